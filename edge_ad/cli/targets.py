"""``edge-ad targets``: the deployment targets registry (torch-free: it runs on the device)."""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the registry as JSON")


def format_table(rows: list[dict]) -> str:
    """A plain-text table of target dicts (``Target.to_dict``); the default precision is starred."""
    header = ["target", "engine", "device", "precisions", "DLA", "OV hint", "description"]
    lines = [header]
    for r in rows:
        precisions = ",".join(p + ("*" if p == r["default_precision"] else "") for p in r["precisions"])
        lines.append([
            r["name"], r["engine"], r["device"], precisions, "yes" if r["dla"] else "-",
            r["openvino_hint"] or "-", r["description"],
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    out = []
    for line in lines:
        cells = [cell.ljust(w) for cell, w in zip(line, widths)] + [line[-1]]
        out.append("  ".join(cells).rstrip())
    out.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    out.append("* = default precision; INT8 is opt-in and needs a calibration set.")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    # The runtime's registry (not edge_ad.converters): converters' package may import torch.
    from edge_ad.runtime.targets import get_target, list_targets

    rows = [get_target(name).to_dict() for name in list_targets()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_table(rows))
    return 0
