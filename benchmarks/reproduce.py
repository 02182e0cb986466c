"""Reproduce a seed method's paper table with its ``paper`` preset, and print the paper's figure beside ours.

    python benchmarks/reproduce.py METHOD --data ROOT [--train-data AUX_ROOT] [--benchmark mvtec|visa]
        [--weights BACKBONE_FILE] [--text-model CLIP_DIR] [--categories C ...] [--shots K] [--steps N]
        [--out DIR] [--json FILE]
    python benchmarks/reproduce.py METHOD --tiny [--data ../shared/data/real] [--text-model CLIP_DIR]

* ``foundad`` (few-shot, one model for every category): trains ``edge_ad.train(..., preset="paper")``
  on ``--data`` (1 shot per category unless ``--shots``) and evaluates each category's test split.
* ``anomalyvfm``, ``visualad``, ``avadino`` (zero-shot): train on ``--train-data`` (the auxiliary
  dataset: VisA to test on MVTec, MVTec to test on VisA; AnomalyVFM: its generated dataset) and
  evaluate every category of ``--data``, which the model never saw.

Each category is scored with ``edge_ad.evaluate``; the table prints the mean over categories next
to the paper's number (docs/REPRODUCE.md lists the commands, GPUs and hours).

``--tiny`` runs the same pipeline with random-init tiny backbones (1 block, 32 wide), 2 steps and
small inputs on the shared real data, so CI checks it end to end without weights; its numbers
mean nothing. AVA-DINO needs a local CLIP text model (``--text-model``) in every mode.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

#: The papers' headline numbers (percent; mean over categories), per benchmark and metric.
#: Sources: ../shared/papers/*.txt (FoundAD: 1-shot row; AnomalyVFM / VisualAD: image AUROC table;
#: AVA-DINO: the MVTec-AD sentence of its results section). None = not reported there.
PAPER: dict[str, dict[str, dict[str, float | None]]] = {
    "foundad": {"mvtec": {"image_auroc": 96.1, "aupro": 92.8}, "visa": {"image_auroc": 92.6, "aupro": 98.0}},
    "anomalyvfm": {"mvtec": {"image_auroc": 94.9}, "visa": {"image_auroc": 93.6}},
    "visualad": {"mvtec": {"image_auroc": 92.2}, "visa": {"image_auroc": 84.7}},
    "avadino": {"mvtec": {"image_auroc": 93.5, "pixel_auroc": 92.1}, "visa": {}},
}
METRICS = ("image_auroc", "pixel_auroc", "aupro")

#: --tiny: random-init backbones small enough for CI (image sizes are multiples of each patch).
TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2, "init_values": 1.0}
TINY: dict[str, dict[str, Any]] = {
    "foundad": {"image_size": 64, "layers": [0], "overrides": {**TINY_VIT, "patch_size": 8},
                "options": {"projector_dim": 16, "projector_depth": 1, "projector_heads": 2}},
    "anomalyvfm": {"image_size": 64, "layers": [0], "overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2,
                                                                  "patch_size": 8},
                   "options": {"adapter_rank": 4, "upsample_channels": 32, "norm_groups": 8, "accumulate": 1}},
    "visualad": {"image_size": 56, "layers": [0], "overrides": {"depth": 1, "embed_dim": 32, "num_heads": 2},
                 "options": {"key_pos_tokens": 0}},
    "avadino": {"image_size": 64, "layers": [0], "overrides": {**TINY_VIT, "patch_size": 8},
                "options": {"bottleneck": 16}},
}
TINY_TRAIN = ["mvtec_transistor_256", "magnetic_tile"]
TINY_EVAL = ["mvtec_hazelnut_256"]


def _text_dim(text_model: str) -> int:
    """Projection width of a local CLIP text model (its ``config.json``)."""
    config = json.loads((Path(text_model) / "config.json").read_text())
    return int(config.get("projection_dim") or config["text_config"]["projection_dim"])


def reproduce(method: str, data: Path, *, train_data: Path | None = None, benchmark: str = "mvtec",
              weights: str | None = None, text_model: str | None = None, categories: list[str] | None = None,
              shots: int | None = None, steps: int | None = None, out: Path = Path("runs/reproduce"),
              tiny: bool = False, device: str = "auto") -> dict[str, Any]:
    """Train ``method`` with its paper preset, evaluate every target category, compare with the paper.

    Returns:
        ``{"method", "benchmark", "tiny", "categories": {cat: metrics}, "mean": {...}, "paper": {...},
        "train_seconds"}`` (metrics as fractions 0..1, paper numbers in percent).
    """
    from edge_ad import evaluate, train
    from edge_ad.data.mvtec import list_categories
    from edge_ad.methods import get_method

    zero_shot = get_method(method).fit_mode == "supervised"
    kwargs: dict[str, Any] = {"preset": "paper", "device": device, "progress": not tiny, "weights": weights}
    options: dict[str, Any] = {}
    if method == "avadino":
        if not text_model:
            raise SystemExit("avadino needs --text-model (a local CLIP folder) for its prompt embeddings")
        options["text_model"] = text_model
    if tiny:
        t = TINY[method]
        kwargs.update(image_size=t["image_size"], layers=t["layers"], steps=2, batch_size=4, pretrained=False,
                      backbone_overrides=t["overrides"])
        options.update(t["options"])
        if method == "avadino":
            options["text_dim"] = _text_dim(text_model)
    if shots is not None:
        kwargs["shots"] = shots
    if steps is not None:
        kwargs["steps"] = steps
    kwargs["method_options"] = options
    run = out / method
    if run.exists():
        import shutil

        shutil.rmtree(run)
    t0 = time.perf_counter()
    if zero_shot:
        aux_root = train_data or data
        aux = TINY_TRAIN if tiny else None
        targets = categories or (TINY_EVAL if tiny else list_categories(data))
        train(method, None, aux_root, None, run, categories=aux, **kwargs)
    else:
        targets = categories or (TINY_TRAIN + TINY_EVAL if tiny else list_categories(data))
        train(method, None, data, None, run, categories=targets, **kwargs)
    seconds = round(time.perf_counter() - t0, 1)
    rows: dict[str, dict[str, float]] = {}
    for c in targets:
        if method == "avadino":
            from edge_ad.methods.avadino import set_class_name

            set_class_name(run, c.replace("_", " "), text_model=text_model, out=out / f"{method}_{c}")
            report = evaluate(out / f"{method}_{c}", data, c, overlays=0, progress=False, device=device)
        else:
            report = evaluate(run, data, c, overlays=0, progress=False, device=device)
        rows[c] = {k: report["metrics"].get(k) for k in METRICS}
    mean = {k: (sum(r[k] for r in rows.values() if r[k] is not None) / max(1, sum(r[k] is not None
                                                                                 for r in rows.values())))
            for k in METRICS}
    return {"method": method, "benchmark": benchmark, "tiny": tiny, "categories": rows, "mean": mean,
            "paper": PAPER[method].get(benchmark, {}), "train_seconds": seconds}


def format_table(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table (ours: mean over categories, percent)."""
    lines = [f"{result['method']} on {result['benchmark']} ({len(result['categories'])} categories"
             + (", TINY random-init settings: numbers are not comparable" if result["tiny"] else "") + ")",
             "| metric | paper | ours |", "|---|---|---|"]
    for k in METRICS:
        paper = result["paper"].get(k)
        ours = result["mean"].get(k)
        lines.append(f"| {k} | {'–' if paper is None else f'{paper:.1f}'} | {'–' if ours is None else f'{100 * ours:.1f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(PAPER))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real",
                        help="evaluation dataset root (MVTec layout); FoundAD also trains on it")
    parser.add_argument("--train-data", type=Path, default=None, help="zero-shot methods: auxiliary dataset root")
    parser.add_argument("--benchmark", choices=("mvtec", "visa"), default="mvtec", help="which paper figure to show")
    parser.add_argument("--weights", default=None, help="local backbone weights file")
    parser.add_argument("--text-model", default=None, help="avadino: local CLIP folder")
    parser.add_argument("--categories", nargs="+", default=None, help="evaluation categories (default: all)")
    parser.add_argument("--shots", type=int, default=None, help="foundad: shots per category (paper: 1, 2, 4)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's steps (e.g. VisualAD "
                        "VisA -> MVTec: 1 epoch = 271)")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="random-init tiny settings (CI, no weights)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = reproduce(args.method, args.data, train_data=args.train_data, benchmark=args.benchmark,
                       weights=args.weights, text_model=args.text_model, categories=args.categories,
                       shots=args.shots, steps=args.steps, out=args.out, tiny=args.tiny, device=args.device)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
