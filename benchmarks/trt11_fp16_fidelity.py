"""Fidelity of the FP16 ONNX a TensorRT 11 (strongly typed) FP16 engine is built from.

    python benchmarks/trt11_fp16_fidelity.py RUN_DIR --data ../shared/data/real --category C [--out table.md]

Converts the run for ``x86-tensorrt`` (FP32 ONNX + manifest), converts that ONNX to FP16 with each
FP32-island preset (:func:`edge_ad.converters.fp16.convert_fp16`, what ``edge-ad build-engine``
does on TensorRT >= 11), runs FP32 and FP16 in onnxruntime (CPU) on the category's test split and
prints map max error, map Pearson r and the image / pixel AUROC deltas (FP16 - FP32) per preset.
This checks the ONNX conversion, not TensorRT's kernels (no GPU here).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def fp16_fidelity_table(run_dir: str | Path, data: str | Path, category: str,
                        presets: tuple[str, ...] = ("default", "no-softmax", "none")) -> str:
    """Markdown table: one row per FP32-island preset, FP16 ONNX vs FP32 ONNX on the test split."""
    from edge_ad.converters.convert import convert
    from edge_ad.converters.fp16 import fp16_fidelity
    from edge_ad.data import MVTecDataset
    from edge_ad.runtime import load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = convert(run_dir, "x86-tensorrt", Path(tmp) / "bundle", precision="fp16", calib_count=8,
                             progress=False)
        bundle = load_bundle(bundle_dir)
        dataset = MVTecDataset(data, category, "test")
        rows = fp16_fidelity(bundle.path("model.onnx"), dataset, bundle.preprocess_spec, tmp, presets=presets)
    lines = [f"FP16 ONNX (TensorRT 11 path) vs FP32 ONNX, onnxruntime CPU, {category} test split "
             f"({len(dataset)} images)", "",
             "| FP32 islands | FP32 nodes | casts | map max abs err (% of map range) | map Pearson r | I-AUROC Δ | "
             "P-AUROC Δ |", "|---|---|---|---|---|---|---|"]
    for preset, conv, report in rows:
        m = report.metrics
        span = report.map["reference_max"] - report.map["reference_min"]
        lines.append(f"| {preset} | {len(conv.fp32_nodes)} | {conv.casts} | {report.map['max_abs_error']:.3g} "
                     f"({100 * report.map['max_abs_error'] / span:.2f} %) | "
                     f"{report.map['pearson_r']:.6f} | {100 * m['image_auroc']['delta']:+.3f} pt | "
                     f"{100 * m['pixel_auroc']['delta']:+.3f} pt |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--category", required=True, help="category whose test split is compared")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    table = fp16_fidelity_table(args.run_dir, args.data, args.category)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
