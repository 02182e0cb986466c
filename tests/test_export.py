"""ONNX export and the fidelity report, on real hazelnut images.

Detectors: FoundAD and knn on a tiny random-init DINOv3 (the real timm architecture, depth 2) and
on EfficientNet-Lite0 with its real ImageNet weights, at 64 x 64 so the file runs in seconds.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from edge_ad.calibration import fit_thresholds
from edge_ad.converters import (
    FidelityReport,
    OnnxValidationError,
    UnsupportedGraphError,
    check_onnx_graph,
    export_onnx,
    fidelity_report,
    find_control_flow,
    onnxruntime_runner,
    read_onnx_metadata,
    torch_runner,
)
from edge_ad.data import MVTecDataset
from edge_ad.methods import BackboneSpec, load_detector
from edge_ad.training import train
from edge_ad.runtime import preprocess_batch

IMG = 64
CATEGORY = "mvtec_hazelnut_256"
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "init_values": 1.0}
BACKBONES = {
    "vit": BackboneSpec("dinov3_vits16", layers=(1,), img_size=IMG, overrides=TINY_VIT),
    "cnn": BackboneSpec("efficientnet_lite0", img_size=IMG, pretrained=True),
}
OPTIONS = {
    "foundad": dict(projector_dim=32, projector_depth=2, projector_heads=2, top_k=3, smoothing_sigma=2.0),
    "knn": dict(coreset_ratio=0.5, smoothing_sigma=2.0),
}


@pytest.fixture(scope="module")
def train_set(real_root: Path) -> MVTecDataset:
    return MVTecDataset(real_root, CATEGORY, "train")


@pytest.fixture(scope="module")
def test_set(real_root: Path) -> MVTecDataset:
    return MVTecDataset(real_root, CATEGORY, "test")


@pytest.fixture(scope="module")
def detectors(real_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """``get(method, kind)``: a detector trained on 4 real good hazelnut shots (FoundAD: 8 steps;
    knn: memory bank), saved as a run directory and rebuilt by ``load_detector``: the real
    train -> run dir -> export path. Cached for the module."""
    cache: dict[tuple[str, str], nn.Module] = {}

    def get(method: str, kind: str) -> nn.Module:
        if (method, kind) not in cache:
            spec = BACKBONES[kind]
            run = train(method, spec.name, real_root, CATEGORY, tmp_path_factory.mktemp(f"{method}-{kind}"),
                        shots=4, pretrained=spec.pretrained, image_size=IMG, layers=spec.layers,
                        steps=8 if method == "foundad" else None, batch_size=2, seed=0, device="cpu",
                        progress=False, backbone_overrides=spec.overrides, method_options=OPTIONS[method])
            cache[(method, kind)] = load_detector(run).eval()
        return cache[(method, kind)]

    return get


def real_images(dataset: MVTecDataset, det: nn.Module) -> np.ndarray:
    return preprocess_batch([s.image for s in dataset], det.preprocess_spec, color_order="rgb")


def torch_outputs(det: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = det(torch.from_numpy(images))
    return out.anomaly_map.numpy(), out.score.numpy()


# ---------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("method", ["foundad", "knn"])
def test_export_matches_torch_on_real_images(method, kind, detectors, test_set, tmp_path):
    det = detectors(method, kind)
    images = real_images(test_set, det)  # 10 real test images: good, crack, cut, hole, print
    path = export_onnx(det, tmp_path / "model.onnx", validate_images=images)
    assert path == tmp_path / "model.onnx" and path.is_file()
    assert not list(tmp_path.glob(".onnx-export-*")), "the staging folder must be removed"

    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert find_control_flow(model) == []
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert model.graph.input[0].name == "images" and dims == [1, 3, IMG, IMG]  # static, batch fixed
    assert [o.name for o in model.graph.output] == ["anomaly_map", "score"]

    meta = read_onnx_metadata(path)
    assert meta["method"] == method
    assert meta["preprocess"] == det.preprocess_spec.to_dict()
    assert meta["backbone"] == BACKBONES[kind].name and meta["input_shape"] == [1, 3, IMG, IMG]
    assert meta["validation"]["passed"] and meta["validation"]["num_images"] == len(images)
    assert meta["validation"]["max_abs_map_error"] <= 1e-4

    maps, scores = onnxruntime_runner(path)(images)
    ref_maps, ref_scores = torch_outputs(det, images)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    assert np.ptp(ref_scores) > 0  # real images give different scores: the comparison is not vacuous


def test_static_batch_runner_pads_the_last_chunk(detectors, test_set, tmp_path):
    det = detectors("knn", "vit")
    images = real_images(test_set, det)[:5]
    path = export_onnx(det, tmp_path / "b2.onnx", batch_size=2)
    runner = onnxruntime_runner(path)
    assert runner.batch_size == 2 and runner.precision == "fp32"
    maps, scores = runner(images)  # 2 + 2 + (1 padded to 2)
    ref_maps, ref_scores = torch_outputs(det, images)
    assert maps.shape == (5, 1, IMG, IMG) and scores.shape == (5,)
    np.testing.assert_allclose(maps, ref_maps, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)


def test_external_data(detectors, test_set, tmp_path):
    det = detectors("knn", "cnn")
    images = real_images(test_set, det)[:2]
    path = export_onnx(det, tmp_path / "big.onnx", external_data=True, validate_images=images,
                       metadata={"target": "jetson-orin", "notes": {"k": 1}})
    data_file = tmp_path / "big.onnx.data"
    assert data_file.is_file() and data_file.stat().st_size > path.stat().st_size  # weights live outside
    onnx.checker.check_model(str(path))
    meta = read_onnx_metadata(path)
    assert meta["target"] == "jetson-orin" and meta["notes"] == {"k": 1}
    maps, _ = onnxruntime_runner(path)(images)
    np.testing.assert_allclose(maps, torch_outputs(det, images)[0], rtol=1e-4, atol=1e-4)
    # Re-exporting the same file without external data removes the now stale weights file.
    export_onnx(det, path, external_data=False)
    assert not data_file.exists() and onnxruntime_runner(path)(images)[0].shape == maps.shape


def test_bad_arguments(detectors, tmp_path):
    det = detectors("knn", "vit")
    with pytest.raises(ValueError, match="opset must be >= 17"):
        export_onnx(det, tmp_path / "m.onnx", opset=13)
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(det, tmp_path / "m.onnx", batch_size=0)
    with pytest.raises(ValueError, match=r"validate_images must be \(N, 3, 64, 64\)"):
        export_onnx(det, tmp_path / "m.onnx", validate_images=np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(TypeError, match="example_input"):
        export_onnx(nn.Linear(2, 2), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


# ------------------------------------------------------------------------------ control flow
def _branch(x: torch.Tensor) -> torch.Tensor:
    if bool(x.mean() > 0):  # data-dependent: scripting keeps it as an ONNX If node
        return x * 2.0
    return x - 1.0


def _scripted_branch() -> torch.jit.ScriptFunction:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated; still the way to an If
        return torch.jit.script(_branch)


class _Toy(nn.Module):
    """Fulfils the export contract's signature; ``scripted`` puts a real branch in the graph."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.branch = _scripted_branch() if mode == "scripted" else None

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        return torch.zeros(batch_size, 3, 16, 16)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.conv(images)
        if self.mode == "scripted":
            m = self.branch(m)
        elif self.mode == "python" and m.mean() > 0:  # frozen at trace time (zeros input -> else branch)
            m = m * 10.0
        return m, m.flatten(1).amax(dim=1)


