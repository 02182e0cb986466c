"""Backbone registry: ``build_backbone(name, ...)`` -> ``Backbone``; ``list_backbones()``.

Registered: DINOv2 (``dinov2_vit{s,b,l}14`` and ``_reg``), DINOv3 (``dinov3_vit{s,b,l}16``),
CLIP (``clip_vitl14_336``), C-RADIOv3 (``radio_v3_{b,l}16``) and ``efficientnet_lite0``. See
``registry.py`` to add one. ``weights=`` takes a file or snapshot folder in any layout of
``layouts.py``; ``inspect_weights`` / ``convert_weights`` are the ``edge-ad weights`` verbs.
"""
from __future__ import annotations

from .base import Backbone, BackboneInfo
from .inspection import WeightsReport, convert_weights, inspect_weights, weights_provenance
from .registry import UnknownBackboneError, build_backbone, list_backbones, register_backbone
from .weights import IncompatibleWeightsError

__all__ = [
    "Backbone",
    "BackboneInfo",
    "IncompatibleWeightsError",
    "UnknownBackboneError",
    "WeightsReport",
    "build_backbone",
    "convert_weights",
    "inspect_weights",
    "list_backbones",
    "register_backbone",
    "weights_provenance",
]
