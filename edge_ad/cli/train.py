"""``edge-ad train --method M --backbone B --data DIR --category CAT --shots K --out RUN_DIR``.

Zero-shot methods train on auxiliary categories instead:
``edge-ad train --method anomalyvfm --backbone B --data ROOT [ROOT ...] --categories C1 C2 --out RUN_DIR``.

``--preset paper|edge`` fills every unset option with the reference recipe or the CPU-friendly one;
``--print-config`` prints every value the run would use (``edge_ad.training.presets.preset_config``)
and exits.
"""
from __future__ import annotations

import argparse

from ._parse import image_size, int_list, key_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, help="foundad | knn | zero-shot methods (see `edge-ad info`)")
    parser.add_argument("--backbone", default=None, help="backbone registry name, e.g. efficientnet_lite0, "
                        "dinov3_vitb16 (default: the preset's, else the method's)")
    parser.add_argument("--preset", default=None, help="paper: the reference code's recipe; "
                        "edge: CPU-friendly (docs/REPRODUCE.md); explicit options override it")
    parser.add_argument("--print-config", action="store_true", help="print every value the run would use and exit")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop training cleanly at this wall-clock "
                        "budget with a usable, resumable run")
    parser.add_argument("--weights", default=None, help="local backbone weights (.safetensors/.pth); default: the "
                        "backbone's offline pretrained weights")
    parser.add_argument("--random-init", action="store_true", help="random backbone weights (smoke tests only)")
    parser.add_argument("--image-size", type=image_size, default=None, help="N or HxW pixels, multiple of the stride, or auto:N: about N*N pixels "
                        "with the training frames' median aspect ratio (multiples of 32)")
    parser.add_argument("--layers", type=int_list, default=None, help="backbone layers, e.g. 9 or 2,3")
    parser.add_argument("--data", default=None, nargs="+", help="dataset root (MVTec layout); zero-shot methods "
                        "accept several roots (required unless --print-config)")
    parser.add_argument("--category", default=None, help="category folder inside --data (few-shot / memory methods)")
    parser.add_argument("--categories", nargs="+", default=None, help="zero-shot methods: auxiliary categories to "
                        "train on (default: all in --data); foundad: one model for these categories")
    parser.add_argument("--synthetic-fraction", type=float, default=None, help="zero-shot methods: share of each "
                        "batch drawn from good images and given a CutPaste / Perlin anomaly (default 0.5; 1 = "
                        "synthetic only)")
    parser.add_argument("--synthetic-anomaly-prob", type=float, default=None, help="zero-shot methods: share of "
                        "those good images given an anomaly; the rest are clean negatives (default 1 = all anomalous)")
    parser.add_argument("--holdout-fraction", type=float, default=None, help="zero-shot methods: share of samples "
                        "held back and scored at the end (default 0.2)")
    parser.add_argument("--shots", type=int, default=None, help="good images per category to train on (0: all; "
                        "default: the preset's, else 8)")
    parser.add_argument("--out", default=None, help="run directory to write (required unless --print-config)")
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

    if args.print_config:
        import json

        from edge_ad.training.presets import preset_config

        doc = preset_config(args.method, args.preset, backbone=args.backbone,
                            method_options=dict(args.method_options), image_size=args.image_size,
                            layers=args.layers, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            shots=args.shots, synthetic_fraction=args.synthetic_fraction,
                            synthetic_anomaly_prob=args.synthetic_anomaly_prob,
                            holdout_fraction=args.holdout_fraction)
        print(json.dumps(doc, indent=2))
        return 0
    if not args.data or not args.out:
        raise SystemExit("edge-ad train: --data and --out are required (only --print-config runs without them)")
    data = args.data[0] if len(args.data) == 1 else args.data
    out = train(
        args.method, args.backbone, data, args.category, args.out, preset=args.preset,
        categories=args.categories, synthetic_fraction=args.synthetic_fraction,
        synthetic_anomaly_prob=args.synthetic_anomaly_prob,
        holdout_fraction=args.holdout_fraction, max_minutes=args.max_minutes,
        shots=args.shots, weights=args.weights, pretrained=not args.random_init,
        image_size=args.image_size, layers=args.layers, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, device=args.device, resume=args.resume, amp=args.amp,
        backbone_overrides=dict(args.backbone_overrides), method_options=dict(args.method_options),
    )
    print(f"run written to {out}")
    return 0
