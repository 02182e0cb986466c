"""``edge-ad train --method M --backbone B --data DIR --category CAT --shots K --out RUN_DIR``.

Zero-shot methods train on auxiliary categories instead:
``edge-ad train --method anomalyvfm --backbone B --data ROOT [ROOT ...] --categories C1 C2 --out RUN_DIR``.
"""
from __future__ import annotations

import argparse

from ._parse import image_size, int_list, key_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help="foundad | knn | zero-shot methods (see `edge-ad info`)")
    parser.add_argument("--backbone", required=True, help="backbone registry name, e.g. efficientnet_lite0, dinov3_vitb16")
    parser.add_argument("--weights", default=None, help="local backbone weights (.safetensors/.pth); default: the "
                        "backbone's offline pretrained weights")
    parser.add_argument("--random-init", action="store_true", help="random backbone weights (smoke tests only)")
    parser.add_argument("--image-size", type=image_size, default=None, help="N or HxW pixels, multiple of the stride, or auto:N: about N*N pixels "
                        "with the training frames' median aspect ratio (multiples of 32)")
    parser.add_argument("--layers", type=int_list, default=None, help="backbone layers, e.g. 9 or 2,3")
    parser.add_argument("--data", required=True, nargs="+", help="dataset root (MVTec layout); zero-shot methods "
                        "accept several roots")
    parser.add_argument("--category", default=None, help="category folder inside --data (few-shot / memory methods)")
    parser.add_argument("--categories", nargs="+", default=None, help="zero-shot methods: auxiliary categories to "
                        "train on (default: all in --data)")
    parser.add_argument("--synthetic-fraction", type=float, default=None, help="zero-shot methods: share of each "
                        "batch drawn from good images and given a CutPaste / Perlin anomaly (default 0.5; 1 = "
                        "synthetic only)")
    parser.add_argument("--synthetic-anomaly-prob", type=float, default=1.0, help="zero-shot methods: share of "
                        "those good images given an anomaly; the rest are clean negatives (default 1 = all anomalous)")
    parser.add_argument("--holdout-fraction", type=float, default=0.2, help="zero-shot methods: share of samples "
                        "held back and scored at the end")
    parser.add_argument("--shots", type=int, default=8, help="good images to train on (0: all)")
    parser.add_argument("--out", required=True, help="run directory to write")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (gradient methods)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--resume", action="store_true", help="continue from RUN_DIR/train_state.pt")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on GPU")
    parser.add_argument("--set", dest="method_options", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="method config field, e.g. --set top_k=5 (repeatable)")
    parser.add_argument("--backbone-arg", dest="backbone_overrides", type=key_value, action="append", default=[],
                        metavar="KEY=VALUE", help="backbone constructor argument, e.g. depth=2 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from edge_ad.training import train

    data = args.data[0] if len(args.data) == 1 else args.data
    out = train(
        args.method, args.backbone, data, args.category, args.out,
        categories=args.categories, synthetic_fraction=args.synthetic_fraction,
        synthetic_anomaly_prob=args.synthetic_anomaly_prob,
        holdout_fraction=args.holdout_fraction,
        shots=args.shots or None, weights=args.weights, pretrained=not args.random_init,
        image_size=args.image_size, layers=args.layers, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device, resume=args.resume, amp=args.amp,
        backbone_overrides=dict(args.backbone_overrides), method_options=dict(args.method_options),
    )
    print(f"run written to {out}")
    return 0
