"""The method contract: shapes, export, registry, smoothing, normalisation, checkpoints, bad inputs.

Runs every registered method on tiny random-init backbones (a ViT and a multi-layer CNN) so the
whole file takes seconds on two CPU cores.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from edge_ad.backbones.base import Backbone, BackboneInfo
from edge_ad.methods import (
    AnomalyDetector,
    BackboneSpec,
    CheckpointError,
    DetectorOutput,
    build_detector,
    get_method,
    list_methods,
    load_detector,
    save_checkpoint,
)
from edge_ad.methods.common import GaussianBlur2d, ScoreNormalizer, fuse_feature_maps
from edge_ad.methods.foundad import FoundAD, FoundADConfig
from edge_ad.methods.knn import KNNConfig, KNNDetector
from edge_ad.runtime.preprocess_spec import PreprocessSpec

IMG = 64


# ---------------------------------------------------------------------------- tiny backbones
class TinyViT(Backbone):
    """A ViT-shaped stand-in: one (B, C, H/8, W/8) map per requested block, stride 8."""

    def __init__(self, img_size: int = IMG, dim: int = 16, layers: tuple[int, ...] = (1,)) -> None:
        super().__init__()
        self.info = BackboneInfo(
            name="tiny_vit", patch_size=8, img_size=(img_size, img_size), layers=tuple(layers),
            feature_dims=tuple(dim for _ in layers), global_dim=dim,
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), feature_strides=tuple(8 for _ in layers),
        )
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.blocks = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(max(layers) + 1))
        self.norm = nn.GroupNorm(1, dim)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.embed(images)
        out = []
        for i, block in enumerate(self.blocks):
            x = x + torch.tanh(block(x))
            if i in self.info.layers:
                out.append(self.norm(x))
        return out, x.mean(dim=(2, 3))


class TinyCNN(Backbone):
    """A CNN-shaped stand-in with two stages of strides 4 and 8 (exercises multi-layer fusion)."""

    def __init__(self, img_size: int = IMG) -> None:
        super().__init__()
        self.info = BackboneInfo(
            name="tiny_cnn", patch_size=8, img_size=(img_size, img_size), layers=(1, 2), feature_dims=(8, 12),
            global_dim=12, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), feature_strides=(4, 8),
        )
        self.stage1 = nn.Conv2d(3, 8, 4, 4)
        self.stage2 = nn.Conv2d(8, 12, 2, 2)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        a = F.relu(self.stage1(images))
        b = F.relu(self.stage2(a))
        return [a, b], b.mean(dim=(2, 3))


#: Tiny random-init registry backbones (no weights are read): a DINOv3-style ViT (4 x 4 patches at
#: 64 px) and EfficientNet-Lite0 with its two default stages (strides 8 and 16, fused on 8 x 8).
BACKBONE_SPECS = {
    "vit": BackboneSpec(
        "dinov3_vits16", layers=(1,), img_size=IMG,
        overrides={"depth": 2, "embed_dim": 64, "num_heads": 2, "init_values": 1.0},
    ),
    "cnn": BackboneSpec("efficientnet_lite0", img_size=IMG),
    "tiny": BackboneSpec("tiny_vit", layers=(1,), img_size=IMG),  # the custom subclass above
}


def make_backbone(kind: str, seed: int = 0) -> Backbone:
    """A tiny random-init backbone: ``"vit"``, ``"cnn"`` (registry) or ``"tiny"`` (custom subclass)."""
    torch.manual_seed(seed)
    if kind == "tiny":
        return TinyViT()
    return BACKBONE_SPECS[kind].build()


SMALL = {
    "foundad": dict(projector_dim=32, projector_depth=2, projector_heads=4, top_k=5, smoothing_sigma=2.0),
    "knn": dict(coreset_ratio=0.5, smoothing_sigma=2.0),
}


def make_detector(method: str, kind: str = "vit", seed: int = 0, **overrides) -> AnomalyDetector:
    """A tiny detector, fitted (knn) and with fitted normalisation, in eval mode."""
    backbone = make_backbone(kind, seed)
    config = get_method(method).config_class(backbone=BACKBONE_SPECS[kind], **{**SMALL[method], **overrides})
    det = build_detector(config, backbone=backbone)
    g = torch.Generator().manual_seed(seed + 100)
    if det.fit_mode == "memory":
        det.fit(torch.randn(4, 3, IMG, IMG, generator=g))
    det.fit_normalization(torch.randn(4, 3, IMG, IMG, generator=g))
    return det.eval()


def export_onnx(model: nn.Module, example: torch.Tensor) -> tuple[bytes, str]:
    """ONNX bytes of ``model`` at the example's fixed size, and which exporter produced them.

    torch 2.14 still has the TorchScript exporter (``dynamo=False``, deprecated, warns); it
    exports opset 17 as asked. The dynamo exporter cannot go below opset 18 for this graph (no
    down-conversion adapter for ``Pad``), so it is the fallback, at 18.
    """
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buf, dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["anomaly_map", "score"])
        return buf.getvalue(), "torchscript-opset17"
    except (TypeError, RuntimeError, AttributeError):  # pragma: no cover - once dynamo=False is removed
        onnx_program = torch.onnx.export(model, (example,), dynamo=True, opset_version=18,
                                         input_names=["images"], output_names=["anomaly_map", "score"])
        return onnx_program.model_proto.SerializeToString(), "dynamo-opset18"


# ---------------------------------------------------------------------------- forward contract
@pytest.mark.parametrize("method", ["foundad", "knn"])
@pytest.mark.parametrize("kind", ["vit", "cnn", "tiny"])
def test_forward_contract(method: str, kind: str) -> None:
    det = make_detector(method, kind)
    x = torch.randn(3, 3, IMG, IMG)
    out = det(x)
    assert isinstance(out, DetectorOutput)
    anomaly_map, score = out  # plain tuple unpacking works (evaluation does this)
    assert anomaly_map.shape == (3, 1, IMG, IMG) and anomaly_map.dtype == torch.float32
    assert score.shape == (3,) and score.dtype == torch.float32
    assert torch.isfinite(anomaly_map).all() and torch.isfinite(score).all()
    # Batch independence: a sample scores the same alone or in a batch.
    single = det(x[1:2])
    torch.testing.assert_close(single.score, score[1:2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(single.anomaly_map, anomaly_map[1:2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["foundad", "knn"])
def test_preprocess_spec_comes_from_backbone(method: str) -> None:
    det = make_detector(method, "cnn", resize="area")
    spec = det.preprocess_spec
    assert isinstance(spec, PreprocessSpec)
    assert spec.size == (IMG, IMG)
    assert spec.mean == det.backbone.info.mean and spec.std == det.backbone.info.std
    assert spec.resize == "area"


@pytest.mark.parametrize("method", ["foundad", "knn"])
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_onnx_export_matches_torch(method: str, kind: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    det = make_detector(method, kind)
    trace_input = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    data, exporter = export_onnx(det, trace_input)
    onnx = pytest.importorskip("onnx")
    graph = onnx.load_from_string(data).graph
    control_flow = {n.op_type for n in graph.node} & {"If", "Loop", "Scan"}
    assert not control_flow, f"data-dependent control flow exported: {control_flow}"
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["anomaly_map", "score"]
    # Fresh data, not the tracing input: a data-dependent branch frozen at trace time would show.
    for seed in (2, 3):
        x = 1.5 * torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))
        amap, score = sess.run(None, {"images": x.numpy()})
        with torch.no_grad():
            ref = det(x)
        np.testing.assert_allclose(amap, ref.anomaly_map.numpy(), rtol=1e-4, atol=1e-4, err_msg=exporter)
        np.testing.assert_allclose(score, ref.score.numpy(), rtol=1e-4, atol=1e-4, err_msg=exporter)


@pytest.mark.parametrize("method", ["foundad", "knn"])
def test_onnx_export_with_dynamic_batch(method: str) -> None:
    """Reshapes use -1 for the batch axis, so a graph exported at batch 1 serves any batch size."""
    ort = pytest.importorskip("onnxruntime")
    det = make_detector(method, "vit")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(det, (det.example_input(1),), buf, dynamo=False, opset_version=17,
                              input_names=["images"], output_names=["anomaly_map", "score"],
                              dynamic_axes={"images": {0: "batch"}, "anomaly_map": {0: "batch"}, "score": {0: "batch"}})
        except (TypeError, RuntimeError, AttributeError):  # pragma: no cover - TorchScript exporter removed
            pytest.skip("the TorchScript ONNX exporter is not available in this torch")
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, IMG, IMG)
    amap, score = sess.run(None, {"images": x.numpy()})
    with torch.no_grad():
        ref = det(x)
    assert amap.shape == (3, 1, IMG, IMG) and score.shape == (3,)
    np.testing.assert_allclose(amap, ref.anomaly_map.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(score, ref.score.numpy(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("method", ["foundad", "knn"])
def test_bad_inputs_raise_clear_errors(method: str) -> None:
    det = make_detector(method)
    with pytest.raises(ValueError, match="3, H, W"):
        det(torch.randn(1, 1, IMG, IMG))  # grey
    with pytest.raises(ValueError, match="3, H, W"):
        det(torch.randn(1, 4, IMG, IMG))  # RGBA
    with pytest.raises(ValueError, match="3, H, W"):
        det(torch.randn(1, IMG, IMG, 3))  # channels-last
    with pytest.raises(ValueError, match="3, H, W"):
        det(torch.randn(3, IMG, IMG))  # no batch axis
    with pytest.raises(ValueError, match=f"{IMG}x{IMG}"):
        det(torch.randn(1, 3, IMG + 8, IMG))
    with pytest.raises(TypeError, match="float"):
        det(torch.zeros(1, 3, IMG, IMG, dtype=torch.uint8))
    with pytest.raises(TypeError, match="Tensor"):
        det(np.zeros((1, 3, IMG, IMG), np.float32))


def test_backbone_must_agree_with_config() -> None:
    backbone = make_backbone("vit")
    with pytest.raises(ValueError, match="img_size"):
        FoundAD(FoundADConfig(backbone=BackboneSpec("dinov3_vits16", layers=(1,), img_size=(128, 128))), backbone)
    with pytest.raises(ValueError, match="layers"):
        FoundAD(FoundADConfig(backbone=BackboneSpec("dinov3_vits16", layers=(0,))), backbone)
    with pytest.raises(ValueError, match="name"):
        FoundAD(FoundADConfig(backbone=BackboneSpec("dinov3_vitb16", layers=(1,))), backbone)


# ---------------------------------------------------------------------------- registry and configs
def test_registry() -> None:
    assert {"foundad", "knn"} <= set(list_methods())
    assert get_method("foundad").detector_class is FoundAD and get_method("foundad").fit_mode == "gradient"
    assert get_method("knn").detector_class is KNNDetector and get_method("knn").fit_mode == "memory"
    with pytest.raises(KeyError, match="registered methods: .*foundad"):
        get_method("patchcorez")


def test_build_detector_from_config_instance() -> None:
    backbone = make_backbone("tiny")
    cfg = KNNConfig(backbone=BackboneSpec.from_info(backbone.info))
    det = build_detector(cfg, backbone=backbone)
    assert isinstance(det, KNNDetector) and det.config.backbone.name == "tiny_vit"


@pytest.mark.parametrize("config_class", [FoundADConfig, KNNConfig])
def test_config_dict_round_trip(config_class) -> None:
    cfg = config_class(backbone=BackboneSpec("efficientnet_lite0", layers=[2, 3], img_size=256, overrides={"a": 1}))
    d = cfg.to_dict()
    assert yaml.safe_load(yaml.safe_dump(d)) == d  # plain YAML types only
    assert config_class.from_dict(d) == cfg
    assert cfg.backbone.img_size == (256, 256) and cfg.backbone.layers == (2, 3)
    with pytest.raises(ValueError, match="unknown"):
        config_class.from_dict({**d, "learning_rate": 1.0})
    with pytest.raises(ValueError, match="unknown backbone keys"):
        config_class.from_dict({**d, "backbone": {**d["backbone"], "nmae": "x"}})


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="divide"):
        FoundADConfig(projector_dim=30, projector_heads=4)
    with pytest.raises(ValueError, match="resize"):
        FoundADConfig(resize="nearest")
    with pytest.raises(ValueError, match="smoothing_sigma"):
        KNNConfig(smoothing_sigma=-1)
    with pytest.raises(ValueError, match="coreset_ratio"):
        KNNConfig(coreset_ratio=0.0)
    with pytest.raises(ValueError, match="odd"):
        KNNConfig(local_aggregation=2)


# ---------------------------------------------------------------------------- shared layers
@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_gaussian_blur_matches_scipy(sigma: float) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    x = rng.random((2, 1, 40, 37)).astype(np.float32)
    x[0, 0, 5, 3] = 10.0  # an impulse near the border exercises the padding
    out = GaussianBlur2d(sigma)(torch.from_numpy(x)).numpy()
    for b in range(2):
        # torch "reflect" (edge pixel not repeated) is scipy's "mirror".
        ref = ndimage.gaussian_filter(x[b, 0].astype(np.float64), sigma, mode="mirror", truncate=4.0)
        np.testing.assert_allclose(out[b, 0], ref, rtol=1e-5, atol=1e-5)


def test_gaussian_blur_size_limit_is_checked() -> None:
    blur = GaussianBlur2d(4.0)  # radius 16
    blur.check_size((17, 17))
    with pytest.raises(ValueError, match="radius"):
        blur.check_size((16, 64))
    with pytest.raises(ValueError, match="smoothing_sigma"):
        make_detector("foundad", smoothing_sigma=20.0)  # radius 80 > 64 px input


def test_smoothing_off_is_plain_upsampling() -> None:
    det = make_detector("foundad", smoothing_sigma=0.0)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        patches = det.patch_scores(x)
        raw = det.forward_raw(x)
    expected = F.interpolate(patches, size=(IMG, IMG), mode="bilinear", align_corners=False)
    torch.testing.assert_close(raw.anomaly_map, expected)


def test_fuse_feature_maps() -> None:
    a = torch.randn(2, 3, 8, 8)
    b = torch.randn(2, 5, 4, 4)
    fused = fuse_feature_maps([a, b])
    assert fused.shape == (2, 8, 8, 8)
    torch.testing.assert_close(fused[:, :3], a)
    torch.testing.assert_close(fused[:, 3:], F.interpolate(b, size=(8, 8), mode="bilinear", align_corners=False))
    assert fuse_feature_maps([b]) is b
    # Order of the list is the channel order, whichever map is finest.
    assert torch.equal(fuse_feature_maps([b, a])[:, 5:], a)


# ---------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("method", ["foundad", "knn"])
def test_normalization_fitted_on_good_images(method: str) -> None:
    backbone = make_backbone("vit")
    det = build_detector(method, backbone=backbone, **SMALL[method])
    g = torch.Generator().manual_seed(5)
    if det.fit_mode == "memory":
        det.fit(torch.randn(4, 3, IMG, IMG, generator=g))
    det.eval()
    good = torch.randn(12, 3, IMG, IMG, generator=g)
    # Before fitting: identity.
    assert not det.normalizer.fitted
    torch.testing.assert_close(det(good).score, det.forward_raw(good).score)
    # Batches from an iterable, with (images, label) tuples, as a DataLoader gives.
    stats = det.fit_normalization([(good[:5], 0), (good[5:], 0)])
    assert stats["num_images"] == 12 and det.normalizer.fitted
    with torch.no_grad():
        out = det(good)
    assert abs(float(out.score.mean())) < 1e-4
    assert float(out.score.std()) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(out.anomaly_map.mean())) < 1e-3
    assert float(out.anomaly_map.std(unbiased=False)) == pytest.approx(1.0, abs=1e-3)
    # Statistics are buffers: they travel with state_dict (and so with checkpoints / ONNX).
    keys = set(det.state_dict())
    assert {"normalizer.map_loc", "normalizer.map_scale", "normalizer.score_loc", "normalizer.score_scale"} <= keys
    # Normalisation is monotone: anomalies still rank above good images.
    with torch.no_grad():
        raw = det.forward_raw(good).score
    assert torch.equal(torch.argsort(raw), torch.argsort(out.score))


def test_normalization_single_image_and_constant_input() -> None:
    norm = ScoreNormalizer()
    with pytest.warns(UserWarning, match="single good image"):
        norm.fit([torch.arange(16.0).view(1, 1, 4, 4)], [torch.tensor([3.0])])
    assert float(norm.score_scale) == pytest.approx(float(norm.map_scale))
    norm.fit([torch.ones(2, 1, 4, 4)], [torch.ones(2)])  # zero spread must not divide by zero
    m, s = norm(torch.ones(1, 1, 4, 4), torch.ones(1))
    assert torch.isfinite(m).all() and torch.isfinite(s).all()
    with pytest.raises(ValueError, match="no images"):
        norm.fit([], [])


def test_frozen_backbone_stays_in_eval_mode() -> None:
    det = make_detector("foundad")
    det.train()
    assert det.training and not det.backbone.training
    assert all(not p.requires_grad for p in det.backbone.parameters())
    trainable = {id(p) for p in det.trainable_parameters()}
    assert trainable == {id(p) for p in det.projector.parameters()}


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method", ["foundad", "knn"])
@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_checkpoint_round_trip(method: str, kind: str, tmp_path: Path) -> None:
    det = make_detector(method, kind)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = det(x)
    save_checkpoint(det, tmp_path, training={"steps": 10, "lr": 1e-3, "seed": 0, "data": Path("/x/y")})
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.yaml").is_file()
    doc = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert doc["method"] == method
    assert doc["backbone"]["name"] == det.backbone.info.name
    assert doc["backbone"]["layers"] == list(det.backbone.info.layers)
    assert doc["backbone"]["img_size"] == [IMG, IMG]
    assert doc["preprocess"] == det.preprocess_spec.to_dict()
    assert doc["training"] == {"steps": 10, "lr": 1e-3, "seed": 0, "data": "/x/y"}
    # Rebuilt from config.yaml alone: the registry builds a random-init backbone (no weights are
    # read or downloaded) and every tensor, backbone included, comes from the file.
    torch.manual_seed(123)
    loaded = load_detector(tmp_path)
    assert type(loaded) is type(det) and not loaded.training
    with torch.no_grad():
        out = loaded(x)
    torch.testing.assert_close(out.anomaly_map, ref.anomaly_map, rtol=0, atol=0)
    torch.testing.assert_close(out.score, ref.score, rtol=0, atol=0)
    assert loaded.config == det.config


@pytest.mark.parametrize("method", ["foundad", "knn"])
def test_checkpoint_with_custom_backbone_instance(method: str, tmp_path: Path) -> None:
    """A backbone outside the registry still round-trips when the caller supplies the module."""
    det = make_detector(method, "tiny")
    save_checkpoint(det, tmp_path)
    x = torch.randn(1, 3, IMG, IMG)
    loaded = load_detector(tmp_path, backbone=make_backbone("tiny", seed=7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).anomaly_map, det(x).anomaly_map, rtol=0, atol=0)
    with pytest.raises(KeyError, match="tiny_vit"):
        load_detector(tmp_path)  # not in the registry: the error names it


def _write_yaml(path: Path, doc: dict) -> None:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_checkpoint_errors(tmp_path: Path) -> None:
    det = make_detector("foundad")
    run = tmp_path / "run"
    save_checkpoint(det, run)
    good_doc = yaml.safe_load((run / "config.yaml").read_text())

    with pytest.raises(FileNotFoundError, match="run directory"):
        load_detector(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_detector(empty)

    # Unknown method.
    _write_yaml(run / "config.yaml", {**good_doc, "method": "patchcorez"})
    with pytest.raises(CheckpointError, match="unknown method 'patchcorez'.*foundad"):
        load_detector(run)
    # Unknown config key.
    _write_yaml(run / "config.yaml", {**good_doc, "config": {**good_doc["config"], "projector_width": 3}})
    with pytest.raises(CheckpointError, match="projector_width"):
        load_detector(run)
    # A config that builds different tensor shapes than the file holds.
    _write_yaml(run / "config.yaml", {**good_doc, "config": {**good_doc["config"], "projector_dim": 64}})
    with pytest.raises(CheckpointError, match="shape mismatch.*projector"):
        load_detector(run)
    _write_yaml(run / "config.yaml", {**good_doc, "config": {**good_doc["config"], "projector_depth": 3}})
    with pytest.raises(CheckpointError, match="missing tensors.*projector.blocks.2"):
        load_detector(run)
    # Preprocessing that no longer matches the backbone.
    _write_yaml(run / "config.yaml", {**good_doc, "preprocess": {**good_doc["preprocess"], "mean": [0.5, 0.5, 0.5]}})
    with pytest.raises(CheckpointError, match="preprocess"):
        load_detector(run)
    # Newer format.
    _write_yaml(run / "config.yaml", {**good_doc, "format_version": 99})
    with pytest.raises(CheckpointError, match="format_version"):
        load_detector(run)
    # Not YAML / not a mapping.
    (run / "config.yaml").write_text("method: [unclosed")
    with pytest.raises(CheckpointError, match="YAML"):
        load_detector(run)

    # Tampered tensors: a wrong shape, then a missing tensor; then the file itself missing.
    _write_yaml(run / "config.yaml", good_doc)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(run / "model.safetensors"))
    bad = dict(tensors)
    bad["projector.head.weight"] = torch.zeros(3, 3)
    save_file(bad, str(run / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"projector.head.weight: file \(3, 3\)"):
        load_detector(run)
    bad = {k: v for k, v in tensors.items() if k != "normalizer.score_loc"}
    save_file(bad, str(run / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors.*normalizer.score_loc"):
        load_detector(run)
    bad = {**tensors, "extra.thing": torch.zeros(1)}
    save_file(bad, str(run / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensors.*extra.thing"):
        load_detector(run)
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_detector(run)
    (run / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_detector(run)


def test_checkpoint_without_backbone_needs_a_weights_source(tmp_path: Path) -> None:
    det = make_detector("foundad")
    with pytest.raises(ValueError, match="include_backbone=False"):
        save_checkpoint(det, tmp_path, include_backbone=False)
