"""`edge_ad.convert` / `edge-ad convert`: run directory -> verified bundle, per target family."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_ad.converters.convert import convert
from edge_ad.converters.openvino import convert_openvino, openvino_runner
from edge_ad.data import MVTecDataset
from edge_ad.methods import build_detector
from edge_ad.runtime import load_bundle, preprocess_batch

CATEGORY = "mvtec_hazelnut_256"


def test_intel_cpu_int8_bundle(knn_run, real_root, tmp_path):
    bundle_path = convert(knn_run, "intel-cpu", tmp_path / "bundle", precision="int8",
                          calib=real_root / CATEGORY, calib_count=16, val_data=real_root, progress=False)
    bundle = load_bundle(bundle_path)  # verifies schema and every checksum
    m = bundle.manifest
    assert (m.target, m.precision, m.engine.name) == ("intel-cpu", "int8", "openvino")
    assert m.engine.hints["INFERENCE_PRECISION_HINT"] == "f32"
    assert m.calibration.count >= 16 and len(m.calibration.hash) == 64
    assert m.thresholds is not None and m.thresholds.target_fpr == 0.01
    fidelity = bundle.fidelity
    assert fidelity["num_images"] == 10 and fidelity["num_anomalous"] == 8
    # The conversion cost is measured and small: the INT8 map still tracks FP32.
    assert fidelity["map"]["pearson_r"] > 0.95
    assert abs(fidelity["metrics"]["pixel_auroc"]["delta"]) < 0.05
    # The stored thresholds are evaluated on the labelled validation set: FPR / recall are reported.
    decisions = fidelity["decisions"]
    assert 0.0 <= decisions["candidate_image_fpr"] <= 1.0 and 0.0 <= decisions["candidate_pixel_recall"] <= 1.0
    assert decisions["image_agreement"] >= 0.8
    # The bundle's IR runs and reproduces the stored fidelity's numbers on its own.
    spec = bundle.preprocess_spec
    test = MVTecDataset(real_root, CATEGORY, "test")
    x = preprocess_batch([s.image for s in test], spec, color_order="rgb")
    maps, scores = openvino_runner(bundle.path("openvino/model.xml"), precision_hint="f32")(x)
    assert maps.shape == (10, 1, 64, 64) and np.isfinite(scores).all()
    calib_files = json.loads(bundle.path("calibration.json").read_text())["files"]
    assert calib_files and not any("/test/" in f for f in calib_files)  # never calibrated on test data


def test_onnx_cpu_fp32_bundle_as_tar(knn_run, tmp_path):
    path = convert(knn_run, "onnx-cpu", tmp_path / "b.tar", precision="fp32", calib_count=8, tar=True)
    bundle = load_bundle(path)
    assert bundle.manifest.engine.name == "onnxruntime" and bundle.manifest.precision == "fp32"
    assert bundle.fidelity["map"]["max_abs_error"] < 1e-3  # FP32 ONNX == torch


def test_precision_not_allowed_by_target(knn_run, tmp_path):
    with pytest.raises(ValueError, match="int8|precision"):
        convert(knn_run, "intel-npu", tmp_path / "x", precision="fp32")
    with pytest.raises(KeyError, match="no-such-target|targets"):
        convert(knn_run, "no-such-target", tmp_path / "y")


@pytest.mark.parametrize("backbone", ["dinov2_vits14", "dinov3_vits16"])
def test_random_init_vit_foundad_int8_openvino_map_cosine(backbone, real_root, tmp_path):
    """Acceptance: FoundAD on random-init ViT-S-shaped DINOv2 / DINOv3 (LayerScale 1.0, so blocks are
    not near-identities that would hide quantisation error) converts to OpenVINO INT8 with anomaly-map
    cosine >= 0.99 against FP32, on real images."""
    size = 56 if backbone.startswith("dinov2") else 64
    torch.manual_seed(0)
    detector = build_detector(
        "foundad", backbone={"name": backbone, "img_size": size, "layers": [3],
                             "overrides": {"depth": 4, "init_values": 1.0}},
        projector_dim=96, projector_depth=2, projector_heads=4).eval()
    train_set = MVTecDataset(real_root, CATEGORY, "train")
    images = preprocess_batch([train_set[i].image for i in range(40)], detector.preprocess_spec, color_order="rgb")
    detector.fit_normalization(torch.from_numpy(images[32:40]))
    from edge_ad.converters import export_onnx

    onnx_path = export_onnx(detector, tmp_path / "m.onnx")
    result = convert_openvino(onnx_path, tmp_path / "ov", precision="int8", calibration_images=images[:32],
                              transformer=True)
    test = MVTecDataset(real_root, CATEGORY, "test")
    x = preprocess_batch([s.image for s in test], detector.preprocess_spec, color_order="rgb")
    with torch.no_grad():
        ref = detector(torch.from_numpy(x)).anomaly_map.numpy().ravel().astype(np.float64)
    got = openvino_runner(result.xml)(x)[0].ravel().astype(np.float64)
    cosine = ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got))
    assert cosine >= 0.99, cosine
    assert not np.allclose(ref, got, atol=1e-4)  # INT8 really changed the numbers


def test_cli_convert_jetson_orin_int8_writes_qdq_bundle_here(knn_run, real_root, tmp_path):
    """No TensorRT on this host: the bundle carries the exact Q/DQ ONNX the engine will be built from,
    it passes the TensorRT graph checks, and onnxruntime runs it (the fidelity report's proxy)."""
    import onnx

    from edge_ad.cli.main import main
    from edge_ad.converters.fidelity import onnxruntime_runner
    from edge_ad.converters.trt_check import check_tensorrt_compatible

    out = tmp_path / "orin"
    assert main(["convert", str(knn_run), "--target", "jetson-orin", "--precision", "int8", "--calib",
                 str(real_root / CATEGORY), "--calib-count", "16", "--out", str(out)]) == 0
    bundle = load_bundle(out)
    assert (bundle.manifest.engine.name, bundle.manifest.precision) == ("tensorrt", "int8")
    model_path = bundle.path("model.onnx")
    ops = {n.op_type for n in onnx.load(str(model_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert check_tensorrt_compatible(model_path) == []
    maps, scores = onnxruntime_runner(model_path)(np.zeros((2, 3, 64, 64), np.float32))
    assert maps.shape == (2, 1, 64, 64) and np.isfinite(scores).all()
    assert "onnxruntime" in bundle.fidelity["extra"]["proxy"]


def test_fidelity_budget_runs_the_sensitivity_search(knn_run, tmp_path):
    path = convert(knn_run, "onnx-cpu", tmp_path / "budget", precision="int8", calib_count=8, max_map_error=0.5)
    quant = load_bundle(path).manifest.info["quantization"]
    search = quant["sensitivity"]
    assert search["budget_met"] and search["excluded"] == []  # a loose budget keeps everything INT8
    assert search["baseline_error"] <= 0.5 and search["conversions"] == 1


def _reshape_max_graph(path, target_shape: list[int]):
    """A tiny (1,3,2,2) -> score (1,) ONNX: Reshape to ``target_shape`` then ReduceMax over axis 1."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shape = numpy_helper.from_array(np.array(target_shape, np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["images", "shape"], ["flat"]),
         helper.make_node("ReduceMax", ["flat"], ["score"], keepdims=0, axes=[1])], "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 2, 2])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])], [shape])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_rebatch_onnx_follows_the_batch_or_refuses_a_baked_one(tmp_path):
    import onnxruntime as ort

    from edge_ad.converters.rebatch import rebatch_onnx

    # Reshape to (0, -1): dim 0 copied from the input, so the graph follows the batch.
    good = rebatch_onnx(_reshape_max_graph(tmp_path / "good.onnx", [0, -1]), 4)
    assert good == tmp_path / "good_b4.onnx"
    session = ort.InferenceSession(str(good), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [4, 3, 2, 2] and session.get_outputs()[0].shape == [4]
    x = np.random.default_rng(0).normal(size=(4, 3, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"images": x})[0], x.reshape(4, -1).max(axis=1))
    # Reshape to (1, -1) bakes batch 1 in: refused with the fix instead of a (1,) score for 4 frames.
    with pytest.raises(ValueError, match="bakes its batch into its graph, convert with --batch 1"):
        rebatch_onnx(_reshape_max_graph(tmp_path / "baked.onnx", [1, -1]), 4)
    with pytest.raises(ValueError, match="batch must be an int"):
        rebatch_onnx(good, 0)


def test_int8_depthwise_follows_the_method_and_the_flag(knn_run, real_root, tmp_path, monkeypatch):
    """OpenVINO INT8 keeps the stem float always and the depthwise convs float where the method asks
    (FoundAD) or ``--no-quantize-depthwise`` says so; the bundle records which layers and why."""
    from edge_ad.cli.main import main
    from edge_ad.converters.qdq import DEPTHWISE_REASON, INPUT_LAYER_REASON
    from edge_ad.methods import get_method
    from edge_ad.methods.foundad.model import FoundAD

    assert FoundAD.int8_quantize_depthwise is False and get_method("knn").detector_class.int8_quantize_depthwise is True

    def float_reasons(bundle_path) -> set[str]:
        return set(load_bundle(bundle_path).manifest.info["quantization"]["float_layers"].values())

    common = dict(precision="int8", calib=real_root / CATEGORY, calib_count=8, progress=False)
    assert float_reasons(convert(knn_run, "intel-cpu", tmp_path / "knn", **common)) == {INPUT_LAYER_REASON}
    out = tmp_path / "flag"
    assert main(["convert", str(knn_run), "--target", "intel-cpu", "--precision", "int8", "--calib",
                 str(real_root / CATEGORY), "--calib-count", "8", "--no-quantize-depthwise", "--out", str(out)]) == 0
    assert float_reasons(out) == {INPUT_LAYER_REASON, DEPTHWISE_REASON}
    # The default comes from the method class: a knn that asked for float depthwise convs gets them.
    monkeypatch.setattr(get_method("knn").detector_class, "int8_quantize_depthwise", False)
    assert DEPTHWISE_REASON in float_reasons(convert(knn_run, "intel-cpu", tmp_path / "cls", **common))
    assert INPUT_LAYER_REASON in float_reasons(
        convert(knn_run, "intel-cpu", tmp_path / "override", quantize_depthwise=True, **common))
    assert DEPTHWISE_REASON not in float_reasons(tmp_path / "override")
    with pytest.raises(ValueError, match="INT8 only"):
        convert(knn_run, "intel-cpu", tmp_path / "fp32", precision="fp32", quantize_depthwise=False)
