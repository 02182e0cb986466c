"""``edge-ad calibrate BUNDLE --source SRC [--camera NAME] [--target-fpr F] [--pixel-fpr F] [--max-frames N] [--roi X,Y,W,H]
[--full-decode]``.

Runs on the device (torch-free): refits the bundle's image / pixel thresholds on good frames of
this camera and saves them into its manifest (:func:`edge_ad.runtime.calibrate.calibrate_bundle`).
An image folder is decoded exactly as ``edge-ad run`` decodes it (JPEGs at reduced size by default,
``--full-decode`` for bundles streamed with ``edge-ad run --full-decode``); the mode is recorded with the
thresholds and a stream that decodes otherwise warns once.
"""
from __future__ import annotations

import argparse

from ._parse import add_decode_arguments, roi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (extract a .tar first: the thresholds are saved into it)")
    parser.add_argument("--source", required=True,
                        help="good frames: image folder, video file, camera index / device, RTSP URL or GStreamer "
                             "pipeline")
    parser.add_argument("--target-fpr", type=float, default=0.01,
                        help="image false-positive rate allowed on good parts (default 0.01 = 1%%)")
    parser.add_argument("--pixel-fpr", type=float, default=None,
                        help="pixel false-positive rate of the pixel threshold (default: the bundle's, else 0.01)")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="use at most N frames (required for cameras, RTSP and GStreamer sources; default: all)")
    parser.add_argument("--roi", type=roi, default=None, help="crop X,Y,W,H applied to every frame, as in production")
    parser.add_argument("--color-order", choices=("bgr", "rgb", "gray"), default=None,
                        help="channel order of the frames (default: the camera profile's, else bgr: OpenCV sources)")
    parser.add_argument("--camera", default=None,
                        help="fit this camera's profile only (e.g. cam_side; stored in the manifest under "
                             "info.cameras, used by streams whose source has this name); default: the bundle's "
                             "default thresholds")
    add_decode_arguments(
        parser,
        "image folders: decode JPEGs at 1/2, 1/4 or 1/8 size exactly as edge-ad run does by "
        "default (same factor rule, never with --roi), so the thresholds are fitted on the "
        "scores the stream produces (default; recorded in the manifest)",
        "image folders: decode every file at full size, to match streams run with edge-ad run "
        "--full-decode (a stream whose decode differs from the calibrated one warns once)")
    parser.add_argument("--device", default="auto", help="engine device (default: the bundle target's)")
    parser.add_argument("--dry-run", action="store_true", help="fit and print, but do not save the thresholds")


def run(args: argparse.Namespace) -> int:
    from edge_ad.runtime.calibrate import calibrate_bundle

    report = calibrate_bundle(args.bundle, args.source, args.target_fpr, pixel_fpr=args.pixel_fpr, device=args.device,
                              roi=args.roi, color_order=args.color_order, max_frames=args.max_frames,
                              save=not args.dry_run, progress=True, camera=args.camera,
                              reduced_decode=args.reduced_decode)
    t, prev = report.thresholds, report.previous

    def old(value: float | None) -> str:
        return "none" if value is None else f"{value:.4g}"

    who = f" camera {report.camera}" if report.camera else ""
    print(f"calibrated{who} on {report.num_frames} good frames ({t.source}), {report.decode} decode")
    print(f"image threshold: {old(prev.image_threshold if prev else None)} -> {t.image_threshold:.4g} "
          f"(target FPR {t.target_fpr:g}, on these frames {report.image_fpr:.4f})")
    print(f"pixel threshold: {old(prev.pixel_threshold if prev else None)} -> {t.pixel_threshold:.4g} "
          f"(target FPR {t.pixel_fpr:g}, on these frames {report.pixel_fpr:.4f})")
    print("saved to manifest.yaml" if report.saved else "dry run: manifest not changed")
    return 0
