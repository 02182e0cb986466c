"""Explicit-quantization (Q/DQ) ONNX for TensorRT, and the static TensorRT graph checks.

The Q/DQ graphs run in onnxruntime, which executes QuantizeLinear / DequantizeLinear exactly as
written: that is the numerics proxy for a TensorRT INT8 engine here (no GPU, no TensorRT).
Detectors are FoundAD on real-architecture backbones (random-init ViT-S-shaped DINOv2 / DINOv3
with LayerScale 1.0, and EfficientNet-Lite0 with its ImageNet weights), normalised on real good
images and evaluated on held-out real images (MVTec hazelnut, ``real_root``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_ad.converters.qdq import (  # noqa: E402
    DEFAULT_EXCLUDE,
    QDQResult,
    _calibrate,
    _entropy_amax,
    _upgrade_opset,
    plan_quantization,
    quantize_qdq,
    strip_qdq_from_unquantized_consumers,
)
from edge_ad.converters.trt_check import TOPK_MAX_K, check_tensorrt_compatible, qdq_summary  # noqa: E402
from edge_ad.methods import build_detector  # noqa: E402
from edge_ad.runtime import preprocess_batch, read_image  # noqa: E402

CATEGORY = "mvtec_hazelnut_256"
VIT_S = {"depth": 3, "embed_dim": 384, "num_heads": 6, "init_values": 1.0}  # ViT-S width, 3 blocks
PROJECTOR = dict(projector_dim=64, projector_depth=2, projector_heads=4, top_k=3, smoothing_sigma=2.0)
BACKBONES = {
    "dinov2": dict(name="dinov2_vits14", img_size=56, layers=(2,), overrides=VIT_S),  # 4 x 4 patches
    "dinov3": dict(name="dinov3_vits16", img_size=64, layers=(2,), overrides=VIT_S),
    "effnet": dict(name="efficientnet_lite0", img_size=64, pretrained=True),  # ImageNet weights
}
MIN_COSINE = 0.99  # the acceptance point


@dataclass
class Exported:
    """A FoundAD detector exported to ONNX with its real-image calibration and held-out sets."""

    onnx_path: Path
    calibration: np.ndarray  # (16, 3, H, W) good training images
    held_out: np.ndarray  # (20, 3, H, W): 10 unseen good + 10 test images (good and defective)
    num_linear: int  # MatMul nodes with a constant weight (Linear layers)


def _export(kind: str, real_root: Path, out: Path) -> Exported:
    torch.manual_seed(0)
    det = build_detector("foundad", backbone=BACKBONES[kind], **PROJECTOR).eval()
    good = sorted((real_root / CATEGORY / "train" / "good").glob("*.png"))
    test = sorted((real_root / CATEGORY / "test").glob("*/*.png"))
    assert len(good) >= 50 and len(test) >= 10

    def batch(paths: list[Path]) -> np.ndarray:
        return preprocess_batch([read_image(p) for p in paths], det.preprocess_spec, color_order="rgb")

    calibration, fit, held_out = batch(good[:16]), batch(good[16:24]), batch(good[40:50] + test[:10])
    # Normalised maps (z-scores of good pixels) make the cosine meaningful: raw maps are all
    # positive and any two of them have a cosine near 1.
    det.fit_normalization(torch.from_numpy(fit))
    det.eval()
    path = out / f"{kind}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(det, (torch.from_numpy(calibration[:1]),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["anomaly_map", "score"])
    model = onnx.load(str(path))
    inits = {t.name for t in model.graph.initializer}
    num_linear = sum(n.op_type == "MatMul" and n.input[1] in inits for n in model.graph.node)
    return Exported(path, calibration, held_out, num_linear)


@pytest.fixture(scope="module")
def exported(real_root, tmp_path_factory):
    """Lazily exported detectors, one per backbone kind, shared by the tests of this module."""
    cache: dict[str, Exported] = {}
    out = tmp_path_factory.mktemp("qdq_models")

    def get(kind: str) -> Exported:
        if kind not in cache:
            cache[kind] = _export(kind, real_root, out)
        return cache[kind]

    return get


def _session(path: Path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _compare(fp32: Path, int8: Path, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image anomaly-map cosine, FP32 scores and INT8 scores over ``images``."""
    a, b = _session(fp32), _session(int8)
    cos, sa, sb = [], [], []
    for x in images:
        map_a, score_a = a.run(None, {"images": x[None]})
        map_b, score_b = b.run(None, {"images": x[None]})
        u, v = map_a.ravel().astype(np.float64), map_b.ravel().astype(np.float64)
        cos.append(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))
        sa.append(float(score_a[0]))
        sb.append(float(score_b[0]))
    return np.array(cos), np.array(sa), np.array(sb)


