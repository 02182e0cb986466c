"""INT8 fidelity of the demo's runs: convert each to a target and print the AUROC deltas vs FP32.

    edge-ad demo --out demo_out
    python benchmarks/int8_fidelity.py demo_out --target intel-cpu --data ../shared/data/real

Every run under ``DEMO_OUT/runs/<category>/<method>`` is converted with ``edge_ad.convert`` (INT8,
calibrated on its category's train/good images plus synthetic defects), its fidelity measured on the
category's test split, and one table printed (and written to ``DEMO_OUT/int8_<target>.md``).
``--max-image-drop`` / ``--max-pixel-drop`` (points) make the script exit 1 when a run exceeds them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_out")
    parser.add_argument("--target", default="intel-cpu")
    parser.add_argument("--precision", default="int8")
    parser.add_argument("--data", required=True, help="dataset root holding the categories' test splits")
    parser.add_argument("--synthetic-fraction", type=float, default=None,
                        help="share of synthetic defects in calibration (default: edge_ad's default)")
    parser.add_argument("--tag", default="", help="suffix for the bundle folder and the table file")
    parser.add_argument("--max-image-drop", type=float, default=1.0, help="allowed image AUROC drop, points")
    parser.add_argument("--max-pixel-drop", type=float, default=0.5, help="allowed pixel AUROC drop, points")
    args = parser.parse_args(argv)

    from edge_ad.converters.convert import convert
    from edge_ad.runtime import load_bundle

    demo_out = Path(args.demo_out)
    runs = sorted(p.parent for p in (demo_out / "runs").glob("*/*/model.safetensors"))
    if not runs:
        raise SystemExit(f"no runs under {demo_out / 'runs'}: run `edge-ad demo --out {demo_out}` first")
    lines = [f"| run | I-AUROC fp32 | I-AUROC {args.precision} | Δ | P-AUROC fp32 | P-AUROC {args.precision} | Δ | map Pearson |",
             "|---|---|---|---|---|---|---|---|"]
    failed = False
    for run in runs:
        category, method = run.parent.name, run.name
        bundle = convert(run, args.target, demo_out / "bundles" / f"{args.target}{args.tag}" / category / method,
                         precision=args.precision, val_data=args.data, val_category=category,
                         synthetic_fraction=args.synthetic_fraction)
        fid = load_bundle(bundle).fidelity
        i, p = fid["metrics"]["image_auroc"], fid["metrics"]["pixel_auroc"]
        lines.append(f"| {category} / {method} | {100 * i['reference']:.2f} | {100 * i['candidate']:.2f} | "
                     f"{100 * i['delta']:+.2f} | {100 * p['reference']:.2f} | {100 * p['candidate']:.2f} | "
                     f"{100 * p['delta']:+.2f} | {fid['map']['pearson_r']:.4f} |")
        failed |= -100 * i["delta"] > args.max_image_drop or -100 * p["delta"] > args.max_pixel_drop
    table = "\n".join(lines)
    print(table)
    (demo_out / f"{args.precision}_{args.target}{args.tag}.md").write_text(table + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
