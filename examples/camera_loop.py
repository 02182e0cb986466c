"""A minimal camera loop with the Detector embedded: read, predict, act, show.

    python examples/camera_loop.py BUNDLE [--camera 0] [--roi x,y,w,h] [--no-window]

The simplest integration: your loop owns the camera and calls ``det.predict`` per frame (one
frame in flight; the frame rate is capture + inference). For line-speed streaming with
capture, preprocessing and inference overlapped in threads, use ``det.stream(camera)`` (see
``edge-ad run``). Press q or Esc to quit.
"""
from __future__ import annotations

import argparse
import sys
import time

from edge_ad.runtime import Detector, require_cv2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", help="bundle directory or .tar (edge-ad convert)")
    parser.add_argument("--camera", default="0", help="camera index or /dev/videoN (default 0)")
    parser.add_argument("--roi", default=None, help="crop x,y,w,h (pixels) of every frame")
    parser.add_argument("--no-window", action="store_true", help="print verdicts only (headless)")
    args = parser.parse_args(argv)
    cv2 = require_cv2("read the camera")
    roi = tuple(int(v) for v in args.roi.split(",")) if args.roi else None

    det = Detector.load(args.bundle)
    cam = cv2.VideoCapture(int(args.camera) if args.camera.isdigit() else args.camera)
    if not cam.isOpened():
        print(f"cannot open camera {args.camera}", file=sys.stderr)
        return 1
    try:
        while True:
            ok, frame = cam.read()  # BGR uint8, as Detector.predict expects by default
            if not ok:
                print("camera read failed", file=sys.stderr)
                return 1
            t0 = time.perf_counter()
            res = det.predict(frame, roi=roi)
            ms = (time.perf_counter() - t0) * 1e3
            if res.is_anomalous:
                # Act on the decision here: reject the part, raise a PLC output, log the frame ...
                print(f"DEFECT score={res.score:.2f} regions={[tuple(r[:4]) for r in res.regions or []]} ({ms:.1f} ms)")
            if not args.no_window:
                from edge_ad.runtime.overlay import draw_overlay

                cv2.imshow("edge_ad", draw_overlay(frame, res))
                if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                    break
    finally:
        cam.release()
        if not args.no_window:
            cv2.destroyAllWindows()
    return 0


if __name__ == "__main__":
    sys.exit(main())
