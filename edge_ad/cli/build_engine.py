"""``edge-ad build-engine BUNDLE [--workspace-mb N] [--dla-core K] [--timing-cache FILE] [--fp32-layers P] [--force]``.

Runs on the device (torch-free): builds the TensorRT engine of a TensorRT bundle into its
``engines/`` folder, or reuses the one already built there for this device, TensorRT and options.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from edge_ad.converters.tensorrt import FP32_PRESETS  # torch- and TensorRT-free

    parser.add_argument("bundle", help="bundle directory written by `edge-ad convert` for a TensorRT target")
    parser.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit in MiB (default 1024)")
    parser.add_argument("--dla-core", type=int, default=None,
                        help="Jetson DLA core to build for (targets with DLA only); default: the GPU")
    parser.add_argument("--timing-cache", default=None,
                        help="tactic timing cache file, loaded if present and saved after the build")
    parser.add_argument("--fp32-layers", default=None, choices=list(FP32_PRESETS),
                        help="FP32 islands of FP16 / INT8 engines (default: 'default' on the GPU, 'none' on DLA); "
                             "'no-softmax' lets TensorRT fuse FP16 attention. See docs/JETSON.md")
    parser.add_argument("--force", action="store_true", help="rebuild even when a matching engine is cached")


def run(args: argparse.Namespace) -> int:
    # edge_ad.converters.engine imports neither torch nor TensorRT at import time.
    from edge_ad.converters.engine import _build

    path, built = _build(args.bundle, workspace_mb=args.workspace_mb, dla_core=args.dla_core,
                         timing_cache=args.timing_cache, force=args.force, device=None,
                         fp32_layers=args.fp32_layers)
    print(f"{'built' if built else 'reused cached'} engine: {path}")
    return 0
