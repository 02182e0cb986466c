"""Anomaly-detection metrics: image- and pixel-level AUROC, AP, F1-max and AUPRO.

Everything here is plain numpy (connected components for AUPRO come from ``scipy.ndimage`` or,
where scipy is missing, OpenCV). Conventions shared by every function:

* A sample (image or pixel) is predicted anomalous at threshold ``t`` when ``score >= t``; the
  curves are evaluated at every distinct score, so tied scores move together (ties count half in
  AUROC, exactly as in scikit-learn's ``roc_auc_score``).
* Labels / masks: 1 (or ``True``) = anomalous, 0 = normal. Scores / maps: higher = more anomalous.
* Results are Python floats, fractions in 0..1. Undefined metrics (one class only, no anomalous
  pixel, non-finite scores, ...) raise ``ValueError`` saying why; no function returns NaN.
* Pixel metrics sort all pixels once (O(P log P) time, O(P) memory for P = N*H*W pixels: about
  40 bytes per pixel at peak, ~1 GB for 100 x 512 x 512 maps); nothing builds an
  (images x thresholds) matrix. ``compute_metrics`` shares that one sort between the
  pixel AUROC / AP / F1-max and AUPRO.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "f1_max_threshold",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "aupro",
    "compute_metrics",
]


# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _as_binary(name: str, values: Any) -> np.ndarray:
    """``values`` as a bool array; raises unless every entry is 0/1 (or bool)."""
    arr = np.asarray(values)
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be a bool or 0/1 numeric array, got dtype {arr.dtype}")
    is_one = arr == 1
    valid = is_one | (arr == 0)
    if not valid.all():
        bad = np.unique(arr[~valid])[:5]
        raise ValueError(
            f"{name} must contain only 0 (normal) and 1 (anomalous), found {bad.tolist()}; "
            "binarise first (e.g. mask > 0, or label == defect)"
        )
    return is_one


def _as_scores(name: str, values: Any) -> np.ndarray:
    """``values`` as a numeric array of finite scores (bool becomes uint8; floats keep their dtype)."""
    arr = np.asarray(values)
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.all():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(arr.size - finite.sum()) - n_nan
            raise ValueError(
                f"{name} contain {n_nan} NaN and {n_inf} infinite value(s); every score must be finite "
                "(check the model output, e.g. a division by zero in normalisation)"
            )
    return arr


def _check_image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _as_binary("labels", labels)
    s = _as_scores("scores", scores)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D (N,), got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} labels vs {s.shape[0]} scores")
    if y.size == 0:
        raise ValueError("labels and scores are empty: need at least one normal and one anomalous image")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        kind = "normal (label 0)" if n_pos == 0 else "anomalous (label 1)"
        raise ValueError(
            f"all {y.size} images are {kind}: AUROC, AP and F1 are undefined without both classes; "
            "evaluate on a test set with good and defective images"
        )
    return y, s


def _check_pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    m = _as_binary("masks", masks)
    a = _as_scores("maps", maps)
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(
            f"masks and maps must be (N, H, W) (or one (H, W) image), got shapes {np.shape(masks)} and "
            f"{np.shape(maps)}"
        )
    if m.shape != a.shape:
        raise ValueError(
            f"masks {m.shape} and maps {a.shape} differ in shape: resize the anomaly maps to the mask "
            "resolution (or the masks, nearest neighbour, to the map resolution) first"
        )
    if m.size == 0:
        raise ValueError("masks and maps are empty")
    n_pos = int(np.count_nonzero(m))
    if n_pos == 0:
        raise ValueError(
            f"masks have no anomalous pixel (all {m.size} pixels are normal): pixel metrics and AUPRO "
            "are undefined; pass masks of a test set that contains defective images"
        )
    if n_pos == m.size:
        raise ValueError(
            f"every one of the {m.size} mask pixels is anomalous: pixel metrics and AUPRO need normal "
            "pixels too"
        )
    return m, a


# ---------------------------------------------------------------------------------------------
# One sort, many curves
# ---------------------------------------------------------------------------------------------


@dataclass
class _Ranking:
    """Scores sorted once, descending, with the end of each block of tied scores.

    Attributes:
        order: (P,) indices into the flat scores, highest score first.
        ends: (T,) position in ``order`` of the last element of each distinct-score block; the
            samples at positions ``0..ends[j]`` are exactly those with ``score >= thresholds[j]``.
        thresholds: (T,) the distinct scores, descending.
    """

    order: np.ndarray
    ends: np.ndarray
    thresholds: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray) -> "_Ranking":
        flat = scores.reshape(-1)
        order = np.argsort(flat)[::-1]  # ascending sort reversed: ties' internal order is irrelevant
        ranked = flat[order]
        ends = np.flatnonzero(ranked[1:] != ranked[:-1])
        ends = np.append(ends, flat.size - 1)
        return cls(order=order, ends=ends, thresholds=ranked[ends])

    def cumulative_count(self, flags: np.ndarray) -> np.ndarray:
        """(T,) int64: how many ``flags`` (bool, same shape as the scores) are set at ``score >= t``."""
        return np.cumsum(flags.reshape(-1)[self.order], dtype=np.int64)[self.ends]

    def cumulative_lookup(self, keys: np.ndarray, table: np.ndarray) -> np.ndarray:
        """(T,) float64: sum of ``table[keys]`` over samples with ``score >= t``.

        ``keys``: integer array shaped like the scores; ``table``: float64 weights indexed by key.
        Gathering through the table in rank order avoids a per-pixel weight array in input order.
        """
        ranked = table[keys.reshape(-1)[self.order]]
        return np.cumsum(ranked, out=ranked)[self.ends]


@dataclass
class _Counts:
    """Cumulative confusion counts at each distinct threshold (descending).

    ``tps[j]`` / ``fps[j]``: positives / negatives with ``score >= thresholds[j]``.
    """

    tps: np.ndarray
    fps: np.ndarray
    thresholds: np.ndarray
    n_pos: int
    n_neg: int

    @classmethod
    def of(cls, y: np.ndarray, ranking: _Ranking) -> "_Counts":
        tps = ranking.cumulative_count(y)
        fps = ranking.ends + 1 - tps
        return cls(tps, fps, ranking.thresholds, int(tps[-1]), int(fps[-1]))

    def auroc(self) -> float:
        # ROC through (0, 0) and every (fpr, tpr) point; trapezoids over distinct thresholds give a
        # tied block of positives and negatives a diagonal segment, i.e. the tie counts half.
        fps = np.concatenate(([0], self.fps)).astype(np.float64)
        tps = np.concatenate(([0], self.tps)).astype(np.float64)
        area = np.sum(np.diff(fps) * (tps[1:] + tps[:-1])) / 2.0
        return float(area / (float(self.n_pos) * float(self.n_neg)))

    def average_precision(self) -> float:
        # Step-wise AP (no interpolation): sum_k (R_k - R_{k-1}) * P_k over distinct thresholds.
        d_tps = np.diff(self.tps, prepend=0).astype(np.float64)
        precision = self.tps / (self.tps + self.fps).astype(np.float64)
        return float(np.sum(d_tps * precision) / self.n_pos)

    def f1_max(self) -> tuple[float, float]:
        # F1 = 2PR / (P + R) = 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + n_pos); 0 where TP = 0.
        f1 = 2.0 * self.tps / (self.tps + self.fps + self.n_pos).astype(np.float64)
        best = int(np.argmax(f1))
        return float(f1[best]), float(self.thresholds[best])


# ---------------------------------------------------------------------------------------------
# Image level
# ---------------------------------------------------------------------------------------------


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image scores.

    Args:
        labels: (N,) 0 good / 1 anomalous (bool accepted).
        scores: (N,) finite image anomaly scores, higher = more anomalous.

    Returns:
        AUROC in 0..1, identical to ``sklearn.metrics.roc_auc_score`` (ties count half).

    Raises:
        ValueError: shape mismatch, non-0/1 labels, non-finite scores, or only one class present.
    """
    y, s = _check_image_inputs(labels, scores)
    return _Counts.of(y, _Ranking.of(s)).auroc()


