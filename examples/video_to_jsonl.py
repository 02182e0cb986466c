"""Stream a video file through a bundle and write one JSON line per frame (plus a final stats line).

    python examples/video_to_jsonl.py BUNDLE line3.mp4 results.jsonl [--roi x,y,w,h]

Every frame is processed (lossless: a file waits for the reader). Each line holds the frame
index, capture timestamps, score, verdict, defect regions (frame pixels) and per-stage timings
(ms); the last line is ``{"stats": ...}``. Torch-free: runs on the device.
"""
from __future__ import annotations

import argparse
import json
import sys

from edge_ad.runtime import Detector
from edge_ad.runtime.stream import result_record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle directory or .tar (edge-ad convert)")
    parser.add_argument("video", help="video file (.mp4, .avi, ...)")
    parser.add_argument("out", help="JSON-lines file to write")
    parser.add_argument("--roi", default=None, help="crop x,y,w,h (pixels) of every frame")
    args = parser.parse_args(argv)
    roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None

    det = Detector.load(args.bundle)
    anomalous = 0
    with open(args.out, "w", encoding="utf-8") as out, det.stream(args.video, lossless=True, roi=roi) as stream:
        for res in stream:
            out.write(json.dumps(result_record(res)) + "\n")
            anomalous += bool(res.is_anomalous)
        stats = stream.stats
        out.write(json.dumps({"stats": stats.to_dict()}) + "\n")
    print(f"{stats.delivered} frames ({anomalous} anomalous, {stats.skipped_total} skipped) -> {args.out} "
          f"at {stats.fps:.1f} fps", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
