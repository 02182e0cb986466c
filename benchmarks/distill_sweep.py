"""Why does a distilled student fail where it fails? One variant per suspected cause, every category.

    .venv/bin/python benchmarks/distill_sweep.py --data ../shared/data/real --work-dir /tmp/edge_ad_sweep \\
        --json docs/distill_sweep.json --markdown docs/distill_sweep.md

Per category: the teacher is ``knn`` on EfficientNet-Lite0 (layers 2+3) at ``--teacher-size`` px
with every good training image and a coreset bank of ``--max-bank-size`` (``WORK/<cat>/teacher``,
reused when present). Each variant distils it with :func:`edge_ad.distill` (or, for the
``knn@student`` reference, retrains the teacher's own method at the student's size) into
``WORK/<cat>/<variant>`` (reused when present), and is scored by
:func:`edge_ad.converters.distill.distillation_fidelity` against the teacher on the category's
test split: retained pixel / image AUROC (student / teacher, both on the same test images) and
the Pearson r of the two normalised maps. The variants, one suspected cause each
(docs/DISTILLATION.md, "Diagnosis"):

* ``regress`` - the old default: conv head regressing the teacher's map from good images and
  synthetic (CutPaste / Perlin) defects, student at ``--student-size``.
* ``regress@teacher`` - resolution: the same at the teacher's input size.
* ``regress-deep`` - capacity: a 4 x 128 head instead of 2 x 64.
* ``regress-good`` - data: no synthetic defects (good patches only).
* ``bank`` - objective + data: feature-level distillation on every patch (MSE), and the map =
  nearest-neighbour distance of the predicted teacher features to a coreset of the teacher's good
  features, both 3x3-aggregated like the knn teacher's (no residual head).
* ``bank-noagg`` - the same without the 3x3 local aggregation of predicted and bank features.
* ``bank+head`` - ``bank`` plus the conv head as a residual correction.
* ``bank-own`` - the bank in the student's own feature space (its aggregated good features),
  gain / offset + residual conv head on the adapter output regress the teacher's map.
* ``bank-lean`` - the default: ``bank-own`` without the residual head (no adapter in the graph;
  the teacher sets the bank term's gain / offset and trains the image-score head).
* ``bank-lean@192`` - the default at 192 px (speed margin over a 320 px teacher).
* ``knn@student`` - reference, not a distillation: the teacher's method refitted at the
  student's size on the student's backbone (what resolution alone costs).

Writes a JSON with every number and a markdown table. Nothing is edited by hand.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEFAULT_CATEGORIES = ("mvtec_hazelnut_256", "mvtec_transistor_256", "magnetic_tile", "bsdata_pitting")

#: variant -> (student image size: "student" | "teacher" | pixels, StudentConfig options).
VARIANTS: dict[str, tuple[str | int, dict[str, Any]]] = {
    # The old default: cosine feature term (weight 0.5), 2 x 64 head.
    "regress": ("student", {"map_head": "regress", "feature_loss": "cosine", "feature_weight": 0.5}),
    "regress@teacher": ("teacher", {"map_head": "regress", "feature_loss": "cosine", "feature_weight": 0.5}),
    "regress-deep": ("student", {"map_head": "regress", "feature_loss": "cosine", "feature_weight": 0.5,
                                 "head_depth": 4, "head_dim": 128}),
    "regress-good": ("student", {"map_head": "regress", "feature_loss": "cosine", "feature_weight": 0.5,
                                 "synthetic_fraction": 0.0}),
    "bank-noagg": ("student", {"map_head": "bank", "bank_space": "teacher", "head_depth": 0, "feature_loss": "mse", "feature_weight": 1.0,
                               "local_aggregation": 1}),
    "bank": ("student", {"map_head": "bank", "bank_space": "teacher", "head_depth": 0, "feature_loss": "mse", "feature_weight": 1.0}),
    "bank+head": ("student", {"map_head": "bank", "bank_space": "teacher", "head_depth": 2, "feature_loss": "mse", "feature_weight": 1.0}),
    "bank-own": ("student", {"map_head": "bank", "bank_space": "student", "head_depth": 2, "feature_loss": "mse",
                             "feature_weight": 1.0}),
    "bank-lean": ("student", {"map_head": "bank", "bank_space": "student", "head_depth": 0}),
    "bank-lean@192": (192, {"map_head": "bank", "bank_space": "student", "head_depth": 0}),
    "knn@student": ("student", {}),
}


def run_variant(args: argparse.Namespace, category: str, variant: str) -> dict[str, Any]:
    """Distil (or refit) one variant unless its run exists; score it against the teacher."""
    from edge_ad.converters.distill import distill, distillation_fidelity, retained_fidelity
    from edge_ad.methods import load_detector
    from edge_ad.training import train

    data = Path(args.data)
    work = Path(args.work_dir) / category
    teacher_dir, out = work / "teacher", work / variant
    size_kind, options = VARIANTS[variant]
    size = size_kind if isinstance(size_kind, int) else args.teacher_size if size_kind == "teacher" else args.student_size
    seconds = None
    if not (out / "model.safetensors").exists():
        t0 = time.perf_counter()
        if variant == "knn@student":
            train("knn", "efficientnet_lite0", data, category, out, shots=0, image_size=size, layers=[2, 3],
                  progress=False, method_options={"max_bank_size": args.max_bank_size})
        else:
            opts = {"synthetic_pool": args.synthetic_pool, **options}
            distill(teacher_dir, "efficientnet_lite0", data, category, out, image_size=size, layers=[2, 3],
                    steps=args.steps, progress=False, fidelity=False, student_options=opts)
        seconds = round(time.perf_counter() - t0, 1)
    teacher, student = load_detector(teacher_dir).eval(), load_detector(out).eval()
    v = retained_fidelity(distillation_fidelity(teacher, student, data, category), None, teacher.image_size)
    row = {"category": category, "variant": variant, "input_size": size, "options": options, "seconds": seconds,
           "map_pearson_r": v["map_pearson_r"]}
    for name in ("pixel_auroc", "image_auroc"):
        if name in v:
            row[name] = v[name]
    return row


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    seen = set(r["category"] for r in rows)
    cats = [c for c in args.categories if c in seen] + sorted(seen - set(args.categories))
    by = {(r["category"], r["variant"]): r for r in rows}
    head = "| variant | " + " | ".join(cats) + " | min |"
    lines = [f"Teacher: knn (bank {args.max_bank_size}) on EfficientNet-Lite0 layers 2+3 at {args.teacher_size} px; "
             f"students on EfficientNet-Lite0 layers 2+3, {args.steps} steps, synthetic pool {args.synthetic_pool}. "
             "Cell = retained pixel AUROC % (student / teacher) / retained image AUROC % / map Pearson r.", "",
             head, "|---|" + "---|" * (len(cats) + 1)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        cells, worst = [], []
        for c in cats:
            r = by.get((c, variant))
            if r is None:
                cells.append("-")
                continue
            p = r["pixel_auroc"]["retained"] * 100
            i = r.get("image_auroc", {}).get("retained", float("nan")) * 100
            worst.append(p)
            cells.append(f"{p:.1f} / {i:.1f} / {r['map_pearson_r']:.2f}")
        size = next(r["input_size"] for r in rows if r["variant"] == variant)
        lines.append(f"| {variant} ({size} px) | " + " | ".join(cells) + f" | {min(worst):.1f} |")
    lines.append("")
    lines.append("Teacher AUROC (pixel / image): " + ", ".join(
        f"{c} {by[(c, v)]['pixel_auroc']['teacher']:.4f} / {by[(c, v)].get('image_auroc', {}).get('teacher', float('nan')):.4f}"
        for c in cats for v in [next(r["variant"] for r in rows if r["category"] == c)]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data")
    ap.add_argument("--work-dir")
    ap.add_argument("--categories", nargs="+", default=list(DEFAULT_CATEGORIES))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--teacher-size", type=int, default=320)
    ap.add_argument("--student-size", type=int, default=224)
    ap.add_argument("--max-bank-size", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--synthetic-pool", type=int, default=240)
    ap.add_argument("--json")
    ap.add_argument("--markdown")
    ap.add_argument("--collect", nargs="+", metavar="JSON",
                    help="no runs: one table from the rows of earlier --json files (later files win)")
    args = ap.parse_args(argv)

    if args.collect:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for path in args.collect:
            doc = json.loads(Path(path).read_text())
            for row in doc["rows"]:
                merged[(row["category"], row["variant"])] = row
        order = {c: i for i, c in enumerate(args.categories)}
        vorder = {v: i for i, v in enumerate(VARIANTS)}
        rows = sorted(merged.values(), key=lambda r: (vorder.get(r["variant"], 99), order.get(r["category"], 99)))
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        table = markdown(rows, args)
        if args.markdown:
            Path(args.markdown).write_text(table)
        print(table)
        return 0

    if not (args.data and args.work_dir):
        ap.error("--data and --work-dir are required (except with --collect)")
    from edge_ad.training import train

    rows: list[dict[str, Any]] = []
    for category in args.categories:
        teacher_dir = Path(args.work_dir) / category / "teacher"
        if not (teacher_dir / "model.safetensors").exists():
            train("knn", "efficientnet_lite0", args.data, category, teacher_dir, shots=0, image_size=args.teacher_size,
                  layers=[2, 3], progress=False, method_options={"max_bank_size": args.max_bank_size})
        for variant in args.variants:
            row = run_variant(args, category, variant)
            rows.append(row)
            ia = row.get("image_auroc", {}).get("retained", float("nan"))
            print(f"{category:22s} {variant:16s} pixel {row['pixel_auroc']['retained']:.1%} image {ia:.1%} "
                  f"r {row['map_pearson_r']:.3f} ({row['seconds']} s)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(markdown(rows, args))
    print(markdown(rows, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
