"""OpenVINO conversion: FP32 / FP16 / INT8 IR, the pinned precision hint, the INT8 recipe's scopes."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ad.converters.openvino import (
    QUANTIZABLE_SCOPES,
    compile_openvino,
    convert_openvino,
    inference_precision_hint,
    openvino_runner,
)
from edge_ad.data import MVTecDataset
from edge_ad.methods import build_detector
from edge_ad.runtime import preprocess_batch

SIZE = 64


@pytest.fixture(scope="module")
def knn_onnx(real_root, tmp_path_factory):
    """A knn detector on real EfficientNet-Lite0 weights, fitted on real good hazelnut images, exported."""
    detector = build_detector("knn", backbone={"name": "efficientnet_lite0", "img_size": SIZE, "pretrained": True})
    train = MVTecDataset(real_root, "mvtec_hazelnut_256", "train")
    good = preprocess_batch([train[i].image for i in range(12)], detector.preprocess_spec, color_order="rgb")
    detector.fit(torch.from_numpy(good[:4]))
    detector.fit_normalization(torch.from_numpy(good[4:8]))
    path = tmp_path_factory.mktemp("ov") / "knn.onnx"
    torch.onnx.export(detector.eval(), (detector.example_input(),), str(path), dynamo=False, opset_version=17,
                      input_names=["images"], output_names=["anomaly_map", "score"])
    test = MVTecDataset(real_root, "mvtec_hazelnut_256", "test")
    x = preprocess_batch([s.image for s in test], detector.preprocess_spec, color_order="rgb")
    with torch.no_grad():
        ref_maps, ref_scores = detector(torch.from_numpy(x))
    return path, good, x, ref_maps.numpy(), ref_scores.numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_conversions_reproduce_torch_on_real_images(knn_onnx, tmp_path, precision):
    path, calib, x, ref_maps, ref_scores = knn_onnx
    result = convert_openvino(path, tmp_path / precision, precision=precision,
                              calibration_images=calib if precision == "int8" else None)
    assert result.xml.is_file() and result.bin.is_file()
    assert result.inference_precision_hint == "f32"  # CPU: never silent bf16
    maps, scores = openvino_runner(result.xml, precision_hint=result.inference_precision_hint)(x)
    assert maps.shape == ref_maps.shape and scores.shape == ref_scores.shape
    if precision == "fp32":
        np.testing.assert_allclose(maps, ref_maps, atol=1e-3)
    elif precision == "fp16":
        assert _cosine(maps, ref_maps) > 0.9999
    else:
        assert _cosine(maps, ref_maps) > 0.98
        assert not np.allclose(maps, ref_maps, atol=1e-3)  # it really is quantised


def test_int8_quantises_only_encoder_and_projector(knn_onnx, tmp_path):
    import openvino as ov

    path, calib, *_ = knn_onnx
    result = convert_openvino(path, tmp_path / "int8", precision="int8", calibration_images=calib[:4])
    model = ov.Core().read_model(str(result.xml))
    fake_quantized = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"]
    assert fake_quantized, "no quantisers were inserted"
    # Every quantiser feeds a node under a quantizable module path: the knn distance MatMul
    # (catastrophic cancellation in INT8) and the smoothing / normalisation stay floating point.
    for fq in fake_quantized:
        consumers = [t.get_node().get_friendly_name() for out in fq.outputs() for t in out.get_target_inputs()
                     if t.get_node().get_type_name() != "ShapeOf"]  # shape bookkeeping reads no values
        assert all(any(re.match(p, c) for p in QUANTIZABLE_SCOPES) for c in consumers), consumers
    assert result.quantization["num_calibration_images"] == 4


def test_precision_hint_and_errors(knn_onnx, tmp_path):
    path, *_ = knn_onnx
    assert inference_precision_hint("fp16", "CPU") == "f32"
    assert inference_precision_hint("fp16", "GPU") == "f16"
    assert inference_precision_hint("int8", "NPU") == "f16"
    with pytest.raises(ValueError, match="precision must be one of"):
        convert_openvino(path, tmp_path / "x", precision="int4")
    with pytest.raises(ValueError, match="calibration images"):
        convert_openvino(path, tmp_path / "y", precision="int8")
    with pytest.raises(FileNotFoundError, match="ONNX model not found"):
        convert_openvino(tmp_path / "missing.onnx", tmp_path / "z")
    with pytest.raises(FileNotFoundError, match="IR not found"):
        compile_openvino(tmp_path / "missing.xml")


def _quantised_consumers(xml: Path) -> dict[str, str]:
    """Friendly name -> type of every op that reads a FakeQuantize output (shape bookkeeping aside)."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return {t.get_node().get_friendly_name(): t.get_node().get_type_name()
            for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"
            for out in op.outputs() for t in out.get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"}


def test_int8_keeps_the_stem_float_and_depthwise_on_request(knn_onnx, tmp_path):
    from edge_ad.converters.qdq import DEPTHWISE_REASON, INPUT_LAYER_REASON, float_layers_by_role

    path, calib, x, ref_maps, ref_scores = knn_onnx
    roles = float_layers_by_role(path)
    stem = [n for n, why in roles.items() if why == INPUT_LAYER_REASON]
    depthwise = [n for n, why in roles.items() if why == DEPTHWISE_REASON]
    assert stem == ["/backbone/conv_stem/Conv"] and len(depthwise) >= 5  # Lite0 stages up to layer 3

    def quantised(name: str, consumers: dict[str, str]) -> bool:
        # The conv's own module: TF "same" padding puts a Pad between the quantiser and the conv.
        module = name.rsplit("/", 1)[0] + "/"
        return any(c.startswith(module) for c in consumers)

    results = {}
    for label, kwargs in {"default": {}, "int8 stem": {"keep_input_layers": False},
                          "float depthwise": {"quantize_depthwise": False}}.items():
        results[label] = convert_openvino(path, tmp_path / label.replace(" ", "_"), precision="int8",
                                          calibration_images=calib, **kwargs)
    default = _quantised_consumers(results["default"].xml)
    assert not quantised(stem[0], default) and all(quantised(n, default) for n in depthwise)
    assert results["default"].quantization["float_layers"] == {stem[0]: INPUT_LAYER_REASON}
    assert quantised(stem[0], _quantised_consumers(results["int8 stem"].xml))
    float_dw = _quantised_consumers(results["float depthwise"].xml)
    assert not any(quantised(n, float_dw) for n in depthwise + stem)
    assert not any(t == "GroupConvolution" for t in float_dw.values())
    # Each layer kept float brings INT8 closer to FP32 on the real test images. Measured here (64 px,
    # 12 calibration images): map 1 - cosine 0.0143 (INT8 stem) > 0.0129 (default) > 0.0012 (float
    # depthwise); at 256 px on four real categories the stem alone cut the score error 31-57 %.
    map_error, score_error = {}, {}
    for label, result in results.items():
        maps, scores = openvino_runner(result.xml, precision_hint="f32")(x)
        map_error[label], score_error[label] = 1 - _cosine(maps, ref_maps), float(np.abs(scores - ref_scores).mean())
    assert map_error["float depthwise"] < map_error["default"] < map_error["int8 stem"]
    assert score_error["float depthwise"] < 0.5 * score_error["default"]
