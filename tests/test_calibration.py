"""Calibration sets (selection, provenance, test-split refusal) and threshold calibration, on real images."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from edge_ad.calibration import (
    CalibrationSet,
    TestSplitError,
    Thresholds,
    build_calibration_set,
    evaluate_thresholds,
    fit_thresholds,
    image_descriptors,
    k_center_greedy,
    upper_quantile_threshold,
)
from edge_ad.data import MVTecDataset
from edge_ad.runtime import PreprocessSpec, preprocess_batch, read_image

CATEGORY = "mvtec_hazelnut_256"
SPEC = PreprocessSpec(48, 48, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def category(real_root: Path) -> Path:
    return real_root / CATEGORY


@pytest.fixture(scope="module")
def good_frames(category: Path) -> list[np.ndarray]:
    return [read_image(p) for p in sorted((category / "train" / "good").glob("*.png"))]


def _quiet_build(*args, **kwargs) -> CalibrationSet:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning expected at these sizes
        return build_calibration_set(*args, **kwargs)


# ------------------------------------------------------------------------------------ sources
def test_mvtec_category_uses_train_good_and_records_provenance(category: Path):
    cs = _quiet_build(category, SPEC, count=40, seed=1)
    assert len(cs) == cs.count == 40 and cs.images.shape == (40, 3, 48, 48) and cs.images.dtype == np.float32
    good = [f for f, k in zip(cs.files, cs.kinds) if k == "good"]
    assert len(good) == 30 and len(set(good)) == 30
    assert all(Path(f).parent == category / "train" / "good" for f in good)
    assert cs.num_candidates == 50 and "train/good" in cs.source
    # .images is exactly the runtime's preprocessing of the chosen files.
    np.testing.assert_array_equal(cs.images[:30], preprocess_batch([read_image(f) for f in good], SPEC, color_order="rgb"))
    manifest = cs.to_manifest()
    assert manifest["count"] == 40 and manifest["hash"] == cs.hash and len(cs.hash) == 64
    assert manifest["files"] == cs.files and manifest["seed"] == 1 and manifest["synthetic_fraction"] == 0.25
    json.dumps(manifest)


def test_deterministic_and_seeded(category: Path):
    a = _quiet_build(category, SPEC, count=36, seed=0)
    b = _quiet_build(category, SPEC, count=36, seed=0)
    assert a.hash == b.hash and a.files == b.files and a.variants == b.variants
    c = _quiet_build(category, SPEC, count=36, seed=5)
    good_a = [f for f, k in zip(a.files, a.kinds) if k == "good"]
    assert good_a == [f for f, k in zip(c.files, c.kinds) if k == "good"]  # selection is seed-free
    assert c.hash != a.hash  # ...the synthetic anomalies are not


def test_selection_is_more_diverse_than_the_first_n(good_frames):
    feats = image_descriptors(good_frames).astype(np.float64)
    k = 12
    chosen = k_center_greedy(feats, k)
    assert len(set(chosen.tolist())) == k

    def covering_radius(idx: np.ndarray) -> float:  # farthest candidate from its nearest chosen image
        d = np.linalg.norm(feats[:, None] - feats[None, idx], axis=-1)
        return float(d.min(axis=1).max())

    def min_pairwise(idx: np.ndarray) -> float:
        d = np.linalg.norm(feats[idx, None] - feats[None, idx], axis=-1)
        return float(d[~np.eye(len(idx), dtype=bool)].min())

    first = np.arange(k)
    assert covering_radius(chosen) < 0.8 * covering_radius(first)
    assert min_pairwise(chosen) > min_pairwise(first)
    # The builder uses exactly this selection (good images first, in pick order).
    cs = build_calibration_set(good_frames, SPEC, count=k, synthetic_fraction=0.0, min_count=1)
    assert cs.files == [f"array[{i}]" for i in chosen]


def test_k_center_greedy_edge_cases():
    x = np.array([[0.0], [0.0], [10.0], [5.0]])
    assert k_center_greedy(x, 10).tolist() == [3, 0, 2, 1]  # mean 3.75 -> 5.0 first; duplicates last
    assert k_center_greedy(x, 0).size == 0
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        k_center_greedy(np.zeros(3), 2)


def test_refuses_test_data(category: Path, real_root: Path):
    for bad in (category / "test", category / "test" / "good", category / "ground_truth" / "crack"):
        with pytest.raises(TestSplitError, match="never see test data"):
            build_calibration_set(bad, SPEC)
    with pytest.raises(TestSplitError, match="test split"):
        build_calibration_set(MVTecDataset(real_root, CATEGORY, "test"), SPEC)
    test = MVTecDataset(real_root, CATEGORY, "test")
    good_only = test.subset([i for i, lbl in enumerate(test.labels) if lbl == 0])
    with pytest.raises(TestSplitError, match="test split"):  # good images of the test split are test data too
        build_calibration_set(good_only, SPEC)


def test_warns_below_min_count(category: Path, good_frames):
    with pytest.warns(UserWarning, match="calibration with only 8 images; ≥ 32 recommended"):
        cs = build_calibration_set(category, SPEC, count=8)
    assert len(cs) == 8
    # Fewer candidates than asked: the set shrinks (keeping the fraction) and says so.
    with pytest.warns(UserWarning, match="calibration with only 13 images; ≥ 32 recommended"):
        small = build_calibration_set(good_frames[:10], SPEC, count=128)
    assert small.num_synthetic == 3 and len(small) - small.num_synthetic == 10


def test_hash_changes_when_an_image_changes(good_frames):
    frames = [f.copy() for f in good_frames[:10]]
    kwargs = dict(count=10, synthetic_fraction=0.0, min_count=1)
    base = build_calibration_set(frames, SPEC, **kwargs)
    frames[4][100:110, 100:110] = 255 - frames[4][100:110, 100:110]
    changed = build_calibration_set(frames, SPEC, **kwargs)
    assert changed.hash != base.hash
    other_spec = PreprocessSpec(48, 48, resize="area", mean=SPEC.mean, std=SPEC.std)
    assert build_calibration_set(good_frames[:10], other_spec, **kwargs).hash != base.hash
    assert build_calibration_set(good_frames[:10], SPEC, **kwargs).hash == base.hash


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5])
def test_synthetic_fraction_is_respected(category: Path, fraction: float):
    cs = _quiet_build(category, SPEC, count=40, synthetic_fraction=fraction, seed=3)
    n_syn = cs.num_synthetic
    assert n_syn == round(40 * fraction) and cs.kinds == ["good"] * (40 - n_syn) + ["synthetic"] * n_syn
    synthetic = np.array([k == "synthetic" for k in cs.kinds])
    assert not cs.masks[~synthetic].any()
    assert all(cs.masks[i].any() for i in np.flatnonzero(synthetic))  # a defect is visible at input size
    if n_syn >= 3:
        assert {v.split("-")[0] for v in cs.variants[-n_syn:]} == {"cutpaste", "scratch", "noise"}
        assert all(f.startswith("synthetic:") for f in cs.files[-n_syn:])
    with pytest.raises(ValueError, match=r"synthetic_fraction must be in \[0, 1\)"):
        build_calibration_set(category, SPEC, synthetic_fraction=1.0)


def test_video_source(tmp_path: Path, good_frames):
    cv2 = pytest.importorskip("cv2")
    path = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (256, 256))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for frame in good_frames[:30]:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    cs = build_calibration_set(path, SPEC, count=8, synthetic_fraction=0.25, min_count=4, max_candidates=15)
    assert len(cs) == 8 and cs.num_candidates == 15 and "30 frames" in cs.source
    good = [f for f, k in zip(cs.files, cs.kinds) if k == "good"]
    ids = [int(f.split("#frame=")[1]) for f in good]
    assert len(set(ids)) == 6 and set(ids) <= {round(i * 29 / 14) for i in range(15)}  # evenly spaced over 0..29
    # A decoded frame resembles its source frame (MJPG is lossy: compare loosely).
    src = preprocess_batch([good_frames[ids[0]]], SPEC, color_order="rgb")[0]
    assert np.abs(cs.images[0] - src).mean() < 0.1


def test_feature_fn_drives_the_selection(good_frames):
    seen = []

    def mean_colour(images: np.ndarray) -> np.ndarray:
        assert images.dtype == np.float32 and images.shape[1:] == (3, 48, 48)
        seen.append(len(images))
        return images.mean(axis=(2, 3))

    cs = build_calibration_set(good_frames, SPEC, count=6, synthetic_fraction=0.0, min_count=1, feature_fn=mean_colour)
    assert sum(seen) == len(good_frames) and "feature_fn" in cs.selection
    feats = preprocess_batch(good_frames, SPEC, color_order="rgb").mean(axis=(2, 3))
    assert cs.files == [f"array[{i}]" for i in k_center_greedy(feats, 6)]


def test_save_load_round_trip(tmp_path: Path, good_frames):
    cs = build_calibration_set(good_frames[:12], SPEC, count=12, min_count=1)
    cs.save(tmp_path / "calib")
    back = CalibrationSet.load(tmp_path / "calib")
    assert back.hash == cs.hash and back.files == cs.files and back.kinds == cs.kinds
    np.testing.assert_array_equal(back.images, cs.images)
    with np.load(tmp_path / "calib" / "calibration.npz") as data:
        images, masks = data["images"].copy(), data["masks"]
    images[0, 0, 0, 0] += 1.0
    np.savez_compressed(tmp_path / "calib" / "calibration.npz", images=images, masks=masks)
    with pytest.raises(ValueError, match="do not match the manifest hash"):
        CalibrationSet.load(tmp_path / "calib")


# ------------------------------------------------------------------------------------ thresholds
@pytest.mark.parametrize("n", [100, 300, 457])
def test_fit_set_fpr_equals_target_within_one_image(n: int):
    rng = np.random.default_rng(n)
    scores = rng.normal(size=n)
    for target in (0.01, 0.05, 0.1):
        th = fit_thresholds(scores, target_fpr=target)
        achieved = evaluate_thresholds(th, scores, np.zeros(n, int)).image_fpr
        assert achieved == th.fit_fpr <= target
        assert target - achieved < 1.0 / n
        assert th.image_threshold in scores  # an observed score, no interpolation
    # 0.01 * 300 is 2.9999999999999996 in floats: still 3 false positives allowed.
    assert fit_thresholds(np.arange(300.0), target_fpr=0.01).image_threshold == 296.0


def test_threshold_ties_and_methods():
    scores = np.array([0.0] * 50 + [1.0] * 50)
    th = fit_thresholds(scores, target_fpr=0.3, source="ties")
    assert th.image_threshold == 1.0 and th.fit_fpr == 0.0  # ties at the threshold are never flagged
    assert upper_quantile_threshold(np.arange(11.0), 0.1, "linear") == pytest.approx(9.0)
    assert upper_quantile_threshold(np.arange(11.0), 0.1) == 9.0
    with pytest.raises(ValueError, match="method"):
        fit_thresholds(scores, method="nearest")
    with pytest.raises(ValueError, match="target_fpr must be a fraction"):
        fit_thresholds(scores, target_fpr=1.0)
    with pytest.raises(ValueError, match="NaN"):
        fit_thresholds(np.array([0.0, np.nan]))


def test_warns_when_too_few_images_for_the_fpr():
    with pytest.warns(UserWarning, match=r"only 20 good images: at least 100 \(1 / FPR\)"):
        th = fit_thresholds(np.arange(20.0), target_fpr=0.01)
    assert th.image_threshold == 19.0  # the highest good score
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_thresholds(np.arange(20.0), target_fpr=0.05)  # 1 / 0.05 = 20: enough


def test_thresholds_round_trip_and_pixel_threshold():
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(10, 1, 16, 16)).astype(np.float32)
    th = fit_thresholds(maps.reshape(10, -1).max(axis=1), maps, target_fpr=0.1, pixel_fpr=0.01)
    assert np.count_nonzero(maps > th.pixel_threshold) == int(0.01 * maps.size)  # 25 of 2560 pixels
    assert th.map_stats["max"] == pytest.approx(float(maps.max())) and th.score_stats["min"] <= th.score_stats["p50"]
    back = Thresholds.from_dict(json.loads(json.dumps(th.to_dict())))
    assert back == th
    with pytest.raises(ValueError, match="unknown Thresholds keys"):
        Thresholds.from_dict({**th.to_dict(), "image_thresh": 1.0})
    assert th.is_anomalous([th.image_threshold, th.image_threshold + 1e-3]).tolist() == [False, True]


def test_thresholds_on_hazelnut(real_root: Path, tmp_path: Path):
    """knn on real EfficientNet-Lite0 features: fit on held-out good train images, evaluate on the
    labelled test split with masks."""
    import torch

    from edge_ad.evaluation.predict import predict_dataset
    from edge_ad.methods import BackboneSpec, build_detector, get_method

    train = MVTecDataset(real_root, CATEGORY, "train")
    torch.manual_seed(0)
    det = build_detector(get_method("knn").config_class(
        backbone=BackboneSpec("efficientnet_lite0", img_size=64, pretrained=True), coreset_ratio=0.5, smoothing_sigma=2.0))
    spec = det.preprocess_spec
    good = torch.from_numpy(preprocess_batch([train[i].image for i in range(20)], spec, color_order="rgb"))
    det.fit(good[:10])
    det.fit_normalization(good[10:])
    held_out = predict_dataset(det, train.subset(range(20, 50)), spec, progress=False)  # 30 unseen good images
    th = fit_thresholds(held_out.scores, held_out.maps, target_fpr=0.1, pixel_fpr=0.01, source="hazelnut train 20-49")
    assert th.num_images == 30 and th.fit_fpr == pytest.approx(3 / 30)
    fit_eval = evaluate_thresholds(th, held_out.scores, held_out.labels, held_out.maps, held_out.masks)
    assert fit_eval.image_fpr == pytest.approx(0.1) and fit_eval.pixel_fpr <= 0.01 and fit_eval.pixel_recall is None

    test = predict_dataset(det, MVTecDataset(real_root, CATEGORY, "test"), spec, progress=False)
    ev = evaluate_thresholds(th, test.scores, test.labels, test.maps, test.masks)
    assert (ev.num_good, ev.num_anomalous) == (2, 8)
    assert ev.image_recall == np.mean(test.scores[test.labels == 1] > th.image_threshold)
    assert ev.false_negatives == 8 - round(8 * ev.image_recall)
    normal, defect = ~test.masks, test.masks
    assert ev.pixel_fpr == pytest.approx(np.mean(test.maps[normal] > th.pixel_threshold))
    assert ev.pixel_recall == pytest.approx(np.mean(test.maps[defect] > th.pixel_threshold))
    assert ev.pixel_recall > 5 * ev.pixel_fpr  # real features find real defects better than chance
    json.dumps(ev.to_dict())


def test_thresholds_and_calibration_import_without_torch():
    code = textwrap.dedent(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "timm"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import numpy as np
        from edge_ad.calibration import fit_thresholds, evaluate_thresholds, build_calibration_set
        from edge_ad.runtime import PreprocessSpec
        th = fit_thresholds(np.arange(200.0), np.zeros((200, 4, 4)), target_fpr=0.01)
        cs = build_calibration_set([np.full((32, 32, 3), i * 8, np.uint8) for i in range(32)], PreprocessSpec(16, 16), count=32)
        assert "torch" not in sys.modules
        print("ok", th.image_threshold, len(cs))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ok", "197.0", "32"]
