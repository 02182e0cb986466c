"""``edge-ad distill RUN_DIR --student BACKBONE [--image-size N] --data DIR --category CAT
[--synthetic-fraction F] [--min-retained F] --out RUN_DIR``: teacher run -> small student run (torch
imported in run()).

Exit status: 0 = written (and, with ``--min-retained``, at or above the floor); 3 = written but the
student keeps less of the teacher's AUROC than the floor (one line on stderr names the numbers and
the fix); 2 = bad input, nothing trained."""
from __future__ import annotations

import argparse
import sys

from ._parse import int_list, key_value, pixel_size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the trained teacher's run directory")
    parser.add_argument("--student", required=True, help="student backbone registry name, e.g. efficientnet_lite0, "
                        "dinov3_vits16, dinov2_vits14")
    parser.add_argument("--image-size", type=pixel_size, default=None, help="student input N or HxW pixels")
    parser.add_argument("--layers", type=int_list, default=None, help="student backbone layers, e.g. 2,3")
    parser.add_argument("--data", required=True, help="dataset root (MVTec layout)")
    parser.add_argument("--category", required=True, help="category folder inside --data")
    parser.add_argument("--synthetic-fraction", type=float, default=None,
                        help="share of training samples with a synthetic anomaly (default 0.5)")
    parser.add_argument("--out", required=True, help="student run directory to write")
    parser.add_argument("--min-retained", type=float, default=None, metavar="F",
                        help="floor on student/teacher pixel and image AUROC on the test split, e.g. 0.97: below it the run is "
                        "still written but the command exits 3 (default: report only)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default 300)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on GPU")
    parser.add_argument("--student-weights", default=None, help="local student backbone weights (.safetensors/.pth)")
    parser.add_argument("--random-init", action="store_true", help="random student backbone (smoke tests only)")
    parser.add_argument("--set", dest="student_options", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="student config field, e.g. --set head_dim=96 (repeatable)")
    parser.add_argument("--backbone-arg", dest="student_overrides", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="student backbone constructor argument, e.g. depth=2 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from edge_ad.converters.distill import DistillationBelowFloorError, distill

    try:
        out = distill(
            args.run_dir, args.student, args.data, args.category, args.out,
            image_size=args.image_size, layers=args.layers, synthetic_fraction=args.synthetic_fraction,
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=args.device,
            resume=args.resume, amp=args.amp, student_weights=args.student_weights,
            student_pretrained=not args.random_init, student_overrides=dict(args.student_overrides),
            student_options=dict(args.student_options), min_retained=args.min_retained,
        )
    except DistillationBelowFloorError as exc:
        print(f"edge-ad distill: {exc}", file=sys.stderr)
        return 3
    print(f"student run written to {out}")
    return 0