def test_if_node_is_rejected_with_a_clear_error(tmp_path):
    with pytest.raises(UnsupportedGraphError, match=r"control-flow node.*If.*TensorRT rejects"):
        export_onnx(_Toy("scripted"), tmp_path / "if.onnx")
    assert not (tmp_path / "if.onnx").exists()
    export_onnx(_Toy("plain"), tmp_path / "plain.onnx")  # the same module without the branch is fine


def _if_model(nested: bool) -> onnx.ModelProto:
    """images -> (anomaly_map, score) with an If (optionally inside a Loop body)."""
    out = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("Identity", ["images"], ["t"])], "then", [],
                               [out("t", TensorProto.FLOAT, [1, 1, 4, 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["images"], ["e"])], "else", [],
                               [out("e", TensorProto.FLOAT, [1, 1, 4, 4])])
    cond = helper.make_node("ReduceMax", ["images"], ["mx"], keepdims=0)
    gt = helper.make_node("Greater", ["mx", "zero"], ["c"])
    if_node = helper.make_node("If", ["c"], ["anomaly_map"], then_branch=then_g, else_branch=else_g, name="branch")
    score = helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0)
    nodes = [cond, gt, if_node, score]
    if nested:  # hide the If inside a Loop body: the search must recurse into subgraphs
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), if_node],
            "body",
            [out("i", TensorProto.INT64, []), out("cond_in", TensorProto.BOOL, [])],
            [out("cond_out", TensorProto.BOOL, []), out("anomaly_map", TensorProto.FLOAT, [1, 1, 4, 4])],
        )
        nodes = [cond, gt, helper.make_node("Loop", ["", "c"], ["anomaly_map"], body=body), score]
    graph = helper.make_graph(
        nodes, "toy", [out("images", TensorProto.FLOAT, [1, 3, 4, 4])],
        [out("anomaly_map", TensorProto.FLOAT, [1, 1, 4, 4]), out("score", TensorProto.FLOAT, [1])],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_handcrafted_if_graph_is_detected():
    flat = find_control_flow(_if_model(nested=False))
    assert len(flat) == 1 and flat[0].startswith("If 'branch'")
    nested = find_control_flow(_if_model(nested=True))
    assert {f.split()[0] for f in nested} == {"If", "Loop"} and any("body" in f for f in nested)
    for nested_flag in (False, True):
        with pytest.raises(UnsupportedGraphError, match="If"):
            check_onnx_graph(_if_model(nested_flag))


def test_frozen_python_branch_fails_validation(tmp_path):
    """A Python `if` on a tensor value is traced into one side only; validation on real-ish data shows it."""
    toy = _Toy("python").eval()
    with torch.no_grad():
        toy.conv.weight.fill_(0.1)
        toy.conv.bias.fill_(1.0)  # the zeros export input gives m = 1 > 0: the trace keeps `m * 10`
    # Negative images give m < 0: PyTorch skips the multiplication, the frozen graph does not.
    images = -np.abs(np.random.default_rng(0).normal(size=(3, 3, 16, 16))).astype(np.float32) * 50
    with pytest.raises(OnnxValidationError, match="differs from PyTorch"):
        export_onnx(toy, tmp_path / "frozen.onnx", validate_images=images)
    assert not (tmp_path / "frozen.onnx").exists()


def test_dynamic_input_is_rejected(detectors, tmp_path):
    det = detectors("knn", "vit")
    buf = tmp_path / "dyn.onnx"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(det, (det.example_input(1),), str(buf), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["anomaly_map", "score"],
                          dynamic_axes={"images": {0: "batch"}})
    with pytest.raises(UnsupportedGraphError, match="static"):
        check_onnx_graph(buf)


# --------------------------------------------------------------------------------- fidelity
def test_fidelity_report_onnxruntime_equals_torch(detectors, test_set, tmp_path):
    det = detectors("knn", "cnn")
    path = export_onnx(det, tmp_path / "model.onnx")
    report = fidelity_report(det, onnxruntime_runner(path), test_set, description="hazelnut test")
    assert report.format == "onnxruntime" and report.precision == "fp32" and report.reference == "pytorch-fp32"
    assert report.num_images == 10 and report.num_anomalous == 8 and report.input_size == (IMG, IMG)
    assert report.map["max_abs_error"] < 1e-4 and report.score["max_abs_error"] < 1e-4
    assert report.map["pearson_r"] > 0.999999 and report.map["cosine_min"] > 0.999999
    assert set(report.metrics) == {"image_auroc", "pixel_auroc"}
    for name, m in report.metrics.items():
        assert abs(m["delta"]) < 1e-6, name
        assert 0.0 <= m["reference"] <= 1.0
    assert report.validation_set["files"] == [str(p) for p in test_set.paths]
    assert len(report.validation_set["hash"]) == 64

    saved = report.save(tmp_path)
    assert saved == tmp_path / "fidelity.json"
    on_disk = json.loads(saved.read_text())
    assert on_disk["metrics"]["image_auroc"]["delta"] == report.metrics["image_auroc"]["delta"]
    assert FidelityReport.load(tmp_path).to_dict() == report.to_dict()
    table = report.table()
    assert "onnxruntime fp32 vs pytorch-fp32" in table and "image_auroc" in table and "map max_abs_error" in table
    assert report.failures(max_map_error=1e-3, max_metric_drop=1e-6) == []

    # FP32 predictions computed once serve as the reference for any number of candidates.
    from edge_ad.evaluation.predict import predict_dataset

    cached = predict_dataset(det, test_set, det.preprocess_spec, progress=False)
    from_cache = fidelity_report(cached, path, test_set, spec=det.preprocess_spec, description="hazelnut test")
    assert from_cache.metrics == report.metrics and from_cache.map == report.map
    with pytest.raises(ValueError, match="disagree"):
        fidelity_report(cached, path, test_set.subset(range(9, -1, -1)), spec=det.preprocess_spec)

    # The same validation images give the same hash whether read from the dataset or preprocessed.
    again = fidelity_report(det, path, real_images(test_set, det), spec=det.preprocess_spec)
    assert again.validation_set["hash"] == report.validation_set["hash"] and again.metrics == {}


def test_fidelity_report_sees_a_perturbed_runner(detectors, train_set, test_set, tmp_path):
    det = detectors("knn", "cnn")
    base = onnxruntime_runner(export_onnx(det, tmp_path / "model.onnx"))
    rng = np.random.default_rng(0)

    def perturbed(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        maps, scores = base(images)
        return maps + rng.normal(0.0, maps.std(), maps.shape).astype(np.float32), -scores

    perturbed.format, perturbed.precision = "fake", "int8"  # type: ignore[attr-defined]
    good = fit_thresholds(torch_runner(det)(real_images(train_set, det)[12:])[1], target_fpr=0.1)
    report = fidelity_report(det, perturbed, test_set, thresholds=good)
    assert (report.format, report.precision) == ("fake", "int8")
    assert report.map["max_abs_error"] > 0.1 and report.map["pearson_r"] < 0.95
    assert report.score["spearman_r"] == pytest.approx(-1.0)
    ref_auroc = report.metrics["image_auroc"]["reference"]
    assert ref_auroc != 0.5
    # Negated scores mirror the ROC curve: AUROC a -> 1 - a.
    assert report.metrics["image_auroc"]["delta"] == pytest.approx(1.0 - 2.0 * ref_auroc)
    assert report.metrics["pixel_auroc"]["delta"] < -0.01
    assert 0.0 <= report.decisions["image_agreement"] < 1.0
    problems = report.failures(max_map_error=1e-3, max_metric_drop=0.01)
    assert any("max |map error|" in p for p in problems) and any("pixel_auroc dropped" in p for p in problems)
    json.dumps(report.to_dict())  # plain types only


def test_fidelity_report_rejects_bad_runner_outputs(detectors, test_set):
    det = detectors("knn", "vit")
    with pytest.raises(ValueError, match=r"maps \(B, 1, 64, 64\) and scores \(B,\)"):
        fidelity_report(det, lambda x: (np.zeros((len(x), 1, 8, 8)), np.zeros(len(x))), test_set)
    with pytest.raises(ValueError, match="non-finite"):
        fidelity_report(det, lambda x: (np.full((len(x), 1, IMG, IMG), np.nan), np.zeros(len(x))), test_set)
    with pytest.raises(ValueError, match="unknown metrics"):
        fidelity_report(det, torch_runner(det), test_set, metrics=["auroc"])


def test_dynamo_fallback_when_torchscript_export_is_gone(detectors, test_set, tmp_path, monkeypatch):
    """A future torch without ``dynamo=False``: the dynamo exporter takes over at opset 18."""
    det = detectors("knn", "vit")
    real_export = torch.onnx.export

    def without_torchscript(*args, **kwargs):
        if kwargs.get("dynamo") is False:
            raise TypeError("torch.onnx.export() got an unexpected keyword argument 'dynamo=False'")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", without_torchscript)
    images = real_images(test_set, det)[:3]
    with pytest.warns(UserWarning, match="dynamo exporter at opset 18"):
        path = export_onnx(det, tmp_path / "dyn.onnx", validate_images=images)
    meta = read_onnx_metadata(path)
    assert meta["exporter"] == "dynamo" and meta["opset"] == "18" and meta["validation"]["passed"]
    check_onnx_graph(path, input_shape=(1, 3, IMG, IMG))
