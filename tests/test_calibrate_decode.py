"""Calibration decodes frames exactly as a stream does (no training/serving skew): on a real
``bsdata_pitting`` JPEG folder (0.5 MP crops, 64 px knn onnx-cpu bundle: reduced decode at 1/4, 1/8),
the thresholds are fitted on the very per-frame scores a stream over that folder produces, for the
default reduced decode and for ``--full-decode``; the decode mode is recorded with the thresholds
(bundle and camera profile), survives a reload, and a stream that decodes otherwise warns once."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest

from edge_ad.calibration.thresholds import fit_thresholds
from edge_ad.runtime import Detector, load_bundle, read_image
from edge_ad.runtime.calibrate import PixelSample, _floor_margins, calibrate_bundle
from edge_ad.runtime.decode_mode import thresholds_decode_mode
from edge_ad.runtime.image_io import jpeg_size, reduction_factor

MISMATCH = "thresholds were calibrated on"


@pytest.fixture(scope="module")
def folder(real_root):
    return real_root / "bsdata_pitting" / "train" / "good"


@pytest.fixture
def bundle(onnx_bundle, tmp_path):
    """A private copy of the shared bundle (calibration rewrites the manifest)."""
    return shutil.copytree(onnx_bundle, tmp_path / "bundle")


def _stream(det: Detector, source, **kwargs):
    with det.stream(source, **kwargs) as s:
        return list(s)


def _expected_scales(folder, model_hw) -> dict[str, int]:
    """Decode factor -> files, from each JPEG's header and the factor rule (what the stream will use)."""
    counts: dict[str, int] = {}
    for f in sorted(folder.iterdir()):
        key = str(reduction_factor(jpeg_size(f.read_bytes()), model_hw))
        counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("reduced", [True, False], ids=["reduced", "full"])
def test_calibration_fits_the_scores_the_stream_produces(bundle, folder, reduced):
    det = Detector.load(bundle)
    report = det.calibrate(str(folder), target_fpr=0.05, pixel_fpr=0.01, reduced_decode=reduced, progress=False)
    results = _stream(det, str(folder), reduced_decode=reduced)
    assert len(results) == report.num_frames == len(list(folder.iterdir()))
    stream_scales: dict[str, int] = {}
    for r in results:
        stream_scales[str(r.decode_scale)] = stream_scales.get(str(r.decode_scale), 0) + 1
    # 0.5 MP crops for a 64 px model: the stream decodes every file reduced (1/4, 1/8), or all in full.
    assert stream_scales == (_expected_scales(folder, det.spec.size) if reduced else {"1": len(results)})
    assert ("1" in stream_scales) != reduced

    # Per frame, calibration saw the stream's scores (batch 8 vs batch 1 calls: float rounding only).
    stream_scores = np.array([r.score for r in results], np.float32)
    np.testing.assert_allclose(report.scores, stream_scores, rtol=1e-5, atol=1e-5)
    # ... and its thresholds are the calibration rule applied to the stream's scores and model maps.
    sample = PixelSample()
    for r in results:
        sample.add(r.model_map)
    maps = sample.array()
    fitted = fit_thresholds(stream_scores, maps, target_fpr=0.05, pixel_fpr=0.01)
    image, pixel, _ = _floor_margins(stream_scores, maps, fitted.image_threshold, fitted.pixel_threshold, "stream")
    t = report.thresholds
    assert t.image_threshold == pytest.approx(image, rel=1e-5)
    assert t.pixel_threshold == pytest.approx(pixel, rel=1e-5)

    # The other decode gives other scores: calibrating in full for a reduced stream (or the reverse)
    # would fit the wrong ones (what this fixes).
    other = np.array([r.score for r in _stream(det, str(folder), reduced_decode=not reduced)], np.float32)
    assert np.max(np.abs(other - stream_scores)) > 1e-3 * np.max(np.abs(stream_scores))
    if not reduced:  # full decode = predict on the files read in full
        files = sorted(folder.iterdir())
        direct = [r.score for r in det.predict_batch([read_image(f, "bgr") for f in files])]
        np.testing.assert_allclose(report.scores, direct, rtol=1e-5, atol=1e-5)

    decode = dict(t.details["decode"])
    assert decode["mode"] == ("reduced" if reduced else "full") == report.decode
    assert dict(decode["scales"]) == stream_scales  # calibration decoded each file at the stream's factor
    assert ("min_size" in decode) == reduced


