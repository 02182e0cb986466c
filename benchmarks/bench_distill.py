"""Teacher vs distilled student on real images: accuracy (``edge_ad.evaluate``) and speed.

    .venv/bin/python benchmarks/bench_distill.py --data ../shared/data/real \
        --categories mvtec_hazelnut_256 magnetic_tile --work-dir /tmp/edge_ad_distill \
        --json docs/distill_bench.json --markdown docs/distill_bench.md

Per category: trains the teacher (``edge_ad.train``: knn on EfficientNet-Lite0, layers 2+3, at
``--teacher-size`` px, all good training images, coreset bank of ``--max-bank-size``) unless ``WORK/<cat>/teacher`` exists, distils it
(``edge_ad.converters.distill``) into a student (EfficientNet-Lite0 at ``--student-size`` px)
unless ``WORK/<cat>/student`` exists, evaluates both on the test split (image / pixel AUROC,
AUPRO), then times both, batch 1, as PyTorch FP32 modules and as exported FP32 ONNX graphs in
onnxruntime (preprocessing included), and the student as an ``intel-cpu`` INT8 bundle
(``edge_ad.convert``) run by :class:`edge_ad.runtime.Detector` (``--no-int8`` skips it). Timing alternates teacher and student calls so that load from other
processes hits both alike; medians in ms per image; ``speedup = teacher / student``.

Writes a JSON with every number and a markdown table (the README's). Reported as measured: the
script never edits numbers, and ``retained_pixel_auroc`` = student / teacher pixel AUROC.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _paired_median_ms(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median wall ms per call of each function, calls interleaved (A, B, A, B, ...) after 2 warm-ups."""
    for fn in fns.values():
        fn()
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _torch_call(run_dir: Path, frame: np.ndarray) -> Callable[[], Any]:
    import torch

    from edge_ad.methods import load_detector
    from edge_ad.runtime.preprocessing import preprocess_batch

    det = load_detector(run_dir)
    x = torch.from_numpy(preprocess_batch([frame], det.preprocess_spec, color_order="rgb"))

    def call() -> Any:
        with torch.no_grad():
            return det(x)

    return call


def _onnx_call(run_dir: Path, out: Path, frame: np.ndarray) -> Callable[[], Any]:
    """Preprocessing + onnxruntime CPU session of the exported FP32 graph, per frame (uint8 RGB).

    The graph is exported without the converter's strict torch-vs-onnxruntime gate: the knn teacher
    at 320 px fails it by a few 1e-3 normalised map units (float rounding of the distance matmul),
    which does not matter for timing; both models are timed the same way.
    """
    from edge_ad.converters.export import export_onnx
    from edge_ad.converters.fidelity import onnxruntime_runner
    from edge_ad.methods import load_detector
    from edge_ad.runtime.preprocessing import preprocess_batch

    det = load_detector(run_dir)
    spec = det.preprocess_spec
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        export_onnx(det, out, batch_size=1)
    runner = onnxruntime_runner(out)
    return lambda: runner(preprocess_batch([frame], spec, color_order="rgb"))


def _bundle_call(run_dir: Path, target: str, precision: str, out: Path, data: Path, category: str,
                 frame_bgr: np.ndarray) -> Callable[[], Any]:
    """A converted bundle (``edge_ad.convert``) run by :class:`edge_ad.runtime.Detector`, per frame (BGR)."""
    from edge_ad.converters.convert import convert
    from edge_ad.runtime import Detector

    if not out.exists():
        convert(run_dir, target, out, precision=precision, calib=data / category, calib_count=32,
                val_data=data, val_category=category, progress=False)
    det = Detector.load(out, regions=False)
    return lambda: det.predict(frame_bgr)


