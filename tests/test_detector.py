"""edge_ad.runtime.Detector: bundles on their engines, real camera-like frames in, Results out."""
from __future__ import annotations

import sys
import threading
import warnings

import cv2
import numpy as np
import pytest

from edge_ad.converters.convert import convert
from edge_ad.converters.openvino import openvino_runner
from edge_ad.data import MVTecDataset
from edge_ad.runtime import Detector, Region, Result, load_bundle, preprocess_batch, read_image, update_manifest
from torch_blocker import run_without_torch

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def ov_bundle(knn_run, real_root, tmp_path_factory):
    return convert(knn_run, "intel-cpu", tmp_path_factory.mktemp("det_b") / "ov", precision="int8",
                   calib=real_root / CATEGORY, calib_count=8, val_data=real_root, progress=False)


@pytest.fixture(scope="module")
def test_set(real_root):
    return MVTecDataset(real_root, CATEGORY, "test")


@pytest.fixture(scope="module")
def onnx_det(onnx_bundle):
    return Detector.load(onnx_bundle)


def _frames(test_set, n=None):
    """Real test images read from disk as an OpenCV camera delivers them (BGR uint8)."""
    return [read_image(s.path, "bgr") for s in list(test_set)[:n]]


def _same(a: Result, b: Result) -> None:
    np.testing.assert_array_equal(a.raw_map, b.raw_map)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert a.score == b.score and a.is_anomalous == b.is_anomalous and a.regions == b.regions


