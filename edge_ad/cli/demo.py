"""``edge-ad demo``: the end-to-end demo (few-shot FoundAD + knn on real images -> INT8 bundle -> runtime + benchmark)."""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="dataset root (default: ../shared/data/real, else a generated sample)")
    parser.add_argument("--out", default="demo_out", help="report folder (default: demo_out)")
    parser.add_argument("--categories", nargs="+", default=None, help="category folders inside --data")
    parser.add_argument("--methods", nargs="+", default=["foundad", "knn"])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--steps", type=int, default=100, help="FoundAD optimiser steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-deploy", dest="deploy", action="store_false",
                        help="skip converting the first run to an intel-cpu INT8 bundle, streaming and benchmarking it")
    parser.add_argument("--benchmark-iterations", type=int, default=100)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edge_ad.demo import demo
    from edge_ad.logs import third_party_logs

    with third_party_logs(Path(args.out) / "demo.log") as log:
        print(f"[demo] NNCF / OpenVINO messages below WARNING go to {log}")
        demo(args.data, args.out, categories=args.categories, methods=tuple(args.methods), backbone=args.backbone,
             image_size=args.image_size, shots=args.shots, steps=args.steps, seed=args.seed, device=args.device,
             deploy=args.deploy, benchmark_iterations=args.benchmark_iterations)
    return 0
