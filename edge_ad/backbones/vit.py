"""Foundation-model ViTs (DINOv2, DINOv3, C-RADIOv3) built from timm's own model definitions.

Every model is built at a fixed ``img_size`` with ``dynamic_img_size=False``:

* DINOv2 resizes its position embedding with antialiased bicubic interpolation when the size is
  dynamic; that op does not export to ONNX. At a fixed size the embedding is resampled once, in
  Python, when weights are loaded.
* DINOv3's RoPE tables are then computed once and cached, so the exported graph has no ``If``
  nodes (TensorRT rejects them).

Features come from ``forward_intermediates`` (never ``forward``: timm's DINOv3 ``forward`` fails in
the legacy ONNX exporter). Patch tokens of each requested block go through the model's final norm
(the FoundAD / AVA-DINO convention) and are reshaped to (B, C, H / p, W / p).

DINOv3 uses timm's ``vit_*_patch16_dinov3`` and never the ``_qkvb`` variants: those add the q / v
biases with ``F.linear(x, qkv.weight, bias)``, which bypasses the ``qkv`` module and therefore any
LoRA wrapper placed on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ._args import ImgSize, reject_overrides, resolve_img_size, resolve_layers
from .base import Backbone, BackboneInfo
from .registry import register_backbone
from .fit import check_family as _check_family
from .fit import check_fits_model
from .layouts import Layout, detect_layout, to_original_layout
from .weights import (
    IncompatibleWeightsError,
    StateDict,
    WeightsPath,
    find_in_hf_cache,
    load_state_dict_strict,
    read_weights,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

FilterFn = Callable[[StateDict, nn.Module], StateDict]

# Constructor arguments the backbone sets itself; overriding them would break export or loading.
_RESERVED_OVERRIDES = {
    "img_size": "pass img_size= to build_backbone",
    "dynamic_img_size": "backbones are built at a fixed size so they export to ONNX / TensorRT",
    "dynamic_img_pad": "inputs must be a multiple of the patch size, padding would shift features",
    "pretrained": "pass pretrained= to build_backbone",
    "num_classes": "the backbone has no classifier head",
    "features_only": "features come from forward_intermediates",
}


def _dinov2_filter(state_dict: StateDict, model: nn.Module, antialias: bool) -> StateDict:
    """Meta dinov2 or timm layout -> timm, pos embed resampled bicubically to the model's grid.

    ``antialias`` follows the reference implementations: off for DINOv2 (transformers'
    ``Dinov2Model``; Meta's hub model too, up to its 0.1-cell scale-factor offset), on for
    DINOv2-reg (``Dinov2WithRegistersModel`` and Meta's ``*_reg`` hub models).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state_dict, model, antialias=antialias)


def _clip_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """OpenAI / open_clip or timm layout -> timm keys.

    The 24 x 24 (336 px) position grid is resampled **bilinearly** (no antialiasing,
    ``align_corners=False``) to the model's grid, as VisualAD's reference does on every forward
    (``VisualAD_lib/VisualAD.py:140``: ``F.interpolate(patch_pos, (new_side, new_side),
    mode='bilinear')``): a 518 px model gets the 37 x 37 grid the reference trained with. VisualAD
    is the method that runs CLIP away from 336 px, so its reference decides; transformers'
    ``CLIPVisionModel(interpolate_pos_encoding=True)`` resamples bicubically instead, which differs
    at non-native sizes only (at 336 px nothing is resampled). OpenAI's own code has no resampling.

    The projection into the joint image-text space (OpenAI ``visual.proj``, timm's
    ``vit_*_clip_*.openai`` ``head``) is dropped: the backbone returns tokens of the vision
    transformer itself, before that projection.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    projection = ("visual.proj", "module.visual.proj", "head.weight", "head.bias")
    state_dict = {k: v for k, v in state_dict.items() if k not in projection}
    return checkpoint_filter_fn(state_dict, model, interpolation="bilinear", antialias=False, align_corners=False)


def _dinov3_filter(state_dict: StateDict, model: nn.Module) -> StateDict:
    """Official facebookresearch/dinov3 or timm layout -> timm Eva keys.

    Meta's ``qkv`` is a ``LinearKMaskedBias``: the key third of ``qkv.bias`` is multiplied by
    ``bias_mask`` (0 there), so whatever it stores is never used and is zeroed here. The released
    ViT-S/B/L have all-zero q / v biases; the non-``_qkvb`` model has no bias, so the bias is
    dropped, but only after checking it really is zero: dropping a non-zero bias would be a
    silently partial load.
    """
    from timm.models.eva import checkpoint_filter_fn

    if "storage_tokens" in state_dict:  # official layout
        has_bias = any(getattr(blk.attn, "q_bias", None) is not None for blk in model.blocks)
        state_dict = dict(state_dict)
        for key in [k for k in state_dict if k.endswith("attn.qkv.bias")]:
            bias = state_dict.pop(key).clone()
            mask = state_dict.pop(key + "_mask", None)
            dim = bias.shape[0] // 3
            bias[dim:2 * dim] = 0.0  # masked k-bias (bias_mask is NaN-initialised, 0 on k after load)
            if mask is not None:
                mask = mask.clone()
                mask[dim:2 * dim] = 0.0
                bias = bias * torch.nan_to_num(mask, nan=1.0)
            if has_bias:
                state_dict[key] = bias
            elif not bias.is_meta and bias.abs().max().item() != 0.0:  # meta: shapes only, no values
                raise IncompatibleWeightsError(
                    f"{key} is non-zero ({bias.abs().max().item():.3g}) but this DINOv3 model has no "
                    "qkv bias; the checkpoint needs timm's _qkvb architecture, which edge_ad does not "
                    "use because its fused bias bypasses LoRA wrappers"
                )
    return checkpoint_filter_fn(state_dict, model)


def _radio_filter(state_dict: StateDict, model: nn.Module, align_corners: bool) -> StateDict:
    """NVIDIA RADIO (``radio_model.model.*``) or timm layout -> timm ViT keys.

    RADIO resamples its 128x128 position-embedding grid bilinearly without antialiasing; the
    ``align_corners`` flag follows each release's hub code, as in timm's own factory. The input
    conditioner, ``summary_idxs`` and adaptor heads are not part of the ViT and are dropped by
    timm's conversion (the conditioner is checked against ``info.mean`` / ``info.std`` first).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(
        state_dict, model, interpolation="bilinear", antialias=False, align_corners=align_corners
    )


@dataclass(frozen=True)
class ViTSpec:
    """How to build one registered ViT from timm.

    Attributes:
        timm_name: timm architecture (``pretrained=True`` uses its default pretrained tag).
        family: checkpoint family (``layouts.Layout.family``) whose files this backbone loads.
        patch_size: the architecture's patch size in pixels (a ``patch_size`` override wins).
        mean, std: RGB normalisation of the published weights, for pixels in 0..1.
        filter_fn: converts a checkpoint (official or timm layout) to this timm model's keys.
        global_token: one line saying what ``forward`` returns as the global token.
    """

    timm_name: str
    family: str
    patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    filter_fn: FilterFn
    global_token: str = "CLS token of the deepest requested block after the final norm"
    hub_filenames: tuple[str, ...] = field(default=("model.safetensors", "pytorch_model.bin"))


class TimmViTBackbone(Backbone):
    """A timm ViT returning normed patch-token maps of chosen blocks and a global token.

    ``forward(images)`` with images (B, 3, H, W) normalised by ``info.mean`` / ``info.std`` returns:

    * features: one (B, C, H / p, W / p) map per block in ``info.layers`` (ascending), patch tokens
      after the final norm (prefix tokens removed);
    * global_token: (B, C) prefix token 0 (CLS) of the deepest requested block after the final
      norm, i.e. the model's CLS output when the last block is requested. Blocks after the deepest
      requested one are not run (nor exported).

    Attributes:
        model: the timm module (``VisionTransformer`` / ``Eva``); its ``state_dict()`` is the timm
            key layout that ``weights=`` accepts. LoRA targets live under it.
        spec: how the model was built.
        weights_layout: the detected layout of the loaded ``weights=`` / pretrained file, None
            for random init.
    """

    def __init__(self, model: nn.Module, info: BackboneInfo, spec: ViTSpec,
                 weights_layout: Layout | None = None) -> None:
        super().__init__()
        self.model = model
        self.info = info
        self.spec = spec
        self.weights_layout = weights_layout

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        self.check_images(images, self.model.patch_embed.proj.weight.dtype)
        outputs = self.model.forward_intermediates(
            images,
            indices=list(self.info.layers),
            return_prefix_tokens=True,
            norm=True,
            stop_early=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        # outputs: per block (patch map (B, C, h, w), prefix tokens (B, num_prefix, C)).
        features = [patch_map for patch_map, _ in outputs]
        global_token = outputs[-1][1][:, 0]
        return features, global_token


def build_timm_vit(
    name: str,
    spec: ViTSpec,
    *,
    weights: WeightsPath | None = None,
    layers: Sequence[int] | None = None,
    img_size: ImgSize | None = None,
    pretrained: bool = False,
    **model_overrides: Any,
) -> TimmViTBackbone:
    """Build ``spec`` at a fixed size and load ``weights`` / local pretrained weights strictly.

    Args:
        name: registry name, for ``info`` and messages.
        spec: timm architecture, normalisation and checkpoint filter.
        weights: local checkpoint file or Hugging Face snapshot folder in any layout of
            ``layouts.py`` (timm, Meta, OpenAI, transformers, NVlabs; a saved ``TimmViTBackbone``
            with ``model.`` prefixed keys works too); detected, converted, loaded strictly.
        layers: 0-based block indices (negative counts from the end); default the last block.
        img_size: int or (H, W) in pixels, multiples of the patch size; default 224.
        pretrained: load timm's published weights from the local Hugging Face cache only.
        **model_overrides: timm constructor arguments (``depth``, ``embed_dim``, ``num_heads``,
            ``init_values``, ...).
    """
    import timm

    reject_overrides(model_overrides, _RESERVED_OVERRIDES, name)
    patch_size = int(model_overrides.get("patch_size", spec.patch_size))
    size = resolve_img_size(img_size, patch_size, name)
    source: str | None = None
    if pretrained:  # resolved before building: a missing file fails fast, not after a ViT-L init
        hub_id = timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id
        weights = find_in_hf_cache(hub_id, spec.hub_filenames, backbone=name)
        source = f"{weights} (Hugging Face cache of {hub_id})"
    state_dict: StateDict | None = None
    layout: Layout | None = None
    if weights is not None:  # read before building: a bad file fails fast
        source = source or str(Path(weights))
        read = read_weights(weights)
        layout = detect_layout(read.state_dict, read.config)
        _check_family(layout, spec, name, source)
        state_dict = to_original_layout(read.state_dict, layout)
    model = timm.create_model(
        spec.timm_name,
        pretrained=False,  # never let timm download; weights are resolved locally below
        img_size=size,
        dynamic_img_size=False,
        num_classes=0,
        **model_overrides,
    )
    if tuple(model.patch_embed.patch_size) != (patch_size, patch_size):  # pragma: no cover - guard
        raise ValueError(
            f"{name}: expected square {patch_size} px patches, got {model.patch_embed.patch_size}"
        )

    if state_dict is not None and layout is not None:
        check_fits_model(layout, read.config, state_dict, model, spec, name, source)
        try:
            state_dict = spec.filter_fn(state_dict, model)
        except IncompatibleWeightsError as exc:
            raise IncompatibleWeightsError(f"weights {source} for backbone {name!r}: {exc}") from None
        except (KeyError, RuntimeError, ValueError, IndexError) as exc:
            raise IncompatibleWeightsError(
                f"weights {source} cannot be converted for backbone {name!r} ({spec.timm_name}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        load_state_dict_strict(model, state_dict, source=f"{source} ({layout.describe()})", backbone=name)

    depth = len(model.blocks)
    chosen = resolve_layers(layers, depth, (depth - 1,), name, "block")
    dim = int(model.embed_dim)
    info = BackboneInfo(
        name=name,
        patch_size=patch_size,
        img_size=size,
        layers=chosen,
        feature_dims=(dim,) * len(chosen),
        global_dim=dim,
        mean=spec.mean,
        std=spec.std,
        num_prefix_tokens=int(model.num_prefix_tokens),
        feature_strides=(patch_size,) * len(chosen),
    )
    return TimmViTBackbone(model, info, spec, layout)


# --- registered specs ------------------------------------------------------------------------
# Prefix tokens (timm num_prefix_tokens): DINOv2 1 (CLS), DINOv2-reg 5 (CLS + 4 registers),
# DINOv3 5 (CLS + 4 storage tokens), C-RADIOv3 8 (see _RADIO_GLOBAL).

_RADIO_GLOBAL = (
    "prefix token 0: the first of RADIO's per-teacher CLS tokens, which timm keeps as cls_token "
    "(the other CLS tokens and the registers become timm's 7 reg_tokens). RADIO's own 'summary' "
    "concatenates the CLS tokens of chosen teachers (summary_idxs, dropped by timm's conversion) "
    "and is not reproduced. C-RADIOv3 has no final norm (timm final_norm=False), so features and "
    "global token are raw block outputs"
)

_IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)
_DINOV2 = partial(_dinov2_filter, antialias=False)
_DINOV2_REG = partial(_dinov2_filter, antialias=True)
_SPECS: dict[str, ViTSpec] = {
    "dinov2_vits14": ViTSpec("vit_small_patch14_dinov2", "dinov2", 14, *_IMAGENET, _DINOV2),
    "dinov2_vitb14": ViTSpec("vit_base_patch14_dinov2", "dinov2", 14, *_IMAGENET, _DINOV2),
    "dinov2_vitl14": ViTSpec("vit_large_patch14_dinov2", "dinov2", 14, *_IMAGENET, _DINOV2),
    "dinov2_vits14_reg": ViTSpec("vit_small_patch14_reg4_dinov2", "dinov2_reg", 14, *_IMAGENET, _DINOV2_REG),
    "dinov2_vitb14_reg": ViTSpec("vit_base_patch14_reg4_dinov2", "dinov2_reg", 14, *_IMAGENET, _DINOV2_REG),
    "dinov2_vitl14_reg": ViTSpec("vit_large_patch14_reg4_dinov2", "dinov2_reg", 14, *_IMAGENET, _DINOV2_REG),
    "dinov3_vits16": ViTSpec("vit_small_patch16_dinov3", "dinov3", 16, *_IMAGENET, _dinov3_filter),
    "dinov3_vitb16": ViTSpec("vit_base_patch16_dinov3", "dinov3", 16, *_IMAGENET, _dinov3_filter),
    "dinov3_vitl16": ViTSpec("vit_large_patch16_dinov3", "dinov3", 16, *_IMAGENET, _dinov3_filter),
    "clip_vitl14_336": ViTSpec(
        "vit_large_patch14_clip_quickgelu_336", "clip", 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _clip_filter
    ),
    # align_corners per release, as timm's factory: C-RADIOv3-B was released with True, -L with False.
    "radio_v3_b16": ViTSpec(
        "vit_base_patch16_radio_v3", "radio", 16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
        partial(_radio_filter, align_corners=True), global_token=_RADIO_GLOBAL,
    ),
    "radio_v3_l16": ViTSpec(
        "vit_large_patch16_radio_v3", "radio", 16, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
        partial(_radio_filter, align_corners=False), global_token=_RADIO_GLOBAL,
    ),
}


def _register(name: str) -> None:
    spec = _SPECS[name]

    def factory(**kwargs: Any) -> TimmViTBackbone:
        return build_timm_vit(name, spec, **kwargs)

    factory.__name__ = name
    factory.__doc__ = f"{name}: timm {spec.timm_name}; global token: {spec.global_token}."
    register_backbone(name)(factory)


for _name in _SPECS:
    _register(_name)
