"""VisualAD: zero-shot anomaly detection with learnable anomaly / normal tokens in a frozen ViT."""
from __future__ import annotations

from ..registry import MethodEntry
from .attention import SelfAlignmentMLP, SpatialCrossAttention
from .config import VisualADConfig
from .loss import binary_dice_loss, binary_focal_loss, loss_fn, param_groups, token_margin_loss, visualad_loss
from .model import TrainOutputs, VisualAD, VisualADHead
from .scoring import SymmetricGaussianBlur, TopFractionMean, top_fraction_mean_exact

METHOD = MethodEntry(
    name="visualad",
    config_class=VisualADConfig,
    detector_class=VisualAD,
    description="zero-shot: learnable anomaly / normal tokens inside a frozen ViT (CLIP / DINOv2 / DINOv3), "
    "per-layer cross-attention + alignment; anomaly = cos(patch, t_a) - cos(patch, t_n)",
    loss_fn=loss_fn,
    param_groups=param_groups,
)

__all__ = [
    "METHOD",
    "SelfAlignmentMLP",
    "SpatialCrossAttention",
    "SymmetricGaussianBlur",
    "TopFractionMean",
    "TrainOutputs",
    "VisualAD",
    "VisualADConfig",
    "VisualADHead",
    "binary_dice_loss",
    "binary_focal_loss",
    "loss_fn",
    "param_groups",
    "token_margin_loss",
    "top_fraction_mean_exact",
    "visualad_loss",
]
