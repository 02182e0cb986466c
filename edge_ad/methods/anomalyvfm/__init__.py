"""AnomalyVFM: zero-shot detection by a foundation ViT with adapted attention and a supervised decoder."""
from __future__ import annotations

from ..registry import MethodEntry
from .config import ADAPTERS, AnomalyVFMConfig, default_summary_tokens
from .decoder import AnomalyDecoder, ConvGNReLU, UpsampleBlock
from .lora import SplitQKV, add_adapters, adapter_parameters, has_adapters, merge_adapters
from .loss import anomalyvfm_loss, focal_loss_with_logits, loss_fn
from .model import AnomalyVFM, AnomalyVFMOutputs

METHOD = MethodEntry(
    name="anomalyvfm",
    config_class=AnomalyVFMConfig,
    detector_class=AnomalyVFM,
    description="zero-shot: foundation ViT with DoRA/LoRA attention + conv decoder trained on synthetic / "
    "auxiliary anomalies; runs on unseen categories",
    loss_fn=loss_fn,
)

__all__ = [
    "ADAPTERS",
    "METHOD",
    "AnomalyDecoder",
    "AnomalyVFM",
    "AnomalyVFMConfig",
    "AnomalyVFMOutputs",
    "ConvGNReLU",
    "SplitQKV",
    "UpsampleBlock",
    "add_adapters",
    "adapter_parameters",
    "anomalyvfm_loss",
    "default_summary_tokens",
    "focal_loss_with_logits",
    "has_adapters",
    "loss_fn",
    "merge_adapters",
]