def image_ap(labels: Any, scores: Any) -> float:
    """Average precision of image scores (``sklearn.metrics.average_precision_score``: step-wise sum
    of precision times recall increase over distinct thresholds, no interpolation).

    Args / Raises: as :func:`image_auroc`.
    """
    y, s = _check_image_inputs(labels, scores)
    return _Counts.of(y, _Ranking.of(s)).average_precision()


def image_f1_max(labels: Any, scores: Any) -> float:
    """Best F1 over all distinct thresholds (predict anomalous when ``score >= threshold``).

    Args / Raises: as :func:`image_auroc`.
    """
    return f1_max_threshold(labels, scores)[0]


def f1_max_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """Best F1 and the threshold that reaches it.

    Args:
        labels: (N,) 0/1 (for pixels pass ``masks.ravel()`` and ``maps.ravel()``).
        scores: (N,) finite scores, higher = more anomalous.

    Returns:
        ``(f1, threshold)``: predicting anomalous for ``score >= threshold`` gives ``f1``, the highest
        F1 over all distinct thresholds (the highest threshold wins ties in F1).

    Raises: as :func:`image_auroc`.
    """
    y, s = _check_image_inputs(labels, scores)
    return _Counts.of(y, _Ranking.of(s)).f1_max()


# ---------------------------------------------------------------------------------------------
# Pixel level
# ---------------------------------------------------------------------------------------------


