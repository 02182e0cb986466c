"""``edge_ad.evaluate``: metrics table, JSON report and overlays for a run directory."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .overlay import render_overlay, write_png
from .predict import Predictions, predict_dataset

#: Keys of the report's ``metrics`` object, all fractions in 0..1, in table order.
REPORT_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max")


def metrics_from_predictions(pred: Predictions) -> dict[str, float]:
    """Image and pixel metrics of ``pred`` (fractions 0..1)."""
    from edge_ad.metrics import compute_metrics

    has_pixels = bool(pred.masks.any())
    metrics = compute_metrics(
        pred.labels, pred.scores, masks=pred.masks if has_pixels else None, maps=pred.maps if has_pixels else None
    )
    return {k: float(v) for k, v in metrics.items()}


def format_metrics_table(rows: dict[str, dict[str, float]], keys: tuple[str, ...] = REPORT_METRICS) -> str:
    """Markdown table, one row per name, values in percent."""
    header = "| run | " + " | ".join(keys) + " |"
    lines = [header, "|" + "---|" * (len(keys) + 1)]
    for name, metrics in rows.items():
        cells = [f"{100 * metrics[k]:.1f}" if k in metrics else "-" for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_overlays(pred: Predictions, dataset, out_dir: Path, count: int = 4) -> list[str]:
    """Overlays for the ``count`` worst and best cases.

    Worst = anomalous images with the lowest scores and good images with the highest (the misses
    and false alarms an integrator cares about); best = the opposite. One colour scale for all.
    """
    vmin, vmax = np.percentile(pred.maps, [1.0, 99.9])
    signed = np.where(pred.labels == 1, pred.scores, -pred.scores)  # high = correct direction
    z = (signed - signed.mean()) / (signed.std() + 1e-12)
    order = np.argsort(z)
    chosen = [("worst", i) for i in order[:count]] + [("best", i) for i in order[::-1][:count]]
    written = []
    for rank, (kind, i) in enumerate(chosen):
        sample = dataset[int(i)]
        caption = f"{pred.defect_types[i]} score={pred.scores[i]:.3g}"
        img = render_overlay(sample.image, pred.maps[i], sample.mask, vmin=float(vmin), vmax=float(vmax), caption=caption)
        name = f"{kind}_{rank % count}_{pred.defect_types[i]}_{Path(pred.paths[i]).stem}.png"
        write_png(out_dir / name, img)
        written.append(name)
    return written


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    category: str,
    *,
    json_path: str | Path | None = None,
    out: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 8,
    overlays: int = 4,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a trained run on ``data/category``'s test split.

    Args:
        run_dir: a run directory (``model.safetensors`` + ``config.yaml``).
        data: dataset root; ``category`` is a folder in it (MVTec layout).
        json_path: where to write the JSON report (default ``<out>/report.json``).
        out: report folder for overlays and JSON (default ``<run_dir>/eval_<category>``).
        overlays: how many worst and best cases to render (0 disables).

    Returns:
        The report: ``{"run_dir", "category", "num_images", "metrics": {image_auroc, pixel_auroc,
        aupro, pixel_f1_max, ...}, "overlays": [...]}``; metric values are fractions 0..1.
    """
    from edge_ad.data import MVTecDataset
    from edge_ad.methods import load_detector
    from edge_ad.training.device import resolve_device

    run_dir = Path(run_dir)
    out_dir = Path(out) if out is not None else run_dir / f"eval_{category}"
    detector = load_detector(run_dir)
    dataset = MVTecDataset(data, category, split="test")
    dev = resolve_device(device)
    pred = predict_dataset(detector, dataset, detector.preprocess_spec, device=dev, batch_size=batch_size,
                           progress=progress, description=f"evaluate {category}")
    metrics = metrics_from_predictions(pred)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": str(data),
        "category": category,
        "num_images": int(len(pred.labels)),
        "num_anomalous": int(pred.labels.sum()),
        "metrics": metrics,
        "per_image": [
            {"path": p, "defect_type": d, "label": int(l), "score": float(s)}
            for p, d, l, s in zip(pred.paths, pred.defect_types, pred.labels, pred.scores)
        ],
    }
    report["overlays"] = write_overlays(pred, dataset, out_dir / "overlays", overlays) if overlays else []
    json_file = Path(json_path) if json_path is not None else out_dir / "report.json"
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(report, indent=2))
    report["json"] = str(json_file)
    print(format_metrics_table({f"{run_dir.name}/{category}": metrics}))
    return report
