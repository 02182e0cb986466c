"""Decision thresholds from held-out good images (numpy only: the runtime refits them on site).

Decision rule (used everywhere in edge_ad): an image is anomalous when ``score > image_threshold``;
a pixel is defective when ``map > pixel_threshold``. Strictly greater, so the threshold itself,
a good score, is still called good.

Fitting: with n good scores sorted ascending ``s_1 <= ... <= s_n`` and a target false-positive
rate ``q``, the allowed number of false positives on the fitting set is ``k = floor(q * n)`` and
the threshold is the order statistic ``s_(n-k)`` (numpy's ``quantile(scores, 1 - q,
method="inverted_cdf")``, computed in integers so ``0.99 * 100`` cannot round up). Then at most
``k`` good images score above it: the fitting-set FPR is ``k / n <= q`` (exactly ``k / n``
without ties at the threshold), i.e. within one image of the target. No interpolation between
scores: the threshold is always an observed good score. ``method="linear"`` gives numpy's
default (linear interpolation between order statistics) for comparison with other tools.

A 1 % FPR needs at least 1 / 0.01 = 100 good images to mean anything: with fewer, ``k = 0`` and the
threshold is the largest good score seen (FPR 0 on the fitting set, unknown in production); a
``UserWarning`` says so. The pixel threshold is the same order statistic over all pixels of all
good maps at ``pixel_fpr`` (pixels of one image are strongly correlated, so the effective sample
is far smaller than the pixel count).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

__all__ = [
    "ThresholdEvaluation",
    "Thresholds",
    "evaluate_thresholds",
    "fit_thresholds",
    "upper_quantile_threshold",
]

_METHODS = ("order_statistic", "linear")


def upper_quantile_threshold(values: np.ndarray, fpr: float, method: str = "order_statistic") -> float:
    """The threshold above which (strictly) at most ``floor(fpr * n)`` of ``values`` lie.

    Args:
        values: any-shape finite values (flattened; n = ``values.size``).
        fpr: target false-positive rate in [0, 1).
        method: ``"order_statistic"`` (the ``(n - floor(fpr * n))``-th smallest value; see the
            module docstring) or ``"linear"`` (``np.quantile(values, 1 - fpr)``, interpolated).

    Returns:
        The threshold as a Python float.
    """
    v = np.asarray(values).ravel()
    n = v.size
    if n == 0:
        raise ValueError("no values to fit a threshold on")
    if method == "linear":
        return float(np.quantile(v.astype(np.float64), 1.0 - fpr))
    k = int(math.floor(fpr * n + 1e-9 * max(1.0, fpr * n)))  # guard 0.01 * 300 = 2.9999999999999996
    k = min(k, n - 1)
    # (n - k)-th smallest, 1-based -> index n - k - 1; partition is O(n), no full sort of all pixels.
    idx = n - k - 1
    return float(np.partition(v, idx)[idx])


def _stats(values: np.ndarray) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64).ravel()
    q = np.quantile(v, [0.5, 0.9, 0.99])
    return {
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "p50": float(q[0]),
        "p90": float(q[1]),
        "p99": float(q[2]),
    }


def _finite(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or infinite values: check the model output")
    return arr


def _as_maps(name: str, maps: Any) -> np.ndarray:
    m = _finite(name, maps)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) or (N, 1, H, W), got shape {np.shape(maps)}")
    return m


@dataclass
class Thresholds:
    """Image and pixel decision thresholds fitted on good images.

    Units are the detector's output units (normalised maps / scores: standard deviations of good
    images above their mean). Decision: anomalous iff ``value > threshold``.

    Attributes:
        image_threshold: image score threshold.
        pixel_threshold: anomaly-map threshold (None when no maps were given).
        target_fpr: requested image false-positive rate (fraction).
        pixel_fpr: requested pixel false-positive rate (fraction; None without maps).
        num_images: good images fitted on.
        fit_fpr: image FPR on the fitting set (``#scores > threshold / n``).
        method: quantile method (``"order_statistic"`` or ``"linear"``).
        score_stats: min / max / mean / std / p50 / p90 / p99 of the good scores.
        map_stats: the same over all good-map pixels (empty without maps).
        source: free text: what the thresholds were fitted on.
    """

    image_threshold: float
    pixel_threshold: float | None
    target_fpr: float
    pixel_fpr: float | None
    num_images: int
    fit_fpr: float
    method: str = "order_statistic"
    score_stats: dict[str, float] = field(default_factory=dict)
    map_stats: dict[str, float] = field(default_factory=dict)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (for the bundle manifest)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Thresholds":
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Thresholds keys {sorted(unknown)}; expected a subset of {sorted(names)}")
        return cls(**dict(d))

    def is_anomalous(self, scores: Any) -> np.ndarray:
        """bool (N,): ``scores > image_threshold``."""
        return np.asarray(scores) > self.image_threshold

    def defect_mask(self, maps: Any) -> np.ndarray:
        """bool, shape of ``maps``: ``maps > pixel_threshold``."""
        if self.pixel_threshold is None:
            raise ValueError("these thresholds have no pixel threshold: fit them with maps")
        return np.asarray(maps) > self.pixel_threshold


def fit_thresholds(
    scores: Any,
    maps: Any | None = None,
    *,
    target_fpr: float = 0.01,
    pixel_fpr: float = 0.01,
    method: str = "order_statistic",
    source: str = "",
) -> Thresholds:
    """Fit image (and pixel) thresholds on held-out good images.

    Args:
        scores: (N,) image scores of good images the model was not fitted on.
        maps: optional (N, H, W) or (N, 1, H, W) anomaly maps of the same images.
        target_fpr: image false-positive rate to allow, in [0, 1) (0.01 = 1 %).
        pixel_fpr: pixel false-positive rate for the pixel threshold, in [0, 1).
        method: ``"order_statistic"`` (default; the threshold is an observed score and the
            fitting-set FPR is ``floor(target_fpr * N) / N``) or ``"linear"`` (numpy interpolation).
        source: free text stored in the result (e.g. ``"hazelnut train/good held-out 20"``).

    Returns:
        :class:`Thresholds`.

    Warns:
        UserWarning: fewer than ``1 / target_fpr`` images (the target is below the resolution of
            the sample: the threshold becomes the largest good score), or fewer good pixels
            than ``1 / pixel_fpr``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    for name, value in (("target_fpr", target_fpr), ("pixel_fpr", pixel_fpr)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be a fraction in [0, 1) (0.01 = 1 %), got {value}")
    s = _finite("scores", scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be (N,), got shape {s.shape}")
    n = int(s.size)
    if n == 0:
        raise ValueError("no scores: fit thresholds on at least one (ideally >= 1 / target_fpr) good image")
    needed = math.ceil(1.0 / target_fpr - 1e-9) if target_fpr > 0 else None
    if needed is not None and n < needed:
        warnings.warn(
            f"fitting a {100 * target_fpr:g} % FPR threshold on only {n} good images: at least {needed} (1 / FPR) are "
            f"needed for one expected false positive, so the threshold is the highest good score seen "
            f"(fitting-set FPR 0, real FPR unknown). Collect more held-out good images",
            UserWarning,
            stacklevel=2,
        )
    image_threshold = upper_quantile_threshold(s, target_fpr, method)
    fit_fpr = float(np.count_nonzero(s > image_threshold)) / n

    pixel_threshold = None
    map_stats: dict[str, float] = {}
    if maps is not None:
        m = _as_maps("maps", maps)
        if m.shape[0] != n:
            raise ValueError(f"maps hold {m.shape[0]} images but scores {n}: they must be the same images")
        if pixel_fpr > 0 and m.size < 1.0 / pixel_fpr:
            warnings.warn(
                f"only {m.size} good pixels for a {100 * pixel_fpr:g} % pixel FPR: the pixel threshold is the "
                "largest good map value", UserWarning, stacklevel=2)
        pixel_threshold = upper_quantile_threshold(m, pixel_fpr, method)
        map_stats = _stats(m)
    return Thresholds(
        image_threshold=image_threshold,
        pixel_threshold=pixel_threshold,
        target_fpr=float(target_fpr),
        pixel_fpr=float(pixel_fpr) if maps is not None else None,
        num_images=n,
        fit_fpr=fit_fpr,
        method=method,
        score_stats=_stats(s),
        map_stats=map_stats,
        source=str(source),
    )


@dataclass
class ThresholdEvaluation:
    """What the thresholds achieve on a labelled set.

    Attributes:
        num_good, num_anomalous: images by label.
        image_fpr: fraction of good images called anomalous (None without good images).
        image_recall: fraction of anomalous images called anomalous (None without any).
        false_positives, false_negatives: image counts.
        image_precision: of images called anomalous, the fraction that are (None when none is called).
        pixel_fpr: fraction of normal pixels (mask 0, all images) above the pixel threshold.
        pixel_recall: fraction of defect pixels (mask 1) above it (None without defect pixels).
    """

    num_good: int
    num_anomalous: int
    image_fpr: float | None
    image_recall: float | None
    false_positives: int
    false_negatives: int
    image_precision: float | None
    pixel_fpr: float | None = None
    pixel_recall: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_thresholds(
    thresholds: Thresholds,
    scores: Any,
    labels: Any,
    maps: Any | None = None,
    masks: Any | None = None,
) -> ThresholdEvaluation:
    """Achieved image FPR / recall and, with maps and masks, pixel FPR / recall.

    Args:
        thresholds: fitted :class:`Thresholds`.
        scores: (N,) image scores; labels: (N,) 0 good / 1 anomalous.
        maps: (N, H, W) or (N, 1, H, W) anomaly maps; masks: (N, H, W) bool / 0-1 ground truth
            at the maps' resolution. Pixel rates need both and a pixel threshold.

    Returns:
        :class:`ThresholdEvaluation` (fractions in 0..1).
    """
    s = _finite("scores", scores).ravel()
    y = np.asarray(labels).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (anomalous)")
    y = y.astype(bool)
    pred = s > thresholds.image_threshold
    n_good, n_bad = int((~y).sum()), int(y.sum())
    fp, tp = int((pred & ~y).sum()), int((pred & y).sum())
    result = ThresholdEvaluation(
        num_good=n_good,
        num_anomalous=n_bad,
        image_fpr=fp / n_good if n_good else None,
        image_recall=tp / n_bad if n_bad else None,
        false_positives=fp,
        false_negatives=n_bad - tp,
        image_precision=tp / int(pred.sum()) if pred.any() else None,
    )
    if (maps is None) != (masks is None):
        raise ValueError("pixel rates need both maps and masks (or neither)")
    if maps is not None:
        if thresholds.pixel_threshold is None:
            raise ValueError("these thresholds have no pixel threshold: fit them with maps")
        m = _as_maps("maps", maps)
        gt = np.asarray(masks)
        if gt.ndim == 4 and gt.shape[1] == 1:
            gt = gt[:, 0]
        gt = gt.astype(bool)
        if gt.shape != m.shape:
            raise ValueError(f"masks {gt.shape} and maps {m.shape} differ: resize masks (nearest) to the maps first")
        if m.shape[0] != s.size:
            raise ValueError(f"maps hold {m.shape[0]} images but scores {s.size}")
        hot = m > thresholds.pixel_threshold
        n_normal, n_defect = int((~gt).sum()), int(gt.sum())
        result.pixel_fpr = int((hot & ~gt).sum()) / n_normal if n_normal else None
        result.pixel_recall = int((hot & gt).sum()) / n_defect if n_defect else None
    return result
