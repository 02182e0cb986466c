"""Backbone registry: every name builds (tiny random-init models), shapes / info, errors, weights,
ONNX export at a fixed size. Nothing downloads: pretrained paths are exercised on fake local files.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from edge_ad.backbones.base import Backbone, BackboneInfo
from edge_ad.backbones.fit import dinov3_rope_periods
from edge_ad.backbones.registry import UnknownBackboneError, build_backbone, list_backbones
from edge_ad.backbones.weights import IncompatibleWeightsError

VIT_NAMES = [
    "dinov2_vits14", "dinov2_vitb14", "dinov2_vitl14",
    "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg",
    "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16",
    "radio_v3_b16", "radio_v3_l16",
]
ALL_NAMES = VIT_NAMES + ["efficientnet_lite0"]
# CLS + registers (DINOv2-reg: 4, DINOv3: 4 storage tokens, C-RADIOv3: timm's 1 cls + 7 reg tokens).
PREFIX_TOKENS = {
    "dinov2_vits14": 1, "dinov2_vitb14": 1, "dinov2_vitl14": 1,
    "dinov2_vits14_reg": 5, "dinov2_vitb14_reg": 5, "dinov2_vitl14_reg": 5,
    "dinov3_vits16": 5, "dinov3_vitb16": 5, "dinov3_vitl16": 5,
    "radio_v3_b16": 8, "radio_v3_l16": 8, "efficientnet_lite0": 0,
}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
NORMALISATION = {**{n: IMAGENET for n in VIT_NAMES if not n.startswith("radio")},
                 "radio_v3_b16": CLIP, "radio_v3_l16": CLIP,
                 "efficientnet_lite0": ((127 / 255,) * 3, (128 / 255,) * 3)}

# Tiny random-init configs of the real architectures. LayerScale 1.0: timm's 1e-5 default makes
# random blocks near-identity, so numeric checks would pass vacuously.
TINY = dict(depth=3, embed_dim=32, num_heads=2, init_values=1.0)


def patch(name: str) -> int:
    return 14 if "14" in name else 16


def tiny(name: str, **kwargs) -> Backbone:
    overrides = {} if name == "efficientnet_lite0" else TINY
    return build_backbone(name, **{**overrides, **kwargs})


def images_for(backbone: Backbone, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *backbone.info.img_size, generator=generator)


def run(backbone: Backbone, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    with torch.no_grad():
        return backbone(x)


# --- registry --------------------------------------------------------------------------------

def test_required_names_registered():
    assert set(ALL_NAMES) <= set(list_backbones())
    assert list_backbones() == sorted(list_backbones())


def test_package_exports_public_api():
    import edge_ad

    package = importlib.import_module("edge_ad.backbones")
    if getattr(package, "__file__", None) is None:
        pytest.skip(
            "stale editable install: edge_ad/backbones/__init__.py was added after `pip install -e .`, "
            "so the scikit-build editable finder still serves edge_ad.backbones as a namespace package; "
            "re-run `pip install -e .` (public API is tested via edge_ad.backbones.registry meanwhile)"
        )
    assert package.build_backbone is build_backbone
    assert package.list_backbones is list_backbones
    assert edge_ad.build_backbone is build_backbone


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownBackboneError, match="dinov2_vits14") as excinfo:
        build_backbone("dinov2_vits16")
    assert isinstance(excinfo.value, KeyError)


def test_reserved_override_rejected():
    with pytest.raises(ValueError, match="dynamic_img_size"):
        build_backbone("dinov3_vits16", dynamic_img_size=True, **TINY)


def test_weights_and_pretrained_are_exclusive(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        build_backbone("dinov2_vits14", weights=tmp_path / "x.safetensors", pretrained=True, **TINY)


# --- every name builds with documented shapes and info --------------------------------------

@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_backbone_builds_with_documented_shapes(name):
    p = patch(name)
    if name == "efficientnet_lite0":
        size, layers, strides, dims = (64, 96), (1, 2, 3), (4, 8, 16), (24, 40, 112)
    else:
        size, layers, strides, dims = (2 * p, 3 * p), (0, 2), (p, p), (32, 32)  # non-square
    backbone = tiny(name, img_size=size, layers=layers)
    info = backbone.info
    assert isinstance(info, BackboneInfo) and isinstance(backbone, Backbone)
    assert not backbone.training
    assert info.name == name
    assert info.img_size == size
    assert info.layers == layers
    assert info.feature_strides == strides
    assert info.patch_size == max(strides)
    assert info.feature_dims == dims
    assert info.global_dim == dims[-1]
    assert info.num_prefix_tokens == PREFIX_TOKENS[name]
    mean, std = NORMALISATION[name]
    assert info.mean == pytest.approx(mean) and info.std == pytest.approx(std)
    assert info.grid_size == (size[0] // max(strides), size[1] // max(strides))

    features, global_token = run(backbone, images_for(backbone))
    assert [tuple(f.shape) for f in features] == [
        (2, c, size[0] // s, size[1] // s) for c, s in zip(dims, strides)
    ]
    assert tuple(global_token.shape) == (2, info.global_dim)
    assert all(torch.isfinite(f).all() for f in features) and torch.isfinite(global_token).all()


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vitb16", "radio_v3_l16"])
def test_vit_defaults_last_block_and_224(name):
    info = tiny(name).info
    assert info.layers == (TINY["depth"] - 1,)
    assert info.img_size == (224, 224)


def test_efficientnet_defaults_and_all_stage_strides():
    assert tiny("efficientnet_lite0").info.layers == (2, 3)
    info = tiny("efficientnet_lite0", img_size=64, layers=(0, 1, 2, 3, 4)).info
    assert info.feature_strides == (2, 4, 8, 16, 32)
    assert info.feature_dims == (16, 24, 40, 112, 320)
    assert info.patch_size == 32


def test_layers_normalised_sorted_and_negative():
    info = tiny("dinov2_vits14", img_size=28, layers=[-1, 0]).info
    assert info.layers == (0, TINY["depth"] - 1)
    info = tiny("dinov2_vits14", img_size=(np.int64(28), 42), layers=np.int64(1)).info  # numpy ints
    assert info.layers == (1,) and info.img_size == (28, 42)


@pytest.mark.parametrize(
    "layers, error",
    [((3,), "out of range"), ((-4,), "out of range"), ((), "at least one"), ((1, -2), "twice")],
)
def test_bad_layers_error(layers, error):
    with pytest.raises(ValueError, match=error):
        tiny("dinov3_vits16", img_size=32, layers=layers)


# --- numerics: the FoundAD / AVA-DINO convention ---------------------------------------------

@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16", "radio_v3_b16"])
def test_vit_last_block_equals_timm_forward_features(name):
    """Last block: patch maps are timm's normed patch tokens, global token timm's normed CLS."""
    p = patch(name)
    backbone = tiny(name, img_size=(2 * p, 3 * p))
    x = images_for(backbone)
    features, global_token = run(backbone, x)
    with torch.no_grad():
        tokens = backbone.model.forward_features(x)  # (B, prefix + h*w, C), after the final norm
    prefix = backbone.info.num_prefix_tokens
    expected = tokens[:, prefix:].reshape(2, 2, 3, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(features[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(global_token, tokens[:, 0], rtol=1e-5, atol=1e-5)


def test_vit_intermediate_block_is_normed_block_output():
    backbone = tiny("dinov2_vits14", img_size=(28, 42), layers=(0, 2))
    model = backbone.model
    x = images_for(backbone)
    features, global_token = run(backbone, x)
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        block0 = model.norm(model.blocks[0](tokens))
    expected = block0[:, 1:].reshape(2, 2, 3, -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(features[0], expected, rtol=1e-5, atol=1e-5)
    assert (features[0] - features[1]).abs().max() > 1e-2  # random blocks are not near-identity


def test_efficientnet_global_token_is_pooled_deepest_map():
    backbone = tiny("efficientnet_lite0", img_size=64, layers=(1, 3))
    features, global_token = run(backbone, images_for(backbone))
    torch.testing.assert_close(global_token, features[-1].mean(dim=(2, 3)))


# --- errors: sizes and inputs ------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, img_size, nearest",
    [
        ("dinov2_vits14", 250, "238 or 252"),
        ("dinov3_vits16", (256, 250), "240 or 256"),
        ("radio_v3_b16", (10, 32), "16"),
        ("efficientnet_lite0", 100, "96 or 112"),  # deepest default stride 16
    ],
)
def test_bad_img_size_names_nearest_valid(name, img_size, nearest):
    with pytest.raises(ValueError, match=f"nearest valid {nearest}"):
        tiny(name, img_size=img_size)


@pytest.mark.parametrize("img_size", [(224,), (224, 224, 3), 224.0, (224.0, 224)])
def test_img_size_type_errors(img_size):
    with pytest.raises(TypeError, match="img_size"):
        tiny("dinov3_vits16", img_size=img_size)


@pytest.mark.parametrize("name", ["dinov2_vits14", "efficientnet_lite0"])
def test_forward_rejects_wrong_inputs(name):
    backbone = tiny(name, img_size=(28, 56) if name != "efficientnet_lite0" else (32, 64))
    h, w = backbone.info.img_size
    with pytest.raises(ValueError, match=rf"img_size \(H, W\) = \({h}, {w}\)"):
        backbone(torch.zeros(1, 3, w, h))
    with pytest.raises(ValueError, match="3 \\(RGB\\) channels"):
        backbone(torch.zeros(1, h, w, 3))  # channels-last
    with pytest.raises(ValueError, match="4-D|3-D"):
        backbone(torch.zeros(3, h, w))
    with pytest.raises(TypeError, match="float tensor"):
        backbone(torch.zeros(1, 3, h, w, dtype=torch.uint8))
    with pytest.raises(TypeError, match="does not match the weights"):
        backbone(torch.zeros(1, 3, h, w, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        backbone(np.zeros((1, 3, h, w), dtype=np.float32))


# --- the DINOv3 _qkvb trap ---------------------------------------------------------------------

def _qkv_calls(model: torch.nn.Module, x: torch.Tensor) -> int:
    calls = []
    handle = model.blocks[0].attn.qkv.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model.forward_features(x)
    handle.remove()
    return len(calls)


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16"])
def test_dinov3_uses_non_qkvb_variant_whose_qkv_module_runs(name):
    import timm

    backbone = tiny(name, img_size=32)
    assert not backbone.spec.timm_name.endswith("_qkvb")
    assert all(blk.attn.q_bias is None for blk in backbone.model.blocks)
    x = images_for(backbone, batch=1)
    # The qkv module is called, so a LoRA wrapper on it takes effect ...
    assert _qkv_calls(backbone.model, x) == 1
    # ... unlike timm's _qkvb variant: F.linear(x, qkv.weight, bias) bypasses the module.
    qkvb = timm.create_model(
        backbone.spec.timm_name + "_qkvb", img_size=32, dynamic_img_size=False, num_classes=0, **TINY
    ).eval()
    assert _qkv_calls(qkvb, x) == 0


# --- weights -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov3_vits16", "radio_v3_b16", "efficientnet_lite0"])
def test_weights_round_trip_safetensors(tmp_path, name):
    from safetensors.torch import save_file

    size = 32 if name == "efficientnet_lite0" else 2 * patch(name)
    torch.manual_seed(0)
    source = tiny(name, img_size=size, layers=(1, 2))
    path = tmp_path / "timm_layout.safetensors"
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    torch.manual_seed(1)  # a different random init, overwritten by the file
    loaded = tiny(name, img_size=size, layers=(1, 2), weights=path)
    x = images_for(source)
    (f_src, g_src), (f_new, g_new) = run(source, x), run(loaded, x)
    for a, b in zip(f_src, f_new):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(g_src, g_new, rtol=0, atol=0)


def test_weights_round_trip_pth_of_saved_backbone(tmp_path):
    """A saved Backbone (keys prefixed 'model.') in a .pth loads too."""
    torch.manual_seed(0)
    source = tiny("dinov3_vits16", img_size=32)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    loaded = tiny("dinov3_vits16", img_size=32, weights=path)
    x = images_for(source)
    torch.testing.assert_close(run(source, x)[1], run(loaded, x)[1], rtol=0, atol=0)


def test_weights_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        tiny("dinov2_vits14", weights=missing)


def test_weights_bad_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"x")
    with pytest.raises(ValueError, match="suffix"):
        tiny("dinov2_vits14", weights=path)


def test_weights_mismatch_names_file_backbone_and_keys(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "shallow.safetensors"
    save_file(tiny("dinov3_vits16", img_size=32, depth=2).model.state_dict(), str(path))
    with pytest.raises(IncompatibleWeightsError) as excinfo:
        tiny("dinov3_vits16", img_size=32, weights=path)  # depth 3
    message = str(excinfo.value)
    assert "shallow.safetensors" in message and "'dinov3_vits16'" in message
    assert "DINOv3 ViT/16 (D 32, 2 blocks" in message and "blocks 2 (backbone: 3)" in message

    wide = tmp_path / "wide.pth"
    torch.save(tiny("dinov2_vits14", img_size=28, embed_dim=48).model.state_dict(), wide)
    with pytest.raises(IncompatibleWeightsError, match=r"embedding width 48 \(backbone: 32\)"):
        tiny("dinov2_vits14", img_size=28, weights=wide)

    # Same architecture, one tensor missing or reshaped: the strict key-by-key load names it.
    state = tiny("dinov3_vits16", img_size=32).model.state_dict()
    del state["blocks.2.norm1.weight"]
    state["blocks.1.mlp.fc1.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(IncompatibleWeightsError) as excinfo:
        tiny("dinov3_vits16", img_size=32, weights=tmp_path / "partial.pth")
    message = str(excinfo.value)
    assert "missing keys: blocks.2.norm1.weight" in message
    assert "blocks.1.mlp.fc1.bias (7,) vs expected (128,)" in message


def test_weights_unexpected_keys_are_an_error_not_ignored(tmp_path):
    state = tiny("radio_v3_b16", img_size=32).model.state_dict()
    state["head.weight"] = torch.zeros(10, 32)
    path = tmp_path / "extra.pth"
    torch.save({"model": state, "epoch": 3}, path)  # wrapped training checkpoint
    with pytest.raises(IncompatibleWeightsError, match="unexpected keys: head.weight"):
        tiny("radio_v3_b16", img_size=32, weights=path)


def _to_official_dinov3(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm Eva keys -> facebookresearch/dinov3 layout (storage tokens, ls*.gamma, qkv.bias)."""
    out = {}
    for key, value in state.items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma")
        out[key.replace("gamma_2", "ls2.gamma")] = value
        if key.endswith("attn.qkv.weight"):
            out[key.replace("weight", "bias")] = torch.zeros(value.shape[0])
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    out["rope_embed.periods"] = dinov3_rope_periods(head_dim=16)  # Meta's periods for RoPE base 100
    return out


