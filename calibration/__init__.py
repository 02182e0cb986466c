"""edge_ad.calibration: calibration sets and score / threshold calibration (numpy; no torch).

::

    build_calibration_set(source, spec, count=128, synthetic_fraction=0.25, seed=0) -> CalibrationSet
        .images float32 (N, 3, H, W), .files, .kinds, .hash, .to_manifest(), .save(folder)
    fit_thresholds(good_scores, good_maps=None, target_fpr=0.01, pixel_fpr=0.01) -> Thresholds
    evaluate_thresholds(thresholds, scores, labels, maps=None, masks=None) -> ThresholdEvaluation
"""
from __future__ import annotations

from .calibset import (
    DEFAULT_SYNTHETIC_FRACTION,
    CalibrationSet,
    TestSplitError,
    build_calibration_set,
    content_hash,
    image_descriptors,
    k_center_greedy,
)
from .thresholds import (
    ThresholdEvaluation,
    Thresholds,
    evaluate_thresholds,
    fit_thresholds,
    upper_quantile_threshold,
)

__all__ = [
    "DEFAULT_SYNTHETIC_FRACTION",
    "CalibrationSet",
    "TestSplitError",
    "ThresholdEvaluation",
    "Thresholds",
    "build_calibration_set",
    "content_hash",
    "evaluate_thresholds",
    "fit_thresholds",
    "image_descriptors",
    "k_center_greedy",
    "upper_quantile_threshold",
]
