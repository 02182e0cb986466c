"""Teacher vs distilled student on real images: retained AUROC and INT8 speed, every category.

    .venv/bin/python benchmarks/bench_distill.py --data ../shared/data/real --work-dir /tmp/edge_ad_distill \
        --json /tmp/edge_ad_distill/result.json --markdown /tmp/edge_ad_distill/result.md

Per category: trains the teacher (``edge_ad.train``: knn on EfficientNet-Lite0, layers 2+3, at
``--teacher-size`` px, all good training images, coreset bank of ``--max-bank-size``) unless
``WORK/<cat>/teacher`` exists, distils it (``edge_ad.distill`` at its defaults, EfficientNet-Lite0
student at ``--student-size`` px, ``--steps``, ``--synthetic-pool``) unless
``WORK/<cat>/<--student-name>`` exists (so runs of ``benchmarks/distill_sweep.py`` in the same work
dir are reused), scores both with distill's own fidelity report (teacher and student on every
test image; ``retained`` = student / teacher AUROC, the number ``--min-retained`` gates on), then
converts both to ``intel-cpu`` INT8 bundles (``edge_ad.convert``, calibrated on the category's good
images) and times them, batch 1: the engine alone on a preprocessed input, and end to end through
:class:`edge_ad.runtime.Detector` on the category's first test frame (preprocessing from the
file's size and the map at frame size included: a cost the student's size does not change);
teacher and student calls alternate so background load hits both alike; medians in ms per frame;
``speedup = teacher / student``. ``--fp32-timing`` adds PyTorch and FP32 ONNX
(onnxruntime) timings.

Writes a JSON with every number and a markdown table (the README's). Reported as measured: the
script never edits numbers.
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
        # Timing only: what INT8 costs in accuracy is convert's fidelity report's job (README
        # "INT8 conversion cost"), not repeated here.
        convert(run_dir, target, out, precision=precision, calib=data / category, calib_count=32, progress=False)
    det = Detector.load(out, regions=False)
    return lambda: det.predict(frame_bgr)


def _engine_call(bundle: Path, frame_bgr: np.ndarray) -> Callable[[], Any]:
    """The bundle's engine alone on an input already preprocessed into its slot (no pre/post)."""
    from edge_ad.runtime import Detector

    det = Detector.load(bundle, regions=False)
    det.predict(frame_bgr)  # fills slot 0 with the preprocessed frame

    def call() -> Any:
        det.engine.start(0, 1)
        return det.engine.wait(0)

    return call


