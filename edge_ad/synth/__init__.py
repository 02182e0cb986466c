"""Anomaly synthesis on uint8 RGB images (numpy; no torch): CutPaste, Perlin-noise anomalies, foreground."""
from __future__ import annotations

from .cutpaste import CutPaste, CutPasteConfig, CutPasteResult, color_jitter, cutpaste
from .foreground import foreground_mask, otsu_threshold
from .perlin import PerlinAnomaly, PerlinConfig, perlin_noise
# Generator-made data (torch / diffusers are imported inside the functions that need them).
from .diffusion import SynthConfig, generate_cheap_dataset, generate_dataset, load_pipeline, read_manifest
from .filtering import FeatureDistanceFilter, FilterResult, feature_distance_map
from .prompts import PromptSet

__all__ = [
    "CutPaste",
    "CutPasteConfig",
    "CutPasteResult",
    "FeatureDistanceFilter",
    "FilterResult",
    "PerlinAnomaly",
    "PerlinConfig",
    "PromptSet",
    "SynthConfig",
    "color_jitter",
    "cutpaste",
    "feature_distance_map",
    "foreground_mask",
    "generate_cheap_dataset",
    "generate_dataset",
    "load_pipeline",
    "otsu_threshold",
    "perlin_noise",
    "read_manifest",
]
