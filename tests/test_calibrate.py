"""On-site calibration (edge_ad.runtime.calibrate, Detector.calibrate, `edge-ad calibrate`) on a
real onnx-cpu bundle of the shared knn run and real good hazelnut images (train/good as the
"site's" good frames, read as BGR like a camera delivers them)."""
from __future__ import annotations

import math
import shutil
import tarfile

import numpy as np
import pytest

from edge_ad.converters.convert import convert
from edge_ad.runtime import Detector, load_bundle, read_image
from edge_ad.runtime.calibrate import MIN_FRAMES, calibrate_bundle
from torch_blocker import run_without_torch

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def base_bundle(knn_run, real_root, tmp_path_factory):
    """onnx-cpu bundle with the thresholds the conversion fitted on the validation split."""
    out = tmp_path_factory.mktemp("calib_bundle") / "onnx"
    return convert(knn_run, "onnx-cpu", out, precision="fp32", calib_count=8, val_data=real_root, progress=False)


@pytest.fixture
def bundle(base_bundle, tmp_path):
    """A private copy (calibration rewrites the manifest)."""
    return shutil.copytree(base_bundle, tmp_path / "bundle")


@pytest.fixture(scope="module")
def good_folder(real_root):
    return real_root / CATEGORY / "train" / "good"


@pytest.fixture(scope="module")
def good_frames(good_folder):
    files = sorted(good_folder.iterdir())[:40]
    return [read_image(p, "bgr") for p in files]


def _scores_and_maps(path, frames):
    det = Detector.load(path)
    res = det.predict_batch(frames)
    return det, np.array([r.score for r in res]), np.stack([r.model_map for r in res]), res


def test_thresholds_refit_at_the_requested_fpr_saved_and_reloadable(bundle, good_frames):
    before = load_bundle(bundle).thresholds
    assert before is not None and before.image_threshold is not None
    reports = {}
    for fpr in (0.05, 0.2):
        report = calibrate_bundle(bundle, good_frames, target_fpr=fpr, pixel_fpr=0.01, progress=False)
        reports[fpr] = report
        n = len(good_frames)
        assert report.num_frames == n and report.saved
        # Order statistic: exactly floor(fpr * n) of the frames used score above the threshold (no ties here).
        assert report.image_fpr == math.floor(fpr * n) / n
        assert np.count_nonzero(report.scores > report.thresholds.image_threshold) == math.floor(fpr * n)
        assert report.pixel_fpr <= 0.01
        # The manifest holds them (re-sealed, verifies), with provenance.
        saved = load_bundle(bundle, verify=True).thresholds
        assert saved.image_threshold == report.thresholds.image_threshold
        assert saved.pixel_threshold == report.thresholds.pixel_threshold
        assert (saved.target_fpr, saved.pixel_fpr) == (fpr, 0.01)
        assert saved.details["num_images"] == n and saved.details["calibrated"] == "on-site"
        assert saved.details["date"].startswith("20") and "iterable" in saved.source
        assert saved.details["previous"]["image_threshold"] is not None
    # A higher allowed FPR gives a lower threshold; the first calibration is recorded as "previous".
    assert reports[0.2].thresholds.image_threshold < reports[0.05].thresholds.image_threshold
    assert reports[0.2].previous.image_threshold == reports[0.05].thresholds.image_threshold
    assert reports[0.05].previous.image_threshold == before.image_threshold

    # A freshly loaded detector follows the new thresholds: FPR on the frames used == the fit FPR,
    # and the pixel threshold matches the pixel FPR over the model maps.
    det, scores, maps, results = _scores_and_maps(bundle, good_frames)
    t = reports[0.2].thresholds
    np.testing.assert_allclose(scores, reports[0.2].scores, rtol=1e-6)
    assert sum(r.is_anomalous for r in results) == math.floor(0.2 * len(good_frames))
    assert np.mean(maps > t.pixel_threshold) == pytest.approx(reports[0.2].pixel_fpr)
    assert det.display_threshold == t.pixel_threshold


