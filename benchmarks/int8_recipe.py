"""Which layers OpenVINO INT8 should keep float: score error, AUROC deltas and engine time per recipe.

    python benchmarks/vs_anomalib.py --data ../shared/data/real --out /tmp/vs
    python benchmarks/int8_recipe.py /tmp/vs --data ../shared/data/real [--methods knn foundad] \
        [--recipes int8-stem float-stem float-depthwise] [--rounds 30] [--json out.json]

For every ``<vs>/<category>/<method>/run`` (the runs ``vs_anomalib.py`` trained: same shots,
weights and size as its table) the run's FP32 ONNX is quantised with
:func:`edge_ad.converters.openvino.convert_openvino` on the calibration set ``edge_ad.convert``
builds (``build_calibration_set(<data>/<category>, count=128, seed=0)``), once per recipe:

* ``int8-stem``: every encoder / projector layer INT8, the stem conv included (the recipe before
  the stem was kept float);
* ``float-stem``: the layer that reads the image stays float (today's default for knn / students);
* ``float-depthwise``: the stem and every depthwise conv stay float (FoundAD's default).

Against the PyTorch FP32 detector it reports, per recipe: image / pixel AUROC deltas on the test
split (points), the mean absolute image-score error on the test split and on the calibration
images (normalised score units; the calibration images include 25 % synthetic defects), and the
INT8 engine time (median of ``--rounds`` interleaved calls on one image, ms; compare within a
category). Nothing is downloaded; the script only reads the runs.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RECIPES: dict[str, dict[str, bool]] = {
    "int8-stem": {"keep_input_layers": False, "quantize_depthwise": True},
    "float-stem": {"keep_input_layers": True, "quantize_depthwise": True},
    "float-depthwise": {"keep_input_layers": True, "quantize_depthwise": False},
}


def measure_run(run: Path, data: Path, category: str, recipes: list[str], rounds: int, work: Path) -> list[dict[str, Any]]:
    """One row per recipe for the run (see the module docstring)."""
    from edge_ad.calibration import build_calibration_set
    from edge_ad.converters.export import export_onnx
    from edge_ad.converters.fidelity import torch_runner
    from edge_ad.converters.openvino import compile_openvino, convert_openvino, openvino_runner
    from edge_ad.data import MVTecDataset
    from edge_ad.data.masks import resize_mask
    from edge_ad.methods import load_detector
    from edge_ad.metrics import image_auroc, pixel_auroc
    from edge_ad.runtime.preprocessing import preprocess_batch

    detector = load_detector(run).eval()
    spec = detector.preprocess_spec
    calib = build_calibration_set(data / category, spec, count=128, seed=0).images
    test = MVTecDataset(data, category, "test")
    items = [test[i] for i in range(len(test))]
    x = preprocess_batch([it.image for it in items], spec, color_order="rgb")
    labels = np.array([it.label for it in items])
    masks = np.stack([resize_mask(np.asarray(it.mask, bool), (spec.height, spec.width)) for it in items])
    reference = torch_runner(detector)
    ref_maps, ref_scores = reference(x)
    _, ref_calib_scores = reference(calib)
    onnx_path = export_onnx(detector, work / "model.onnx", batch_size=1)
    transformer = not detector.backbone.info.name.startswith("efficientnet")
    rows, compiled = [], {}
    for recipe in recipes:
        result = convert_openvino(onnx_path, work / recipe, precision="int8", calibration_images=calib,
                                  transformer=transformer, **RECIPES[recipe])
        run_int8 = openvino_runner(result.xml, precision_hint="f32")
        maps, scores = run_int8(x)
        _, calib_scores = run_int8(calib)
        rows.append({
            "recipe": recipe,
            "float_layers": len(result.quantization["float_layers"]),
            "image_auroc_fp32": 100 * image_auroc(labels, ref_scores),
            "delta_image_auroc": 100 * (image_auroc(labels, scores) - image_auroc(labels, ref_scores)),
            "delta_pixel_auroc": 100 * (pixel_auroc(masks, maps[:, 0]) - pixel_auroc(masks, ref_maps[:, 0])),
            "test_score_error": float(np.abs(scores - ref_scores).mean()),
            "calib_score_error": float(np.abs(calib_scores - ref_calib_scores).mean()),
        })
        compiled[recipe] = compile_openvino(result.xml, precision_hint="f32")
    # Interleaved timing: every recipe sees the same background load.
    frame = x[:1]
    times: dict[str, list[float]] = {r: [] for r in recipes}
    for model in compiled.values():
        for _ in range(5):
            model(frame)
    for _ in range(rounds):
        for recipe, model in compiled.items():
            t0 = time.perf_counter()
            model(frame)
            times[recipe].append(1e3 * (time.perf_counter() - t0))
    for row in rows:
        row["engine_ms"] = statistics.median(times[row["recipe"]])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vs_out", help="--out directory of benchmarks/vs_anomalib.py")
    ap.add_argument("--data", required=True, help="dataset root (MVTec layout) the runs were trained on")
    ap.add_argument("--methods", nargs="+", default=["knn", "foundad"])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    vs_out, data = Path(args.vs_out), Path(args.data)
    runs = sorted((p.parent.parent.parent.name, p.parent.parent.name, p.parent)
                  for p in vs_out.glob("*/*/run/model.safetensors") if p.parent.parent.name in args.methods)
    if not runs:
        raise SystemExit(f"no runs of {args.methods} under {vs_out}: run benchmarks/vs_anomalib.py --out {vs_out} first")
    lines = ["| category | method | recipe | float layers | INT8 ΔI | INT8 ΔP | test score error | calib score error "
             "| engine ms |", "|---|---|---|---|---|---|---|---|---|"]
    everything = []
    for category, method, run in runs:
        with tempfile.TemporaryDirectory(prefix="int8_recipe_") as tmp:
            rows = measure_run(run, data, category, args.recipes, args.rounds, Path(tmp))
        for r in rows:
            everything.append({"category": category, "method": method, **r})
            lines.append(f"| {category} | {method} | {r['recipe']} | {r['float_layers']} | {r['delta_image_auroc']:+.1f} "
                         f"| {r['delta_pixel_auroc']:+.2f} | {r['test_score_error']:.3f} | {r['calib_score_error']:.3f} "
                         f"| {r['engine_ms']:.2f} |")
        print("\n".join(lines[-len(rows):]), flush=True)
    print("\n" + "\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