def test_decode_mode_survives_reload_for_bundle_and_camera_profile(bundle, folder):
    det = Detector.load(bundle)
    det.calibrate(str(folder), 0.05, reduced_decode=False, max_frames=25, progress=False)
    det.calibrate(str(folder), 0.05, camera="cam_a", max_frames=25, progress=False)
    det.calibrate(str(folder), 0.05, camera="cam_roi", roi=(0, 0, 460, 460), max_frames=25, progress=False)
    frames = [read_image(f, "bgr") for f in sorted(folder.iterdir())[:25]]
    det.calibrate(frames, 0.05, camera="cam_arrays", progress=False)

    reloaded = load_bundle(bundle, verify=True)  # sealed
    assert thresholds_decode_mode(reloaded.thresholds) == "full"
    again = Detector.load(bundle)
    modes = {name: thresholds_decode_mode(p.thresholds) for name, p in again.cameras.items()}
    # A ROI is never decoded reduced (its pixels are the full frame's); arrays are used as given.
    assert modes == {"cam_a": "reduced", "cam_roi": "full", "cam_arrays": "given"}
    assert thresholds_decode_mode(again.thresholds) == "full"


def test_stream_with_another_decode_warns_once(bundle, folder):
    det = Detector.load(bundle)
    det.calibrate(str(folder), 0.05, reduced_decode=False, max_frames=25, progress=False)  # bundle defaults: full
    det.calibrate(str(folder), 0.05, camera="cam_a", max_frames=25, progress=False)  # cam_a: reduced

    def caught(source, **kwargs) -> list[str]:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            _stream(det, source, max_frames=2, **kwargs)
        return [str(x.message) for x in w if MISMATCH in str(x.message)]

    # As calibrated: silent (default thresholds full, cam_a reduced; arrays are never compared).
    assert caught(str(folder), reduced_decode=False) == []
    assert caught({"cam_a": str(folder)}) == []
    assert caught([read_image(f, "bgr") for f in sorted(folder.iterdir())[:2]]) == []
    # Another decode: one warning naming the camera and the fix, then no more for that camera and pair.
    first = caught(str(folder))
    assert len(first) == 1 and str(folder) in first[0] and "full decode" in first[0] and "--full-decode" in first[0]
    assert caught(str(folder)) == []
    side = caught({"cam_a": str(folder)}, reduced_decode=False)
    assert len(side) == 1 and side[0].startswith("cam_a:") and "reduced decode" in side[0]
    assert caught({"cam_a": str(folder)}, reduced_decode=False) == []

    # A fresh detector warns again (once per detector), also when the thresholds came from a reload.
    det = Detector.load(bundle)
    assert len(caught(str(folder))) == 1


def test_cli_calibrate_full_decode_flag(bundle, folder, capsys):
    from edge_ad.cli.main import main

    for flag, mode in (([], "reduced"), (["--full-decode"], "full")):
        rc = main(["calibrate", str(bundle), "--source", str(folder), "--max-frames", "20", *flag])
        assert rc == 0 and f"{mode} decode" in capsys.readouterr().out
        assert thresholds_decode_mode(load_bundle(bundle).thresholds) == mode
    with pytest.raises(ValueError, match="reduced_decode must be True"):
        calibrate_bundle(bundle, str(folder), 0.05, reduced_decode="no", progress=False)