def _producers(model) -> dict:
    return {o: n for n in model.graph.node for o in n.output}


def _assert_recipe(model, result: QDQResult) -> None:
    """Per-channel symmetric INT8 weights on the targets; nothing quantised that must stay float."""
    summary = qdq_summary(model)
    nodes = {n.name: n for n in model.graph.node}
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    producer = _producers(model)
    assert set(result.quantized_nodes) == set(summary.quantized_weight_nodes)
    for name, wq in summary.quantized_weight_nodes.items():
        node = nodes[name]
        assert node.op_type in ("MatMul", "Conv", "Gemm")
        weight = consts[producer[node.input[1]].input[0]]
        assert weight.dtype == np.int8 and wq.dtype == "INT8" and wq.symmetric, name
        expected_axis = 0 if node.op_type == "Conv" else 1  # output channels: Conv (O, I, k, k), MatMul (K, N)
        assert wq.axis == expected_axis and wq.num_scales == weight.shape[expected_axis], (name, wq)
        # ...and its activation input is Q/DQ'd too (INT8 x INT8 GEMM).
        assert summary.quantized_activation_nodes.get(name) == [0], name
    # Residual Adds, LayerNorm, Softmax and every other float op read float tensors.
    assert summary.quantized_float_ops == {}
    for node in model.graph.node:
        if node.op_type in ("Add", "Sub", "LayerNormalization", "Softmax", "TopK", "Resize", "Pow", "ReduceMean"):
            for name in node.input:
                src = producer.get(name)
                assert src is None or src.op_type != "DequantizeLinear", f"{node.op_type} {node.name} reads {src.name}"
    # Activation Q/DQ: per tensor, INT8 zero point 0 (what TensorRT supports).
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            assert consts[node.input[1]].size == 1
            zp = consts[node.input[2]]
            assert zp.dtype == np.int8 and not zp.any()


# ---------------------------------------------------------------------------- real detectors
@pytest.mark.parametrize("kind", ["dinov2", "dinov3"])
def test_vit_foundad_qdq_matches_fp32_on_real_images(kind, exported, tmp_path):
    e = exported(kind)
    result = quantize_qdq(e.onnx_path, tmp_path / "q.onnx", e.calibration, method="minmax")
    assert result.backend == "onnxruntime" and result.num_calibration_images == 16
    model = onnx.load(str(result.onnx_path))

    assert check_tensorrt_compatible(model) == []
    _assert_recipe(model, result)
    # Every Linear layer of backbone and projector is INT8 (3 blocks x 4 + projector 1 + 2 x 4 + 1)...
    assert len(result.quantized_nodes) == e.num_linear == 3 * 4 + 1 + 2 * 4 + 1
    # ...the patch embedding (reads the image) and the Gaussian smoothing (score head) are not,
    excluded = result.excluded_nodes
    assert "input image" in excluded["/backbone/patch_embed/proj/Conv"]
    assert all("score head" in excluded[n] for n in ("/smoother/Conv", "/smoother/Conv_1"))
    assert sum("attention" in r for r in excluded.values()) == 2 * (3 + 2)  # q @ k^T, attn @ v per block
    # ...and FoundAD's residual f - P(f) reads the float features, not the projector's INT8 input.
    assert result.restored_float_inputs >= 1
    sub = next(n for n in model.graph.node if n.name == "/Sub")
    assert _producers(model)[sub.input[0]].op_type != "DequantizeLinear"

    cos, s32, s8 = _compare(e.onnx_path, result.onnx_path, e.held_out)
    print(f"{kind}: anomaly-map cosine min {cos.min():.5f} mean {cos.mean():.5f}; "
          f"score corr {np.corrcoef(s32, s8)[0, 1]:.4f}, max |diff| {np.abs(s32 - s8).max():.3f}")
    assert cos.min() >= MIN_COSINE
    assert np.corrcoef(s32, s8)[0, 1] >= 0.98


