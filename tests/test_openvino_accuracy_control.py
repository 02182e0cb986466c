"""OpenVINO accuracy-aware INT8 (``convert_openvino(..., accuracy_control=AccuracyControl(...))``).

knn on real EfficientNet-Lite0 weights at 64 px, fitted on real good hazelnut images. The
validation set is real good images plus CutPaste synthetic defects on other real good images
(never the test split), the metric the pixel AUROC of the maps against the CutPaste masks.
NNCF's ``quantize_with_accuracy_control`` must run, the result must record it, and the INT8
model's metric must stay within ``max_drop`` (+ a small tolerance: NNCF measures on the same
images but through its own compiled model) of the FP32 model's.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytest.importorskip("nncf")
pytest.importorskip("openvino")

from edge_ad.converters.openvino import AccuracyControl, convert_openvino, openvino_runner  # noqa: E402
from edge_ad.data import MVTecDataset  # noqa: E402
from edge_ad.data.masks import resize_mask  # noqa: E402
from edge_ad.methods import build_detector  # noqa: E402
from edge_ad.metrics import pixel_auroc  # noqa: E402
from edge_ad.runtime import preprocess_batch  # noqa: E402
from edge_ad.synth import CutPaste  # noqa: E402

SIZE = 64
CATEGORY = "mvtec_hazelnut_256"
#: Tighter than plain INT8's drop here (0.0076 pixel AUROC on this set, NNCF 3.4 / OpenVINO 2026.4), so
#: NNCF's restore loop runs (it reverted 1 of 51 quantizers, drop 0.0058, ~12 s). 0.002 made it revert
#: all of them (100 s).
MAX_DROP = 0.006
TOLERANCE = 0.005


@pytest.fixture(scope="module")
def knn_setup(real_root, tmp_path_factory):
    """(onnx path, calibration images, validation images, validation masks (N, 64, 64) bool)."""
    detector = build_detector("knn", backbone={"name": "efficientnet_lite0", "img_size": SIZE, "pretrained": True})
    train = MVTecDataset(real_root, CATEGORY, "train")
    spec = detector.preprocess_spec
    good = preprocess_batch([train[i].image for i in range(12)], spec, color_order="rgb")
    detector.fit(torch.from_numpy(good[:4]))
    detector.fit_normalization(torch.from_numpy(good[4:8]))
    path = tmp_path_factory.mktemp("ov_ac") / "knn.onnx"
    torch.onnx.export(detector.eval(), (detector.example_input(),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["anomaly_map", "score"])

    # Validation: 4 real good images (empty masks) + 8 CutPaste defects on other real good images.
    rng = np.random.default_rng(0)
    cutpaste = CutPaste()
    raw, masks = [], []
    for i in range(12, 16):
        image = train[i].image
        raw.append(image)
        masks.append(np.zeros((SIZE, SIZE), bool))
    for i in range(16, 24):
        image, mask = cutpaste(train[i].image, rng)
        assert image.dtype == np.uint8 and mask.any()
        raw.append(image)
        masks.append(resize_mask(mask, (SIZE, SIZE)))
    val = preprocess_batch(raw, spec, color_order="rgb")
    masks = np.stack(masks)
    assert masks.any() and not masks.all()
    return path, good, val, masks


def test_accuracy_aware_int8_stays_within_max_drop(knn_setup, tmp_path):
    path, calib, val, masks = knn_setup
    calls = []

    def metric(maps: np.ndarray, scores: np.ndarray) -> float:
        calls.append(len(maps))
        assert maps.shape == masks.shape and scores.shape == (len(masks),)
        return pixel_auroc(masks, maps)

    fp32 = convert_openvino(path, tmp_path / "fp32", precision="fp32")
    fp32_maps, _ = openvino_runner(fp32.xml, precision_hint=fp32.inference_precision_hint)(val)
    fp32_metric = pixel_auroc(masks, fp32_maps[:, 0])
    assert fp32_metric > 0.7, fp32_metric  # the metric sees the synthetic defects at all

    start = time.perf_counter()
    result = convert_openvino(path, tmp_path / "int8", precision="int8", calibration_images=calib,
                              accuracy_control=AccuracyControl(val, metric, max_drop=MAX_DROP))
    elapsed = time.perf_counter() - start
    assert result.xml.is_file() and result.precision == "int8"
    assert result.quantization["accuracy_control"] == {"max_drop": MAX_DROP, "num_validation_images": len(val)}
    assert len(calls) >= 2  # FP32 and INT8 at least, always on the whole set (asserted in metric)

    int8_maps, int8_scores = openvino_runner(result.xml, precision_hint=result.inference_precision_hint)(val)
    assert np.isfinite(int8_maps).all() and np.isfinite(int8_scores).all()
    int8_metric = pixel_auroc(masks, int8_maps[:, 0])
    assert int8_metric >= fp32_metric - MAX_DROP - TOLERANCE, (fp32_metric, int8_metric, elapsed)