def test_dinov3_official_layout_loads_via_timm_filter(tmp_path):
    source = tiny("dinov3_vits16", img_size=32)
    official = _to_official_dinov3(source.model.state_dict())
    path = tmp_path / "dinov3_official.pth"
    torch.save(official, path)
    loaded = tiny("dinov3_vits16", img_size=32, weights=path)
    x = images_for(source)
    torch.testing.assert_close(run(source, x)[1], run(loaded, x)[1], rtol=0, atol=0)

    official["blocks.1.attn.qkv.bias"] = torch.full_like(official["blocks.1.attn.qkv.bias"], 0.1)
    torch.save(official, path)
    with pytest.raises(IncompatibleWeightsError, match="blocks.1.attn.qkv.bias is non-zero"):
        tiny("dinov3_vits16", img_size=32, weights=path)


def test_dinov2_official_layout_loads_and_resamples_pos_embed(tmp_path):
    """Official DINOv2 keys (mask_token) at another resolution: the pos embed is resampled at load."""
    from safetensors.torch import save_file

    source = tiny("dinov2_vits14", img_size=56).model.state_dict()  # 4x4 grid
    source["mask_token"] = torch.zeros(1, 32)
    path = tmp_path / "dinov2_official.safetensors"
    save_file(source, str(path))
    loaded = tiny("dinov2_vits14", img_size=(28, 42), weights=path)  # 2x3 grid
    assert loaded.model.pos_embed.shape == (1, 1 + 2 * 3, 32)
    torch.testing.assert_close(loaded.model.blocks[1].mlp.fc1.weight, source["blocks.1.mlp.fc1.weight"])


