"""``edge-ad convert RUN_DIR --target T [--precision P] [--calib DIR] [--batch N] --out BUNDLE``."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory written by `edge-ad train`")
    parser.add_argument("--target", required=True, help="deployment target (see `edge-ad targets`)")
    parser.add_argument("--precision", default=None, choices=["fp32", "fp16", "int8"],
                        help="default: the target's default precision")
    parser.add_argument("--calib", default=None, help="calibration images: folder, MVTec category folder (train/good "
                        "is used) or video; default: the run's training category")
    parser.add_argument("--calib-count", type=int, default=128)
    parser.add_argument("--synthetic-fraction", type=float, default=None,
                        help="share of synthetic defects in the calibration set")
    parser.add_argument("--val-data", default=None, help="dataset root whose test split measures fidelity")
    parser.add_argument("--val-category", default=None, help="category in --val-data (default: the run's)")
    parser.add_argument("--threshold-fpr", type=float, default=0.01,
                        help="false-positive rate of the stored thresholds (held-out good images)")
    parser.add_argument("--max-map-error", type=float, default=None,
                        help="INT8 fidelity budget (1 - map cosine vs FP32 on the calibration images): a "
                        "sensitivity search keeps the most sensitive blocks in float until it holds")
    parser.add_argument("--quantize-depthwise", action=argparse.BooleanOptionalAction, default=None,
                        help="INT8: quantise (or, with --no-quantize-depthwise, keep float) the depthwise convs of "
                        "CNN backbones; default: OpenVINO follows the method (FoundAD keeps them float), Q/DQ "
                        "ONNX keeps them float")
    parser.add_argument("--batch", type=int, default=1,
                        help="static batch N of the model (OpenVINO, onnxruntime and TensorRT targets; FP32 / FP16 / "
                        "INT8): the runtime gathers up to N frames of different cameras into one engine call "
                        "(docs/MULTI_CAMERA.md); default 1")
    parser.add_argument("--tar", action="store_true", help="write one .tar file")
    parser.add_argument("--out", required=True, help="bundle directory (or .tar with --tar)")
    parser.add_argument("--sign-key", default=None, help="PEM Ed25519 private key: sign the bundle (manifest.sig)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_ad.converters.convert import convert
    from edge_ad.logs import third_party_logs

    # Beside the bundle, not in it: a bundle holds only its listed, hashed artifacts.
    out = Path(args.out)
    with third_party_logs(out.parent / f"{out.name}.convert.log") as log:
        print(f"[convert] NNCF / OpenVINO messages below WARNING go to {log}")
        convert(args.run_dir, args.target, args.out, precision=args.precision, calib=args.calib,
                calib_count=args.calib_count, synthetic_fraction=args.synthetic_fraction, val_data=args.val_data,
                val_category=args.val_category, threshold_fpr=args.threshold_fpr,
                max_map_error=args.max_map_error, tar=args.tar, sign_key=args.sign_key,
                batch=args.batch, quantize_depthwise=args.quantize_depthwise)
    return 0
