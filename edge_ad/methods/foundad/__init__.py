"""FoundAD: few-shot anomaly detection with a frozen foundation encoder and a manifold projector."""
from __future__ import annotations

from ..registry import MethodEntry
from .config import FoundADConfig
from .loss import FoundADBatch, build_training_batch, foundad_loss, loss_fn, projection_loss
from .model import FoundAD, ManifoldProjector, ProjectionPair, ProjectorBlock

METHOD = MethodEntry(
    name="foundad",
    config_class=FoundADConfig,
    detector_class=FoundAD,
    description="few-shot: frozen encoder + manifold projector trained on good and CutPaste images; "
    "anomaly = projection residual",
)

__all__ = [
    "METHOD",
    "FoundAD",
    "FoundADBatch",
    "FoundADConfig",
    "ManifoldProjector",
    "ProjectionPair",
    "ProjectorBlock",
    "build_training_batch",
    "foundad_loss",
    "loss_fn",
    "projection_loss",
]