def pixel_auroc(masks: Any, maps: Any) -> float:
    """AUROC over all pixels of all images (every pixel is one sample).

    Args:
        masks: (N, H, W) ground truth, bool or 0/1 (a single (H, W) image is accepted).
        maps: (N, H, W) finite anomaly maps, same shape as ``masks``.

    Returns:
        Pixel AUROC in 0..1.

    Raises:
        ValueError: shape mismatch, non-binary masks, non-finite maps, no anomalous (or no normal)
            pixel at all.
    """
    m, a = _check_pixel_inputs(masks, maps)
    return _Counts.of(m, _Ranking.of(a)).auroc()


def pixel_ap(masks: Any, maps: Any) -> float:
    """Average precision over all pixels (step-wise, as :func:`image_ap`). Args / Raises: as :func:`pixel_auroc`."""
    m, a = _check_pixel_inputs(masks, maps)
    return _Counts.of(m, _Ranking.of(a)).average_precision()


def pixel_f1_max(masks: Any, maps: Any) -> float:
    """Best pixel F1 over all distinct map values. Args / Raises: as :func:`pixel_auroc`."""
    m, a = _check_pixel_inputs(masks, maps)
    return _Counts.of(m, _Ranking.of(a)).f1_max()[0]


# ---------------------------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------------------------


