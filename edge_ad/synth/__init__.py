"""Anomaly synthesis on uint8 RGB images (numpy; no torch): CutPaste, Perlin-noise anomalies, foreground."""
from __future__ import annotations

from .cutpaste import CutPaste, CutPasteConfig, CutPasteResult, color_jitter, cutpaste
from .foreground import foreground_mask, otsu_threshold
from .perlin import PerlinAnomaly, PerlinConfig, perlin_noise

__all__ = [
    "CutPaste",
    "CutPasteConfig",
    "CutPasteResult",
    "PerlinAnomaly",
    "PerlinConfig",
    "color_jitter",
    "cutpaste",
    "foreground_mask",
    "otsu_threshold",
    "perlin_noise",
]
