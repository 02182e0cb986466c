"""``edge-ad synth OUT --text-to-image DIR --inpaint DIR [...]``: generator-made anomaly data.

Thin wrapper over :func:`edge_ad.synth.generate_dataset` (stages a / b / c, MVTec layout,
``manifest.jsonl``, resumable). torch / diffusers are imported only inside ``run``.
"""
from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output root (MVTec layout: OUT/<object>/{train/good,test/good,test/synthetic,ground_truth})")
    parser.add_argument("--text-to-image", required=True, help="local diffusers text-to-image pipeline folder "
                        "(e.g. FLUX.1-dev saved with save_pretrained)")
    parser.add_argument("--inpaint", required=True, help="local diffusers inpainting pipeline folder (e.g. FLUX.1-Fill-dev)")
    parser.add_argument("--prompts", default=None, help="YAML / JSON prompt file (objects, backgrounds, damages); "
                        "default: the built-in industrial prompt set")
    parser.add_argument("--objects", nargs="+", default=None, help="objects of the prompt set to render (default all)")
    parser.add_argument("--per-object", type=int, default=10, help="samples per object")
    parser.add_argument("--image-size", type=int, default=512, help="generated image side in pixels (multiple of 16)")
    parser.add_argument("--box-size", type=int, nargs=2, default=(50, 300), metavar=("MIN", "MAX"),
                        help="inpainted box side range in pixels")
    parser.add_argument("--threshold", type=float, default=0.3, help="feature cosine-distance threshold of stage (c)")
    parser.add_argument("--steps", type=int, default=28, help="denoising steps")
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: pipeline's)")
    parser.add_argument("--filter-backbone", default="efficientnet_lite0", help="backbone of the stage (c) filter")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"),
                        help="pipeline dtype (bfloat16 for FLUX on a GPU)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="refuse to continue an existing dataset in OUT")


def run(args: argparse.Namespace) -> int:
    import torch

    from edge_ad.synth import generate_dataset

    summary = generate_dataset(
        args.out, args.text_to_image, args.inpaint, prompts=args.prompts, objects=args.objects,
        per_object=args.per_object, image_size=args.image_size, box_size=tuple(args.box_size),
        threshold=args.threshold, steps=args.steps, guidance_scale=args.guidance_scale,
        filter_backbone=args.filter_backbone, seed=args.seed, device=args.device,
        dtype=getattr(torch, args.dtype) if args.dtype else None, resume=args.resume,
    )
    print(json.dumps(summary, indent=2))
    return 0
