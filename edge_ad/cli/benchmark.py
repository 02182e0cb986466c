"""``edge-ad benchmark BUNDLE [--source SRC] [--sources N] [--batch-wait-ms M] [--warmup N] [--iterations N]
[--json FILE] [--device D] [--engine-threads N] [--full-decode]``.

Per-stage latency percentiles, end-to-end streaming FPS next to the bare engine's, capture-to-
decision p99, drops, peak RSS and device facts. Thin wrapper over
:func:`edge_ad.runtime.benchmark.benchmark`; torch-free.
"""
from __future__ import annotations

import argparse

from ._parse import add_decode_arguments, engine_threads, pixel_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory or .tar written by `edge-ad convert`")
    parser.add_argument("--source", default=None,
                        help="video / image folder / camera / URL to stream (default: synthetic frames in memory)")
    parser.add_argument("--warmup", type=int, default=20, help="warm-up engine calls / results not measured (20)")
    parser.add_argument("--iterations", type=int, default=200, help="measured engine calls and stream frames (200)")
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    parser.add_argument("--device", default="auto", help="engine device (CPU, GPU, NPU, CUDA); default: the bundle's")
    parser.add_argument("--sources", type=int, default=1,
                        help="stream N cameras at once through one detector, each a copy of --source (cycled) or "
                             "synthetic; prints per-camera FPS and capture-to-decision p50/p99 (default 1)")
    parser.add_argument("--batch-wait-ms", type=float, default=2.0,
                        help="static-batch bundles: how long an engine call waits for other cameras' frames (2 ms)")
    parser.add_argument("--map-resolution", choices=("frame", "model", "lazy"), default="frame",
                        help="Result maps: frame (default), model, or lazy (made on first access; regions at model "
                             "resolution)")
    add_decode_arguments(
        parser,
        "image folders: decode JPEGs at 1/2, 1/4 or 1/8 size when that keeps the model input's "
        "size (default; results stay in the file's pixels, decode_scale records the factor)",
        "image folders: decode every file at full size (scores exactly as predict on the file)")
    parser.add_argument("--engine-threads", type=engine_threads, default=None, metavar="N|auto",
                        help="the engine's CPU inference threads (OpenVINO INFERENCE_NUM_THREADS, onnxruntime "
                             "intra_op_num_threads), 1..usable cores, or auto (default: the measured budget, "
                             "docs/MULTI_CAMERA.md); the other cores go to the stream's preprocessing")
    parser.add_argument("--frame-size", type=pixel_size, default=(480, 640),
                        help="HxW of the synthetic frames (default 480x640)")


def run(args: argparse.Namespace) -> int:
    from edge_ad.runtime.benchmark import benchmark, format_report

    size = args.frame_size
    size = (size, size) if isinstance(size, int) else size
    source = int(args.source) if args.source is not None and args.source.isdigit() else args.source
    report = benchmark(args.bundle, source, warmup=args.warmup, iterations=args.iterations, device=args.device,
                       json_path=args.json, frame_size=size, sources=args.sources,
                       batch_wait_ms=args.batch_wait_ms, map_resolution=args.map_resolution,
                       reduced_decode=args.reduced_decode, engine_threads=args.engine_threads)
    print(format_report(report))
    return 0