def test_efficientnet_lite0_foundad_qdq_matches_fp32(exported, tmp_path):
    e = exported("effnet")
    result = quantize_qdq(e.onnx_path, tmp_path / "q.onnx", e.calibration)
    model = onnx.load(str(result.onnx_path))
    assert check_tensorrt_compatible(model) == []
    _assert_recipe(model, result)
    excluded = result.excluded_nodes
    depthwise = [n for n, r in excluded.items() if r.startswith("depthwise")]
    # Lite0 repeats blocks (1, 2, 2, 3, 3, ...) per stage; stages 0-4 run up to stride 16: 11 MBConvs.
    assert len(depthwise) == 11
    assert all("conv_dw" in n for n in depthwise)
    assert "input image" in excluded["/backbone/conv_stem/Conv"]
    convs = [n for n in result.quantized_nodes if n.endswith("Conv")]
    assert len(convs) >= 15  # the pointwise (1 x 1) convs: the bulk of the compute
    # MBConv skip connections: onnxruntime wired them to the Q/DQ copy; the post-pass undid it.
    assert result.restored_float_inputs >= 5

    cos, s32, s8 = _compare(e.onnx_path, result.onnx_path, e.held_out)
    print(f"effnet: anomaly-map cosine min {cos.min():.5f} mean {cos.mean():.5f}; "
          f"score corr {np.corrcoef(s32, s8)[0, 1]:.4f}")
    assert cos.min() >= MIN_COSINE


def test_percentile_and_entropy_calibration(exported, tmp_path):
    e = exported("dinov3")
    model = onnx.load(str(e.onnx_path))
    plan = plan_quantization(model)
    from edge_ad.converters.qdq import _activation_inputs

    tensors = _activation_inputs(model, plan.targets)
    batches = [e.calibration[i : i + 1] for i in range(0, 16, 2)]
    ranges = {m: _calibrate(e.onnx_path, "images", tensors, batches, m) for m in ("minmax", "percentile", "entropy")}
    for name in tensors:
        amax = ranges["minmax"][name]
        assert amax > 0
        # Histogram methods clip (at most the max), and never collapse to a tiny range.
        for m in ("percentile", "entropy"):
            assert 0.05 * amax <= ranges[m][name] <= amax * (1 + 1e-6), (m, name, ranges[m][name], amax)
    result = quantize_qdq(e.onnx_path, tmp_path / "q.onnx", e.calibration, method="entropy")
    assert result.method == "entropy" and check_tensorrt_compatible(result.onnx_path) == []
    cos, _, _ = _compare(e.onnx_path, result.onnx_path, e.held_out)
    assert cos.min() >= MIN_COSINE


def test_entropy_threshold_on_known_distributions():
    rng = np.random.default_rng(0)
    bins = 2048
    # Gaussian with a few far outliers: KL clips well below the max, above the bulk.
    x = np.abs(np.concatenate([rng.normal(size=200_000), [60.0, -55.0, 58.0]]))
    hist, edges = np.histogram(x, bins=bins, range=(0, x.max()))
    amax = _entropy_amax(hist, edges)
    assert 3.0 < amax < 20.0
    # ReLU6-like: half exact zeros, mass up to the saturation at 6 -> threshold stays near 6.
    y = np.concatenate([np.zeros(100_000), np.clip(rng.exponential(2.0, 100_000), 0, 6)])
    hist, edges = np.histogram(y, bins=bins, range=(0, 6.0))
    assert _entropy_amax(hist, edges) > 4.5


