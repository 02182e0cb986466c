"""Does a detected checkpoint fit a built timm ViT? Clear errors before any tensor is copied.

Key-by-key strictness is ``weights.load_state_dict_strict``'s job; this module compares the
architecture facts of a ``layouts.Layout`` (family, width, depth, patch size, registers) and the
settings a ``config.json`` / checkpoint records that keys alone do not show (activation, LayerNorm
eps, DINOv3 RoPE base, RADIO input normalisation), and names what the file is, what the backbone
expects and which ``--backbone`` would fit.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .layouts import Layout
from .weights import IncompatibleWeightsError, StateDict

if TYPE_CHECKING:  # vit.py imports this module
    from .vit import ViTSpec

# DINOv3 RoPE base (``pos_embed_rope_base`` in dinov3/hub/backbones.py, ``rope_theta`` in
# transformers, ``rope_temperature`` in timm's ``vit_*_patch16_dinov3``).
DINOV3_ROPE_BASE = 100.0
_ACTIVATIONS = {"dinov2": "gelu", "dinov2_reg": "gelu", "dinov3": "gelu", "clip": "quick_gelu"}


def _hint(layout: Layout) -> str:
    suggested = layout.suggested_backbone
    return f"; use --backbone {suggested}" if suggested else "; no registered backbone has this architecture"


def check_family(layout: Layout, spec: "ViTSpec", name: str, source: str) -> None:
    """Raise unless ``layout`` is a checkpoint of the family ``spec`` loads (before building)."""
    if layout.family != spec.family:
        raise IncompatibleWeightsError(
            f"weights {source} are a {layout.describe()}, but backbone {name!r} is a {spec.family} "
            f"model ({spec.timm_name}){_hint(layout)}"
        )


def check_fits_model(layout: Layout, config: dict[str, Any] | None, state_dict: StateDict, model: nn.Module,
                     spec: "ViTSpec", name: str, source: str) -> None:
    """Raise unless the checkpoint's architecture and recorded settings match ``model``.

    Args:
        layout: detected layout of the file.
        config: the snapshot's ``config.json`` (None for single files).
        state_dict: the file in original layout (``layouts.to_original_layout``).
        model: the built timm model.
        spec, name, source: for messages.

    Raises:
        IncompatibleWeightsError: width, depth, patch size or register count differ, or a recorded
            setting (activation, LayerNorm eps, gated MLP, RoPE base, input normalisation) does
            not match what the timm model computes.
    """
    expected = {
        "embedding width": int(model.embed_dim),
        "blocks": len(model.blocks),
        "patch size": int(model.patch_embed.patch_size[0]),
        "registers": int(model.num_prefix_tokens) - 1,
    }
    found = {"embedding width": layout.embed_dim, "blocks": layout.depth, "patch size": layout.patch_size,
             "registers": layout.num_registers}
    wrong = [f"{what} {found[what]} (backbone: {expected[what]})" for what in expected if found[what] != expected[what]]
    problems = []
    if wrong:
        problems.append(", ".join(wrong))
    problems += _config_problems(layout, config or {}, model)
    problems += _state_problems(layout, state_dict, spec)
    if problems:
        raise IncompatibleWeightsError(
            f"weights {source} are a {layout.describe()} and do not fit backbone {name!r} "
            f"({spec.timm_name}): {'; '.join(problems)}{_hint(layout) if wrong else ''}"
        )


def _config_problems(layout: Layout, config: dict[str, Any], model: nn.Module) -> list[str]:
    """Settings in a transformers ``config.json`` that the keys do not show."""
    config = config.get("vision_config", config) if layout.family == "clip" else config
    problems = []
    act = config.get("hidden_act")
    if act is not None and act != _ACTIVATIONS.get(layout.family, act):
        problems.append(f"config.json hidden_act {act!r}, the timm model uses {_ACTIVATIONS[layout.family]!r}")
    eps = config.get("layer_norm_eps")
    model_eps = float(model.blocks[0].norm1.eps)
    if eps is not None and not math.isclose(float(eps), model_eps, rel_tol=1e-6):
        problems.append(f"config.json layer_norm_eps {eps}, the timm model uses {model_eps}")
    if config.get("use_gated_mlp") or config.get("use_swiglu_ffn"):
        problems.append("config.json asks for a gated (SwiGLU) MLP, which the registered ViT-S/B/L do not have")
    theta = config.get("rope_theta")
    if theta is not None and float(theta) != DINOV3_ROPE_BASE:
        problems.append(f"config.json rope_theta {theta}, the timm DINOv3 model uses {DINOV3_ROPE_BASE}")
    return problems


def dinov3_rope_periods(head_dim: int, base: float = DINOV3_ROPE_BASE) -> torch.Tensor:
    """Meta's ``RopePositionEmbedding.periods`` (head_dim / 4,) for ``base`` (dinov3/layers/
    rope_position_encoding.py: ``base ** (2 * arange(D / 4) / (D / 2))``)."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float64) / (head_dim // 2))


def _state_problems(layout: Layout, state_dict: StateDict, spec: "ViTSpec") -> list[str]:
    """Settings stored as tensors: DINOv3 RoPE periods, RADIO input normalisation."""
    problems = []
    periods = state_dict.get("rope_embed.periods")
    if periods is not None:
        head_dim = 4 * int(periods.shape[0])
        expected = dinov3_rope_periods(head_dim)
        # Meta stores the periods in bf16 for some checkpoints: compare at bf16 precision.
        if not torch.allclose(periods.double(), expected, rtol=1e-2):
            problems.append(
                f"rope_embed.periods {periods.double()[:3].tolist()}... are not the RoPE base {DINOV3_ROPE_BASE} "
                "periods timm's DINOv3 computes (a min/max-period RoPE checkpoint?)"
            )
    for key, value, what in (("radio_model.input_conditioner.norm_mean", spec.mean, "mean"),
                             ("radio_model.input_conditioner.norm_std", spec.std, "std")):
        stored = state_dict.get(key)
        if stored is not None and not torch.allclose(stored.flatten().double(), torch.tensor(value, dtype=torch.float64),
                                                     atol=1e-4):
            problems.append(
                f"the checkpoint's input conditioner normalises with {what} {stored.flatten().tolist()}, "
                f"the backbone with {list(value)} (info.{what})"
            )
    return problems
