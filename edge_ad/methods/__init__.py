"""Anomaly-detection methods: one folder each, one registry, one checkpoint format.

Public API::

    build_detector(name_or_config, backbone=None, **config_fields) -> AnomalyDetector
    get_method(name) -> MethodEntry;  list_methods() -> list[str];  make_config(name, **fields)
    save_checkpoint(detector, run_dir, training=None, include_backbone=True) -> Path
    load_detector(run_dir, device="cpu", backbone=None) -> AnomalyDetector

Every detector: ``detector(images) -> DetectorOutput(anomaly_map (B,1,H,W), score (B,))``,
``detector.preprocess_spec``, ``detector.fit_normalization(good_images)``; see
:mod:`edge_ad.methods.base` for the contract and the training hooks (``fit_mode``).
"""
from __future__ import annotations

from .base import FIT_MODES, AnomalyDetector, BackboneSpec, DetectorOutput, MethodConfig
from .checkpoint import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    load_checkpoint_config,
    load_detector,
    save_checkpoint,
)
from .registry import MethodEntry, build_detector, get_method, list_methods, make_config

__all__ = [
    "CONFIG_FILE",
    "FIT_MODES",
    "MODEL_FILE",
    "AnomalyDetector",
    "BackboneSpec",
    "CheckpointError",
    "DetectorOutput",
    "MethodConfig",
    "MethodEntry",
    "build_detector",
    "get_method",
    "list_methods",
    "load_checkpoint_config",
    "load_detector",
    "make_config",
    "save_checkpoint",
]
