"""The method contract every detector fulfils.

A detector is a pure ``nn.Module``:

* ``forward(images)`` takes normalised float images (B, 3, H, W) (``PreprocessSpec`` of the
  detector: size, mean / std of its backbone) and returns :class:`DetectorOutput`
  ``(anomaly_map (B, 1, H, W), score (B,))``: the map at input resolution, already upsampled and
  smoothed, both normalised with statistics of good images (see :class:`ScoreNormalizer`).
* No Python branch depends on tensor values, so ``torch.onnx.export`` at the fixed input size
  produces the same graph the torch module runs.
* The frozen backbone is a submodule; its weights are part of the checkpoint by default, so a run
  directory rebuilds the detector without network access or training code.

How a method is trained is declared by ``fit_mode`` (a class attribute):

``"gradient"`` (e.g. FoundAD)
    The generic loop optimises ``trainable_parameters()`` (everything with ``requires_grad``; the
    backbone is frozen here). The method's ``loss.py`` provides ``loss_fn(model, batch)`` and a
    batch builder; ``loss_fn`` calls the module itself (``model(images, context)``) so that a
    ``DistributedDataParallel`` wrapper sees the call.
``"memory"`` (e.g. knn)
    No optimiser: ``detector.fit(good_image_batches)`` builds the state (a memory bank).
``"supervised"`` (zero-shot methods: AnomalyVFM, VisualAD, AVA-DINO)
    Trained on auxiliary categories with pixel masks (real test splits and / or synthetic anomalies)
    by :mod:`edge_ad.training.supervised`, then applied to categories never seen. The method's
    ``METHOD`` entry provides ``loss_fn(model, SupervisedBatch)`` (and optionally
    ``param_groups``); ``forward(images, train_outputs=True)`` returns what that loss needs.
``"none"``
    Nothing to fit beyond the normalisation.

Every method then calls ``detector.fit_normalization(good_image_batches)`` (ideally on good images
held out from training) before :func:`edge_ad.methods.checkpoint.save_checkpoint`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from edge_ad.backbones.base import Backbone, BackboneInfo
from edge_ad.runtime.preprocess_spec import DEFAULT_RESIZE, RESIZE_MODES, PreprocessSpec

from .common import GaussianBlur2d, ScoreNormalizer, fuse_feature_maps, iterate_image_batches, upsample_to

__all__ = [
    "FIT_MODES",
    "AnomalyDetector",
    "BackboneSpec",
    "DetectorOutput",
    "MethodConfig",
]

#: How a method is trained; see the module docstring.
FIT_MODES = ("gradient", "memory", "supervised", "none")


class DetectorOutput(NamedTuple):
    """What every detector returns (a tuple, so ONNX export flattens it to two outputs).

    Attributes:
        anomaly_map: (B, 1, H, W) float, at input resolution; normalised units (standard deviations
            of good-image pixels above their mean) once the normaliser is fitted, raw before.
        score: (B,) float image anomaly score, normalised the same way with image-level statistics.
    """

    anomaly_map: torch.Tensor
    score: torch.Tensor


def _as_size(value: Any, what: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, int):
        return (int(value), int(value))
    size = tuple(int(v) for v in value)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{what} must be a positive int or (height, width), got {value!r}")
    return size  # type: ignore[return-value]


@dataclass
class BackboneSpec:
    """Everything ``edge_ad.backbones.build_backbone`` needs to rebuild the same backbone.

    Attributes:
        name: backbone registry name (``"dinov3_vitb16"``, ``"efficientnet_lite0"``, ...).
        layers: block / stage indices (0-based) whose features the method uses; None = the
            backbone's default.
        img_size: (H, W) input size in pixels; None = the backbone's default.
        weights: local weights file used when training; a checkpoint that includes the backbone
            does not need it again.
        pretrained: load the registry's default pretrained weights (offline cache).
        overrides: extra keyword arguments for the backbone constructor (e.g. ``depth`` for tiny
            test models).
    """

    name: str
    layers: tuple[int, ...] | None = None
    img_size: tuple[int, int] | None = None
    weights: str | None = None
    pretrained: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"backbone name must be a non-empty string, got {self.name!r}")
        if self.layers is not None:
            if isinstance(self.layers, int):
                self.layers = (self.layers,)
            self.layers = tuple(int(i) for i in self.layers)
            if not self.layers:
                raise ValueError("backbone layers must not be empty (None selects the default)")
        self.img_size = _as_size(self.img_size, "backbone img_size")
        self.weights = None if self.weights is None else str(self.weights)
        self.pretrained = bool(self.pretrained)
        self.overrides = dict(self.overrides or {})

    def build(self, *, load_weights: bool = True) -> Backbone:
        """Build the backbone; ``load_weights=False`` skips weights (a checkpoint supplies them)."""
        from edge_ad.backbones import build_backbone

        img_size: Any = self.img_size
        if img_size is not None and img_size[0] == img_size[1]:
            img_size = img_size[0]  # builders accept an int for square inputs everywhere
        return build_backbone(
            self.name,
            weights=self.weights if load_weights else None,
            layers=list(self.layers) if self.layers is not None else None,
            img_size=img_size,
            pretrained=self.pretrained and load_weights,
            **self.overrides,
        )

    @classmethod
    def from_info(cls, info: BackboneInfo, **kwargs: Any) -> "BackboneSpec":
        """The spec of an already built backbone (name, layers and size from its ``info``)."""
        return cls(name=info.name, layers=tuple(info.layers), img_size=tuple(info.img_size), **kwargs)


def _plain(value: Any) -> Any:
    """Tuples -> lists, recursively: YAML's safe dumper knows lists only."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@dataclass