# --- pretrained=True: local Hugging Face cache only --------------------------------------------

def _fake_hf_cache(cache: Path, hub_id: str, state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    commit = "0" * 40
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))


def test_pretrained_vit_loads_only_from_local_hf_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    expected = r"timm/vit_small_patch16_dinov3\.lvd1689m/model\.safetensors"
    with pytest.raises(FileNotFoundError, match=expected):
        tiny("dinov3_vits16", img_size=32, pretrained=True)

    source = tiny("dinov3_vits16", img_size=32)
    _fake_hf_cache(tmp_path / "hub", "timm/vit_small_patch16_dinov3.lvd1689m", source.model.state_dict())
    loaded = tiny("dinov3_vits16", img_size=32, pretrained=True)
    x = images_for(source)
    torch.testing.assert_close(run(source, x)[1], run(loaded, x)[1], rtol=0, atol=0)


# --- ONNX export at a fixed size ---------------------------------------------------------------

def _op_types(graph) -> set[str]:
    ops = set()
    for node in graph.node:
        ops.add(node.op_type)
        for attribute in node.attribute:
            if attribute.g is not None and attribute.g.node:
                ops |= _op_types(attribute.g)
    return ops


class _Flat(torch.nn.Module):
    """features list + global token -> a flat tuple of output tensors for export."""

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features, global_token = self.backbone(images)
        return (*features, global_token)


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16", "efficientnet_lite0"])
def test_onnx_export_fixed_size_no_if_nodes_matches_onnxruntime(tmp_path, name):
    """Legacy TorchScript exporter (dynamo=False), opset 17: no If nodes, ORT matches torch.

    (torch 2.14's dynamo exporter asked for opset 17 down-converts from 18 and leaves a Split with
    the opset-18 ``num_outputs`` attribute in DINOv3's RoPE, which ORT rejects.)
    """
    import onnx
    import onnxruntime as ort

    size = (64, 96) if name == "efficientnet_lite0" else (2 * patch(name), 3 * patch(name))
    backbone = tiny(name, img_size=size, layers=(1, 2))
    x = images_for(backbone, batch=1)
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(
        _Flat(backbone).eval(), (x,), str(path), opset_version=17, dynamo=False,
        input_names=["images"], output_names=["feat_1", "feat_2", "global"],
    )
    model = onnx.load(str(path))
    ops = _op_types(model.graph)
    assert "If" not in ops and "Loop" not in ops, sorted(ops)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected = _Flat(backbone)(x)
    assert len(outputs) == len(expected) == 3
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)


def test_dynamo_onnx_export_needs_opset_18_for_dinov3(tmp_path):
    """The torch.export-based exporter works at opset 18 (no If nodes, ORT matches); at opset 17
    it down-converts and leaves an opset-18 Split in DINOv3's RoPE that ORT rejects."""
    import onnx
    import onnxruntime as ort

    backbone = tiny("dinov3_vits16", img_size=(32, 48), layers=(1, 2))
    x = images_for(backbone, batch=1)
    path = tmp_path / "dinov3_dynamo.onnx"
    torch.onnx.export(_Flat(backbone).eval(), (x,), str(path), opset_version=18, dynamo=True, verbose=False)
    assert "If" not in _op_types(onnx.load(str(path)).graph)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = _Flat(backbone)(x)
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
