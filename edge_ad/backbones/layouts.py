"""Which checkpoint layout a state dict is in, what architecture it holds, and the key mapping of
the Hugging Face ``transformers`` / NVlabs-hub layouts to the original (Meta / OpenAI / NVlabs HF)
layout that timm's checkpoint filters read.

Layouts (``Layout.layout``):

* ``timm``: timm's own keys (``blocks.N.attn.qkv``, ``reg_token``, ...); also a saved edge_ad
  backbone (``model.`` prefix).
* ``meta``: facebookresearch/dinov2 / dinov3 (``blocks.N.ls1.gamma``, ``register_tokens`` /
  ``storage_tokens``, ``mask_token``, DINOv3 ``rope_embed.periods`` and masked k-bias).
* ``openai``: OpenAI CLIP / open_clip (``visual.conv1.weight``, ``visual.transformer.resblocks``).
* ``transformers``: Hugging Face ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``DINOv3ViTModel``,
  ``CLIPVisionModel`` / ``CLIPModel`` (the names of transformers 5, and the v4 names still found
  in most downloaded snapshots: ``attention.attention.query``, DINOv3 ``layer.N``,
  CLIP ``vision_model.``).
* ``nvlabs``: NVlabs RADIO, Hugging Face snapshot (``radio_model.model.*``) or torch-hub
  ``.pth.tar`` (``base_model.*`` under ``state_dict_ema``).

Families: ``dinov2``, ``dinov2_reg``, ``dinov3``, ``clip``, ``radio``. docs/WEIGHTS.md lists the
key names and the source files they come from.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .weights import IncompatibleWeightsError, StateDict, strip_prefix

# Backbone registry names by (family, embed_dim): what `weights inspect` suggests.
_BACKBONES: dict[tuple[str, int], str] = {
    ("dinov2", 384): "dinov2_vits14", ("dinov2", 768): "dinov2_vitb14", ("dinov2", 1024): "dinov2_vitl14",
    ("dinov2_reg", 384): "dinov2_vits14_reg", ("dinov2_reg", 768): "dinov2_vitb14_reg",
    ("dinov2_reg", 1024): "dinov2_vitl14_reg",
    ("dinov3", 384): "dinov3_vits16", ("dinov3", 768): "dinov3_vitb16", ("dinov3", 1024): "dinov3_vitl16",
    ("clip", 1024): "clip_vitl14_336",
    ("radio", 768): "radio_v3_b16", ("radio", 1024): "radio_v3_l16",
}
_SIZE_NAMES = {384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H", 1536: "ViT-g"}
# C-RADIOv3 keeps its per-teacher CLS tokens and registers in one (tokens, D) parameter; timm
# makes the first its cls_token and the rest reg_token (7 for C-RADIOv3).
_RADIO_PREFIX = "radio_model.model."


@dataclass(frozen=True)
class Layout:
    """A detected checkpoint layout and the architecture facts readable from its keys.

    Attributes:
        layout: ``timm`` | ``meta`` | ``openai`` | ``transformers`` | ``nvlabs``.
        family: ``dinov2`` | ``dinov2_reg`` | ``dinov3`` | ``clip`` | ``radio``.
        embed_dim: token width D.
        depth: number of transformer blocks.
        patch_size: patch size in pixels.
        num_registers: register / storage tokens besides CLS (RADIO: extra CLS + registers).
        pos_grid: (rows, cols) of the absolute position embedding; None for DINOv3 (RoPE).
        notes: other facts worth printing (text tower, adaptor heads, summary indices, config).
    """

    layout: str
    family: str
    embed_dim: int
    depth: int
    patch_size: int
    num_registers: int
    pos_grid: tuple[int, int] | None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def suggested_backbone(self) -> str | None:
        """The registry name matching family and width, or None when none is registered."""
        return _BACKBONES.get((self.family, self.embed_dim))

    @property
    def native_img_size(self) -> int | None:
        """Square input size the position embedding was trained for (pixels), None for RoPE."""
        return None if self.pos_grid is None else self.pos_grid[0] * self.patch_size

    def describe(self) -> str:
        """One line: ``DINOv2-reg ViT-B/14 (D 768, 12 blocks, 4 registers, pos grid 37x37 = 518 px) in transformers layout``."""
        size = _SIZE_NAMES.get(self.embed_dim, "ViT")
        family = {"dinov2": "DINOv2", "dinov2_reg": "DINOv2-reg", "dinov3": "DINOv3", "clip": "CLIP",
                  "radio": "C-RADIO"}[self.family]
        grid = (f", pos grid {self.pos_grid[0]}x{self.pos_grid[1]} = {self.native_img_size} px"
                if self.pos_grid else ", RoPE")
        return (f"{family} {size}/{self.patch_size} (D {self.embed_dim}, {self.depth} blocks, "
                f"{self.num_registers} registers{grid}) in {self.layout} layout")


def _block_count(keys: Any, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _grid(tokens: int, what: str) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise IncompatibleWeightsError(
            f"{what}: position embedding has {tokens} patch positions, not a square grid; the file is "
            "not a square-trained ViT this loader knows"
        )
    return side, side


def normalise_transformers_keys(state_dict: StateDict) -> StateDict:
    """transformers v4 key names -> v5 (the renames of transformers' ``conversion_mapping.py``),
    and wrapper prefixes (``dinov2.``, ``vision_model.``, ...) dropped."""
    for prefix in ("dinov2.", "dinov2_with_registers.", "backbone.", "vision_model.", "model."):
        if prefix == "model." and any(k.startswith("embeddings.") for k in state_dict):
            continue  # DINOv3's own blocks live under model.layer
        state_dict = strip_prefix(state_dict, prefix)
    out: StateDict = {}
    for key, value in state_dict.items():
        key = key.replace("attention.attention.query", "attention.q_proj")
        key = key.replace("attention.attention.key", "attention.k_proj")
        key = key.replace("attention.attention.value", "attention.v_proj")
        key = key.replace("attention.output.dense", "attention.o_proj")
        if key.startswith("layer."):  # DINOv3ViTModel of transformers 4.56..4.x
            key = "model." + key
        if key.startswith("vision_model."):  # a full CLIPModel: keep the vision tower
            key = key[len("vision_model."):]
        out[key] = value
    return out


def detect_layout(state_dict: Mapping[str, torch.Tensor], config: dict[str, Any] | None = None) -> Layout:
    """Detect the layout and architecture of a state dict (keys as stored, ``config.json`` if any).

    Raises:
        IncompatibleWeightsError: the keys match no layout this loader converts; the message lists
            a few keys so the user can tell what the file is.
    """
    try:
        return _detect(state_dict, config or {})
    except KeyError as exc:  # keys of one layout with another one's missing: say which
        raise IncompatibleWeightsError(
            f"checkpoint looks like one layout but lacks its key {exc}; is the file complete (all shards)?"
        ) from None


def _detect(state_dict: Mapping[str, torch.Tensor], config: dict[str, Any]) -> Layout:
    keys = set(state_dict)
    model_type = str(config.get("model_type", ""))
    if "radio" in model_type.lower() or any(k.startswith(_RADIO_PREFIX) for k in keys) \
            or "base_model.patch_generator.embedder.weight" in keys:
        return _detect_radio(state_dict, config)
    if any(k.startswith(("visual.", "module.visual.")) for k in keys):
        return _detect_openai_clip(state_dict)
    sd = normalise_transformers_keys(dict(state_dict))
    if "embeddings.patch_embeddings.projection.weight" in sd or model_type in ("dinov2", "dinov2_with_registers"):
        return _detect_transformers_dinov2(sd, config)
    if "embeddings.patch_embeddings.weight" in sd or model_type == "dinov3_vit":
        return _detect_transformers_dinov3(sd, config)
    if "embeddings.class_embedding" in sd or model_type in ("clip", "clip_vision_model"):
        return _detect_transformers_clip(sd, config)
    sd = strip_prefix(dict(state_dict), "model.")
    if "storage_tokens" in sd:
        return _from_blocks(sd, "meta", "dinov3", "storage_tokens", None)
    if "mask_token" in sd and "pos_embed" in sd:
        family = "dinov2_reg" if "register_tokens" in sd else "dinov2"
        return _from_blocks(sd, "meta", family, "register_tokens", 1)
    if "patch_embed.proj.weight" in sd and "blocks.0.attn.qkv.weight" in sd:
        return _detect_timm(sd)
    shown = ", ".join(sorted(keys)[:6])
    raise IncompatibleWeightsError(
        f"unrecognised checkpoint layout ({len(keys)} tensors, e.g. {shown}); edge_ad reads timm, Meta "
        "DINOv2/DINOv3, OpenAI/open_clip CLIP, transformers (Dinov2Model, Dinov2WithRegistersModel, "
        "DINOv3ViTModel, CLIPVisionModel/CLIPModel) and NVlabs RADIO checkpoints"
    )


def _from_blocks(sd: Mapping[str, torch.Tensor], layout: str, family: str, reg_key: str,
                 pos_prefix: int | None, **notes: Any) -> Layout:
    """Facts of a timm-like key set (patch_embed.proj, blocks.N, pos_embed)."""
    weight = sd["patch_embed.proj.weight"]
    registers = int(sd[reg_key].shape[-2]) if reg_key in sd else 0
    grid = None
    if pos_prefix is not None and "pos_embed" in sd:
        grid = _grid(int(sd["pos_embed"].shape[1]) - pos_prefix, f"{family} {layout}")
    return Layout(layout, family, int(weight.shape[0]), _block_count(sd, r"blocks\.(\d+)\."),
                  int(weight.shape[-1]), registers, grid, dict(notes))


def _detect_timm(sd: Mapping[str, torch.Tensor]) -> Layout:
    registers = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    if "pos_embed" not in sd:
        family = "dinov3"  # timm Eva: RoPE, no absolute position embedding
    elif "norm_pre.weight" in sd:
        family = "clip"
    elif registers == 7 and "norm.weight" not in sd:
        family = "radio"  # C-RADIOv3 in timm: 1 cls + 7 reg tokens, no final norm
    else:
        family = "dinov2_reg" if registers else "dinov2"
    # timm puts the pos embed of the CLS token in front unless the model is no_embed_class
    # (DINOv2-reg, RADIO); a square patch grid tells which.
    pos_prefix = None
    if "pos_embed" in sd:
        tokens = int(sd["pos_embed"].shape[1])
        pos_prefix = 0 if math.isqrt(tokens) ** 2 == tokens else 1
    return _from_blocks(sd, "timm", family, "reg_token", pos_prefix)


def _detect_transformers_dinov2(sd: Mapping[str, torch.Tensor], config: dict[str, Any]) -> Layout:
    registers = int(sd["embeddings.register_tokens"].shape[1]) if "embeddings.register_tokens" in sd else 0
    family = "dinov2_reg" if registers or config.get("model_type") == "dinov2_with_registers" else "dinov2"
    weight = sd["embeddings.patch_embeddings.projection.weight"]
    grid = _grid(int(sd["embeddings.position_embeddings"].shape[1]) - 1, f"{family} transformers")
    return Layout("transformers", family, int(weight.shape[0]), _block_count(sd, r"encoder\.layer\.(\d+)\."),
                  int(weight.shape[-1]), registers, grid, _config_notes(config))


def _detect_transformers_dinov3(sd: Mapping[str, torch.Tensor], config: dict[str, Any]) -> Layout:
    weight = sd["embeddings.patch_embeddings.weight"]
    registers = int(sd["embeddings.register_tokens"].shape[1]) if "embeddings.register_tokens" in sd else 0
    return Layout("transformers", "dinov3", int(weight.shape[0]), _block_count(sd, r"model\.layer\.(\d+)\."),
                  int(weight.shape[-1]), registers, None, _config_notes(config))


def _detect_transformers_clip(sd: Mapping[str, torch.Tensor], config: dict[str, Any]) -> Layout:
    weight = sd["embeddings.patch_embedding.weight"]
    grid = _grid(int(sd["embeddings.position_embedding.weight"].shape[0]) - 1, "CLIP transformers")
    notes = _config_notes(config.get("vision_config", config))
    if any(k.startswith("text_model.") for k in sd):
        notes["text_tower"] = "present (not used by the vision backbone)"
    return Layout("transformers", "clip", int(weight.shape[0]), _block_count(sd, r"encoder\.layers\.(\d+)\."),
                  int(weight.shape[-1]), 0, grid, notes)


def _detect_openai_clip(state_dict: Mapping[str, torch.Tensor]) -> Layout:
    prefix = "module.visual." if "module.visual.conv1.weight" in state_dict else "visual."
    weight = state_dict[prefix + "conv1.weight"]
    grid = _grid(int(state_dict[prefix + "positional_embedding"].shape[0]) - 1, "CLIP openai")
    notes: dict[str, Any] = {"activation": "QuickGELU for OpenAI weights (open_clip: see its model config)"}
    if any(k.startswith(("transformer.", "module.transformer.")) for k in state_dict):
        notes["text_tower"] = "present (not used by the vision backbone)"
    depth = _block_count(state_dict, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    return Layout("openai", "clip", int(weight.shape[0]), depth, int(weight.shape[-1]), 0, grid, notes)


def _detect_radio(state_dict: Mapping[str, torch.Tensor], config: dict[str, Any]) -> Layout:
    sd = to_original_layout(dict(state_dict), Layout("nvlabs", "radio", 0, 0, 0, 0, None))
    embedder = sd[_RADIO_PREFIX + "patch_generator.embedder.weight"]  # (D, 3 * p * p) linear
    patch = math.isqrt(int(embedder.shape[1]) // 3)
    tokens = sd[_RADIO_PREFIX + "patch_generator.cls_token.token"]
    grid = _grid(int(sd[_RADIO_PREFIX + "patch_generator.pos_embed"].shape[1]), "RADIO")
    notes: dict[str, Any] = {}
    if "radio_model.summary_idxs" in sd:
        notes["summary_idxs"] = [int(i) for i in sd["radio_model.summary_idxs"].tolist()]
    elif isinstance(config.get("args"), dict) and "teachers" in config["args"]:
        notes["summary_idxs"] = radio_summary_indices(config["args"]["teachers"])
    if "summary_idxs" in notes:
        notes["anomalyvfm"] = radio_summary_note(notes["summary_idxs"])
    if any(k.startswith("radio_model.feature_normalizer.") for k in sd):
        notes["feature_normalizer"] = ("present: RADIO's own forward applies it to the patch features; edge_ad "
                                       "(like timm) returns the backbone's raw tokens")
    adaptors = sorted({k.split(".")[2] for k in sd if k.startswith("radio_model.adaptors.")})
    adaptors += sorted({k.split(".")[1] for k in sd if k.startswith(("_heads.", "_feature_projections."))})
    if adaptors:
        notes["adaptor_heads"] = f"{', '.join(adaptors)} (dropped: AnomalyVFM uses the backbone tokens only)"
    if config:
        notes["config"] = {k: config[k] for k in ("version", "patch_size", "max_resolution", "preferred_resolution")
                           if k in config}
    return Layout("nvlabs", "radio", int(embedder.shape[0]),
                  _block_count(sd, re.escape(_RADIO_PREFIX) + r"blocks\.(\d+)\."), patch,
                  int(tokens.shape[0]) - 1, grid, notes)


def radio_summary_note(summary_idxs: list[int]) -> str:
    """What AnomalyVFM should concatenate for these RADIO ``summary_idxs`` (its image head reads
    the first ``summary_tokens`` prefix tokens, i.e. RADIO's per-teacher CLS tokens in order)."""
    if summary_idxs == list(range(len(summary_idxs))):
        return (f"RADIO's summary = CLS tokens {summary_idxs} = the first {len(summary_idxs)} prefix tokens; "
                f"AnomalyVFM: --set summary_tokens={len(summary_idxs)}")
    return (f"RADIO's summary = CLS tokens {summary_idxs}, not the leading prefix tokens that AnomalyVFM's "
            "summary_tokens takes")


def radio_summary_indices(teachers: Any) -> list[int]:
    """RADIO's ``summary_idxs`` from its training args' teacher list, as NVlabs/RADIO hubconf.py
    computes them: the first index of each teacher name whose ``use_summary`` is true (default)."""
    first: dict[str, int] = {}
    for index, teacher in enumerate(teachers or []):
        if teacher.get("use_summary", True):
            first.setdefault(str(teacher.get("name", index)), index)
    return sorted(first.values())


def _config_notes(config: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("model_type", "hidden_act", "layer_norm_eps", "image_size", "patch_size", "num_attention_heads",
            "rope_theta", "num_register_tokens", "query_bias", "key_bias", "value_bias", "use_gated_mlp",
            "use_swiglu_ffn", "layerscale_value")
    return {k: config[k] for k in keys if k in config}


# --- transformers / NVlabs-hub -> original layout ---------------------------------------------

def to_original_layout(state_dict: StateDict, layout: Layout) -> StateDict:
    """Keys of ``layout`` renamed to the layout timm's filters read (Meta, OpenAI, NVlabs HF, timm).

    ``timm``, ``meta`` and ``openai`` come back unchanged (a leading ``model.`` of a saved edge_ad
    backbone is dropped); ``transformers`` and the NVlabs torch-hub file are renamed; tensors are
    only concatenated / reshaped, never resampled (that happens when a model of a given size is
    loaded).
    """
    if layout.layout in ("timm", "meta"):
        return strip_prefix(state_dict, "model.")
    if layout.layout == "nvlabs":
        if any(k.startswith("base_model.") for k in state_dict):  # torch-hub .pth.tar
            return {("radio_model.model." + k[len("base_model."):] if k.startswith("base_model.") else
                     "radio_model." + k if k.startswith("input_conditioner.") else k): v
                    for k, v in state_dict.items()}
        return state_dict
    if layout.layout != "transformers":
        return state_dict
    sd = normalise_transformers_keys(state_dict)
    if layout.family in ("dinov2", "dinov2_reg"):
        return _dinov2_to_meta(sd)
    if layout.family == "dinov3":
        return _dinov3_to_meta(sd)
    return _clip_to_openai(sd)


def _take_qkv(sd: StateDict, prefix: str, out_key: str, out: StateDict, dim: int) -> None:
    """q / k / v projections of one block -> one fused (3D, D) weight and (3D,) bias.

    A missing bias (DINOv3's key projection has none) is zero, as in Meta's masked k-bias.
    """
    out[out_key + ".weight"] = torch.cat([sd.pop(f"{prefix}{p}_proj.weight") for p in "qkv"])
    biases = [sd.pop(f"{prefix}{p}_proj.bias", None) for p in "qkv"]
    if any(b is not None for b in biases):
        out[out_key + ".bias"] = torch.cat([b if b is not None else torch.zeros(dim) for b in biases])


def _rename_rest(sd: StateDict, out: StateDict, renames: list[tuple[str, str]]) -> StateDict:
    for key, value in sd.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def _dinov2_to_meta(sd: StateDict) -> StateDict:
    """transformers Dinov2Model / Dinov2WithRegistersModel -> facebookresearch/dinov2 keys."""
    out: StateDict = {}
    dim = int(sd["embeddings.cls_token"].shape[-1])
    for i in range(_block_count(sd, r"encoder\.layer\.(\d+)\.")):
        _take_qkv(sd, f"encoder.layer.{i}.attention.", f"blocks.{i}.attn.qkv", out, dim)
    return _rename_rest(sd, out, [
        (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.register_tokens$", "register_tokens"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
        (r"^encoder\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."), (r"^layernorm\.", "norm."),
    ])


def _dinov3_to_meta(sd: StateDict) -> StateDict:
    """transformers DINOv3ViTModel -> facebookresearch/dinov3 keys (storage tokens, masked k-bias)."""
    out: StateDict = {}
    dim = int(sd["embeddings.cls_token"].shape[-1])
    for i in range(_block_count(sd, r"model\.layer\.(\d+)\.")):
        _take_qkv(sd, f"model.layer.{i}.attention.", f"blocks.{i}.attn.qkv", out, dim)
    mask = sd.get("embeddings.mask_token")
    if mask is not None:
        sd["embeddings.mask_token"] = mask.reshape(1, -1)  # Meta: (1, D); transformers: (1, 1, D)
    return _rename_rest(sd, out, [
        (r"^embeddings\.cls_token$", "cls_token"), (r"^embeddings\.mask_token$", "mask_token"),
        (r"^embeddings\.register_tokens$", "storage_tokens"),
        (r"^embeddings\.patch_embeddings\.", "patch_embed.proj."),
        (r"^model\.layer\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
        (r"^model\.layer\.(\d+)\.layer_scale(\d)\.lambda1$", r"blocks.\1.ls\2.gamma"),
        (r"^model\.layer\.(\d+)\.mlp\.up_proj\.", r"blocks.\1.mlp.fc1."),
        (r"^model\.layer\.(\d+)\.mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),
        (r"^model\.layer\.(\d+)\.", r"blocks.\1."),
    ])


def _clip_to_openai(sd: StateDict) -> StateDict:
    """transformers CLIPVisionModel / CLIPModel vision tower -> OpenAI CLIP ``visual.*`` keys."""
    out: StateDict = {}
    sd = {k: v for k, v in sd.items() if not k.startswith(("text_model.", "text_projection", "logit_scale"))
          and not k.endswith("position_ids")}
    dim = int(sd["embeddings.class_embedding"].shape[-1])
    for i in range(_block_count(sd, r"encoder\.layers\.(\d+)\.")):
        prefix = f"encoder.layers.{i}.self_attn."
        out[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"] = torch.cat(
            [sd.pop(f"{prefix}{p}_proj.weight") for p in "qkv"])
        out[f"visual.transformer.resblocks.{i}.attn.in_proj_bias"] = torch.cat(
            [sd.pop(f"{prefix}{p}_proj.bias", torch.zeros(dim)) for p in "qkv"])
    if "visual_projection.weight" in sd:  # CLIPModel / CLIPVisionModelWithProjection: (E, D) -> (D, E)
        out["visual.proj"] = sd.pop("visual_projection.weight").t().contiguous()
    return _rename_rest(sd, out, [
        (r"^embeddings\.class_embedding$", "visual.class_embedding"),
        (r"^embeddings\.patch_embedding\.", "visual.conv1."),
        (r"^embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
        (r"^pre_layrnorm\.", "visual.ln_pre."), (r"^post_layernorm\.", "visual.ln_post."),
        (r"^encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"visual.transformer.resblocks.\1.attn.out_proj."),
        (r"^encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"visual.transformer.resblocks.\1.ln_\2."),
        (r"^encoder\.layers\.(\d+)\.mlp\.fc1\.", r"visual.transformer.resblocks.\1.mlp.c_fc."),
        (r"^encoder\.layers\.(\d+)\.mlp\.fc2\.", r"visual.transformer.resblocks.\1.mlp.c_proj."),
    ])
