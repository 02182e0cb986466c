"""Time and score one trained detector in every format on this machine, in one run.

    python benchmarks/bench_formats.py RUN_DIR --data ../shared/data/real --category mvtec_hazelnut_256 \
        [--formats torch-fp32 ort-fp32 ort-int8 ov-fp32 ov-fp16 ov-int8] [--min-pixel-auroc 0.95]

Formats: PyTorch FP32, onnxruntime FP32 and INT8 (TensorRT-style Q/DQ graph), OpenVINO FP32 / FP16 /
INT8 (NNCF). INT8 is calibrated on the category's train/good images (never its test split). One
table: format, status, size MB, image / pixel AUROC, ms per image (median, batch 1), FPS, speed
ratio to PyTorch. ``--min-image-auroc`` / ``--min-pixel-auroc`` make the script exit 1 when a
format that ran falls below the floor (a CI gate); a format that fails to convert is reported as
such and also fails the gate.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

FORMATS = ("torch-fp32", "ort-fp32", "ort-int8", "ov-fp32", "ov-fp16", "ov-int8")


def _time_per_image(runner, images: np.ndarray, repeats: int) -> float:
    """Median ms of one batch-1 call (after two warm-up calls)."""
    x = images[:1]
    for _ in range(2):
        runner(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _size_mb(paths) -> float:
    return sum(Path(p).stat().st_size for p in paths) / 2**20


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True)
    parser.add_argument("--category", required=True)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--calib-count", type=int, default=64, help="train/good images used for INT8 calibration")
    parser.add_argument("--repeats", type=int, default=30, help="timed batch-1 calls per format")
    parser.add_argument("--min-image-auroc", type=float, default=None)
    parser.add_argument("--min-pixel-auroc", type=float, default=None)
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    parser.add_argument("--work-dir", default=None, help="keep converted models here (default: a temp dir)")
    args = parser.parse_args(argv)

    import torch

    from edge_ad.converters.export import export_onnx
    from edge_ad.converters.fidelity import onnxruntime_runner, torch_runner
    from edge_ad.converters.openvino import convert_openvino, openvino_runner
    from edge_ad.data import MVTecDataset, sample_k_shot
    from edge_ad.methods import load_detector
    from edge_ad.metrics import image_auroc, pixel_auroc
    from edge_ad.runtime import preprocess_batch
    from edge_ad.data.masks import resize_mask

    torch.set_num_threads(max(1, torch.get_num_threads()))
    detector = load_detector(args.run_dir).eval()
    spec = detector.preprocess_spec
    test = MVTecDataset(args.data, args.category, "test")
    x_test = preprocess_batch([s.image for s in test], spec, color_order="rgb")
    labels = np.asarray(test.labels)
    masks = np.stack([resize_mask(s.mask, spec.size) for s in test])
    train = MVTecDataset(args.data, args.category, "train")
    calib_idx = sample_k_shot(len(train), min(args.calib_count, len(train)), seed=1)
    x_calib = preprocess_batch([train[i].image for i in calib_idx], spec, color_order="rgb")
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="edge_ad_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    transformer = not detector.backbone.info.name.startswith("efficientnet")

    onnx_fp32 = work / "model.onnx"
    rows = []
    for fmt in args.formats:
        row = {"format": fmt, "status": "ok", "size_mb": None, "image_auroc": None, "pixel_auroc": None,
               "ms_per_image": None, "fps": None}
        try:
            if fmt == "torch-fp32":
                runner = torch_runner(detector)
                files = []
                size = sum(t.numel() * t.element_size() for t in detector.state_dict().values()) / 2**20
            else:
                if not onnx_fp32.exists():
                    export_onnx(detector, onnx_fp32, batch_size=1)
                if fmt == "ort-fp32":
                    files, runner = [onnx_fp32], onnxruntime_runner(onnx_fp32)
                elif fmt == "ort-int8":
                    from edge_ad.converters.qdq import quantize_qdq

                    qdq = work / "model_qdq.onnx"
                    quantize_qdq(onnx_fp32, qdq, x_calib)
                    files, runner = [qdq], onnxruntime_runner(qdq)
                else:
                    precision = fmt.split("-")[1]
                    res = convert_openvino(onnx_fp32, work / f"openvino_{precision}", precision=precision,
                                           calibration_images=x_calib if precision == "int8" else None,
                                           transformer=transformer)
                    files = [res.xml, res.bin]
                    runner = openvino_runner(res.xml, precision_hint=res.inference_precision_hint)
                size = _size_mb(files)
            maps, scores = runner(x_test)
            row.update(size_mb=round(size, 2), image_auroc=image_auroc(labels, scores),
                       pixel_auroc=pixel_auroc(masks, np.asarray(maps)[:, 0]))
            ms = _time_per_image(runner, x_test, args.repeats)
            row.update(ms_per_image=round(ms, 2), fps=round(1000.0 / ms, 1))
        except Exception as exc:  # a failed format is a row, not a crash: the table is the deliverable
            row["status"] = f"failed: {type(exc).__name__}: {exc}"[:120]
            traceback.print_exc(file=sys.stderr)
        rows.append(row)

    base = next((r["ms_per_image"] for r in rows if r["format"] == "torch-fp32" and r["ms_per_image"]), None)
    header = f"{'format':<11} {'status':<8} {'size MB':>8} {'I-AUROC':>8} {'P-AUROC':>8} {'ms/img':>8} {'FPS':>7} {'vs torch':>8}"
    print(f"\n{args.run_dir} on {args.category} ({len(test)} test images; INT8 calibrated on {len(calib_idx)} "
          f"train/good images)\n" + header)
    failed_gate = False
    for r in rows:
        ratio = f"{base / r['ms_per_image']:.2f}x" if base and r["ms_per_image"] else "-"

        def pct(v):
            return f"{100 * v:.2f}" if v is not None else "-"

        status = "ok" if r["status"] == "ok" else "FAILED"
        print(f"{r['format']:<11} {status:<8} {r['size_mb'] if r['size_mb'] is not None else '-':>8} "
              f"{pct(r['image_auroc']):>8} {pct(r['pixel_auroc']):>8} {r['ms_per_image'] or '-':>8} "
              f"{r['fps'] or '-':>7} {ratio:>8}")
        if r["status"] != "ok":
            print(f"    {r['status']}")
            failed_gate |= args.min_image_auroc is not None or args.min_pixel_auroc is not None
            continue
        if args.min_image_auroc is not None and r["image_auroc"] < args.min_image_auroc:
            failed_gate = True
            print(f"    below --min-image-auroc {args.min_image_auroc}")
        if args.min_pixel_auroc is not None and r["pixel_auroc"] < args.min_pixel_auroc:
            failed_gate = True
            print(f"    below --min-pixel-auroc {args.min_pixel_auroc}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if failed_gate else 0


if __name__ == "__main__":
    sys.exit(main())
