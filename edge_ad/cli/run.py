"""``edge-ad run BUNDLE --source SRC [--source NAME=SRC ...] [--batch-wait-ms M] [--show] [--save out.mp4]
[--jsonl results.jsonl] [--lossless] [--max-frames N] [--device D] [--full-decode] [--engine-threads N]``:
stream a bundle over a camera / video / folder / URL / pipeline, or several named cameras at once
(``--source cam_top=0 --source cam_side=rtsp://...``: one detector, per-camera profiles, docs/MULTI_CAMERA.md).

Thin wrapper over :func:`edge_ad.runtime.stream.run_stream`; torch-free.
"""
from __future__ import annotations

import argparse
import sys

from ._parse import add_decode_arguments, engine_threads, named_sources, roi


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory or .tar written by `edge-ad convert`")
    parser.add_argument("--source", required=True, action="append",
                        help="camera index (0) or /dev/videoN, video file, image folder, rtsp:// URL, or a GStreamer "
                             "pipeline ending in appsink (quote it); NAME=SRC names a camera (its profile in the "
                             "bundle); repeat for several cameras through one detector")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0,
                        help="static-batch bundles: how long an engine call waits for other cameras' frames (2 ms)")
    add_decode_arguments(
        parser,
        "image folders: decode JPEGs at 1/2, 1/4 or 1/8 size when that keeps the model input's "
        "size (default; results stay in the file's pixels, decode_scale records the factor; "
        "never with --roi)",
        "image folders: decode every file at full size (scores exactly as predict on the file; "
        "calibrate its thresholds with edge-ad calibrate --full-decode, else a warning says "
        "the decodes differ)")
    parser.add_argument("--engine-threads", type=engine_threads, default=None, metavar="N|auto",
                        help="the engine's CPU inference threads (OpenVINO INFERENCE_NUM_THREADS, onnxruntime "
                             "intra_op_num_threads), 1..usable cores, or auto (default: the measured budget, "
                             "docs/MULTI_CAMERA.md); the other cores go to the stream's preprocessing")
    parser.add_argument("--show", action="store_true", help="show frames with the anomaly overlay (q / Esc quits)")
    parser.add_argument("--save", default=None, help="write overlaid frames to this video (.mp4 or .avi)")
    parser.add_argument("--jsonl", default=None, help="write one JSON object per frame, then a final stats line")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--lossless", dest="lossless", action="store_true", default=None,
                      help="process every frame (default for files / folders)")
    mode.add_argument("--line-speed", dest="lossless", action="store_false",
                      help="drop stale frames to keep latency bounded (default for cameras / URLs / pipelines)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after N frames read from the source")
    parser.add_argument("--device", default="auto", help="engine device (CPU, GPU, NPU, CUDA); default: the bundle's")
    parser.add_argument("--roi", type=roi, default=None, help="crop x,y,w,h (pixels) of every frame")
    parser.add_argument("--color-order", default="bgr", choices=("bgr", "rgb", "gray"),
                        help="channel order of the source's frames (OpenCV sources: bgr)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verify-key", default=None,
                        help="PEM Ed25519 public key: refuse the bundle unless it is signed with its private key")


def run(args: argparse.Namespace) -> int:
    import json

    from edge_ad.runtime.stream import run_stream

    from edge_ad.runtime import load_bundle

    source = named_sources(args.source)
    bundle = load_bundle(args.bundle, verify_key=args.verify_key) if args.verify_key else args.bundle
    stats = run_stream(bundle, source, show=args.show, save=args.save, jsonl=args.jsonl, lossless=args.lossless,
                       max_frames=args.max_frames, device=args.device, roi=args.roi, color_order=args.color_order,
                       progress=not args.no_progress, batch_wait_ms=args.batch_wait_ms,
                       reduced_decode=args.reduced_decode, engine_threads=args.engine_threads)
    keys = ("source", "mode", "captured", "delivered", "dropped", "skipped", "fps")
    d = stats.to_dict()
    summary = {k: d[k] for k in keys}
    if len(stats.sources) > 1:
        summary["sources"] = {name: {k: v for k, v in s.items() if k in keys[2:]} for name, s in d["sources"].items()}
        summary["batch_fill"] = round(stats.batch_fill, 3)
    print(json.dumps(summary), file=sys.stderr)
    if stats.delivered == 0:  # nothing was inspected: a wrong ROI / colour order must not look like success
        print(f"edge-ad run: error: {stats.no_result_reason()}", file=sys.stderr)
        return 1
    return 0