def bench_category(args: argparse.Namespace, category: str) -> dict[str, Any]:
    from edge_ad.converters import distill
    from edge_ad.data import MVTecDataset
    from edge_ad.evaluation import evaluate
    from edge_ad.methods.checkpoint import load_checkpoint_config
    from edge_ad.training import train

    work = Path(args.work_dir) / category
    data = Path(args.data)
    teacher_dir, student_dir = work / "teacher", work / "student"
    row: dict[str, Any] = {"category": category}
    if not (teacher_dir / "model.safetensors").exists():
        t0 = time.perf_counter()
        train("knn", "efficientnet_lite0", data, category, teacher_dir, shots=0, image_size=args.teacher_size,
              layers=[2, 3], device=args.device, progress=True,
              method_options={"max_bank_size": args.max_bank_size})
        row["teacher_train_s"] = round(time.perf_counter() - t0, 1)
    if not (student_dir / "model.safetensors").exists():
        t0 = time.perf_counter()
        distill(teacher_dir, "efficientnet_lite0", data, category, student_dir, image_size=args.student_size,
                layers=[2, 3], steps=args.steps, batch_size=args.batch_size, device=args.device,
                resume=(student_dir / "train_state.pt").exists(), progress=True,
                student_options={"synthetic_pool": args.synthetic_pool})
        row["distill_s"] = round(time.perf_counter() - t0, 1)
    for who, run in (("teacher", teacher_dir), ("student", student_dir)):
        rep = evaluate(run, data, category, device=args.device, overlays=0, progress=False)
        row[who] = {k: rep["metrics"][k] for k in ("image_auroc", "pixel_auroc", "aupro") if k in rep["metrics"]}
        row[who]["input_size"] = args.teacher_size if who == "teacher" else args.student_size
    student_cfg = load_checkpoint_config(student_dir)["config"]  # what the run actually used
    row["student_steps"], row["synthetic_pool"] = student_cfg["steps"], student_cfg["synthetic_pool"]
    fid = json.loads((student_dir / "fidelity.json").read_text())
    row["map_pearson_r"] = fid["map"]["pearson_r"]
    row["score_spearman_r"] = fid["score"]["spearman_r"]
    row["retained_pixel_auroc"] = row["student"]["pixel_auroc"] / row["teacher"]["pixel_auroc"]
    row["retained_image_auroc"] = row["student"]["image_auroc"] / row["teacher"]["image_auroc"]

    frame = MVTecDataset(data, category, "test")[0].image  # uint8 RGB
    bgr = np.ascontiguousarray(frame[..., ::-1])
    torch_ms = _paired_median_ms({"teacher": _torch_call(teacher_dir, frame),
                                  "student": _torch_call(student_dir, frame)}, args.repeats)
    onnx_ms = _paired_median_ms({
        "teacher": _onnx_call(teacher_dir, work / "onnx" / "teacher.onnx", frame),
        "student": _onnx_call(student_dir, work / "onnx" / "student.onnx", frame),
    }, args.repeats)
    row["ms"] = {"pytorch": torch_ms, "onnxruntime-fp32": onnx_ms}
    if args.int8:
        int8 = _paired_median_ms({"student": _bundle_call(student_dir, "intel-cpu", "int8", work / "student_int8",
                                                          data, category, bgr)}, args.repeats)
        row["ms"]["student-intel-cpu-int8"] = int8["student"]
    row["speedup"] = {k: v["teacher"] / v["student"] for k, v in row["ms"].items() if isinstance(v, dict)}
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Teacher: knn (bank {args.max_bank_size}) on EfficientNet-Lite0 (layers 2+3) at {args.teacher_size} px; student: `student` on "
        f"EfficientNet-Lite0 (layers 2+3) at {args.student_size} px, batch {args.batch_size}. "
        "ms = median per image incl. preprocessing, batch 1, this machine's CPU; INT8 = student as an "
        "intel-cpu INT8 bundle run by Detector.",
        "",
        "| category | teacher pixel AUROC | student pixel AUROC | retained | teacher image AUROC | student image AUROC "
        "| map r | steps / pool | PyTorch ms T / S (x) | onnxruntime ms T / S (x) | student INT8 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, s = r["teacher"], r["student"]
        pt, ox = r["ms"]["pytorch"], r["ms"]["onnxruntime-fp32"]
        lines.append(
            f"| {r['category']} | {t['pixel_auroc']:.4f} | {s['pixel_auroc']:.4f} | {100 * r['retained_pixel_auroc']:.2f} % "
            f"| {t['image_auroc']:.4f} | {s['image_auroc']:.4f} | {r['map_pearson_r']:.3f} "
            f"| {r['student_steps']} / {r['synthetic_pool']} "
            f"| {pt['teacher']:.1f} / {pt['student']:.1f} ({r['speedup']['pytorch']:.2f}x) "
            f"| {ox['teacher']:.1f} / {ox['student']:.1f} ({r['speedup']['onnxruntime-fp32']:.2f}x) "
            f"| {r['ms'].get('student-intel-cpu-int8', float('nan')):.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--categories", nargs="+", default=["mvtec_hazelnut_256", "magnetic_tile"])
    parser.add_argument("--work-dir", required=True, help="runs and bundles are written (and reused) here")
    parser.add_argument("--teacher-size", type=int, default=320)
    parser.add_argument("--student-size", type=int, default=224)
    parser.add_argument("--max-bank-size", type=int, default=1000, help="teacher knn memory bank cap (coreset)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--synthetic-pool", type=int, default=400,
                        help="synthetic anomalies made once with cached teacher targets (0 = fresh every step)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model (interleaved)")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the student's intel-cpu INT8 bundle (conversion takes minutes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)

    import torch

    rows = [bench_category(args, c) for c in args.categories]
    result = {"rows": rows, "settings": {k: v for k, v in vars(args).items()},
              "torch_threads": torch.get_num_threads()}
    table = markdown(rows, args)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
