"""Real-size check of the checkpoint loaders: transformers reference at the real architecture
(random weights, LayerScale 1.0), saved as a sharded snapshot folder, loaded through
``build_backbone(weights=folder)`` at each method's size and layers, features compared.

    .venv/bin/python benchmarks/weights_real_size.py [--only dinov3_vitb16 ...] [--out report.json]

Prints, per backbone, the largest relative error (max |a - b| / max |b|) over the method's layers'
patch maps and the CLS token. The tests run the same comparison on small configs; this is the
once-per-change proof at the real sizes (minutes on a CPU, ~6 GB of memory for a ViT-L).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

# backbone -> (transformers class, config kwargs, final norm attribute, prefix tokens,
#              (method, img_size, layers) the size and layers a method uses)
CASES = {
    "dinov2_vitb14": ("Dinov2Model", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, image_size=518, patch_size=14), "layernorm", 1,
                      ("(non-default size)", 448, (5, 11))),
    "dinov2_vitl14_reg": ("Dinov2WithRegistersModel", dict(hidden_size=1024, num_hidden_layers=24,
                          num_attention_heads=16, intermediate_size=4096, image_size=518, patch_size=14,
                          num_register_tokens=4), "layernorm", 5, ("AnomalyVFM (DINOv2-reg option)", 672, (23,))),
    "dinov3_vitb16": ("DINOv3ViTModel", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, num_register_tokens=4), "norm", 5, ("FoundAD", 512, (9,))),
    "dinov3_vitl16": ("DINOv3ViTModel", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096, num_register_tokens=4), "norm", 5, ("AVA-DINO", 512, (5, 11, 17, 23))),
    "clip_vitl14_336": ("CLIPVisionModel", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, image_size=336, patch_size=14), "post_layernorm", 1,
                        ("VisualAD", 336, (5, 11, 17, 23))),
}


def check(name: str) -> dict:
    import transformers

    from edge_ad.backbones import build_backbone

    cls_name, config_kwargs, norm_attr, prefix, (method, size, layers) = CASES[name]
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("Model", "Config"))
    extra = {} if name.startswith("clip") else {"layerscale_value": 1.0}
    torch.manual_seed(0)
    reference = cls(config_cls(**config_kwargs, **extra)).eval()
    if name.startswith("dinov3"):  # released ViT-S/B/L: q / v biases all zero (see docs/WEIGHTS.md)
        with torch.no_grad():
            for key, param in reference.named_parameters():
                if key.endswith(("q_proj.bias", "v_proj.bias")):
                    param.zero_()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder, max_shard_size="500MB")
        backbone = build_backbone(name, weights=folder, img_size=size, layers=layers)
    load_s = time.perf_counter() - t0
    patch = backbone.info.patch_size
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    kwargs = {"interpolate_pos_encoding": True} if name.startswith("clip") else {}
    with torch.no_grad():
        features, global_token = backbone(x)
        hidden = reference(pixel_values=x, output_hidden_states=True, **kwargs).hidden_states
        norm = getattr(reference, norm_attr)
        errors = []
        for layer, feature in zip(layers, features):
            tokens = norm(hidden[layer + 1])
            grid = size // patch
            expected = tokens[:, prefix:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
            errors.append(float((feature - expected).abs().max() / expected.abs().max()))
        errors.append(float((global_token - tokens[:, 0]).abs().max() / tokens[:, 0].abs().max()))
    return {"backbone": name, "method": method, "img_size": size, "layers": list(layers),
            "layout": backbone.weights_layout.describe(), "max_rel_error": max(errors), "save_load_s": round(load_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    rows = []
    for name in args.only:
        row = check(name)
        rows.append(row)
        print(f"{row['backbone']:18s} {row['method']:32s} {row['img_size']:4d} px layers {row['layers']}: "
              f"max rel error {row['max_rel_error']:.2e}  ({row['layout']})", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
