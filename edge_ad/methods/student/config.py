"""Configuration of the ``student`` method: a small detector distilled from a trained teacher."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..base import BackboneSpec, MethodConfig

__all__ = ["StudentConfig"]


@dataclass
class StudentConfig(MethodConfig):
    """A cheap backbone + a light convolutional head that regresses a teacher detector's outputs.

    The student is trained by :func:`edge_ad.converters.distill` (it is not trained from good
    images alone: it learns what the teacher flags). Its raw outputs are in the *teacher's* raw
    units, so the teacher's thresholds and the student's own normaliser mean the same thing.

    Attributes:
        backbone: the student's frozen encoder (default EfficientNet-Lite0, stages 2+3, 224 px).
        resize, smoothing_sigma: see :class:`MethodConfig`; ``distill`` copies the teacher's resize
            mode and scales its smoothing (input pixels) to the student's input size.
        adapter_dim: channels of the learned 1x1 projection of the student features into the
            teacher's feature space (= the teacher's fused feature width, so the projection can
            be aligned with the teacher's features); 0 = no adapter, the head reads the student
            features directly.
        head_dim: width of the head's 3x3 convolutions.
        head_depth: number of 3x3 conv + ReLU layers before the final 1x1 conv to one channel.
        top_k: the image-score head reads max, mean and the mean of the ``top_k`` largest patch
            values of the predicted map (clamped to the patch count when built).
        feature_weight: weight of the feature-alignment loss (1 - cosine, per patch); 0 disables
            it (and ``distill`` then builds no adapter).
        score_weight: weight of the image-score regression loss (in teacher score units).
        lr, weight_decay, batch_size, steps: the optimisation ``distill`` uses by default.
        synthetic_fraction: share of training samples that carry a synthetic anomaly (CutPaste
            or Perlin, alternating), so the student sees what the teacher flags.
        synthetic_pool: 0 = a fresh synthetic anomaly (and teacher pass) for every synthetic
            sample of every step (most variety); N > 0 = N synthetic samples made once, their
            teacher targets cached, and steps draw from them (the teacher then runs N times in
            all instead of ~``steps * batch_size * synthetic_fraction``: what makes a slow
            teacher affordable on a CPU).
        teacher: provenance of the teacher: ``{"run_dir", "method", "backbone", "config_sha256",
            "model_sha256", "image_size"}`` (informational; never used to rebuild the module).
    """

    backbone: BackboneSpec = field(
        default_factory=lambda: BackboneSpec("efficientnet_lite0", layers=(2, 3), img_size=(224, 224))
    )
    adapter_dim: int = 0
    head_dim: int = 64
    head_depth: int = 2
    top_k: int = 10
    feature_weight: float = 0.5
    score_weight: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    steps: int = 300
    synthetic_fraction: float = 0.5
    synthetic_pool: int = 0
    teacher: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("adapter_dim", "synthetic_pool"):
            value = getattr(self, name)
            if int(value) != value or int(value) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("head_dim", "head_depth", "top_k", "batch_size", "steps"):
            value = getattr(self, name)
            if int(value) != value or int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("feature_weight", "score_weight", "weight_decay"):
            value = float(getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(self, name, value)
        self.lr = float(self.lr)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.synthetic_fraction = float(self.synthetic_fraction)
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}")
        self.teacher = dict(self.teacher or {})
