"""``student``: a small detector distilled from a trained teacher (see :func:`edge_ad.converters.distill`)."""
from __future__ import annotations

from ..registry import MethodEntry
from .config import StudentConfig
from .loss import StudentBatch, distillation_loss, loss_fn
from .model import StudentDetector, StudentTrainingOutput

METHOD = MethodEntry(
    name="student",
    config_class=StudentConfig,
    detector_class=StudentDetector,
    description="distilled: small frozen encoder + memory bank + conv head fitted to a teacher detector's maps and scores "
    "(train with `edge-ad distill`)",
)

__all__ = ["METHOD", "StudentBatch", "StudentConfig", "StudentDetector", "StudentTrainingOutput",
           "distillation_loss", "loss_fn"]
