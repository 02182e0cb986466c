"""Tiny zero-shot runs of AnomalyVFM and VisualAD on the shared real data, one table.

    python benchmarks/zero_shot_tiny.py [--methods anomalyvfm visualad] [--out runs/zero_shot_tiny]
        [--data ../shared/data/real] [--seed 0] [--json FILE]

Each method trains with the zero-shot protocol (``edge_ad.train`` = ``edge-ad train --method M ...
--categories mvtec_transistor_256 magnetic_tile``) on a random-init tiny ViT (no pretrained ViT is
available offline: these runs prove that the pipeline learns, not how the real foundation models
perform), then ``edge_ad.evaluate`` scores the run on hazelnut, a category it never saw. Reported:
held-back pixel / image AUROC of the training categories (``train_log.json["holdout"]``: real
test-split images and the fixed synthetic set) and the unseen-category metrics, whatever they are.

The per-method settings below are the documented tiny configurations (docs/ANOMALYVFM.md,
docs/VISUALAD.md). AVA-DINO also needs a CLIP text model directory for its prompt embeddings, so its
tiny run is the command in docs/AVADINO.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

TRAIN_CATEGORIES = ["mvtec_transistor_256", "magnetic_tile"]
UNSEEN = "mvtec_hazelnut_256"

#: Tiny random-init configurations (LayerScale 1.0 so random blocks are not near-identity).
CONFIGS: dict[str, dict] = {
    "anomalyvfm": dict(
        backbone="dinov3_vits16", image_size=128, steps=200, batch_size=8, lr=5e-4, synthetic_fraction=1.0,
        backbone_overrides={"depth": 2, "embed_dim": 64, "num_heads": 2, "patch_size": 8, "init_values": 1.0},
        method_options={"adapter_rank": 8, "upsample_channels": 64, "accumulate": 1},
    ),
    "visualad": dict(
        backbone="dinov2_vits14", image_size=224, steps=200, batch_size=8, lr=0.01, layers=[0, 1, 2, 3],
        backbone_overrides={"depth": 4, "embed_dim": 64, "num_heads": 2, "init_values": 1.0},
        method_options={"key_pos_tokens": 0},
    ),
}


def _fmt(v) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    parser.add_argument("--out", type=Path, default=Path("runs/zero_shot_tiny"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from edge_ad import evaluate, train

    rows, record = [], {}
    for method in args.methods:
        cfg = dict(CONFIGS[method])
        run = args.out / method
        if run.exists():
            shutil.rmtree(run)
        torch.manual_seed(args.seed)
        t0 = time.perf_counter()
        train(method, cfg.pop("backbone"), args.data, None, run, categories=TRAIN_CATEGORIES, pretrained=False,
              seed=args.seed, device="cpu", **cfg)
        seconds = time.perf_counter() - t0
        log = json.loads((run / "train_log.json").read_text())
        hold = log["holdout"]
        report = evaluate(run, args.data, UNSEEN, device="cpu", overlays=0, progress=False)
        m = report["metrics"]
        record[method] = {"holdout": hold, "unseen": m, "seconds": round(seconds, 1), "run": str(run),
                          "loss_first_last": [log["fit"]["losses"][0], log["fit"]["losses"][-1]]}
        rows.append(f"| {method} | {_fmt(hold['real']['pixel_auroc'])} / {_fmt(hold['real']['image_auroc'])} | "
                    f"{_fmt(hold['synthetic']['pixel_auroc'])} / {_fmt(hold['synthetic']['image_auroc'])} | "
                    f"{_fmt(m.get('pixel_auroc'))} / {_fmt(m.get('image_auroc'))} | "
                    f"{log['fit']['losses'][0][1]:.3f} → {log['fit']['losses'][-1][1]:.3f} | {seconds:.0f} |")
    table = "\n".join([
        "| method | held-back real P / I-AUROC | held-back synthetic P / I-AUROC | unseen hazelnut P / I-AUROC | "
        "loss first → last | train s |",
        "|---|---|---|---|---|---|", *rows])
    print(table)
    if args.json:
        args.json.write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
