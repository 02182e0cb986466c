"""edge_ad.metrics against scikit-learn, hand-worked cases and a slow reference AUPRO."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from edge_ad import metrics as M
from edge_ad.metrics import (
    aupro,
    compute_metrics,
    f1_max_threshold,
    image_ap,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)

TOL = 1e-6


def _sk_f1_max(y: np.ndarray, s: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def _random_case(rng: np.random.Generator, n: int, quantum: float | None) -> tuple[np.ndarray, np.ndarray]:
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes always present
    s = rng.normal(size=n) + 0.8 * y
    if quantum is not None:
        s = np.round(s / quantum) * quantum  # heavy ties
    return y, s


# ----------------------------------------------------------------------------------------------
# Image level: agreement with scikit-learn
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantum", [None, 0.05, 0.5, 2.0])
def test_image_metrics_match_sklearn(quantum):
    rng = np.random.default_rng(123)
    for _ in range(40):
        n = int(rng.integers(2, 200))
        y, s = _random_case(rng, n, quantum)
        assert abs(image_auroc(y, s) - roc_auc_score(y, s)) < TOL
        assert abs(image_ap(y, s) - average_precision_score(y, s)) < TOL
        assert abs(image_f1_max(y, s) - _sk_f1_max(y, s)) < TOL


def test_all_scores_tied_gives_chance_auroc():
    y = np.array([0, 1, 0, 1, 1])
    s = np.full(5, 3.0)
    assert image_auroc(y, s) == pytest.approx(0.5)
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    # One threshold: everything predicted anomalous -> precision 3/5, recall 1.
    assert image_ap(y, s) == pytest.approx(0.6)
    assert image_f1_max(y, s) == pytest.approx(2 * 0.6 / 1.6)


def test_input_types_bool_int_float32_lists():
    y = [False, True, True, False]
    s = np.array([0.1, 0.9, 0.4, 0.5], dtype=np.float32)
    assert image_auroc(y, s) == pytest.approx(roc_auc_score(np.array(y), s))
    assert image_auroc([0, 1, 1, 0], [1, 9, 4, 5]) == pytest.approx(0.75)
    assert image_auroc(np.array([0.0, 1.0, 1.0, 0.0]), s.tolist()) == pytest.approx(0.75)
    assert isinstance(image_auroc(y, s), float)


# ----------------------------------------------------------------------------------------------
# Image level: hand-computed cases
# ----------------------------------------------------------------------------------------------


def test_hand_computed_with_tie():
    # labels  0    0    1    1    0    1
    # scores 0.1  0.4  0.35 0.8  0.8  0.9
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.8, 0.9])
    # AUROC = P(score_pos > score_neg) + 0.5 P(tie) over the 3 x 3 pairs:
    #   pos 0.9 beats all 3 negatives -> 3
    #   pos 0.8 beats 0.1, 0.4, ties 0.8 -> 2.5
    #   pos 0.35 beats 0.1 only -> 1
    #   total 6.5 / 9
    assert image_auroc(y, s) == pytest.approx(6.5 / 9)
    # Distinct thresholds descending, (TP, FP) at score >= t:
    #   0.9 -> (1, 0): P = 1,    R = 1/3
    #   0.8 -> (2, 1): P = 2/3,  R = 2/3
    #   0.4 -> (2, 2): P = 1/2,  R = 2/3 (no recall gain, contributes 0)
    #   0.35-> (3, 2): P = 3/5,  R = 1
    #   0.1 -> (3, 3): P = 1/2,  R = 1   (no gain)
    # AP = 1/3 * 1 + 1/3 * 2/3 + 1/3 * 3/5
    assert image_ap(y, s) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # F1 = 2TP / (TP + FP + 3): 2/4, 4/6, 4/7, 6/8, 6/9 -> best 0.75 at threshold 0.35.
    f1, thr = f1_max_threshold(y, s)
    assert f1 == pytest.approx(0.75)
    assert thr == pytest.approx(0.35)
    assert image_f1_max(y, s) == pytest.approx(0.75)


def test_perfect_and_inverted_separation():
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert image_auroc(y, s) == 1.0
    assert image_ap(y, s) == 1.0
    assert image_f1_max(y, s) == 1.0
    assert image_auroc(y, -s) == 0.0
    # Inverted: positives come last; thresholds -0.1, -0.2, -0.3 add FPs, then -0.7 adds TP 1
    # (P = 1/4, R = 1/2), -0.9 adds TP 2 (P = 2/5, R = 1) -> AP = 1/2 * 1/4 + 1/2 * 2/5.
    assert image_ap(y, -s) == pytest.approx(0.5 * 0.25 + 0.5 * 0.4)
    # Best F1 inverted: at the lowest threshold TP = 2, FP = 3 -> 4 / (2 + 3 + 2) = 4/7.
    assert image_f1_max(y, -s) == pytest.approx(4 / 7)


# ----------------------------------------------------------------------------------------------
# Pixel level
# ----------------------------------------------------------------------------------------------


def _random_pixels(rng: np.random.Generator, n: int = 6, h: int = 24, w: int = 20, levels: int | None = None):
    masks = np.zeros((n, h, w), bool)
    for i in range(n // 2, n):
        for _ in range(2):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            masks[i, y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
    maps = rng.random((n, h, w)) + 0.7 * masks
    if levels is not None:
        maps = np.floor(maps * levels) / levels
    return masks, maps


@pytest.mark.parametrize("levels", [None, 4, 32])
def test_pixel_metrics_match_sklearn(levels):
    rng = np.random.default_rng(7)
    masks, maps = _random_pixels(rng, levels=levels)
    y, s = masks.ravel(), maps.ravel()
    assert abs(pixel_auroc(masks, maps) - roc_auc_score(y, s)) < TOL
    assert abs(pixel_ap(masks, maps) - average_precision_score(y, s)) < TOL
    assert abs(pixel_f1_max(masks, maps) - _sk_f1_max(y, s)) < TOL
    # float32 maps and 0/1 uint8 masks are accepted too
    assert abs(pixel_auroc(masks.astype(np.uint8), maps.astype(np.float32)) - roc_auc_score(y, s.astype(np.float32))) < TOL


def test_pixel_metrics_accept_single_image():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    amap = np.zeros((4, 4))
    amap[1, 1] = 1.0
    assert pixel_auroc(mask, amap) == 1.0
    assert pixel_ap(mask, amap) == 1.0
    assert pixel_f1_max(mask, amap) == 1.0


# ----------------------------------------------------------------------------------------------
# AUPRO
# ----------------------------------------------------------------------------------------------


def _slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Straightforward reference: binarise at every distinct value, measure each region, integrate."""
    regions = []  # list of (image index, bool region mask)
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        pred = maps >= t
        fpr = (pred & normal).sum() / normal.sum()
        pro = np.mean([pred[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # clip the segment at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


def test_aupro_perfect_map_is_one():
    masks = np.zeros((3, 10, 10), bool)
    masks[1, 2:5, 2:5] = True
    masks[2, 7:9, 1:9] = True
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)
    # any strictly increasing transform of a perfect map is still perfect
    assert aupro(masks, masks * 5.0 + 0.01) == pytest.approx(1.0)


def test_aupro_map_covering_one_of_two_regions():
    # Region A: 2x2 = 4 px, region B: 4x4 = 16 px, in one 12x12 image. The map marks B only.
    masks = np.zeros((1, 12, 12), bool)
    masks[0, 0:2, 0:2] = True  # A
    masks[0, 6:10, 6:10] = True  # B
    amap = np.zeros((1, 12, 12))
    amap[0, 6:10, 6:10] = 1.0
    # Threshold 1: FPR 0, PRO = (0/4 + 16/16) / 2 = 0.5 (regions weigh equally; a pixel-wise
    # overlap would give 16/20 = 0.8). Threshold 0: FPR 1, PRO 1.
    # Curve (0,0) -> (0,0.5) -> (1,1); at FPR 0.3 PRO = 0.5 + 0.5 * 0.3 = 0.65.
    # Area on [0, 0.3] = 0.3 * (0.5 + 0.65) / 2 = 0.1725; normalised: 0.1725 / 0.3 = 0.575.
    assert aupro(masks, amap) == pytest.approx(0.575)
    assert _slow_aupro(masks, amap) == pytest.approx(0.575)
    # With the full range: area 1 * (0.5 + 1) / 2 = 0.75.
    assert aupro(masks, amap, fpr_limit=1.0) == pytest.approx(0.75)


def test_aupro_interpolates_at_the_limit():
    # 1 region (1 px) + 9 normal px. Map: region 0.5, normal pixels 0.9 (one), 0.1 (eight).
    masks = np.zeros((1, 1, 10), bool)
    masks[0, 0, 0] = True
    amap = np.full((1, 1, 10), 0.1)
    amap[0, 0, 0] = 0.5
    amap[0, 0, 1] = 0.9
    # Points: (0,0); t=0.9 -> (1/9, 0); t=0.5 -> (1/9, 1); t=0.1 -> (1, 1).
    # Area on [0, 0.3]: 0 up to 1/9 (PRO 0), then the vertical jump, then 1 until 0.3:
    #   (0.3 - 1/9) * 1 -> normalised (0.3 - 1/9) / 0.3.
    assert aupro(masks, amap) == pytest.approx((0.3 - 1 / 9) / 0.3)
    # Limit below the first FP: PRO stays 0 -> 0.
    assert aupro(masks, amap, fpr_limit=0.05) == pytest.approx(0.0)


def test_aupro_uses_8_connectivity():
    # Pixels (0,0) and (1,1) touch diagonally -> one region with 8-connectivity; (5,5) is another.
    masks = np.zeros((1, 7, 7), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 5, 5] = True
    amap = np.zeros((1, 7, 7))
    amap[0, 0, 0] = 1.0  # covers half of the diagonal region only
    # Threshold 1: PRO = (1/2 + 0) / 2 = 0.25 (4-connectivity would give (1 + 0 + 0) / 3).
    # Curve (0,0) -> (0,0.25) -> (1,1): at 0.3, PRO = 0.25 + 0.75 * 0.3 = 0.475;
    # area = 0.3 * (0.25 + 0.475) / 2 -> normalised (0.25 + 0.475) / 2 = 0.3625.
    assert aupro(masks, amap) == pytest.approx(0.3625)
    regions, sizes = M._label_regions(masks)
    assert sizes.tolist() == [46, 2, 1]


def test_aupro_regions_are_numbered_across_images():
    masks = np.zeros((3, 5, 5), bool)
    masks[0, 0, 0] = True
    masks[2, 1:3, 1:3] = True
    masks[2, 4, 4] = True
    regions, sizes = M._label_regions(masks)
    assert sizes[1:].tolist() == [1, 4, 1]
    assert set(np.unique(regions[2])) == {0, 2, 3}


def test_aupro_opencv_fallback_matches_scipy(monkeypatch):
    pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    masks, maps = _random_pixels(rng, n=4, h=16, w=14)
    masks[3, 10, 10] = masks[3, 11, 11] = True  # a diagonal pair: one region in 8-connectivity
    expected_sizes = M._label_regions(masks)[1]
    expected = aupro(masks, maps)
    monkeypatch.setitem(__import__("sys").modules, "scipy", None)  # `from scipy import ndimage` fails
    with pytest.raises(ImportError):
        from scipy import ndimage as _  # noqa: F401
    assert sorted(M._label_regions(masks)[1].tolist()) == sorted(expected_sizes.tolist())
    assert aupro(masks, maps) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("levels", [None, 5])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_slow_reference(levels, fpr_limit):
    rng = np.random.default_rng(11)
    masks, maps = _random_pixels(rng, n=4, h=16, w=14, levels=levels)
    assert abs(aupro(masks, maps, fpr_limit=fpr_limit) - _slow_aupro(masks, maps, fpr_limit)) < TOL


def test_aupro_binned_thresholds():
    rng = np.random.default_rng(3)
    masks, maps = _random_pixels(rng, n=4, h=16, w=14)
    # Integer-valued maps 0..10 and 11 thresholds: the thresholds are exactly the map values.
    int_maps = np.floor(maps * 10 / maps.max())
    assert aupro(masks, int_maps, num_thresholds=11) == pytest.approx(aupro(masks, int_maps), abs=1e-12)
    # Continuous maps: many thresholds approach the exact value.
    assert aupro(masks, maps, num_thresholds=2000) == pytest.approx(aupro(masks, maps), abs=5e-3)
    # A constant map: one threshold, everything flagged at once -> curve (0,0) -> (1,1).
    assert aupro(masks, np.zeros(masks.shape), num_thresholds=10) == pytest.approx(0.15)


def test_compute_metrics_keys_and_values():
    rng = np.random.default_rng(5)
    masks, maps = _random_pixels(rng)
    labels = masks.reshape(masks.shape[0], -1).any(axis=1).astype(int)
    scores = maps.reshape(maps.shape[0], -1).max(axis=1)
    out = compute_metrics(labels, scores)
    assert set(out) == {"image_auroc", "image_ap", "image_f1_max"}
    out = compute_metrics(labels, scores, masks=masks, maps=maps)
    assert set(out) == {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "aupro"}
    assert out["image_auroc"] == pytest.approx(image_auroc(labels, scores))
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert out["pixel_ap"] == pytest.approx(pixel_ap(masks, maps))
    assert out["pixel_f1_max"] == pytest.approx(pixel_f1_max(masks, maps))
    assert out["aupro"] == pytest.approx(aupro(masks, maps))
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in out.values())


# ----------------------------------------------------------------------------------------------
# Error paths
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [image_auroc, image_ap, image_f1_max])
def test_image_errors(fn):
    with pytest.raises(ValueError, match="differ in length"):
        fn([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="1-D"):
        fn([[0, 1]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match="NaN"):
        fn([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="infinite"):
        fn([0, 1], [0.1, np.inf])
    with pytest.raises(ValueError, match="only 0"):
        fn([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="only 0"):
        fn([0.0, np.nan], [0.1, 0.2])
    with pytest.raises(ValueError, match="bool or 0/1"):
        fn(["good", "bad"], [0.1, 0.2])
    with pytest.raises(ValueError, match="numeric"):
        fn([0, 1], ["a", "b"])
    with pytest.raises(ValueError, match="all 3 images are normal"):
        fn([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="all 2 images are anomalous"):
        fn([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


@pytest.mark.parametrize("fn", [pixel_auroc, pixel_ap, pixel_f1_max, aupro])
def test_pixel_errors(fn):
    masks = np.zeros((2, 4, 4), bool)
    masks[1, 1, 1] = True
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert 0.0 <= fn(masks, maps) <= 1.0  # the valid case works
    with pytest.raises(ValueError, match="differ in shape"):
        fn(masks, maps[:, :3])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        fn(masks[None], maps[None])
    with pytest.raises(ValueError, match="no anomalous pixel"):
        fn(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="normal pixels too"):
        fn(np.ones_like(masks), maps)
    bad = maps.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fn(masks, bad)
    with pytest.raises(ValueError, match="only 0"):
        fn(masks.astype(np.uint8) * 255, maps)


def test_aupro_parameter_errors():
    masks = np.zeros((1, 4, 4), bool)
    masks[0, 0, 0] = True
    maps = np.random.default_rng(0).random((1, 4, 4))
    for bad in (0.0, -0.1, 1.5, "0.3", True):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(masks, maps, fpr_limit=bad)
    for bad in (1, 0, 2.5, True):
        with pytest.raises(ValueError, match="num_thresholds"):
            aupro(masks, maps, num_thresholds=bad)


def test_compute_metrics_errors():
    masks = np.zeros((2, 4, 4), bool)
    masks[1, 1, 1] = True
    maps = np.random.default_rng(0).random((2, 4, 4))
    labels, scores = np.array([0, 1]), np.array([0.2, 0.8])
    with pytest.raises(ValueError, match="masks given without maps"):
        compute_metrics(labels, scores, masks=masks)
    with pytest.raises(ValueError, match="maps given without masks"):
        compute_metrics(labels, scores, maps=maps)
    with pytest.raises(ValueError, match="hold 3 images but labels hold 2"):
        compute_metrics(labels, scores, masks=np.concatenate([masks, masks[:1]]), maps=np.concatenate([maps, maps[:1]]))
    with pytest.raises(ValueError, match="labelled good"):
        compute_metrics(np.array([1, 0]), scores, masks=masks, maps=maps)
    with pytest.raises(ValueError, match="all 2 images are normal"):
        compute_metrics([0, 0], scores, masks=masks, maps=maps)
