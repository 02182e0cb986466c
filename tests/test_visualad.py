"""VisualAD: full-size parameter counts, exact post-processing, the token-in-sequence ViT runner,
learning on real annotated defects, and export -> OpenVINO INT8 / Q/DQ bundles -> Detector."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from edge_ad.methods import build_detector, get_method, load_detector
from edge_ad.methods.visualad import (
    SymmetricGaussianBlur,
    TopFractionMean,
    VisualADConfig,
    VisualADHead,
    param_groups,
    top_fraction_mean_exact,
    visualad_loss,
)

TINY = {"depth": 4, "embed_dim": 64, "num_heads": 2}
AUX = ["mvtec_transistor_256", "magnetic_tile"]
UNSEEN = "mvtec_hazelnut_256"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls run fastest on one thread, and the CPU is shared with other test runs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny(name: str = "dinov2_vits14", size: int = 112, **fields):
    torch.manual_seed(0)
    return build_detector("visualad", backbone={"name": name, "layers": [0, 1, 2, 3], "img_size": size,
                                                "overrides": dict(TINY, init_values=1.0)}, key_pos_tokens=0, **fields)


# ---------------------------------------------------------------- sizes (meta device, no weights)
def test_full_size_parameter_counts_match_the_reference_on_meta():
    """CLIP ViT-L/14-336, taps 6/12/18/24: cross-attention 4 x 5,780,485 = 23.12 M (4 anchors, 1536
    key positions, C = 1024) and alignment 4 x 2,099,200 = 8.40 M, as the reference's modules."""
    with torch.device("meta"):
        det = build_detector("visualad")  # the default config: clip_vitl14_336 @ 336, layers 5/11/17/23
    assert det.backbone.info.layers == (5, 11, 17, 23) and det.num_patches == 576 and det.embed_dim == 1024
    cross = sum(p.numel() for p in det.head.cross_attention.parameters())
    align = sum(p.numel() for p in det.head.alignment.parameters())
    assert cross == 4 * (4 * 1024 + 1536 * 1024 + 3 * 1024**2 + 4 * 1024 + (1024 * 4 + 4) + (1024**2 + 1024) + 1)
    assert cross == 23_121_940 and align == 8_396_800
    trainable = sum(p.numel() for p in det.trainable_parameters())
    assert trainable == cross + align + 2 * 1024 + 2 * 1024  # + tokens + final norm (token positions frozen)
    assert not any(p.requires_grad for p in det.backbone.parameters())
    # DINOv2-L at 518 px (1369 patches) fits the same 1536 key positions; more patches must say how to fix it.
    with torch.device("meta"):
        VisualADHead(1024, 4, 1369, VisualADConfig())
        with pytest.raises(ValueError, match="key_pos_tokens"):
            VisualADHead(1024, 4, 1600, VisualADConfig())


# ---------------------------------------------------------------- post-processing
def test_symmetric_blur_is_scipys_reflect_and_torch_reflect_is_not():
    from scipy.ndimage import gaussian_filter

    from edge_ad.methods.common import GaussianBlur2d

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 1, 40, 56)).astype(np.float32)
    ours = SymmetricGaussianBlur(4.0, (40, 56))(torch.from_numpy(x)).numpy()[0, 0]
    ref = gaussian_filter(x[0, 0].astype(np.float64), sigma=4)  # scipy default mode="reflect"
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    mirror = GaussianBlur2d(4.0)(torch.from_numpy(x)).numpy()[0, 0]  # torch "reflect" == scipy "mirror"
    assert np.abs(mirror - ref).max() > 1e-2


