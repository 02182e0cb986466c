"""FoundAD configuration (defaults = the paper's reference setting, plus per-channel token standardisation)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..base import BackboneSpec, MethodConfig

__all__ = ["FEATURE_NORMS", "FoundADConfig"]

FEATURE_NORMS = ("channel", "none")


@dataclass
class FoundADConfig(MethodConfig):
    """FoundAD: a small transformer (the "manifold projector") learns to map features of a frozen
    foundation encoder back onto the manifold of good features; the residual is the anomaly.

    Defaults = the reference setting, except ``feature_norm="channel"`` (CNN features need it;
    ``--preset paper`` sets ``"none"``, the reference). Reference setting: DINOv3 ViT-B/16 at
    512 x 512, patch tokens of block 9 (third from last) through the final norm; projector 384 wide, 6 blocks, 12 heads; AdamW lr 1e-3, weight decay
    1e-4, constant lr, batch 8; CutPaste context images half of the time; top-10 image score.

    Attributes:
        backbone: frozen encoder (any registry backbone; several CNN layers are fused on the
            finest grid).
        resize, smoothing_sigma: see :class:`MethodConfig` (smoothing in input pixels; 0 = off).
        projector_dim: projector width D (tokens are mapped C -> D -> C).
        projector_depth: number of pre-norm transformer blocks.
        projector_heads: attention heads; must divide ``projector_dim``.
        projector_mlp_ratio: MLP hidden width / D.
        feature_dropout: dropout on the projector's input features during training only.
        top_k: image score = mean of the ``top_k`` largest patch scores (clamped to the patch count
            when the detector is built).
        lr, weight_decay, batch_size, steps: the optimisation the method is meant to be trained
            with; a training loop reads them as defaults (the run's actual values are recorded in
            the checkpoint's ``training`` section).
        synthetic_prob: probability that a training sample's context image is a CutPaste
            synthetic anomaly instead of the clean image (the target is always the clean image).
        augment: apply the reference's staged training augmentation (30 % flip / rot90, 30 %
            colour jitter / grey / blur; :class:`edge_ad.training.augment.ReferenceAugment`) to
            each training image before CutPaste; target and context see the same augmented image.
        cutpaste_hue_jitter: hue jitter of the pasted patch in turns (reference: ``ColorJitter(0.5)``
            for brightness, contrast, saturation and hue, ``src/train.py:61``).
        cutpaste_scar_side: image side (pixels) at which the CutPaste scar sizes (2-16 x 10-25 px)
            apply; the reference draws them in pixels of its 512-pixel inputs.
        feature_norm: ``"channel"`` standardises every encoder token per channel with the mean /
            standard deviation of the good training images' tokens (fixed buffers, fitted once
            before training) before the projector and the residual; ``"none"`` uses the raw
            features. The reference's ViT tokens come out of the encoder's final LayerNorm; CNN
            stages are not normalised (EfficientNet-Lite0 stage 3: std 4-7 per channel around
            non-zero means), so a projector that starts near zero spends its first hundreds of
            steps learning that scale. ``--preset paper`` sets ``"none"`` (the reference).
        class_foreground: paste inside the reference's per-class foreground rule when the
            category folder is an MVTec AD / VisA class name
            (:func:`edge_ad.synth.class_foreground.class_foreground`); other categories, or False,
            use the generic foreground estimate.
    """

    backbone: BackboneSpec = field(
        default_factory=lambda: BackboneSpec("dinov3_vitb16", layers=(9,), img_size=(512, 512))
    )
    projector_dim: int = 384
    projector_depth: int = 6
    projector_heads: int = 12
    projector_mlp_ratio: float = 4.0
    feature_dropout: float = 0.2
    top_k: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    steps: int = 2000
    synthetic_prob: float = 0.5
    augment: bool = True
    cutpaste_hue_jitter: float = 0.5
    cutpaste_scar_side: float = 512.0
    class_foreground: bool = False
    feature_norm: str = "channel"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("projector_dim", "projector_depth", "projector_heads", "top_k", "batch_size", "steps"):
            value = getattr(self, name)
            if int(value) != value or int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if self.projector_dim % self.projector_heads:
            raise ValueError(
                f"projector_heads ({self.projector_heads}) must divide projector_dim ({self.projector_dim})"
            )
        if not self.projector_mlp_ratio > 0:
            raise ValueError(f"projector_mlp_ratio must be positive, got {self.projector_mlp_ratio}")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), got {self.feature_dropout}")
        if not 0.0 <= self.synthetic_prob <= 1.0:
            raise ValueError(f"synthetic_prob must be in [0, 1], got {self.synthetic_prob}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        self.projector_mlp_ratio = float(self.projector_mlp_ratio)
        self.feature_dropout = float(self.feature_dropout)
        self.synthetic_prob = float(self.synthetic_prob)
        self.augment = bool(self.augment)
        self.class_foreground = bool(self.class_foreground)
        self.cutpaste_hue_jitter = float(self.cutpaste_hue_jitter)
        self.cutpaste_scar_side = float(self.cutpaste_scar_side)
        if self.cutpaste_hue_jitter < 0 or not self.cutpaste_scar_side > 0:
            raise ValueError("cutpaste_hue_jitter must be >= 0 and cutpaste_scar_side > 0 pixels, got "
                             f"{self.cutpaste_hue_jitter}, {self.cutpaste_scar_side}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got {self.feature_norm!r}")
        self.lr = float(self.lr)
        self.weight_decay = float(self.weight_decay)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FoundADConfig":
        """As :meth:`MethodConfig.from_dict`; a saved config without ``feature_norm`` was written
        before the field existed, with raw features, so it loads as ``"none"``."""
        if isinstance(d, dict) and "feature_norm" not in d:
            d = {**d, "feature_norm": "none"}
        return super().from_dict(d)  # type: ignore[return-value]