def _label_regions(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected ground-truth regions of every image, numbered globally.

    Args:
        masks: (N, H, W) bool.

    Returns:
        ``(regions, sizes)``: regions (N, H, W) int32, 0 = normal pixel, 1..R = region id (unique
        across images); sizes (R + 1,) pixel count of each region (``sizes[0]`` = normal pixels).
    """
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - depends on the environment
        ndimage = None
    if ndimage is not None:
        structure = np.ones((3, 3), dtype=bool)  # 8-connectivity, as in the MVTec AD reference code

        def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
            lab, n = ndimage.label(mask, structure=structure)
            return lab, int(n)

    else:  # without scipy (runtime-only installs): OpenCV's labelling, same 8-connectivity
        from edge_ad.runtime._cv import cv2_available, require_cv2

        if not cv2_available():
            raise ImportError(
                "AUPRO needs connected components from scipy (pip install scipy) or OpenCV "
                "(pip install opencv-python-headless); neither could be imported"
            )
        cv2 = require_cv2("label defect regions for AUPRO")

        def label(mask: np.ndarray) -> tuple[np.ndarray, int]:
            n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
            return lab, int(n) - 1

    regions = np.zeros(masks.shape, dtype=np.int32)
    offset = 0
    for i in range(masks.shape[0]):
        if not masks[i].any():
            continue
        lab, n = label(masks[i])
        regions[i] = np.where(lab > 0, lab + offset, 0)
        offset += n
    sizes = np.bincount(regions.reshape(-1), minlength=offset + 1)
    return regions, sizes


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x, y) for ``0 <= x <= limit``, interpolating y at ``limit``.

    ``x`` must be non-decreasing and start at 0.
    """
    k = int(np.searchsorted(x, limit, side="right"))  # x[:k] <= limit < x[k:]
    xs, ys = x[:k], y[:k]
    if k < x.size and xs[-1] < limit:
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        xs = np.append(xs, limit)
        ys = np.append(ys, y_lim)
    return float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)