def test_quantize_qdq_rejects_bad_input(exported, tmp_path):
    e = exported("dinov3")
    with pytest.raises(ValueError, match="PreprocessSpec"):
        quantize_qdq(e.onnx_path, tmp_path / "q.onnx", e.calibration[:, :, :32, :32])
    with pytest.raises(ValueError, match="method"):
        quantize_qdq(e.onnx_path, tmp_path / "q.onnx", e.calibration, method="mse")
    with pytest.raises(TypeError, match="numpy"):
        quantize_qdq(e.onnx_path, tmp_path / "q.onnx", torch.from_numpy(e.calibration))
    with pytest.raises(ValueError, match="NaN"):
        quantize_qdq(e.onnx_path, tmp_path / "q.onnx", np.full_like(e.calibration, np.nan))
    try:
        import modelopt.onnx.quantization  # noqa: F401
    except Exception:  # noqa: BLE001 - the usual case here
        with pytest.raises(ImportError, match="nvidia-modelopt"):
            quantize_qdq(e.onnx_path, tmp_path / "q.onnx", e.calibration, backend="modelopt")
    # Everything excluded: nothing to quantise is an error, not a silent FP32 copy.
    with pytest.raises(ValueError, match="nothing to quantise"):
        quantize_qdq(e.onnx_path, tmp_path / "q.onnx", e.calibration, exclude=DEFAULT_EXCLUDE + (r".",))


