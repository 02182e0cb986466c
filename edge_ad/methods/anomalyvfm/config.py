"""AnomalyVFM configuration (paper / reference-code defaults)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..base import BackboneSpec, MethodConfig

__all__ = ["ADAPTERS", "AnomalyVFMConfig", "default_summary_tokens"]

#: Parameter-efficient adaptation of the encoder's attention: DoRA (reference default), LoRA, none.
ADAPTERS = ("dora", "lora", "none")

#: Prefix tokens concatenated into the image head's input, per backbone family (see
#: :func:`default_summary_tokens`).
_RADIO_SUMMARY_TOKENS = 4


def default_summary_tokens(backbone_name: str) -> int:
    """How many leading prefix tokens form the "summary" the image head reads.

    RADIO: timm's C-RADIOv3 keeps RADIO's per-teacher CLS tokens as its first prefix tokens
    (``cls_token`` + the first ``reg_token`` entries; 8 prefix tokens = 4 teacher CLS + 4
    registers in C-RADIOv3). RADIO's own summary concatenates the CLS tokens of the teachers listed
    in the checkpoint's ``summary_idxs``, which timm's conversion drops, so we concatenate the first
    4 prefix tokens (every teacher CLS). Set ``summary_tokens`` to use another count. DINOv2 /
    DINOv3: the CLS token only (1).
    """
    return _RADIO_SUMMARY_TOKENS if backbone_name.startswith("radio") else 1


@dataclass
class AnomalyVFMConfig(MethodConfig):
    """AnomalyVFM: a foundation ViT with DoRA / LoRA-adapted attention and a supervised decoder.

    Model:
        adapter: ``"dora"`` (reference code default), ``"lora"`` (the paper's wording) or
            ``"none"`` (frozen encoder).
        adapter_rank: rank r of every adapter (q, v slices of ``attn.qkv`` and ``attn.proj``).
        adapter_alpha: peft ``lora_alpha`` (scaling alpha / r); the reference uses 1.
        adapter_dropout: dropout on the adapter input (training only).
        adapters_merged: True when the backbone weights already contain the merged adapters (a
            saved run directory always does): then no peft modules are built and loading needs no
            peft.
        decoder_channels: width of the 3x3 bottleneck convs; None = the encoder width C.
        upsample_channels: width of the x2 upsampling blocks (512).
        upsample_blocks: number of x2 upsampling blocks (reference: 1).
        norm_groups: GroupNorm groups (32).
        summary_tokens: leading prefix tokens concatenated for the image head; None = per
            backbone (:func:`default_summary_tokens`).
        mean_filter_size: side (odd, in decoder-map cells) of the mean filter applied to the
            decoder's probability map before it is upsampled to the input, inside the graph (5,
            as the reference on its 96 x 96 map); 1 = off. ``smoothing_sigma`` (the base class's Gaussian) is 0.

    Loss (``loss.py``):
        focal_weight: weight of the pixel focal term in the base loss (5).
        focal_alpha, focal_gamma: focal-loss alpha / gamma (0.25, 2), pixel and image terms.
        l1_clip: (low, high) clip of sigma(mask logit) in the L1 term ((0.1, 0.9)).
        confidence_alpha: alpha of ``mean(C * L_base - alpha * log C)`` (0.1).
        use_confidence: False = plain ``mean(L_base)`` (ablation switch).

    Training (read by the supervised trainer):
        steps: optimiser steps (200: the reference's RADIO recipe, ``train.py:71``; its DINOv2 /
            DINOv3 recipes use 500, README.md:300).
        batch_size: micro-batch size; ``batch_size * accumulate`` = 32 reproduces the reference.
        accumulate: micro-batches per optimiser step.
        lr, weight_decay: AdamW (1e-4, 1e-2).
        grad_clip: global gradient-norm clip (0 = off).
        warmup_steps: linear warm-up steps.
        min_lr_ratio: 1.0 = constant lr; < 1 = cosine decay to ``lr * min_lr_ratio``.
    """

    backbone: BackboneSpec = field(
        default_factory=lambda: BackboneSpec("radio_v3_l16", img_size=(768, 768))
    )
    smoothing_sigma: float = 0.0
    adapter: str = "dora"
    adapter_rank: int = 64
    adapter_alpha: float = 1.0
    adapter_dropout: float = 0.0
    adapters_merged: bool = False
    decoder_channels: int | None = None
    upsample_channels: int = 512
    upsample_blocks: int = 1
    norm_groups: int = 32
    summary_tokens: int | None = None
    mean_filter_size: int = 5
    focal_weight: float = 5.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    l1_clip: tuple[float, float] = (0.1, 0.9)
    confidence_alpha: float = 0.1
    use_confidence: bool = True
    steps: int = 200
    batch_size: int = 8
    accumulate: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-2
    grad_clip: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS}, got {self.adapter!r}")
        ints = ["adapter_rank", "upsample_channels", "norm_groups", "mean_filter_size", "steps", "batch_size",
                "accumulate"]
        for name in ints:
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("upsample_blocks", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or int(value) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            setattr(self, name, int(value))
        if self.mean_filter_size % 2 == 0:
            raise ValueError(f"mean_filter_size must be odd (centred window), got {self.mean_filter_size}")
        for name in ("decoder_channels", "summary_tokens"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or int(value) != value or int(value) <= 0:
                    raise ValueError(f"{name} must be a positive integer or None (default), got {value!r}")
                setattr(self, name, int(value))
        for name in ("decoder_channels", "upsample_channels"):
            value = getattr(self, name)
            if value is not None and value % self.norm_groups:
                raise ValueError(f"{name} ({value}) must be a multiple of norm_groups ({self.norm_groups})")
        low, high = (float(v) for v in self.l1_clip)
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"l1_clip must be (low, high) with 0 <= low < high <= 1, got {self.l1_clip!r}")
        self.l1_clip = (low, high)
        for name in ("adapter_alpha", "lr"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("adapter_dropout", "focal_weight", "focal_gamma", "confidence_alpha", "weight_decay",
                     "grad_clip"):
            if float(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not 0.0 <= float(self.focal_alpha) <= 1.0:
            raise ValueError(f"focal_alpha must be in [0, 1], got {self.focal_alpha}")
        if not 0.0 < float(self.min_lr_ratio) <= 1.0:
            raise ValueError(f"min_lr_ratio must be in (0, 1], got {self.min_lr_ratio}")
        if not 0.0 <= float(self.adapter_dropout) < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout}")
        for name in ("adapter_alpha", "adapter_dropout", "focal_weight", "focal_alpha", "focal_gamma",
                     "confidence_alpha", "lr", "weight_decay", "grad_clip", "min_lr_ratio"):
            setattr(self, name, float(getattr(self, name)))
        self.adapters_merged = bool(self.adapters_merged)
        self.use_confidence = bool(self.use_confidence)

    @property
    def effective_batch_size(self) -> int:
        """Images per optimiser step (``batch_size * accumulate``)."""
        return self.batch_size * self.accumulate