class MethodConfig:
    """Fields every method config has; a method subclasses it and adds its own (all with defaults).

    Attributes:
        backbone: the frozen encoder (see :class:`BackboneSpec`).
        resize: how frames are resized to the input size (``"auto"``: area averaging when
            downscaling, bilinear when upscaling; or ``"bilinear"`` / ``"area"``), recorded in the
            detector's :class:`PreprocessSpec` so training, evaluation and runtime agree.
        smoothing_sigma: Gaussian smoothing of the upsampled anomaly map, in input pixels (0 = off).
    """

    backbone: BackboneSpec = field(
        default_factory=lambda: BackboneSpec("dinov3_vitb16", layers=(9,), img_size=(512, 512))
    )
    resize: str = DEFAULT_RESIZE
    smoothing_sigma: float = 4.0

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = BackboneSpec(**self.backbone)
        if isinstance(self.backbone, str):
            self.backbone = BackboneSpec(self.backbone)
        if not isinstance(self.backbone, BackboneSpec):
            raise TypeError(f"backbone must be a BackboneSpec, dict or name, got {type(self.backbone).__name__}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        self.smoothing_sigma = float(self.smoothing_sigma)
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must be >= 0 pixels, got {self.smoothing_sigma}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (lists, not tuples) for YAML."""
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MethodConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error so a typo cannot pass silently."""
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; expected a subset of {sorted(names)}")
        kwargs = dict(d)
        if isinstance(kwargs.get("backbone"), dict):
            bb = kwargs["backbone"]
            bb_names = {f.name for f in dataclasses.fields(BackboneSpec)}
            bad = set(bb) - bb_names
            if bad:
                raise ValueError(f"unknown backbone keys {sorted(bad)}; expected a subset of {sorted(bb_names)}")
            kwargs["backbone"] = BackboneSpec(**bb)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "MethodConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


class AnomalyDetector(nn.Module):
    """Base class of all detectors: frozen backbone + method head + upsampling, smoothing, normalisation.

    Subclasses set ``method``, ``config_class`` and ``fit_mode`` and implement
    :meth:`patch_scores` (B, 1, h, w) and :meth:`image_score` (B,); the base class turns those into
    the contract's outputs.

    Args:
        config: the method's config (a :class:`MethodConfig` subclass).
        backbone: an already built backbone; None builds ``config.backbone``. Its ``info`` must
            agree with ``config.backbone`` (name, layers, size) when those are set.

    Attributes:
        backbone: the frozen encoder, always in eval mode.
        image_size: (H, W) input size in pixels.
        grid_size: (h, w) of the fused patch grid (the finest requested feature map).
        feature_dim: channels of the fused features (sum over layers).
        smoother: :class:`GaussianBlur2d` or identity.
        normalizer: :class:`ScoreNormalizer` (buffers in the checkpoint).
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    fit_mode: ClassVar[str] = "none"
    #: OpenVINO INT8 recipe for CNN backbones: quantise the depthwise convs (15-21 % of knn's INT8
    #: engine time on a 2-core CPU, benchmarks/int8_recipe.py). A method whose scores need more fidelity than that speed
    #: is worth sets False (``edge_ad.convert(..., quantize_depthwise=...)`` overrides either way).
    int8_quantize_depthwise: ClassVar[bool] = True

    def __init__(self, config: MethodConfig, backbone: Backbone | None = None) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if self.fit_mode not in FIT_MODES:
            raise ValueError(f"{type(self).__name__}.fit_mode must be one of {FIT_MODES}")
        if backbone is None:
            backbone = config.backbone.build()
        if not isinstance(backbone, Backbone):
            raise TypeError(f"backbone must be an edge_ad Backbone, got {type(backbone).__name__}")
        info = backbone.info
        _check_backbone_agrees(config.backbone, info)
        # Record what was actually built (defaults, negative layer indices resolved) so the
        # checkpoint config rebuilds exactly this backbone.
        config = config.replace(
            backbone=dataclasses.replace(config.backbone, layers=tuple(info.layers), img_size=tuple(info.img_size))
        )
        self.config = config
        self.backbone = backbone
        # Frozen: no optimiser ever sees it, and eval mode is pinned in train() (dropout, BN stats).
        self.backbone.requires_grad_(False)
        self.backbone.eval()

        self.image_size: tuple[int, int] = (int(info.img_size[0]), int(info.img_size[1]))
        self.feature_dim: int = int(sum(info.feature_dims))
        stride = min(info.feature_strides) if info.feature_strides else info.patch_size
        self.grid_size: tuple[int, int] = (self.image_size[0] // stride, self.image_size[1] // stride)
        self.num_patches: int = self.grid_size[0] * self.grid_size[1]

        if config.smoothing_sigma > 0:
            blur = GaussianBlur2d(config.smoothing_sigma, channels=1)
            blur.check_size(self.image_size)
            self.smoother: nn.Module = blur
        else:
            self.smoother = nn.Identity()
        self.normalizer = ScoreNormalizer()

    # ------------------------------------------------------------------ contract
    @property
    def preprocess_spec(self) -> PreprocessSpec:
        """How uint8 frames become this detector's input (size, backbone mean / std, resize mode)."""
        info = self.backbone.info
        return PreprocessSpec(
            height=self.image_size[0],
            width=self.image_size[1],
            mean=tuple(info.mean),
            std=tuple(info.std),
            resize=self.config.resize,
        )

    def forward(self, images: torch.Tensor) -> DetectorOutput:
        """Normalised anomaly map (B, 1, H, W) and score (B,) of normalised images (B, 3, H, W)."""
        raw = self.forward_raw(images)
        anomaly_map, score = self.normalizer(raw.anomaly_map, raw.score)
        return DetectorOutput(anomaly_map, score)

    def forward_raw(self, images: torch.Tensor) -> DetectorOutput:
        """Like :meth:`forward` but without the good-image normalisation (the method's own units)."""
        self.check_images(images)
        patches = self.patch_scores(images)
        score = self.image_score(patches)
        anomaly_map = self.smoother(upsample_to(patches, self.image_size))
        return DetectorOutput(anomaly_map, score)

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Raw per-patch anomaly (B, 1, h, w) on :attr:`grid_size`."""
        raise NotImplementedError

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Raw image score (B,) from patch scores (B, 1, h, w)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    def extract_features(self, images: torch.Tensor) -> torch.Tensor:
        """Fused backbone features (B, C, h, w), C = :attr:`feature_dim`, (h, w) = :attr:`grid_size`."""
        features, _ = self.backbone(images)
        fused = fuse_feature_maps(features)
        if tuple(fused.shape[1:]) != (self.feature_dim, *self.grid_size):
            raise RuntimeError(
                f"backbone {self.backbone.info.name!r} returned fused features {tuple(fused.shape[1:])}, "
                f"its info promises {(self.feature_dim, *self.grid_size)}"
            )
        return fused

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error for inputs that are not (B, 3, H, W) floats of the detector's size.

        Shape checks are static (fixed at export), so they are not data-dependent control flow.
        """
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, 3, H, W), got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be (B, 3, H, W) RGB, got shape {tuple(images.shape)}; "
                "grey frames must be replicated to 3 channels (edge_ad.runtime.preprocessing does this)"
            )
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(
                f"images must be {self.image_size[0]}x{self.image_size[1]} (the detector's input size), "
                f"got {images.shape[-2]}x{images.shape[-1]}; resize with detector.preprocess_spec"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor normalised with the backbone mean/std, got {images.dtype}")

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """Zeros (batch_size, 3, H, W) on the detector's device: a tracing / export input."""
        return torch.zeros(batch_size, 3, *self.image_size, device=self.device)

    @property
    def device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    def train(self, mode: bool = True) -> "AnomalyDetector":
        super().train(mode)
        self.backbone.eval()  # the encoder is frozen: its dropout / norm statistics never train
        return self

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters an optimiser should update (the backbone's are frozen)."""
        return (p for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def fit_normalization(
        self, good_images: torch.Tensor | Iterable[torch.Tensor], *, progress: bool = False
    ) -> dict[str, float]:
        """Fit the map / score normalisation on good images and store it in buffers.

        Args:
            good_images: normalised images (N, 3, H, W) or an iterable of such batches (also
                ``(images, ...)`` tuples). Prefer good images the method was not trained on:
                training images score optimistically low for a learned method.
            progress: show a tqdm bar over the batches.

        Returns:
            The fitted statistics (see :meth:`ScoreNormalizer.stats`).
        """
        was_training = self.training
        self.eval()
        maps, scores = [], []
        batches = iterate_image_batches(good_images)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="fit normalisation", unit="batch", dynamic_ncols=True)
        try:
            for batch in batches:
                raw = self.forward_raw(batch.to(self.device))
                maps.append(raw.anomaly_map.float().cpu())
                scores.append(raw.score.float().cpu())
            self.normalizer.fit(maps, scores)
        finally:
            self.train(was_training)
        return self.normalizer.stats()

    # ------------------------------------------------------------------ checkpoint support
    def config_dict(self) -> dict[str, Any]:
        """The config as plain types; :func:`save_checkpoint` writes it to ``config.yaml``."""
        return self.config.to_dict()


def _check_backbone_agrees(spec: BackboneSpec, info: BackboneInfo) -> None:
    """A passed-in backbone must be the one the config describes, or the checkpoint would lie."""
    problems = []
    if spec.name != info.name:
        problems.append(f"name {info.name!r} != config {spec.name!r}")
    explicit = spec.layers is not None and all(i >= 0 for i in spec.layers)  # negatives resolve per depth
    if explicit and tuple(spec.layers) != tuple(info.layers):
        problems.append(f"layers {tuple(info.layers)} != config {tuple(spec.layers)}")
    if spec.img_size is not None and tuple(spec.img_size) != tuple(info.img_size):
        problems.append(f"img_size {tuple(info.img_size)} != config {tuple(spec.img_size)}")
    if problems:
        raise ValueError("backbone does not match config.backbone: " + "; ".join(problems))