def test_opset_upgrade_for_modelopt_keeps_numerics(exported, tmp_path):
    """ModelOpt's path upgrades the export to opset 19 first; the upgrade must not change results."""
    e = exported("dinov3")
    model = onnx.load(str(e.onnx_path))
    up = _upgrade_opset(model, 19)
    assert next(i.version for i in up.opset_import if i.domain in ("", "ai.onnx")) == 19
    onnx.save(up, str(tmp_path / "up.onnx"))
    x = e.held_out[:2]
    for img in x:
        a = _session(e.onnx_path).run(None, {"images": img[None]})
        b = _session(tmp_path / "up.onnx").run(None, {"images": img[None]})
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- post-pass
def _qdq_graph(dedicated: bool):
    """x -> Q/DQ -> MatMul(W) (a target) and x -> [Q/DQ] -> Add(x, mm) (the residual)."""
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "W")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q1"),
        helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xdq"], name="dq1"),
        helper.make_node("MatMul", ["xdq", "W"], ["mm"], name="mm"),
    ]
    if dedicated:
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq2"], name="q2"),
            helper.make_node("DequantizeLinear", ["xq2", "s", "zp"], ["xdq2"], name="dq2"),
            helper.make_node("Add", ["xdq2", "mm"], ["y"], name="residual"),
        ]
    else:
        nodes.append(helper.make_node("Add", ["xdq", "mm"], ["y"], name="residual"))
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [scale, zp, w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("dedicated", [False, True])
def test_post_pass_moves_float_consumers_back_to_float(dedicated):
    model = _qdq_graph(dedicated)
    assert qdq_summary(model).quantized_adds == ["residual"]
    assert any("Add node(s) have INT8" in p for p in check_tensorrt_compatible(model))
    assert strip_qdq_from_unquantized_consumers(model, ["mm"]) == 1
    nodes = {n.name: n for n in model.graph.node}
    assert list(nodes["residual"].input) == ["x", "mm"]
    assert list(nodes["mm"].input) == ["xdq", "W"]  # the target keeps its Q/DQ
    assert ("q2" in nodes) is False and ("dq2" in nodes) is False  # a dedicated pair left unused is removed
    assert qdq_summary(model).quantized_adds == []
    onnx.checker.check_model(model)


# ---------------------------------------------------------------------------- trt_check on small graphs
def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def test_check_flags_control_flow():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [], [_vi("t", [1, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [_vi("e", [1, 4])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g, name="branch_on_data"),
    ]
    zero = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
    problems = check_tensorrt_compatible(_model(nodes, [_vi("x", [1, 4])], [_vi("y", [1, 4])], [zero]))
    assert len(problems) == 1 and "control flow If in branch_on_data" in problems[0]


def test_check_flags_dynamic_shapes():
    # Dynamic batch on the input.
    dyn = _model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [_vi("x", ["batch", 3, 8, 8])],
                 [_vi("y", ["batch", 3, 8, 8])])
    problems = check_tensorrt_compatible(dyn)
    assert len(problems) == 1 and "graph input 'x' has dynamic shape ['batch', 3, 8, 8]" in problems[0]
    # Static input, but a Reshape whose target shape is computed from tensor values.
    shape_from_values = _model(
        [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64, name="cast"),
         helper.make_node("ReduceMax", ["xi"], ["n"], keepdims=1, name="max"),
         helper.make_node("Reshape", ["x", "n"], ["y"], name="reshape_by_value")],
        [_vi("x", [1, 4])], [_vi("y", None)],
    )
    problems = check_tensorrt_compatible(shape_from_values)
    assert any("reshape_by_value" in p and "tensor values" in p for p in problems)
    # Shapes computed from Shape (like TF "same" padding) are build-time constants: fine.
    from_shape = _model(
        [helper.make_node("Shape", ["x"], ["s"], name="shape"),
         helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape_by_shape")],
        [_vi("x", [1, 4])], [_vi("y", ["d0", "d1"])],  # symbolic output dims, as torch writes them
    )
    assert check_tensorrt_compatible(from_shape) == []


def test_check_flags_unsupported_ops_topk_and_bad_qdq():
    k_big = numpy_helper.from_array(np.array([TOPK_MAX_K + 1], np.int64), "k")
    scale = numpy_helper.from_array(np.array([0.1, -0.2], np.float32), "scale")  # a negative scale
    zp = numpy_helper.from_array(np.array([0, 3], np.uint8), "zp")  # UINT8, non-zero
    w = numpy_helper.from_array(np.ones((2, 2), np.uint8), "w")
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk"),
        helper.make_node("DequantizeLinear", ["w", "scale", "zp"], ["wf"], axis=0, name="dq_w"),  # axis 0 for MatMul
        helper.make_node("MatMul", ["m", "wf"], ["mm"], name="mm"),
        helper.make_node("DynamicQuantizeLinear", ["m"], ["a", "b", "c"], name="dyn_q"),
        helper.make_node("Celu2", ["m"], ["z"], name="mystery"),
    ]
    model = _model(nodes, [_vi("x", [1, 5000]), _vi("m", [1, 2])],
                   [_vi("v", [1, 5000]), _vi("mm", [1, 2]), _vi("z", [1, 2])], [k_big, scale, zp, w])
    problems = "\n".join(check_tensorrt_compatible(model))
    for expected in ("exceeds TensorRT's limit of 3840", "op Celu2 in mystery", "QOperator-format op DynamicQuantizeLinear",
                     "scales must be positive", "UINT8", "zero point must be 0", "needs its output-channel axis 1"):
        assert expected in problems, expected


def test_check_passes_fp32_exports(exported):
    for kind in ("dinov3", "effnet"):  # effnet: TF "same" pads computed from Shape at run time
        assert check_tensorrt_compatible(exported(kind).onnx_path) == []


def test_qdq_model_bytes_and_path_agree(exported, tmp_path):
    e = exported("dinov3")
    data = e.onnx_path.read_bytes()
    assert check_tensorrt_compatible(data) == check_tensorrt_compatible(e.onnx_path) == []
    assert not qdq_summary(data).is_quantized
