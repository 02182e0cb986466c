"""``edge-ad info``: torch-free environment report."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from edge_ad.info import collect_info, info

    if args.json:
        print(json.dumps(collect_info(), indent=2))
    else:
        info()
    return 0
