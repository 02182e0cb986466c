"""Anomaly synthesis on uint8 RGB images (numpy; no torch): CutPaste and foreground estimation."""
from __future__ import annotations

from .cutpaste import CutPaste, CutPasteConfig, CutPasteResult, color_jitter, cutpaste
from .foreground import foreground_mask, otsu_threshold

__all__ = [
    "CutPaste",
    "CutPasteConfig",
    "CutPasteResult",
    "color_jitter",
    "cutpaste",
    "foreground_mask",
    "otsu_threshold",
]
