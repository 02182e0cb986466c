"""VisualAD configuration (defaults = the reference code's CLIP ViT-L/14-336 setting at its native 336 px;
``--preset paper`` runs the reference's 518 px)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..base import BackboneSpec, MethodConfig

__all__ = ["VisualADConfig"]


@dataclass
class VisualADConfig(MethodConfig):
    """VisualAD: two learnable tokens (anomaly, normal) ride through a frozen ViT; patches are
    scored by their cosine similarity to the two tokens at several depths.

    Reference setting (VisualAD public code, ``train.py`` / ``utils/training_utils.py``): CLIP
    ViT-L/14-336 run at **518 x 518** (``train.py:347``; its 24 x 24 position grid interpolated
    bilinearly to 37 x 37, which ``clip_vitl14_336`` does once when loading weights at that size;
    ``--preset paper``), taps after blocks 6 / 12 / 18 / 24 (1-based; ``layers=(5, 11, 17, 23)``
    here, 0-based like every edge_ad backbone), 4 anchor queries per cross-attention, residual scale
    0.01, dropout 0.1, AdamW (tokens at ``lr``, everything else at ``lr * rest_lr_ratio``, weight
    decay 0.01), cosine decay to 10 % of the lr, each token's gradient clipped to norm 1.0, batch 8,
    Gaussian sigma 4 px, image score = mean of the top 1 % pixels. The default size here is CLIP's
    native 336 px (``--preset edge``: 2.4x fewer tokens, and TopK stays under TensorRT's limit). The language-free variant of the
    paper swaps the backbone for any DINOv2 / DINOv3 registry ViT.

    Attributes:
        backbone: frozen ViT (any ``TimmViTBackbone`` of the registry: ``clip_vitl14_336``,
            ``dinov2_*``, ``dinov3_*``); ``layers`` are the tapped blocks (0-based, ascending).
        resize, smoothing_sigma: see :class:`MethodConfig`. The smoothing pads symmetrically (the
            edge pixel repeated, scipy's default ``mode="reflect"``), as the reference's
            ``scipy.ndimage.gaussian_filter``.
        num_anchors: learnable anchor queries per Spatial-Aware Cross-Attention (reference 4).
        key_pos_tokens: rows of each cross-attention's learnable key positional embedding; the
            first ``num_patches`` are used. The reference allocates 1536 so one module fits CLIP
            336 px (576 patches) and DINOv2 518 px (1369); 0 = exactly the patch count.
        res_scale_init: initial residual scale of the cross-attention output (reference 0.01).
        dropout: dropout of the cross-attention weights / output and inside the alignment MLP
            (training only).
        alignment_hidden_ratio: hidden width of the Self-Alignment MLP / C (reference 1.0).
        train_token_pos: also train the two tokens' positional embeddings. The reference code
            initialises them from the CLS position and leaves them out of the optimiser (False);
            the paper describes them as learnable (True).
        top_fraction: image score = mean of this fraction of the highest map pixels (0.01 = 1 %).
        max_topk: the largest K a TopK may use (TensorRT's limit is 3840); above it the score is
            taken on an average-pooled map (see ``scoring.TopFractionMean``).
        steps, batch_size, accumulate, lr, weight_decay, grad_clip, warmup_steps, min_lr_ratio:
            the supervised ("zero-shot protocol") trainer's defaults. ``lr`` is the tokens' lr
            (reference 1e-3); the other trainable parts get ``lr * rest_lr_ratio``. ``grad_clip``
            is the global clip (off in the reference); the per-token clip is ``token_grad_clip``.
            ``steps=432`` is the reference's 2 epochs over MVTec's test split at batch 8.
        rest_lr_ratio: lr of norm / cross-attention / alignment relative to the tokens' (0.1).
        token_grad_clip: gradient-norm clip applied to each token separately (1.0; 0 = off).
        margin: cosine margin of the token-separation loss ``clamp(cos(t_a, t_n) + margin, 0)``.
    """

    backbone: BackboneSpec = field(
        default_factory=lambda: BackboneSpec("clip_vitl14_336", layers=(5, 11, 17, 23), img_size=(336, 336))
    )
    num_anchors: int = 4
    key_pos_tokens: int = 1536
    res_scale_init: float = 0.01
    dropout: float = 0.1
    alignment_hidden_ratio: float = 1.0
    train_token_pos: bool = False
    top_fraction: float = 0.01
    max_topk: int = 3840
    steps: int = 432
    batch_size: int = 8
    accumulate: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    rest_lr_ratio: float = 0.1
    token_grad_clip: float = 1.0
    margin: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("num_anchors", "max_topk", "steps", "batch_size", "accumulate"):
            value = getattr(self, name)
            if int(value) != value or int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("key_pos_tokens", "warmup_steps"):
            value = getattr(self, name)
            if int(value) != value or int(value) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
            setattr(self, name, int(value))
        for name in ("res_scale_init", "dropout", "alignment_hidden_ratio", "top_fraction", "lr",
                     "weight_decay", "grad_clip", "min_lr_ratio", "rest_lr_ratio", "token_grad_clip", "margin"):
            setattr(self, name, float(getattr(self, name)))
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.alignment_hidden_ratio > 0:
            raise ValueError(f"alignment_hidden_ratio must be > 0, got {self.alignment_hidden_ratio}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1] (0.01 = top 1 %), got {self.top_fraction}")
        if not self.lr > 0 or self.weight_decay < 0 or self.grad_clip < 0 or self.token_grad_clip < 0:
            raise ValueError("lr must be > 0; weight_decay, grad_clip and token_grad_clip must be >= 0")
        if not 0.0 < self.min_lr_ratio <= 1.0 or not self.rest_lr_ratio > 0:
            raise ValueError(
                f"min_lr_ratio must be in (0, 1] and rest_lr_ratio > 0, got {self.min_lr_ratio}, {self.rest_lr_ratio}"
            )
        self.train_token_pos = bool(self.train_token_pos)
        layers = self.backbone.layers
        if layers is not None and min(layers) >= 0 and list(layers) != sorted(set(layers)):
            raise ValueError(f"backbone layers must be distinct and ascending (tap order), got {layers}")