def bench_category(args: argparse.Namespace, category: str) -> dict[str, Any]:
    from edge_ad.converters import distill
    from edge_ad.converters.distill import distillation_fidelity, retained_fidelity
    from edge_ad.data import MVTecDataset
    from edge_ad.methods import load_detector
    from edge_ad.methods.checkpoint import load_checkpoint_config
    from edge_ad.training import train

    work = Path(args.work_dir) / category
    data = Path(args.data)
    teacher_dir, student_dir = work / "teacher", work / args.student_name
    row: dict[str, Any] = {"category": category}
    if not (teacher_dir / "model.safetensors").exists():
        t0 = time.perf_counter()
        train("knn", "efficientnet_lite0", data, category, teacher_dir, shots=0, image_size=args.teacher_size,
              layers=[2, 3], device=args.device, progress=True,
              method_options={"max_bank_size": args.max_bank_size})
        row["teacher_train_s"] = round(time.perf_counter() - t0, 1)
    if not (student_dir / "model.safetensors").exists():
        t0 = time.perf_counter()
        # Everything else at distill's defaults: the table measures what a user gets.
        distill(teacher_dir, "efficientnet_lite0", data, category, student_dir, image_size=args.student_size,
                layers=[2, 3], steps=args.steps, device=args.device,
                resume=(student_dir / "train_state.pt").exists(), progress=True, fidelity=False,
                student_options={"synthetic_pool": args.synthetic_pool})
        row["distill_s"] = round(time.perf_counter() - t0, 1)
    teacher, student = load_detector(teacher_dir).eval(), load_detector(student_dir).eval()
    # The gate's numbers: both models on the same test images (distill's fidelity report).
    verdict = retained_fidelity(distillation_fidelity(teacher, student, data, category), None, teacher.image_size)
    for name in ("pixel_auroc", "image_auroc"):
        row[name] = verdict[name]
    row["map_pearson_r"] = verdict["map_pearson_r"]
    cfg = load_checkpoint_config(student_dir)["config"]  # what the run actually used
    row["student_steps"], row["synthetic_pool"], row["map_head"] = cfg["steps"], cfg["synthetic_pool"], cfg["map_head"]
    row["teacher_size"], row["student_size"] = list(teacher.image_size), list(student.image_size)

    frame = MVTecDataset(data, category, "test")[0].image  # uint8 RGB
    bgr = np.ascontiguousarray(frame[..., ::-1])
    row["ms"] = {}
    if args.fp32_timing:
        row["ms"]["pytorch"] = _paired_median_ms({"teacher": _torch_call(teacher_dir, frame),
                                                  "student": _torch_call(student_dir, frame)}, args.repeats)
        row["ms"]["onnxruntime-fp32"] = _paired_median_ms({
            "teacher": _onnx_call(teacher_dir, work / "onnx" / "teacher.onnx", frame),
            "student": _onnx_call(student_dir, work / "onnx" / f"{args.student_name}.onnx", frame),
        }, args.repeats)
    if args.int8:
        row["ms"]["intel-cpu-int8"] = _paired_median_ms({
            "teacher": _bundle_call(teacher_dir, "intel-cpu", "int8", work / "teacher_int8", data, category, bgr),
            "student": _bundle_call(student_dir, "intel-cpu", "int8", work / f"{args.student_name}_int8", data,
                                    category, bgr),
        }, args.repeats)
        row["ms"]["intel-cpu-int8-engine"] = _paired_median_ms({
            "teacher": _engine_call(work / "teacher_int8", bgr),
            "student": _engine_call(work / f"{args.student_name}_int8", bgr),
        }, args.repeats)
        row["frame_size"] = list(frame.shape[:2])
    row["speedup"] = {k: v["teacher"] / v["student"] for k, v in row["ms"].items()}
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"Teacher: knn (bank {args.max_bank_size}) on EfficientNet-Lite0 (layers 2+3) at {args.teacher_size} px; student: "
        f"`student` (distill defaults) on EfficientNet-Lite0 (layers 2+3) at {args.student_size} px. AUROC: both models on "
        "every test image (distill's fidelity report; retained = student / teacher). INT8 = intel-cpu INT8 bundles, "
        "batch 1, medians, teacher and student interleaved: engine = the compiled model on a preprocessed input; "
        "end-to-end = Detector.predict on the category's first test frame (BGR, its file size), preprocessing "
        "and the map at frame size included.",
        "",
        "| category | map head | teacher / student pixel AUROC | retained | teacher / student image AUROC | retained "
        "| map r | steps / pool | INT8 engine ms T / S (speed-up) | INT8 end-to-end ms T / S (speed-up), frame |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, i = r["pixel_auroc"], r["image_auroc"]
        def speed(key: str) -> str:
            ms = r["ms"].get(key)
            return f"{ms['teacher']:.1f} / {ms['student']:.1f} ({r['speedup'][key]:.2f}x)" if ms else "-"

        frame = "x".join(str(v) for v in r.get("frame_size", []))
        lines.append(
            f"| {r['category']} | {r['map_head']} | {p['teacher']:.4f} / {p['student']:.4f} | {100 * p['retained']:.1f} % "
            f"| {i['teacher']:.4f} / {i['student']:.4f} | {100 * i['retained']:.1f} % | {r['map_pearson_r']:.3f} "
            f"| {r['student_steps']} / {r['synthetic_pool']} | {speed('intel-cpu-int8-engine')} "
            f"| {speed('intel-cpu-int8')}, {frame} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--categories", nargs="+",
                        default=["mvtec_hazelnut_256", "mvtec_transistor_256", "magnetic_tile", "bsdata_pitting"])
    parser.add_argument("--work-dir", required=True, help="runs and bundles are written (and reused) here")
    parser.add_argument("--teacher-size", type=int, default=320)
    parser.add_argument("--student-size", type=int, default=224)
    parser.add_argument("--max-bank-size", type=int, default=1000, help="teacher knn memory bank cap (coreset)")
    parser.add_argument("--student-name", default="student",
                        help="student run folder under WORK/<category> (reused when it exists)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--synthetic-pool", type=int, default=240,
                        help="synthetic anomalies made once with cached teacher targets (0 = fresh every step)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per model (interleaved)")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the intel-cpu INT8 bundles (conversion takes minutes)")
    parser.add_argument("--fp32-timing", action="store_true",
                        help="also time both models as PyTorch modules and FP32 ONNX graphs (onnxruntime)")
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
