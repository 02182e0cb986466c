"""Named training presets: ``paper`` (the reference code's recipe) and ``edge`` (CPU-friendly).

One registry (:data:`PRESETS`), keyed by ``(method, preset)``. A preset fills every
:func:`edge_ad.train` argument the caller left unset (``None``); explicit arguments always win.
Without a preset, ``train`` uses the method config's defaults and the protocol defaults as before.

Where each ``paper`` value comes from (file and line of the reference repositories) is asserted in
``tests/test_presets.py``; where ``edge`` departs from ``paper`` and why is tabled in
``docs/REPRODUCE.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["PRESETS", "Preset", "apply_preset", "cpu_hint", "get_preset", "list_presets", "preset_config"]

PRESET_NAMES = ("paper", "edge")


@dataclass(frozen=True)
class Preset:
    """A complete training recipe for one method.

    Attributes:
        method, name: registry method and preset name.
        summary: one line for ``--print-config`` and the docs.
        backbone: backbone registry name.
        train: :func:`edge_ad.train` keyword values (``image_size``, ``layers``, ``steps``,
            ``batch_size``, ``lr``, ``shots``, ``synthetic_fraction``, ...).
        options: method config fields (``method_options``).
        all_categories: few-shot (gradient) methods: with no ``category`` given, train one model
            on every category of the dataset (FoundAD's paper protocol).
        per_backbone: ``train`` values that change when another backbone is chosen
            (``--backbone``), e.g. AnomalyVFM's 500 steps for DINOv3; explicit arguments still win.
        hours: rough wall time of the recipe on the hardware in ``hardware`` (docs / hints).
        hardware: what ``hours`` was estimated for.
    """

    method: str
    name: str
    summary: str
    backbone: str
    train: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    all_categories: bool = False
    per_backbone: dict[str, dict[str, Any]] = field(default_factory=dict)
    hours: float | None = None
    hardware: str = ""

    def train_for(self, backbone: str | None) -> dict[str, Any]:
        """``train`` with the values of ``per_backbone[backbone]`` applied."""
        return {**self.train, **self.per_backbone.get(backbone or self.backbone, {})}


def _foundad() -> list[Preset]:
    common = {"projector_dim": 384, "projector_depth": 6, "projector_heads": 12, "feature_dropout": 0.2,
              "top_k": 10, "weight_decay": 1e-4, "synthetic_prob": 0.5, "augment": True,
              "cutpaste_hue_jitter": 0.5, "cutpaste_scar_side": 512.0}
    return [
        Preset("foundad", "paper", "DINOv3 ViT-B/16 at 512, block 9, 1-shot, one model for all categories, "
               "no map smoothing (FoundAD reference code)", "dinov3_vitb16",
               train={"image_size": 512, "layers": (9,), "steps": 2000, "batch_size": 8, "lr": 1e-3, "shots": 1},
               # feature_norm "none": the reference's ViT tokens come out of the final LayerNorm already.
               options={**common, "smoothing_sigma": 0.0, "class_foreground": True, "feature_norm": "none"},
               all_categories=True, hours=1.0,
               hardware="one 24 GB GPU"),
        Preset("foundad", "edge", "EfficientNet-Lite0 at its default size, 8 shots per category, 300 steps, "
               "Gaussian sigma 4 (CPU-friendly)", "efficientnet_lite0",
               train={"image_size": None, "layers": None, "steps": 300, "batch_size": 8, "lr": 1e-3, "shots": 8},
               options={**common, "smoothing_sigma": 4.0}, hours=1.0, hardware="2 CPU cores"),
    ]


def _anomalyvfm() -> list[Preset]:
    common = {"adapter": "dora", "adapter_rank": 64, "adapter_alpha": 1.0, "upsample_blocks": 1,
              "mean_filter_size": 5, "weight_decay": 1e-2, "min_lr_ratio": 1.0, "warmup_steps": 0,
              "smoothing_sigma": 0.0}
    return [
        Preset("anomalyvfm", "paper", "C-RADIOv3-L at 768 (the paper: RADIOv2.5-L), DoRA r64, 200 steps of 32 "
               "on a generated dataset only (good + defective), mean filter 5 on the 96x96 map", "radio_v3_l16",
               train={"image_size": 768, "layers": None, "steps": 200, "batch_size": 8, "lr": 1e-4,
                      "synthetic_fraction": 0.0, "holdout_fraction": 0.0, "synthetic_anomaly_prob": 1.0},
               options={**common, "accumulate": 4}, hours=0.5, hardware="one 48 GB GPU",
               # README.md:300 (DINOv3: 500 steps at 768); train.py:65-66 (DINOv2 / CLIP at 672 "to get the
               # same ftr size"), DINOv2 trains 500 steps like DINOv3.
               per_backbone={"dinov3_vitl16": {"steps": 500},
                             "dinov2_vitl14_reg": {"steps": 500, "image_size": 672}}),
        Preset("anomalyvfm", "edge", "DINOv3 ViT-S/16 at 448, LoRA r8, 500 steps of 8 on auxiliary categories "
               "with on-the-fly CutPaste / Perlin anomalies", "dinov3_vits16",
               train={"image_size": 448, "layers": None, "steps": 500, "batch_size": 8, "lr": 1e-4,
                      "synthetic_fraction": 0.5, "holdout_fraction": 0.2, "synthetic_anomaly_prob": 1.0},
               options={**common, "adapter": "lora", "adapter_rank": 8, "upsample_channels": 128, "accumulate": 1},
               hours=4.0, hardware="2 CPU cores"),
    ]


def _visualad() -> list[Preset]:
    common = {"num_anchors": 4, "res_scale_init": 0.01, "dropout": 0.1, "top_fraction": 0.01,
              "weight_decay": 0.01, "min_lr_ratio": 0.1, "rest_lr_ratio": 0.1, "token_grad_clip": 1.0,
              "margin": 0.5, "smoothing_sigma": 4.0}
    return [
        Preset("visualad", "paper", "CLIP ViT-L/14-336 run at 518 (37x37 patches, position embedding "
               "interpolated bilinearly), 2 epochs of MVTec's test split (432 steps of 8)", "clip_vitl14_336",
               train={"image_size": 518, "layers": (5, 11, 17, 23), "steps": 432, "batch_size": 8, "lr": 1e-3,
                      "synthetic_fraction": 0.0, "holdout_fraction": 0.0, "synthetic_anomaly_prob": 1.0},
               options=dict(common), hours=1.0, hardware="one 24 GB GPU"),
        Preset("visualad", "edge", "CLIP ViT-L/14-336 at its native 336 (TopK under TensorRT's limit), "
               "432 steps of 8 with on-the-fly anomalies", "clip_vitl14_336",
               train={"image_size": 336, "layers": (5, 11, 17, 23), "steps": 432, "batch_size": 8, "lr": 1e-3,
                      "synthetic_fraction": 0.5, "holdout_fraction": 0.2, "synthetic_anomaly_prob": 1.0},
               options=dict(common), hours=6.0, hardware="2 CPU cores"),
    ]


def _avadino() -> list[Preset]:
    common = {"bottleneck": 768, "text_dim": 768, "routing_temperature": 0.1, "cross_modal_scale": 100.0,
              "calibration_scale": 10.0, "weight_decay": 1e-2, "warmup_steps": 40, "min_lr_ratio": 1.0,
              "smoothing_sigma": 0.0}
    return [
        Preset("avadino", "paper", "DINOv3 ViT-L/16 at 512, blocks 5/11/17/23, 10 epochs of VisA's test split "
               "(1350 steps of 16), the reference's interleaved text columns", "dinov3_vitl16",
               train={"image_size": 512, "layers": (5, 11, 17, 23), "steps": 1350, "batch_size": 16, "lr": 1e-4,
                      "synthetic_fraction": 0.0, "holdout_fraction": 0.0, "synthetic_anomaly_prob": 1.0},
               options={**common, "text_layout": "reference"}, hours=2.0, hardware="one 24 GB GPU"),
        Preset("avadino", "edge", "as paper, but the paper's text columns (T_n normal, T_a abnormal) and "
               "on-the-fly anomalies with a held-back check", "dinov3_vitl16",
               train={"image_size": 512, "layers": (5, 11, 17, 23), "steps": 1350, "batch_size": 16, "lr": 1e-4,
                      "synthetic_fraction": 0.5, "holdout_fraction": 0.2, "synthetic_anomaly_prob": 1.0},
               options={**common, "text_layout": "paper"}, hours=20.0, hardware="2 CPU cores"),
    ]


#: (method, preset name) -> :class:`Preset`. One registry for every method's presets.
PRESETS: dict[tuple[str, str], Preset] = {
    (p.method, p.name): p for p in (*_foundad(), *_anomalyvfm(), *_visualad(), *_avadino())
}


def list_presets(method: str | None = None) -> list[tuple[str, str]]:
    """Registered ``(method, preset)`` pairs (of one method when given), sorted."""
    return sorted(k for k in PRESETS if method is None or k[0] == method)


def get_preset(method: str, name: str) -> Preset:
    """The preset; a clear error lists what exists."""
    if (method, name) not in PRESETS:
        known = [n for m, n in list_presets(method)]
        if not known:
            with_presets = sorted({m for m, _ in PRESETS})
            raise KeyError(f"method {method!r} has no presets; methods with presets: {', '.join(with_presets)}")
        raise KeyError(f"unknown preset {name!r} for {method!r}; choose one of: {', '.join(known)}")
    return PRESETS[(method, name)]


def apply_preset(method: str, name: str, backbone: str | None, given: dict[str, Any],
                 method_options: dict[str, Any] | None) -> tuple[dict[str, Any], str, dict[str, Any], bool]:
    """Fill the ``train`` arguments left None from preset ``name`` (explicit values win).

    Returns:
        (filled ``given``, backbone name, method options (preset's updated by the caller's),
        ``all_categories``).
    """
    chosen = get_preset(method, name)
    values = chosen.train_for(backbone)
    filled = {k: (v if v is not None else values.get(k)) for k, v in given.items()}
    return filled, backbone or chosen.backbone, {**chosen.options, **(method_options or {})}, chosen.all_categories


def cpu_hint(method: str, current: str | None) -> str:
    """The line printed after the time estimate of a long CPU run: the CPU-sized preset to use
    instead (empty when ``method`` has none, or ``current`` is it)."""
    cheaper = [n for (m, n), p in PRESETS.items() if m == method and n != current and "CPU" in p.hardware]
    if not cheaper:
        return ""
    return (f"hint: on a CPU, `--preset {cheaper[0]}` is the cheaper recipe for {method} "
            f"(`edge-ad train --method {method} --preset {cheaper[0]} --print-config` lists it, docs/REPRODUCE.md "
            "explains it); or bound this run with --max-minutes")


def preset_config(method: str, name: str | None, *, backbone: str | None = None,
                  method_options: dict[str, Any] | None = None, **train_kwargs: Any) -> dict[str, Any]:
    """Every value a ``train(method, ..., preset=name)`` call would use, as plain types.

    Explicit arguments (non-None) override the preset, exactly as in :func:`edge_ad.train`;
    ``name=None`` shows the method config's defaults (a call without a preset).

    Returns:
        ``{"method", "preset", "summary", "backbone", "train": {...}, "config": {...}, "estimate"}``,
        where ``config`` is the full method config (every field, defaults included) and ``train``
        the protocol values (steps, batch, shots / data mix, ...).
    """
    from edge_ad.methods import BackboneSpec, get_method

    entry = get_method(method)
    chosen = get_preset(method, name) if name is not None else None
    train = chosen.train_for(backbone) if chosen else {}
    train.update({k: v for k, v in train_kwargs.items() if v is not None})
    options = {**(chosen.options if chosen else {}), **(method_options or {})}
    default_spec = entry.config_class().backbone
    name_ = backbone or (chosen.backbone if chosen else default_spec.name)
    same = name_ == default_spec.name
    layers = train.get("layers") or (default_spec.layers if same else None)
    size = train.get("image_size") or (default_spec.img_size if same else None)
    config = entry.config_class(backbone=BackboneSpec(name_, layers=tuple(layers) if layers else None,
                                                      img_size=size), **options)
    doc = config.to_dict()
    for k in ("steps", "batch_size", "lr"):
        if train.get(k) is not None and k in doc:
            doc[k] = train[k]
        elif k in doc:
            train[k] = doc[k]
    if entry.fit_mode == "supervised":
        train.setdefault("synthetic_fraction", 0.5)
        train.setdefault("synthetic_anomaly_prob", 1.0)
        train.setdefault("holdout_fraction", 0.2)
    else:
        train.setdefault("shots", 8)
        train["all_categories"] = bool(chosen and chosen.all_categories)
    return {"method": method, "preset": name, "summary": chosen.summary if chosen else "method config defaults",
            "backbone": name_, "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in train.items()},
            "config": doc, "estimate": {"hours": chosen.hours if chosen else None,
                                        "hardware": chosen.hardware if chosen else ""}}
