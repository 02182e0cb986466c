"""FoundAD: one category-agnostic model for several categories vs one model per category.

    python benchmarks/foundad_multicategory.py [--data ../shared/data/real] [--steps 30] [--shots 8]
        [--preset edge] [--image-size N] [--out runs/foundad_multicategory] [--json FILE]

Trains ``edge_ad.train("foundad", ..., categories=[...])`` (= ``edge-ad train --method foundad
--categories C1 C2 C3``: the paper's protocol, one model for all categories) and one model per
category with the same preset, steps and shots, then scores every category's test split with
``edge_ad.evaluate`` and prints one table (pixel / image AUROC per category, both models).
The steps are the caller's: on a shared 2-core CPU keep them small and state them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

CATEGORIES = ["mvtec_hazelnut_256", "mvtec_transistor_256", "magnetic_tile"]


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    parser.add_argument("--categories", nargs="+", default=CATEGORIES)
    parser.add_argument("--preset", default="edge")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/foundad_multicategory"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from edge_ad import evaluate, train

    common = dict(preset=args.preset, steps=args.steps, shots=args.shots, seed=args.seed, image_size=args.image_size,
                  progress=False)
    runs: dict[str, tuple[Path, list[str]]] = {"multi": (args.out / "multi", list(args.categories))}
    for c in args.categories:
        runs[c] = (args.out / f"single_{c}", [c])
    rows: dict[str, dict[str, dict]] = {c: {} for c in args.categories}
    seconds: dict[str, float] = {}
    for name, (run, cats) in runs.items():
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.perf_counter()
        train("foundad", None, args.data, None, run, categories=cats, **common)
        seconds[name] = round(time.perf_counter() - t0, 1)
        for c in cats:
            report = evaluate(run, args.data, c, overlays=0, progress=False)
            rows[c]["multi" if name == "multi" else "single"] = report["metrics"]
    print(f"\nFoundAD, preset {args.preset}, {args.steps} steps, {args.shots} shots per category, seed {args.seed}, "
          f"image size {args.image_size or 'preset'}")
    print("| category | pixel AUROC one model (3 categories) | pixel AUROC per-category model | "
          "image AUROC one model | image AUROC per-category model |")
    print("|---|---|---|---|---|")
    for c, r in rows.items():
        print(f"| {c} | {_fmt(r['multi'].get('pixel_auroc'))} | {_fmt(r['single'].get('pixel_auroc'))} | "
              f"{_fmt(r['multi'].get('image_auroc'))} | {_fmt(r['single'].get('image_auroc'))} |")
    print(f"train seconds: {seconds}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
                                         "seconds": seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
