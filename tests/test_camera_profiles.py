"""Per-camera profiles (manifest info.cameras): calibrating one camera changes that camera's verdicts
only, profiles survive a reload, concurrent calibrations of two cameras never corrupt the bundle,
unknown cameras fall back with one warning. Real onnx-cpu bundle of the shared knn run, real
hazelnut images."""
from __future__ import annotations

import shutil
import threading
import time
import warnings

import numpy as np
import pytest

from edge_ad.converters.convert import convert
from edge_ad.data import MVTecDataset
from edge_ad.runtime import Detector, load_bundle, read_image
from edge_ad.runtime.bundle import BundleError
from edge_ad.runtime.camera_profile import CameraProfile, camera_profiles, save_camera_profile

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def base_bundle(knn_run, real_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("camprof_bundle") / "onnx"
    return convert(knn_run, "onnx-cpu", out, precision="fp32", calib_count=8, val_data=real_root, progress=False)


@pytest.fixture
def bundle(base_bundle, tmp_path):
    """A private copy (calibration rewrites the manifest)."""
    return shutil.copytree(base_bundle, tmp_path / "bundle")


@pytest.fixture(scope="module")
def good_frames(real_root):
    return [read_image(p, "bgr") for p in sorted((real_root / CATEGORY / "train" / "good").iterdir())[:30]]


@pytest.fixture(scope="module")
def noisy_good(good_frames):
    """The same good parts through a noisy sensor: a camera whose good frames score higher."""
    rng = np.random.default_rng(0)
    return [np.clip(f.astype(np.int16) + rng.normal(0, 40, f.shape).astype(np.int16), 0, 255).astype(np.uint8)
            for f in good_frames]


@pytest.fixture(scope="module")
def test_frames(real_root):
    return [read_image(s.path, "bgr") for s in MVTecDataset(real_root, CATEGORY, "test")]


def test_calibrating_one_camera_changes_only_its_verdicts(bundle, noisy_good, test_frames):
    det = Detector.load(bundle)
    default = load_bundle(bundle).thresholds
    report = det.calibrate(noisy_good, target_fpr=0.05, camera="cam_side", progress=False)
    assert report.camera == "cam_side" and report.saved
    side = report.thresholds
    assert side.image_threshold > default.image_threshold  # the noisy camera needs a higher threshold
    assert load_bundle(bundle).thresholds == default  # the bundle's defaults are untouched
    assert (det.image_threshold, det.pixel_threshold) == (default.image_threshold, default.pixel_threshold)

    with det.stream({"cam_top": test_frames, "cam_side": test_frames}) as stream:
        results = list(stream)
    top = [r for r in results if r.source == "cam_top"]
    side_res = [r for r in results if r.source == "cam_side"]
    assert len(top) == len(side_res) == len(test_frames)
    for a, b, frame in zip(top, side_res, test_frames):
        ref = det.predict(frame)  # predict uses the bundle's defaults
        assert a.score == b.score == ref.score
        assert a.is_anomalous == ref.is_anomalous == (a.score > default.image_threshold)
        assert b.is_anomalous == (b.score > side.image_threshold)
        np.testing.assert_array_equal(b.defect_mask, b.raw_map > np.float32(side.pixel_threshold))
    assert [a.is_anomalous for a in top] != [b.is_anomalous for b in side_res]  # the profile made a difference


def test_profile_survives_reload_and_unknown_cameras_warn_once(bundle, noisy_good, test_frames):
    Detector.load(bundle).calibrate(noisy_good, camera="cam_side", roi=(8, 8, 240, 240), progress=False)
    det = Detector.load(bundle)  # verify=True: the manifest is sealed with the profile in it
    prof = det.cameras["cam_side"]
    assert prof.roi == (8, 8, 240, 240) and prof.color_order == "bgr" and prof.thresholds.details["camera"] == "cam_side"
    assert camera_profiles(load_bundle(bundle).manifest) == {"cam_side": prof}
    with det.stream({"cam_side": test_frames[:2]}) as stream:
        res = list(stream)
    assert all(r.roi == (8, 8, 240, 240) and r.raw_map.shape == (240, 240) for r in res)  # the profile's ROI
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            list(det.stream({"cam_new": test_frames[:1]}))
    msgs = [str(w.message) for w in caught if "no camera profile 'cam_new'" in str(w.message)]
    assert len(msgs) == 1 and "default thresholds" in msgs[0]


def test_concurrent_calibration_of_two_cameras_keeps_both(bundle, good_frames, noisy_good):
    errors = []

    def calibrate(camera, frames):
        try:
            Detector.load(bundle).calibrate(frames, camera=camera, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=calibrate, args=("cam_a", good_frames)),
               threading.Thread(target=calibrate, args=("cam_b", noisy_good))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    profiles = camera_profiles(load_bundle(bundle, verify=True).manifest)
    assert set(profiles) == {"cam_a", "cam_b"}
    assert profiles["cam_b"].thresholds.image_threshold > profiles["cam_a"].thresholds.image_threshold


def test_profile_saves_are_read_modify_write_under_the_lock(bundle, monkeypatch):
    """Widen the window between reading and writing the manifest: both saves must still land."""
    import edge_ad.runtime.bundle.io as bio

    real = bio.replace_file_atomic

    def slow(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(bio, "replace_file_atomic", slow)
    threads = [threading.Thread(target=save_camera_profile, args=(bundle, CameraProfile(name, roi=(0, 0, 9, 9))))
               for name in ("cam_a", "cam_b", "cam_c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(camera_profiles(load_bundle(bundle, verify=True).manifest)) == {"cam_a", "cam_b", "cam_c"}


def test_malformed_profiles_are_refused_naming_the_fix(bundle):
    with pytest.raises(BundleError, match="roi must be"):
        CameraProfile("cam", roi=(0, 0, 0, 5))
    with pytest.raises(BundleError, match="color_order"):
        CameraProfile("cam", color_order="yuv")
    from edge_ad.runtime import update_manifest

    update_manifest(bundle, {"info": {"cameras": {"cam_x": {"roi": None, "colour": "bgr"}}}})
    with pytest.raises(BundleError, match="info.cameras.cam_x: unknown key"):
        Detector.load(bundle)


def test_cli_calibrate_camera_stores_only_that_profile(bundle, real_root, capsys):
    from edge_ad.cli.main import main

    default = load_bundle(bundle).thresholds
    rc = main(["calibrate", str(bundle), "--camera", "cam_b", "--source",
               str(real_root / CATEGORY / "train" / "good"), "--max-frames", "25", "--target-fpr", "0.05"])
    assert rc == 0 and "calibrated camera cam_b on 25 good frames" in capsys.readouterr().out
    manifest = load_bundle(bundle, verify=True).manifest
    assert set(camera_profiles(manifest)) == {"cam_b"} and manifest.thresholds == default
