"""INT8 sensitivity search (converters/sensitivity.py): per-block fallback to floating point until a
fidelity budget holds, with the OpenVINO (NNCF) and Q/DQ (TensorRT) adapters.

Real inputs: FoundAD on a random-init ViT-S-shaped DINOv3 (LayerScale 1.0, 3 blocks, 64 px),
normalised on real good hazelnut images; calibration and validation are real hazelnut images
preprocessed with the detector's spec. Budgets are set from the plain-INT8 error measured here.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_ad.converters.fidelity import onnxruntime_runner  # noqa: E402
from edge_ad.converters.sensitivity import (  # noqa: E402
    group_quantizable_nodes,
    map_cosine_error,
    openvino_quantizer,
    qdq_quantizer,
    sensitivity_search,
)
from edge_ad.methods import build_detector  # noqa: E402
from edge_ad.runtime import preprocess_batch, read_image  # noqa: E402

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def vit(real_root, tmp_path_factory):
    """(onnx path, calibration (8 good), validation (4 unseen good + 4 test)) of a tiny ViT FoundAD."""
    torch.manual_seed(0)
    det = build_detector(
        "foundad",
        backbone={"name": "dinov3_vits16", "img_size": 64, "layers": [2],
                  "overrides": {"depth": 3, "embed_dim": 384, "num_heads": 6, "init_values": 1.0}},
        projector_dim=64, projector_depth=2, projector_heads=4, top_k=3, smoothing_sigma=2.0).eval()
    good = sorted((real_root / CATEGORY / "train" / "good").glob("*.png"))
    test = sorted((real_root / CATEGORY / "test").glob("*/*.png"))

    def batch(paths):
        return preprocess_batch([read_image(p) for p in paths], det.preprocess_spec, color_order="rgb")

    calibration, fit, validation = batch(good[:8]), batch(good[16:24]), batch(good[40:44] + test[::len(test) // 4][:4])
    det.fit_normalization(torch.from_numpy(fit))  # normalised maps: the cosine is meaningful
    det.eval()
    path = tmp_path_factory.mktemp("sensitivity") / "vit.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(det, (torch.from_numpy(calibration[:1]),), str(path), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["anomaly_map", "score"])
    return path, calibration, validation


# ---------------------------------------------------------------------------- grouping
def test_group_vit_blocks(vit):
    from edge_ad.converters.openvino import VIT_QUANTIZABLE_SCOPES

    groups = group_quantizable_nodes(vit[0])
    assert list(groups) == ["/backbone/patch_embed/proj/", "/backbone/blocks.0/", "/backbone/blocks.1/",
                            "/backbone/blocks.2/", "/projector/embed/", "/projector/blocks.0/",
                            "/projector/blocks.1/", "/projector/head/"]
    assert groups["/backbone/blocks.1/"] == [f"/backbone/blocks.1/{m}/MatMul"
                                             for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")]
    assert all(n.startswith(g) for g, nodes in groups.items() for n in nodes)
    # Attention products (activation x activation) and the score head are never candidates.
    flat = [n for nodes in groups.values() for n in nodes]
    assert not any("/smoother/" in n or n.count("/") == 1 for n in flat)
    # Restricted to what OpenVINO's ViT recipe quantises: no patch embedding.
    assert "/backbone/patch_embed/proj/" not in group_quantizable_nodes(vit[0], include=VIT_QUANTIZABLE_SCOPES)


def _conv_graph(names: list[str]):
    """A chain of 8-channel 1x1 convs with the given node names (CNN-style module paths)."""
    nodes, inits, x = [], [], "images"
    for i, name in enumerate(names):
        w = numpy_helper.from_array(np.full((8, 8 if i else 3, 1, 1), 0.1, np.float32), f"w{i}")
        inits.append(w)
        nodes.append(helper.make_node("Conv", [x, w.name], [f"y{i}"], name=name))
        x = f"y{i}"
    nodes.append(helper.make_node("ReduceMean", [x], ["score"], name="/ReduceMean", keepdims=0))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph)


def test_group_cnn_stages_and_layers():
    names = ["/backbone/conv_stem/Conv", "/backbone/blocks.1/blocks.1.0/conv_pw/Conv",
             "/backbone/blocks.1/blocks.1.0/conv_pwl/Conv", "/backbone/blocks.1/blocks.1.1/conv_pw/Conv",
             "/backbone/layer2/layer2.0/conv1/Conv", "/backbone/layer2/layer2.0/downsample/downsample.0/Conv",
             "/projector/mlp/mlp.0/Conv", "/projector/mlp/mlp.2/Conv", "/smoother/Conv"]
    groups = group_quantizable_nodes(_conv_graph(names))
    assert groups == {
        "/backbone/conv_stem/": [names[0]],  # no block structure: per layer
        "/backbone/blocks.1/blocks.1.0/": names[1:3],
        "/backbone/blocks.1/blocks.1.1/": [names[3]],
        "/backbone/layer2/layer2.0/": names[4:6],
        "/projector/mlp/mlp.0/": [names[6]],  # "mlp.0" is a layer, not a block
        "/projector/mlp/mlp.2/": [names[7]],
    }


# ---------------------------------------------------------------------------- the search logic
def test_search_greedy_order_cache_and_limits():
    """Fake backend: each float group removes its own error; check order, reuse and reporting."""
    cost = {"a": 0.001, "b": 0.004, "c": 0.002, "d": 0.002}
    calls: list[frozenset] = []
    ref = np.ones((2, 1, 4, 4), np.float32)

    def quantize(excluded):
        calls.append(frozenset(excluded))
        err = sum(v for k, v in cost.items() if k not in excluded)

        def run(images):
            return np.full_like(ref, 1.0), np.array([err, err])  # score carries the error
        return run

    def metric(maps, scores, rm, rs):
        return float(scores[0])

    images = np.zeros((2, 3, 4, 4), np.float32)
    fp32 = lambda x: (ref, np.zeros(2))  # noqa: E731
    res = sensitivity_search(fp32, quantize, images, list(cost), max_error=0.0035, metric=metric, progress=False)
    # Most sensitive first (b), then c before d (tie: graph order): 0.009 -> 0.005 -> 0.003.
    assert res.excluded == ["b", "c"] and res.budget_met
    assert [e for e, _ in res.steps] == [[], ["b"], ["b", "c"]]
    assert res.error == pytest.approx(0.003) and res.baseline_error == pytest.approx(0.009)
    assert res.conversions == len(calls) == 1 + 4 + 1  # step ["b"] reused the sensitivity pass
    assert len(set(calls)) == len(calls)
    # Loose budget: one conversion, nothing excluded.
    calls.clear()
    res = sensitivity_search(fp32, quantize, images, cost, max_error=0.01, metric=metric, progress=False)
    assert res.excluded == [] and res.budget_met and len(calls) == 1 and res.sensitivity == {}
    # Unreachable within max_fallbacks: best configuration tried, budget_met False.
    res = sensitivity_search(fp32, quantize, images, cost, max_error=0.0005, metric=metric, max_fallbacks=2,
                             progress=False)
    assert not res.budget_met and res.excluded == ["b", "c"] and len(res.steps) == 3
    assert res.to_dict()["steps"][-1]["excluded"] == ["b", "c"]
    assert map_cosine_error(ref, None, ref, None) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------- real backends
def _check_tight_and_loose(quantizer, fp32, validation, groups):
    """Budget 15 % below the plain-INT8 error measured here: the search must fall back and meet it."""
    ref = fp32(validation)
    plain = map_cosine_error(*quantizer(set())(validation), *ref)
    assert plain > 0
    budget = 0.85 * plain
    res = sensitivity_search(fp32, quantizer, validation, groups, max_error=budget, progress=False)
    assert res.budget_met and 1 <= len(res.excluded) < len(groups), res
    assert res.error <= budget < plain and res.baseline_error == pytest.approx(plain)
    assert res.steps[0] == ([], pytest.approx(plain)) and res.steps[-1][1] == pytest.approx(res.error)
    assert set(res.sensitivity) == set(groups)
    assert quantizer.artifact(res.excluded).is_file()
    loose = sensitivity_search(fp32, quantizer, validation, groups, max_error=plain * 1.5, progress=False)
    assert loose.excluded == [] and loose.budget_met and loose.conversions == 1
    return plain, res


def test_openvino_search(vit, tmp_path):
    pytest.importorskip("openvino")
    pytest.importorskip("nncf")
    logging.getLogger("nncf").setLevel(logging.WARNING)
    from edge_ad.converters.openvino import VIT_QUANTIZABLE_SCOPES

    path, calibration, validation = vit
    groups = group_quantizable_nodes(path, include=VIT_QUANTIZABLE_SCOPES)
    groups = {g: n for g, n in groups.items() if g.startswith("/backbone/")}  # 3 blocks: keeps the test fast
    quantizer = openvino_quantizer(path, tmp_path, calibration, transformer=True, fast_bias_correction=True)
    assert quantizer.scopes({"/backbone/blocks.1/"})[0].startswith(r"(?!(?:/backbone/blocks\.1/))")
    plain, res = _check_tight_and_loose(quantizer, onnxruntime_runner(path), validation, groups)
    # The float blocks really are float in the IR: no FakeQuantize feeds their MatMuls.
    import openvino as ov

    model = ov.Core().read_model(str(quantizer.artifact(res.excluded)))
    fq_consumers = {t.get_node().get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"
                    for t in op.output(0).get_target_inputs()}
    assert any(n.startswith("/backbone/blocks.") for n in fq_consumers)
    assert not any(n.startswith(tuple(res.excluded)) for n in fq_consumers), sorted(fq_consumers)


def test_qdq_search(vit, tmp_path):
    path, calibration, validation = vit
    # Backbone blocks and projector blocks (the per-layer embed / head / never-quantised patch
    # embedding left out to keep the test fast).
    groups = {g: n for g, n in group_quantizable_nodes(path).items() if "/blocks." in g}
    quantizer = qdq_quantizer(path, tmp_path, calibration)
    plain, res = _check_tight_and_loose(quantizer, onnxruntime_runner(path), validation, groups)
    quantized = set(quantizer.results[frozenset(res.excluded)].quantized_nodes)
    assert quantized and not any(n.startswith(tuple(res.excluded)) for n in quantized)
    assert set(quantizer.results[frozenset()].quantized_nodes) > quantized