def test_detector_calibrate_applies_immediately(bundle, good_frames):
    det = Detector.load(bundle)
    old = det.image_threshold
    frame = good_frames[0]
    report = det.calibrate(good_frames, target_fpr=0.1, progress=False)
    t = report.thresholds
    assert det.image_threshold == t.image_threshold != old
    assert det.pixel_threshold == t.pixel_threshold and det.display_threshold == t.pixel_threshold
    assert det.bundle.thresholds.image_threshold == t.image_threshold  # the detector reports the saved manifest
    res = det.predict(frame)
    assert res.is_anomalous == (res.score > t.image_threshold)
    np.testing.assert_array_equal(res.defect_mask, res.raw_map > np.float32(t.pixel_threshold))
    # Display mapping follows the refit pixel threshold: the threshold sits at 0.5.
    np.testing.assert_allclose(res.anomaly_map, np.clip(res.raw_map / (2 * t.pixel_threshold), 0, 1), atol=1e-6)
    called = [r.is_anomalous for r in det.predict_batch(good_frames)]
    assert sum(called) == math.floor(0.1 * len(good_frames))


def test_source_spec_folder_roi_and_dry_run(bundle, good_folder):
    manifest_before = (bundle / "manifest.yaml").read_bytes()
    report = calibrate_bundle(bundle, str(good_folder), 0.05, max_frames=25, roi=(16, 16, 200, 200), save=False,
                              progress=False)
    assert report.num_frames == 25 and not report.saved
    assert (bundle / "manifest.yaml").read_bytes() == manifest_before  # dry run: untouched
    assert report.thresholds.details["roi"] == "16,16,200,200"
    assert str(good_folder) in report.thresholds.source


def test_refuses_too_few_frames_bad_fpr_and_tar(bundle, good_frames, tmp_path):
    with pytest.raises(ValueError, match=f"got {MIN_FRAMES - 1} good frame.*at least {MIN_FRAMES}"):
        calibrate_bundle(bundle, good_frames[: MIN_FRAMES - 1], 0.01, progress=False)
    for bad in (0.0, 1.0, -0.1, "0.01"):
        with pytest.raises(ValueError, match="target_fpr must be a fraction"):
            calibrate_bundle(bundle, good_frames, bad, progress=False)
    with pytest.raises(ValueError, match="max_frames"):
        calibrate_bundle(bundle, good_frames, 0.01, max_frames=3, progress=False)
    tar = tmp_path / "b.tar"
    with tarfile.open(tar, "w") as tf:
        for p in bundle.rglob("*"):
            tf.add(p, arcname=str(p.relative_to(bundle)), recursive=False)
    with pytest.raises(ValueError, match="extract the .tar first"):
        calibrate_bundle(tar, good_frames, 0.05, progress=False)
    assert calibrate_bundle(tar, good_frames, 0.05, save=False, progress=False).num_frames == len(good_frames)


def test_cli_calibrate_without_torch(bundle, good_folder):
    proc = run_without_torch(f"""
        import sys
        from edge_ad.cli.main import main
        code = main(["calibrate", {str(bundle)!r}, "--source", {str(good_folder)!r}, "--target-fpr", "0.1",
                     "--max-frames", "30"])
        assert "torch" not in sys.modules, "calibrate imported torch"
        sys.exit(code)
    """)
    assert proc.returncode == 0, proc.stderr
    assert "calibrated on 30 good frames" in proc.stdout and "saved to manifest.yaml" in proc.stdout
    t = load_bundle(bundle).thresholds
    assert t.target_fpr == 0.1 and t.details["num_images"] == 30 and t.details["fit_fpr"] == 3 / 30
    bad = run_without_torch(f"""
        import sys
        from edge_ad.cli.main import main
        sys.exit(main(["calibrate", {str(bundle)!r}, "--source", {str(good_folder)!r}, "--max-frames", "5"]))
    """)
    assert bad.returncode == 2 and "max_frames must be an int >= 20" in bad.stderr
