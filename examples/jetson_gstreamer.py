"""Jetson CSI camera (nvarguscamerasrc) through GStreamer into a line-speed stream.

    python3 examples/jetson_gstreamer.py BUNDLE [--sensor-id 0] [--width 1920 --height 1080 --fps 30]
                                                [--jsonl results.jsonl] [--max-frames N]

The pipeline converts NVMM frames to BGR on the VIC (nvvidconv) and hands the newest one to
OpenCV (``appsink drop=true max-buffers=1``), so a slow consumer never queues stale frames in
GStreamer either. Needs an OpenCV built with GStreamer: JetPack's system OpenCV
(``python3-opencv``), not a pip ``opencv-python`` wheel (check ``edge-ad info``). Stop with Ctrl-C:
the stream shuts its threads down cleanly and prints its stats.
"""
from __future__ import annotations

import argparse
import json
import sys


def pipeline(sensor_id: int, width: int, height: int, fps: int) -> str:
    """The nvarguscamerasrc -> BGR appsink pipeline string."""
    return (
        f"nvarguscamerasrc sensor-id={sensor_id} ! "
        f"video/x-raw(memory:NVMM),width={width},height={height},framerate={fps}/1,format=NV12 ! "
        "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
        "appsink drop=true max-buffers=1"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle directory or .tar (edge-ad convert for a Jetson target)")
    parser.add_argument("--sensor-id", type=int, default=0)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--jsonl", default=None, help="write one JSON line per frame")
    parser.add_argument("--max-frames", type=int, default=None)
    args = parser.parse_args(argv)

    from edge_ad.runtime import Detector
    from edge_ad.runtime.stream import result_record

    det = Detector.load(args.bundle)
    out = open(args.jsonl, "w", encoding="utf-8") if args.jsonl else None
    stream = det.stream(pipeline(args.sensor_id, args.width, args.height, args.fps), lossless=False,
                        max_frames=args.max_frames)
    try:
        with stream:
            for res in stream:
                if out is not None:
                    out.write(json.dumps(result_record(res)) + "\n")
                if res.is_anomalous:
                    print(f"frame {res.frame_index}: DEFECT score={res.score:.2f} "
                          f"latency={res.timings['capture_to_decision']:.1f} ms")
    except KeyboardInterrupt:
        pass
    finally:
        if out is not None:
            out.close()
    print(json.dumps(stream.stats.to_dict(), indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
