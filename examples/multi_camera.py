"""Four cameras through one detector: video files stand in for the cameras of an inspection cell.

    python examples/multi_camera.py BUNDLE top.mp4 side.mp4 end.mp4 back.mp4 [--line-speed] \
        [--batch-wait-ms 2] [--map-resolution lazy]

Each video becomes a named camera (``cam0`` .. ``cam3``, or ``NAME=PATH``); one capture thread per
camera feeds the detector's shared pipeline round-robin, and each frame is judged by its camera's
profile (``edge-ad calibrate BUNDLE --camera cam1 --source good_frames/``). Prints one line per
anomalous frame and, at the end, a per-camera table (captured = delivered + dropped + skipped).
A static-batch bundle (``edge-ad convert ... --batch 4``) infers frames of several cameras in one
call. Torch-free: runs on the device. See docs/MULTI_CAMERA.md.
"""
from __future__ import annotations

import argparse
import sys

from edge_ad.cli._parse import named_sources
from edge_ad.runtime import Detector


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle directory or .tar (edge-ad convert)")
    parser.add_argument("videos", nargs="+", help="one video file (or NAME=PATH) per camera")
    parser.add_argument("--line-speed", action="store_true",
                        help="drop stale frames as live cameras would (default: every frame, lossless)")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0, help="static-batch bundles: wait for other "
                        "cameras' frames at most this long (ms)")
    parser.add_argument("--map-resolution", choices=("frame", "model", "lazy"), default="lazy",
                        help="lazy (default here): full-resolution maps only when read")
    args = parser.parse_args(argv)

    sources = named_sources(args.videos)
    if not isinstance(sources, dict):  # one unnamed video: still a named camera
        sources = {"cam0": sources}
    det = Detector.load(args.bundle, map_resolution=args.map_resolution)
    with det.stream(sources, lossless=not args.line_speed, batch_wait_ms=args.batch_wait_ms) as stream:
        for res in stream:
            if res.is_anomalous:
                boxes = ", ".join(f"{r.w}x{r.h}@({r.x},{r.y})" for r in (res.regions or [])[:3])
                print(f"{res.source} frame {res.frame_index}: anomalous (score {res.score:.2f}) {boxes}")
    s = stream.stats
    print(f"{'camera':<10}{'captured':>9}{'delivered':>10}{'dropped':>8}{'skipped':>8}{'fps':>8}", file=sys.stderr)
    for name, cs in s.sources.items():
        print(f"{name:<10}{cs.captured:>9}{cs.delivered:>10}{cs.dropped_total:>8}{cs.skipped_total:>8}{cs.fps:>8.1f}",
              file=sys.stderr)
    print(f"{'total':<10}{s.captured:>9}{s.delivered:>10}{s.dropped_total:>8}{s.skipped_total:>8}{s.fps:>8.1f}  "
          f"(batch {s.batch}, fill {s.batch_fill:.2f})", file=sys.stderr)
    return 0 if s.delivered else 1


if __name__ == "__main__":
    sys.exit(main())
