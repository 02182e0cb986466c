"""AVA-DINO configuration (defaults = the reference code's setting)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..base import BackboneSpec, MethodConfig

__all__ = ["AVADinoConfig", "TEXT_LAYOUTS"]

#: ``"paper"``: T_n from the normal prompt, T_a from the abnormal one (the paper's meaning).
#: ``"reference"``: the reference code's interleaved columns (tools/utils.py:105); weights trained
#: by the reference code only load correctly with it.
TEXT_LAYOUTS = ("paper", "reference")


@dataclass
class AVADinoConfig(MethodConfig):
    """AVA-DINO: zero-shot anomaly detection with anomaly-aware dual adapters on a frozen DINOv3,
    routed by CLIP text embeddings of normal / abnormal prompt ensembles.

    Reference setting (Aqeel et al., "Anomaly-Aware Vision-Language Adapters for Zero-Shot Anomaly
    Detection", public code): DINOv3 ViT-L/16 at 512 x 512, blocks 5/11/17/23 (0-based) through the
    final norm, patch tokens standardised per image; adapters 1024 -> 768 -> 1024; CLIP ViT-L/14-336
    text embeddings (768-d); routing temperature 0.1; cross-modal logit scale 100, calibration
    scale 10; map = layer mean of the cross-modal anomaly probability, no smoothing, image score =
    its maximum; AdamW lr 1e-4, weight decay 1e-2, batch 16, 3 % linear warm-up then constant lr;
    loss 0.5 seg + 0.25 calibration + 0.25 global CE + 0.1 routing MSE.

    Attributes:
        backbone: frozen ViT (any registry ViT; its per-block CLS tokens are used too).
        resize: see :class:`MethodConfig`.
        smoothing_sigma: Gaussian smoothing of the final map in input pixels; 0 (default) as in the
            reference code, 4 as in most CLIP-based zero-shot detectors.
        bottleneck: hidden width of the patch / CLS adapters (``Linear(C -> bottleneck)``).
        text_dim: width D of the CLIP text embeddings (768 for CLIP ViT-L/14); the prompt adapters
            are D -> D -> D.
        routing_temperature: softmax temperature of the text-guided routing.
        cross_modal_scale: logit scale of ``softmax(scale * f' . T)``.
        calibration_scale: logit scale of ``sigmoid(scale * f' . cls')``.
        class_name: the class name whose prompt embeddings the detector holds (its deployment
            class); None until set (see :func:`edge_ad.methods.avadino.set_class_name`), then the
            first inference sets it to ``default_class_name``.
        default_class_name: name used when inference runs before any class name was set.
        class_names: training category folder -> class name for the prompts; a category not
            listed uses its folder name with ``_`` replaced by a space.
        text_model: local CLIP directory used to encode class names (training / conversion only).
        text_embeddings: precomputed ``.safetensors`` embeddings file (class name -> (2, D)).
        text_layout: ``"paper"`` (T_n from the normal prompt, T_a from the abnormal one) or
            ``"reference"`` (the reference code's interleaved ``view(B, 768, 2)`` columns, needed
            to load weights trained by the reference code; the paper preset uses it).
        seg_weight, calibration_weight, global_weight, routing_weight: loss weights.
        focal_gamma: focusing exponent of the focal loss.
        steps, batch_size, accumulate, lr, weight_decay, grad_clip, warmup_steps, min_lr_ratio:
            the supervised trainer's optimisation (see ``edge_ad.training.supervised``); the
            reference trains 10 epochs of VisA's test split (~1350 steps of 16) with 3 % warm-up.
    """

    backbone: BackboneSpec = field(
        default_factory=lambda: BackboneSpec("dinov3_vitl16", layers=(5, 11, 17, 23), img_size=(512, 512))
    )
    smoothing_sigma: float = 0.0
    bottleneck: int = 768
    text_dim: int = 768
    routing_temperature: float = 0.1
    cross_modal_scale: float = 100.0
    calibration_scale: float = 10.0
    class_name: str | None = None
    default_class_name: str = "object"
    class_names: dict[str, str] = field(default_factory=dict)
    text_model: str | None = None
    text_embeddings: str | None = None
    text_layout: str = "paper"
    seg_weight: float = 0.5
    calibration_weight: float = 0.25
    global_weight: float = 0.25
    routing_weight: float = 0.1
    focal_gamma: float = 2.0
    steps: int = 1350
    batch_size: int = 16
    accumulate: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    grad_clip: float = 0.0
    warmup_steps: int = 40
    min_lr_ratio: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("bottleneck", "text_dim", "steps", "batch_size", "accumulate"):
            value = getattr(self, name)
            if int(value) != value or int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        if int(self.warmup_steps) != self.warmup_steps or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        self.warmup_steps = int(self.warmup_steps)
        for name in ("routing_temperature", "cross_modal_scale", "calibration_scale", "lr"):
            value = float(getattr(self, name))
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}")
            setattr(self, name, value)
        for name in ("seg_weight", "calibration_weight", "global_weight", "routing_weight", "focal_gamma",
                     "weight_decay", "grad_clip"):
            value = float(getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(self, name, value)
        self.min_lr_ratio = float(self.min_lr_ratio)
        if self.text_layout not in TEXT_LAYOUTS:
            raise ValueError(f"text_layout must be one of {TEXT_LAYOUTS}, got {self.text_layout!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (1 = constant lr), got {self.min_lr_ratio}")
        if not isinstance(self.class_names, dict):
            raise TypeError(
                f"class_names must map category folder -> class name, e.g. {{'mvtec_hazelnut_256': 'hazelnut'}}, "
                f"got {type(self.class_names).__name__}"
            )
        self.class_names = {str(k): str(v).strip() for k, v in self.class_names.items()}
        if any(not v for v in self.class_names.values()):
            raise ValueError(f"class_names values must be non-empty, got {self.class_names}")
        if self.class_name is not None:
            self.class_name = str(self.class_name).strip() or None
        self.default_class_name = str(self.default_class_name).strip()
        if not self.default_class_name:
            raise ValueError("default_class_name must be non-empty")
        self.text_model = None if self.text_model is None else str(self.text_model)
        self.text_embeddings = None if self.text_embeddings is None else str(self.text_embeddings)

    def class_name_for(self, category: str) -> str:
        """Prompt class name of a training category folder (``class_names`` or the folder name)."""
        return self.class_names.get(category, category.replace("_", " ").strip())
