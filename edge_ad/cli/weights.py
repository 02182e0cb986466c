"""``edge-ad weights inspect PATH``, ``edge-ad weights convert PATH --backbone NAME --out FILE`` and
``edge-ad weights clip-text PATH --out DIR``.

PATH is a local weights file or Hugging Face snapshot folder; nothing is downloaded. Thin
wrappers over ``edge_ad.backbones.inspection.inspect_weights`` / ``convert_weights`` and
``edge_ad.backbones.clip_text.convert_clip_text``.
"""
from __future__ import annotations

import argparse
import json

from ._parse import image_size, key_value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="weights_command", metavar="{inspect,convert,clip-text}", required=True)
    inspect = sub.add_parser("inspect", help="layout, architecture, sha256 and the --backbone to use",
                             description="layout, architecture, sha256 and the --backbone to use")
    inspect.add_argument("path", help="weights file (.safetensors/.pth/.bin/.pth.tar) or snapshot folder")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.add_argument("--no-hash", dest="sha256", action="store_false", help="skip the sha256")
    convert = sub.add_parser("convert", help="one normalised timm-layout .safetensors for a backbone",
                             description="one normalised timm-layout .safetensors for a backbone")
    convert.add_argument("path", help="weights file or snapshot folder, any supported layout")
    convert.add_argument("--backbone", required=True, help="backbone registry name, e.g. dinov3_vitb16")
    convert.add_argument("--out", required=True, help="output .safetensors file")
    convert.add_argument("--image-size", type=image_size, default=None,
                         help="N or HxW; default the checkpoint's native size (pos embed kept unresampled)")
    convert.add_argument("--backbone-arg", dest="backbone_overrides", type=key_value, action="append", default=[],
                         metavar="KEY=VALUE", help="backbone constructor argument, e.g. depth=2 (repeatable)")
    text = sub.add_parser("clip-text", help="CLIP text tower (OpenAI .pt, open_clip, CLIPModel) -> a "
                          "CLIPTextModelWithProjection folder for AVA-DINO",
                          description="CLIP text tower -> a transformers CLIPTextModelWithProjection folder")
    text.add_argument("path", help="OpenAI / open_clip checkpoint or transformers CLIP snapshot folder")
    text.add_argument("--out", required=True, help="folder to write config.json + model.safetensors into")
    text.add_argument("--tokenizer-from", default=None, help="Hugging Face CLIP snapshot folder whose tokenizer "
                      "files are copied next to the weights")


def run(args: argparse.Namespace) -> int:
    from edge_ad.backbones.inspection import convert_weights, inspect_weights

    if args.weights_command == "clip-text":
        from edge_ad.backbones.clip_text import convert_clip_text

        print(f"wrote {convert_clip_text(args.path, args.out, tokenizer_from=args.tokenizer_from)}")
        return 0
    if args.weights_command == "inspect":
        report = inspect_weights(args.path, sha256=args.sha256)
        print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
        return 0
    out = convert_weights(args.path, args.backbone, args.out, img_size=args.image_size,
                          **dict(args.backbone_overrides))
    print(f"wrote {out}")
    print(inspect_weights(out).format())
    return 0