def _pro_curve_binned(
    maps: np.ndarray, normal_weight: np.ndarray, region_weight: np.ndarray, num_thresholds: int
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at ``num_thresholds`` equally spaced thresholds from max to min of ``maps``."""
    flat = maps.reshape(-1)
    lo, hi = float(flat.min()), float(flat.max())
    thresholds = np.linspace(lo, hi, num_thresholds) if hi > lo else np.array([lo])
    # bins[p] = number of thresholds <= score: pixel p is positive at thresholds[:bins[p]].
    bins = np.searchsorted(thresholds, flat, side="right")
    t = thresholds.size
    fp_hist = np.bincount(bins, weights=normal_weight.reshape(-1), minlength=t + 1)
    pro_hist = np.bincount(bins, weights=region_weight.reshape(-1), minlength=t + 1)
    # Positive at threshold j  <=>  bins >= j + 1; walk j from the top threshold down.
    fpr = np.cumsum(fp_hist[::-1])[:t]
    pro = np.cumsum(pro_hist[::-1])[:t]
    return fpr, pro


def _aupro(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float,
    num_thresholds: int | None,
    ranking: _Ranking | None = None,
) -> float:
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float, np.floating, np.integer)):
        raise ValueError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit} (0.3 is the MVTec convention)")
    if num_thresholds is not None:
        if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, (int, np.integer)) or num_thresholds < 2:
            raise ValueError(f"num_thresholds must be None (exact) or an integer >= 2, got {num_thresholds!r}")
    regions, sizes = _label_regions(masks)
    n_regions = sizes.size - 1
    n_normal = int(sizes[0])
    # Per-pixel contributions: a normal pixel adds 1/n_normal to the FPR, a pixel of region r adds
    # 1/(R * |r|) to the PRO (its region's overlap, averaged over the R regions).
    lut = np.zeros(n_regions + 1, dtype=np.float64)
    lut[1:] = 1.0 / (n_regions * sizes[1:].astype(np.float64))
    if num_thresholds is None:
        ranking = ranking if ranking is not None else _Ranking.of(maps)
        fpr = ranking.cumulative_count(~masks) / float(n_normal)
        pro = ranking.cumulative_lookup(regions, lut)
    else:
        normal_weight = (~masks).astype(np.float64) / float(n_normal)
        fpr, pro = _pro_curve_binned(maps, normal_weight, lut[regions], int(num_thresholds))
    # Start at threshold +inf (nothing predicted); floating-point sums may overshoot 1 by an ulp.
    fpr = np.clip(np.concatenate(([0.0], fpr)), 0.0, 1.0)
    pro = np.clip(np.concatenate(([0.0], pro)), 0.0, 1.0)
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap (PRO) curve up to ``fpr_limit`` FPR.

    At threshold ``t`` a pixel is predicted anomalous when ``map >= t``. PRO(t) is the mean, over all
    8-connected ground-truth regions of all images, of the fraction of each region's pixels that are
    predicted anomalous (every region weighs the same, whatever its size). FPR(t) is the fraction of
    all normal pixels (of all images, good and defective) predicted anomalous. The curve runs from
    (0, 0) through every threshold; its area for FPR in [0, fpr_limit] (trapezoids, the PRO value at
    ``fpr_limit`` linearly interpolated) is divided by ``fpr_limit``, so a perfect map scores 1.0.

    Args:
        masks: (N, H, W) ground truth, bool or 0/1 (a single (H, W) image is accepted).
        maps: (N, H, W) finite anomaly maps, same shape.
        fpr_limit: upper FPR integration limit in (0, 1]; 0.3 is the MVTec AD convention.
        num_thresholds: ``None`` (default) evaluates the curve at every distinct map value (exact,
            one sort of all pixels); an integer T >= 2 evaluates it at T equally spaced thresholds
            between the map minimum and maximum (no sort, an approximation that converges to the
            exact value as T grows; exact when the maps only take those T values).

    Returns:
        AUPRO in 0..1.

    Raises:
        ValueError: as :func:`pixel_auroc`, or a bad ``fpr_limit`` / ``num_thresholds``.
    """
    m, a = _check_pixel_inputs(masks, maps)
    return _aupro(m, a, fpr_limit, num_thresholds)


# ---------------------------------------------------------------------------------------------
# All at once
# ---------------------------------------------------------------------------------------------


def compute_metrics(
    labels: Any,
    scores: Any,
    masks: Any | None = None,
    maps: Any | None = None,
    *,
    fpr_limit: float = 0.3,
) -> dict[str, float]:
    """Every metric of one evaluation.

    Args:
        labels: (N,) 0 good / 1 anomalous.
        scores: (N,) finite image scores.
        masks: optional (N, H, W) ground truth (bool or 0/1); good images must have empty masks.
        maps: optional (N, H, W) finite anomaly maps; required exactly when ``masks`` is given.
        fpr_limit: AUPRO integration limit.

    Returns:
        ``{"image_auroc", "image_ap", "image_f1_max"}`` and, with masks, also ``{"pixel_auroc",
        "pixel_ap", "pixel_f1_max", "aupro"}``; fractions in 0..1. The pixels are sorted once for
        all four pixel metrics.

    Raises:
        ValueError: any error of the single metrics; masks without maps (or the reverse); masks /
            maps whose image count differs from ``labels``; a good image (label 0) with defect
            pixels in its mask.
    """
    y, s = _check_image_inputs(labels, scores)
    counts = _Counts.of(y, _Ranking.of(s))
    out = {
        "image_auroc": counts.auroc(),
        "image_ap": counts.average_precision(),
        "image_f1_max": counts.f1_max()[0],
    }
    if masks is None and maps is None:
        return out
    if masks is None or maps is None:
        given, missing = ("masks", "maps") if maps is None else ("maps", "masks")
        raise ValueError(f"{given} given without {missing}: pixel metrics need both (or neither)")
    m, a = _check_pixel_inputs(masks, maps)
    if m.shape[0] != y.size:
        raise ValueError(f"masks/maps hold {m.shape[0]} images but labels hold {y.size}: they must align")
    defect_in_good = np.flatnonzero(~y & m.reshape(m.shape[0], -1).any(axis=1))
    if defect_in_good.size:
        raise ValueError(
            f"{defect_in_good.size} image(s) labelled good (0) have defect pixels in their mask, first at "
            f"index {int(defect_in_good[0])}: labels and masks are misaligned"
        )
    ranking = _Ranking.of(a)
    pixel_counts = _Counts.of(m, ranking)
    out["pixel_auroc"] = pixel_counts.auroc()
    out["pixel_ap"] = pixel_counts.average_precision()
    out["pixel_f1_max"] = pixel_counts.f1_max()[0]
    del pixel_counts
    out["aupro"] = _aupro(m, a, fpr_limit, None, ranking=ranking)
    return out
