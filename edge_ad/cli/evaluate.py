"""``edge-ad evaluate RUN_DIR --data DIR --category CAT [--json FILE]``."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory written by `edge-ad train`")
    parser.add_argument("--data", required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--category", required=True, help="category folder inside --data")
    parser.add_argument("--json", dest="json_path", default=None, help="write the JSON report here")
    parser.add_argument("--out", default=None, help="report folder (default RUN_DIR/eval_CATEGORY)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overlays", type=int, default=4, help="worst and best cases to render (0: none)")


def run(args: argparse.Namespace) -> int:
    from edge_ad.evaluation import evaluate

    evaluate(args.run_dir, args.data, args.category, json_path=args.json_path, out=args.out, device=args.device,
             batch_size=args.batch_size, overlays=args.overlays)
    return 0