def test_onnx_fp32_matches_pytorch_pipeline(onnx_det, knn_run, test_set):
    from edge_ad.evaluation import predict_dataset
    from edge_ad.methods import load_detector

    assert onnx_det.engine.name == "onnxruntime" and onnx_det.engine.device == "CPU"
    spec = onnx_det.bundle.preprocess_spec
    ref = predict_dataset(load_detector(knn_run), test_set, spec, progress=False)
    thr = onnx_det.bundle.thresholds
    assert thr is not None and thr.image_threshold is not None and thr.pixel_threshold is not None
    for i, frame in enumerate(_frames(test_set)):
        res = onnx_det.predict(frame)
        assert isinstance(res, Result)
        assert res.model_map.shape == (64, 64)
        np.testing.assert_allclose(res.model_map, ref.maps[i], atol=1e-3)
        assert abs(res.score - float(ref.scores[i])) < 1e-3
        # Maps come back at the frame's resolution, bilinear like cv2.
        assert res.raw_map.shape == frame.shape[:2] and res.raw_map.dtype == np.float32
        resized = cv2.resize(ref.maps[i], frame.shape[1::-1], interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(res.raw_map, resized, atol=1e-3)
        # Display map: documented calibration mapping, in [0, 1].
        expected = np.clip(res.raw_map / (2 * thr.pixel_threshold), 0, 1)
        np.testing.assert_allclose(res.anomaly_map, expected, atol=1e-6)
        assert res.anomaly_map.min() >= 0 and res.anomaly_map.max() <= 1
        assert res.is_anomalous == (res.score > thr.image_threshold)
        np.testing.assert_array_equal(res.defect_mask, res.raw_map > thr.pixel_threshold)
        assert sum(r.area_px for r in res.regions) == int(res.defect_mask.sum())
        for r in res.regions:
            assert isinstance(r, Region)
            box = res.raw_map[r.y : r.y + r.h, r.x : r.x + r.w]
            assert r.peak == pytest.approx(float(box[res.defect_mask[r.y : r.y + r.h, r.x : r.x + r.w]].max()))
        assert set(res.timings) == {"preprocess", "infer", "postprocess"}
        assert all(v >= 0 for v in res.timings.values())
    # Real defects are found: some anomalous test image has regions.
    assert any(onnx_det.predict(f).regions for f in _frames(test_set))


def test_openvino_int8_reproduces_the_ir(ov_bundle, test_set):
    det = Detector.load(ov_bundle)
    bundle = det.bundle
    assert det.engine.name == "openvino" and det.engine.device == "CPU"
    hint = bundle.manifest.engine.hints["INFERENCE_PRECISION_HINT"]
    assert det.engine.config["INFERENCE_PRECISION_HINT"] == hint == "f32"
    images = [s.image for s in test_set]  # RGB
    x = preprocess_batch(images, bundle.preprocess_spec, color_order="rgb")
    maps, scores = openvino_runner(bundle.path("openvino/model.xml"), precision_hint=hint)(x)
    thr = bundle.thresholds.image_threshold
    for i, img in enumerate(images):
        res = det.predict(img, color_order="rgb")
        np.testing.assert_allclose(res.model_map, maps[i, 0], atol=1e-5)
        assert abs(res.score - float(scores[i])) <= 1e-5
        assert res.is_anomalous == (res.score > thr)


def test_predict_batch_equals_predict(onnx_det, ov_bundle, test_set):
    frames = _frames(test_set, 5)
    frames[2] = cv2.resize(frames[2], (200, 150))  # sizes may differ
    for det in (onnx_det, Detector.load(ov_bundle)):
        batch = det.predict_batch(frames)
        assert len(batch) == 5
        for frame, got in zip(frames, batch):
            _same(got, det.predict(frame))
    with pytest.raises(ValueError, match="empty"):
        onnx_det.predict_batch([])


def test_roi_crop(onnx_det, test_set):
    frame = _frames(test_set, 1)[0]
    roi = (30, 40, 150, 120)
    res = onnx_det.predict(frame, roi=roi)
    crop = np.ascontiguousarray(frame[40:160, 30:180])
    ref = onnx_det.predict(crop)
    assert res.raw_map.shape == (120, 150) and res.roi == roi
    np.testing.assert_array_equal(res.raw_map, ref.raw_map)
    assert res.score == ref.score
    # Regions are reported in full-frame coordinates.
    assert [(r.x - 30, r.y - 40, r.w, r.h, r.area_px) for r in res.regions] == \
           [(r.x, r.y, r.w, r.h, r.area_px) for r in ref.regions]
    per_frame = onnx_det.predict_batch([frame, frame], roi=[roi, None])
    _same(per_frame[0], res)
    _same(per_frame[1], onnx_det.predict(frame))
    with pytest.raises(ValueError, match="outside"):
        onnx_det.predict(frame, roi=(0, 0, frame.shape[1] + 1, 10))


def test_grey_frame(onnx_det, test_set):
    path = test_set[0].path
    grey = read_image(path, "gray")
    res = onnx_det.predict(grey, color_order="gray")
    assert res.raw_map.shape == grey.shape
    rgb_of_grey = np.repeat(grey[:, :, None], 3, axis=2)
    _same(res, onnx_det.predict(rgb_of_grey))
    _same(onnx_det.predict(grey[:, :, None]), res)


def test_thread_safety(onnx_det, test_set):
    frames = _frames(test_set, 6)
    serial = [onnx_det.predict(f) for f in frames]
    results: dict = {}
    errors: list = []

    def worker(t):
        try:
            for rep in range(3):
                for i, f in enumerate(frames):
                    results[(t, rep, i)] = onnx_det.predict(f)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 * 3 * 6
    for (t, rep, i), res in results.items():
        _same(res, serial[i])


def test_bad_inputs(onnx_det):
    ok = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        onnx_det.predict(ok.astype(np.float32))
    with pytest.raises(TypeError, match="numpy"):
        onnx_det.predict([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="4 channels"):
        onnx_det.predict(np.zeros((32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        onnx_det.predict(np.zeros((32, 32, 2), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        onnx_det.predict(np.zeros((0, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 2x2"):
        onnx_det.predict(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 2x2"):
        onnx_det.predict(ok, roi=(0, 0, 1, 5))
    with pytest.raises(ValueError, match="color_order"):
        onnx_det.predict(ok, color_order="bgra")
    with pytest.raises(ValueError, match="gray"):
        onnx_det.predict(ok, color_order="gray")


def test_uncalibrated_bundle_warns_once(onnx_bundle, tmp_path):
    import shutil

    path = tmp_path / "nothr"
    shutil.copytree(onnx_bundle, path)
    update_manifest(path, {"thresholds": None})
    det = Detector.load(path)
    frame = np.full((40, 50, 3), 128, np.uint8)
    with pytest.warns(UserWarning, match="calibrat"):
        res = det.predict(frame)
    assert res.is_anomalous is None and res.defect_mask is None and res.regions == []
    np.testing.assert_allclose(res.anomaly_map, np.clip(res.raw_map / 6.0, 0, 1), atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.predict(frame)  # only once


def test_engine_choice_errors(onnx_bundle, monkeypatch):
    bundle = load_bundle(onnx_bundle)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        Detector.load(bundle)
    monkeypatch.delitem(sys.modules, "onnxruntime")
    with pytest.raises(ValueError, match="device"):
        Detector.load(bundle, device="NPU")


def test_tensorrt_bundle_without_tensorrt_names_the_install(knn_run, tmp_path):
    # TensorRT is not installable on CPU machines: loading a TensorRT bundle must say how to get it.
    # The engine itself is tested against a stub TensorRT in tests/test_tensorrt_engine.py.
    path = convert(knn_run, "jetson-orin", tmp_path / "orin", precision="fp16", calib_count=8, progress=False)
    with pytest.raises(ImportError, match=r"pip install edge-ad\[tensorrt\]"):
        Detector.load(path)


def test_detector_runs_without_torch(onnx_bundle, ov_bundle):
    proc = run_without_torch(
        f"""
        import sys
        import numpy as np
        from edge_ad.runtime import Detector
        frame = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
        for path in ({str(onnx_bundle)!r}, {str(ov_bundle)!r}):
            res = Detector.load(path).predict(frame)
            assert res.raw_map.shape == (120, 90) and np.isfinite(res.score)
        import edge_ad
        assert edge_ad.Detector is Detector
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_without_opencv(onnx_bundle, onnx_det, test_set, monkeypatch):
    """No cv2: regions need it (clear error naming regions=False); maps use the numpy bilinear resize."""
    import edge_ad.runtime._cv as cv_mod
    import edge_ad.runtime.detector as det_mod

    frame = _frames(test_set, 1)[0][:150, :201]
    with_cv2 = onnx_det.predict(frame)
    monkeypatch.setattr(cv_mod, "_CV2", None)
    monkeypatch.setattr(det_mod, "cv2_available", lambda: False)
    with pytest.raises(ImportError, match="regions=False"):
        Detector.load(onnx_bundle)
    det = Detector.load(onnx_bundle, regions=False)
    res = det.predict(frame)
    assert res.regions is None
    np.testing.assert_allclose(res.raw_map, with_cv2.raw_map, atol=1e-4)
    np.testing.assert_array_equal(res.model_map, with_cv2.model_map)
