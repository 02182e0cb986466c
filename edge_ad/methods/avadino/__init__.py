"""AVA-DINO: zero-shot anomaly detection with text-routed anomaly-aware adapters on a frozen DINOv3."""
from __future__ import annotations

from ..registry import MethodEntry
from .adapters import AVADinoHead, BottleneckAdapter, DualAdapter
from .config import AVADinoConfig
from .loss import avadino_loss, dice_loss, focal_loss, loss_fn, routing_loss
from .model import AVADino, AVADinoOutputs, set_class_name, standardize_tokens
from .text import (
    ClipTextEncoder,
    TextEmbeddings,
    load_text_embeddings,
    prompt_sentences,
    save_text_embeddings,
)

METHOD = MethodEntry(
    name="avadino",
    config_class=AVADinoConfig,
    detector_class=AVADino,
    description="zero-shot: frozen DINOv3 + normal / anomaly adapters routed by CLIP prompt embeddings "
    "(trained on auxiliary categories with masks); map = cross-modal anomaly probability",
    loss_fn=loss_fn,
)

__all__ = [
    "METHOD",
    "AVADino",
    "AVADinoConfig",
    "AVADinoHead",
    "AVADinoOutputs",
    "BottleneckAdapter",
    "ClipTextEncoder",
    "DualAdapter",
    "TextEmbeddings",
    "avadino_loss",
    "dice_loss",
    "focal_loss",
    "load_text_embeddings",
    "loss_fn",
    "prompt_sentences",
    "routing_loss",
    "save_text_embeddings",
    "set_class_name",
    "standardize_tokens",
]