@pytest.mark.parametrize("size", [112, 336, 518, 1024])
def test_top_fraction_mean_is_exact_under_the_topk_limit_and_close_above(size):
    """K = ceil(1 % of H*W): 126, 1129, 2684 (exact, K <= 3840); at 1024^2 K would be 10486, so the
    map is 2x2 average-pooled first. Maps: upsampled + smoothed random patch grids, like VisualAD's."""
    from edge_ad.methods.common import upsample_to

    scorer = TopFractionMean((size, size), 0.01, 3840)
    assert scorer.k <= 3840
    assert scorer.pool == (1 if size <= 518 else 2)
    torch.manual_seed(size)
    grid = torch.randn(3, 1, size // 14, size // 14)
    maps = SymmetricGaussianBlur(4.0, (size, size))(upsample_to(grid, (size, size)))
    exact = top_fraction_mean_exact(maps, 0.01)
    got = scorer(maps)
    if scorer.pool == 1:
        torch.testing.assert_close(got, exact)
    else:
        spread = (maps.flatten(1).max(1).values - maps.flatten(1).min(1).values)
        assert ((got - exact).abs() / spread).max() < 0.01  # under 1 % of each map's range
    assert scorer.k == max(1, math.ceil(0.01 * (size // scorer.pool) ** 2))


# ---------------------------------------------------------------- the token-in-sequence runner
def test_rope_identity_rows_equal_shifting_the_prefix_count():
    """DINOv3 (RoPE): two identity rows in front of the table == telling every attention that the
    two tokens are two more prefix tokens (timm's own mechanism), so patch positions are intact."""
    det = _tiny("dinov3_vits16", 128).eval()
    x = torch.randn(2, 3, 128, 128)
    a, n, patches = det.encode(x)
    model = copy.deepcopy(det.backbone.model)
    for blk in model.blocks:
        blk.attn.num_prefix_tokens += 2
    tokens, rope = model._pos_embed(model.patch_embed(x))
    special = (torch.stack([det.anomaly_token, det.normal_token]) + det.token_pos).expand(2, -1, -1)
    seq = model.norm_pre(torch.cat([special, tokens], 1))
    for blk in model.blocks[:4]:
        seq = blk(seq, rope=rope)
    ref = det.final_norm(seq)
    torch.testing.assert_close(patches[-1], ref[:, 2 + det.num_prefix_tokens:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(n, ref[:, 1], atol=1e-5, rtol=1e-5)


def test_tokens_are_in_the_sequence_and_the_backbone_stays_frozen():
    det = _tiny().eval()
    x = torch.randn(2, 3, 112, 112)
    _, _, patches = det.encode(x)
    with torch.no_grad():
        # Another token changes what the patches attend to (a random one: LayerNorm would erase a
        # constant shift).
        det.anomaly_token.add_(torch.randn_like(det.anomaly_token))
    _, _, patches2 = det.encode(x)
    assert (patches[-1] - patches2[-1]).abs().max() > 1e-4
    assert all(t.shape == (2, det.num_patches, det.embed_dim) for t in patches)
    det.train()
    assert not det.backbone.training and det.head.training


# ---------------------------------------------------------------- loss and learning on real defects
def _real_batch(real_root, det, n_per_category=4):
    from edge_ad.data import MVTecDataset
    from edge_ad.data.masks import resize_mask
    from edge_ad.runtime.preprocessing import preprocess_batch

    spec = det.preprocess_spec
    samples = []
    for cat in AUX:
        test = list(MVTecDataset(real_root, cat, "test"))
        samples += [s for s in test if s.label == 1][:n_per_category] + [s for s in test if s.label == 0][:1]
    images = torch.from_numpy(preprocess_batch([s.image for s in samples], spec, color_order="rgb")).float()
    masks = torch.from_numpy(np.stack([resize_mask(s.mask, (spec.height, spec.width)) for s in samples]))
    return images, masks.float().unsqueeze(1), torch.tensor([float(s.label) for s in samples])


def test_loss_trains_only_the_head_and_fits_real_defect_masks(real_root):
    """On 10 real annotated transistor / magnetic-tile images the objective must drop and the maps must
    learn where the defects are (pixel AUROC on that batch), with gradients only outside the backbone."""
    from edge_ad.metrics import pixel_auroc

    det = _tiny()
    images, masks, labels = _real_batch(real_root, det)
    groups = param_groups(det, 5e-2)
    assert [g["lr"] for g in groups] == [5e-2, 5e-2, pytest.approx(5e-3)]
    assert groups[0]["grad_clip"] == groups[1]["grad_clip"] == 1.0
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in det.trainable_parameters()}
    opt = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"]} for g in groups], weight_decay=0.01)
    before = {k: v.clone() for k, v in det.backbone.state_dict().items()}

    def auroc() -> float:
        det.eval()
        with torch.no_grad():
            maps = det.forward_raw(images).anomaly_map
        det.train()
        return pixel_auroc(masks[:, 0].numpy() > 0.5, maps[:, 0].numpy())

    start_auroc, losses = auroc(), []
    for _ in range(50):
        opt.zero_grad()
        loss, parts = visualad_loss(det(images, train_outputs=True), masks, labels)
        loss.backward()
        assert all(p.grad is None for p in det.backbone.parameters())
        for g in groups[:2]:
            torch.nn.utils.clip_grad_norm_(g["params"], g["grad_clip"])
        opt.step()
        losses.append(float(loss.detach()))
    end_auroc = auroc()
    assert set(parts) == {"seg", "image", "margin"}
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    # Random-init tiny ViT: about 0.40 -> 0.84 here (seeded); a head that learns nothing stays near 0.4.
    assert end_auroc > max(0.7, start_auroc + 0.2), (start_auroc, end_auroc)
    for k, v in det.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k])


# ---------------------------------------------------------------- train -> convert -> Detector
@pytest.fixture(scope="module")
def visualad_run(real_root, tmp_path_factory):
    """A tiny zero-shot run through ``edge_ad.train`` on the auxiliary categories' test splits."""
    from edge_ad.training import train

    out = tmp_path_factory.mktemp("visualad") / "run"
    return train("visualad", "dinov2_vits14", real_root, None, out, categories=AUX, pretrained=False,
                 image_size=112, layers=[0, 1, 2, 3], steps=6, batch_size=4, lr=1e-2, device="cpu",
                 progress=False, backbone_overrides=TINY, method_options={"key_pos_tokens": 0})


def test_checkpoint_round_trip_reproduces_outputs(tmp_path):
    from edge_ad.methods.checkpoint import save_checkpoint

    det = _tiny("dinov3_vits16", 128, train_token_pos=True).eval()
    with torch.no_grad():
        det.head.alignment[0].fc2.bias.add_(0.5)  # anything a fresh build would not have
        det.token_pos.add_(torch.randn_like(det.token_pos))
    x = torch.randn(2, 3, 128, 128)
    loaded = load_detector(save_checkpoint(det, tmp_path / "run"))
    assert loaded.token_pos.requires_grad and loaded.config.train_token_pos
    with torch.no_grad():
        a, b = det(x), loaded(x)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map)
    torch.testing.assert_close(a.score, b.score)


def test_run_reloads_and_reports_holdout(visualad_run):
    import json

    log = json.loads((visualad_run / "train_log.json").read_text())
    assert log["split"]["categories"] == AUX and "real" in log["holdout"]
    det = load_detector(visualad_run)
    assert get_method("visualad").fit_mode == "supervised" and det.normalizer.fitted
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        out = det(x)
    assert out.anomaly_map.shape == (2, 1, 112, 112) and out.score.shape == (2,)


def test_openvino_int8_and_jetson_qdq_bundles_reproduce_their_maps(visualad_run, real_root, tmp_path):
    import onnx

    from edge_ad.converters.convert import convert
    from edge_ad.converters.fidelity import onnxruntime_runner
    from edge_ad.converters.openvino import openvino_runner
    from edge_ad.converters.trt_check import check_tensorrt_compatible
    from edge_ad.data import MVTecDataset
    from edge_ad.runtime import Detector, preprocess_batch

    images = [s.image for s in MVTecDataset(real_root, UNSEEN, "test")]
    ov = convert(visualad_run, "intel-cpu", tmp_path / "ov", precision="int8", calib=real_root / UNSEEN,
                 calib_count=8, val_data=real_root, val_category=UNSEEN, progress=False)
    det = Detector.load(ov)
    bundle = det.bundle
    # The ViT blocks VisualAD runs itself are INT8 (their Linear layers), its head stays float.
    import openvino as ov_runtime

    ir = ov_runtime.Core().read_model(str(bundle.path("openvino/model.xml")))
    consumers = [t.get_node().get_friendly_name() for op in ir.get_ordered_ops()
                 if op.get_type_name() == "FakeQuantize" for o in op.outputs() for t in o.get_target_inputs()]
    assert any(c.startswith("/blocks.") for c in consumers)
    assert not any(c.startswith(("/head/", "/scorer/", "/smoother/")) for c in consumers)
    assert bundle.fidelity["num_images"] == len(images)
    x = preprocess_batch(images, bundle.preprocess_spec, color_order="rgb")
    hint = bundle.manifest.engine.hints["INFERENCE_PRECISION_HINT"]
    maps, scores = openvino_runner(bundle.path("openvino/model.xml"), precision_hint=hint)(x)
    for i, image in enumerate(images):
        res = det.predict(image, color_order="rgb")
        np.testing.assert_allclose(res.model_map, maps[i, 0], atol=1e-5)
        assert abs(res.score - float(scores[i])) <= 1e-5

    orin = convert(visualad_run, "jetson-orin", tmp_path / "orin", precision="int8", calib=real_root / UNSEEN,
                   calib_count=8, val_data=real_root, val_category=UNSEEN, progress=False)
    from edge_ad.runtime import load_bundle

    qdq = load_bundle(orin)
    path = qdq.path("model.onnx")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "TopK"} <= ops
    assert check_tensorrt_compatible(path) == []
    maps_q, scores_q = onnxruntime_runner(path)(x)
    assert maps_q.shape == (len(images), 1, 112, 112) and np.isfinite(scores_q).all()
    # INT8 vs FP32 torch on the unseen category's real images: the same maps up to quantisation.
    with torch.no_grad():
        ref = load_detector(visualad_run)(torch.from_numpy(x)).anomaly_map.numpy()
    for q in (maps, maps_q):
        r = np.corrcoef(q.ravel(), ref.ravel())[0, 1]
        assert r > 0.9, r


def test_clip_at_518_interpolates_the_position_grid_bilinearly_and_exports(tmp_path, real_root):
    """The paper preset's 518 px CLIP: the 24 x 24 grid of 336 px weights becomes 37 x 37 by bilinear
    interpolation (VisualAD_lib/VisualAD.py:140), the CLS position stays, and VisualAD at that size
    exports to one static ONNX graph whose map matches PyTorch on real images."""
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from edge_ad.backbones import build_backbone
    from edge_ad.converters.export import export_onnx
    from edge_ad.converters.fidelity import onnxruntime_runner
    from edge_ad.data import MVTecDataset
    from edge_ad.runtime.preprocessing import preprocess_batch

    tiny = {"depth": 4, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    small = build_backbone("clip_vitl14_336", img_size=336, layers=[0, 1, 2, 3], **tiny)
    with torch.no_grad():
        small.model.pos_embed.normal_()  # a grid with structure, so the interpolation mode matters
    weights = tmp_path / "clip336.safetensors"
    save_file({k: v.contiguous() for k, v in small.model.state_dict().items()}, str(weights))
    big = build_backbone("clip_vitl14_336", img_size=518, layers=[0, 1, 2, 3], weights=weights, **tiny)
    old = small.model.pos_embed.detach()
    grid = old[:, 1:].reshape(1, 24, 24, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(37, 37), mode="bilinear", align_corners=False)
    new = big.model.pos_embed.detach()
    torch.testing.assert_close(new[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 37 * 37, 32))
    torch.testing.assert_close(new[:, :1], old[:, :1])
    bicubic = F.interpolate(grid, size=(37, 37), mode="bicubic", align_corners=False, antialias=True)
    assert (bicubic - expected).abs().max() > 1e-2  # timm's default would differ

    torch.manual_seed(0)
    det = build_detector("visualad", backbone={"name": "clip_vitl14_336", "layers": [0, 1, 2, 3], "img_size": 518,
                                               "weights": str(weights), "overrides": tiny}, key_pos_tokens=0).eval()
    assert det.grid_size == (37, 37) and det.image_size == (518, 518)
    images = [s.image for s in list(MVTecDataset(real_root, "mvtec_hazelnut_256", "test"))[:2]]
    x = torch.from_numpy(preprocess_batch(images, det.preprocess_spec, color_order="rgb"))
    path = export_onnx(det, tmp_path / "visualad518.onnx", validate_images=x.numpy())
    maps, scores = onnxruntime_runner(path)(x.numpy())
    with torch.no_grad():
        ref = det(x)
    assert maps.shape == (2, 1, 518, 518)
    np.testing.assert_allclose(maps, ref.anomaly_map.numpy(), atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(scores, ref.score.numpy(), atol=1e-3, rtol=1e-3)
