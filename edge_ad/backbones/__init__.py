"""Backbone registry: ``build_backbone(name, ...)`` -> ``Backbone``; ``list_backbones()``.

Registered: DINOv2 (``dinov2_vit{s,b,l}14`` and ``_reg``), DINOv3 (``dinov3_vit{s,b,l}16``),
C-RADIOv3 (``radio_v3_{b,l}16``) and ``efficientnet_lite0``. See ``registry.py`` to add one.
"""
from __future__ import annotations

from .base import Backbone, BackboneInfo
from .registry import UnknownBackboneError, build_backbone, list_backbones, register_backbone
from .weights import IncompatibleWeightsError

__all__ = [
    "Backbone",
    "BackboneInfo",
    "IncompatibleWeightsError",
    "UnknownBackboneError",
    "build_backbone",
    "list_backbones",
    "register_backbone",
]
