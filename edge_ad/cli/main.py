"""The ``edge-ad`` command line.

Every verb is a thin wrapper over a public Python function with the same arguments, and each
verb's module is imported only when that verb runs, so runtime verbs (``info``, later ``run``,
``benchmark``, ``calibrate``) start fast and never import torch.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

from .._version import __version__

# verb -> (module under edge_ad.cli, one-line help). Modules expose add_arguments(parser) and run(args).
VERBS: dict[str, tuple[str, str]] = {
    "info": ("info", "versions, engines, C++ extension and CPU features (torch-free)"),
    "demo": ("demo", "end-to-end demo: few-shot FoundAD and knn on real images, metrics and overlays"),
    "train": ("train", "train / fit a detector on the good images of one category"),
    "evaluate": ("evaluate", "metrics, JSON report and overlays of a run on a test split"),
    "targets": ("targets", "deployment targets: engine, device, precisions, DLA, OpenVINO hint (torch-free)"),
    "convert": ("convert", "run directory -> deployment bundle for a target (ONNX, OpenVINO, TensorRT Q/DQ)"),
    "build-engine": ("build_engine", "build / reuse the TensorRT engine of a bundle on the device (torch-free)"),
    "run": ("run", "stream a bundle over a camera / video / folder / URL / pipeline: JSONL, overlay video (torch-free)"),
    "benchmark": ("benchmark", "per-stage latency, streaming vs bare-engine FPS, RSS and device facts (torch-free)"),
    "distill": ("distill", "teacher run -> small student run that reproduces its maps and scores (knowledge distillation)"),
    "calibrate": ("calibrate", "refit a bundle's thresholds on this camera's good frames, saved to its manifest (torch-free)"),
    "weights": ("weights", "inspect a foundation-model checkpoint (layout, size, --backbone) or convert it to one timm-layout file"),
    "synth": ("synth", "generator-made anomaly data (text-to-image, inpainting, feature filter) in MVTec layout"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-ad",
        description="edge_ad: visual anomaly detection with foundation models, from training to the edge.",
    )
    parser.add_argument("--version", action="version", version=f"edge-ad {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb, (module_name, help_text) in VERBS.items():
        verb_parser = sub.add_parser(verb, help=help_text, description=help_text)
        verb_parser.set_defaults(_module=module_name)
        # Only the chosen verb's module is imported (see main); here we need its arguments, which
        # live in small torch-free modules.
        importlib.import_module(f"edge_ad.cli.{module_name}").add_arguments(verb_parser)
    return parser


_NEGATIVE_VALUE = re.compile(r"^-\d[\d.,]*$")


def join_negative_values(argv: Sequence[str]) -> list[str]:
    """``--roi -1,0,10,10`` -> ``--roi=-1,0,10,10``: argparse takes a value starting with ``-`` for an option.

    Only ``--long`` options without ``=`` followed by a number-like token (digits, ``.``, ``,``)
    are joined; no verb has negative positional arguments.
    """
    out: list[str] = []
    for token in argv:
        prev = out[-1] if out else ""
        if _NEGATIVE_VALUE.match(token) and prev.startswith("--") and "=" not in prev:
            out[-1] = f"{prev}={token}"
        else:
            out.append(token)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    if args.verb is None:
        parser.print_help()
        return 0
    module = importlib.import_module(f"edge_ad.cli.{args._module}")
    try:
        result = module.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, OSError, ImportError, RuntimeError) as exc:
        # User-facing errors carry their fix in the message; a traceback would bury it.
        print(f"edge-ad {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
