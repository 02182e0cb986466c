"""AnomalyVFM: full-size parameter counts (meta device), adapters (peft DoRA / LoRA) merged exactly
into a plain timm ViT, checkpoints that reload without peft, the loss, learning on a batch, and the
convert -> bundle -> Detector path (OpenVINO INT8, Q/DQ ONNX for jetson-orin)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edge_ad.methods import build_detector, load_detector, save_checkpoint  # noqa: E402
from edge_ad.methods.anomalyvfm import (  # noqa: E402
    AnomalyVFM,
    AnomalyVFMConfig,
    anomalyvfm_loss,
    focal_loss_with_logits,
    loss_fn,
)

CATEGORY = "mvtec_hazelnut_256"
TINY_VIT = dict(depth=2, embed_dim=64, num_heads=2, init_values=1.0, patch_size=8)
TINY = dict(adapter_rank=4, upsample_channels=32, norm_groups=8)


def tiny_detector(adapter: str = "dora", seed: int = 0, **fields) -> AnomalyVFM:
    torch.manual_seed(seed)
    det = build_detector("anomalyvfm", backbone={"name": "dinov3_vits16", "img_size": 64, "overrides": TINY_VIT},
                         adapter=adapter, **{**TINY, **fields})
    with torch.no_grad():  # move the adapters off their identity init so merging has something to fold
        for name, p in det.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
            elif "lora_magnitude" in name:
                p.mul_(torch.empty_like(p).uniform_(0.8, 1.2))
    return det.eval()


@pytest.mark.parametrize("name, size, summary", [("radio_v3_l16", 768, 4), ("dinov3_vitl16", 768, 1),
                                                 ("dinov2_vitl14_reg", 672, 1)])
def test_full_size_parameter_counts_on_meta_device(name, size, summary):
    with torch.device("meta"):
        det = build_detector("anomalyvfm", backbone={"name": name, "img_size": size})
    assert det.config.adapter == "dora" and det.config.adapter_rank == 64 and det.config.adapter_alpha == 1.0
    # Decoder at ViT-L width: 2 x conv3x3 1024->1024 (+GN), x2 block conv3x3 1024->512, 512->512 (+GN), 2 heads.
    decoder = sum(p.numel() for p in det.decoder.parameters())
    expected = 2 * (9 * 1024 * 1024 + 1024 + 2 * 1024) + (9 * 1024 * 512 + 512 + 2 * 512) \
        + (9 * 512 * 512 + 512 + 2 * 512) + 2 * (512 + 1)
    assert decoder == expected and abs(decoder - 26e6) < 0.1e6
    assert det.decoder_size == (size // det.backbone.info.patch_size * 2,) * 2
    # Adapters: q, v, proj of 24 blocks, rank 64: A (64 x 1024) + B (1024 x 64) + DoRA magnitude (1024).
    adapters = det.adapter_parameter_count()
    assert adapters == 24 * 3 * (2 * 64 * 1024 + 1024)
    backbone = sum(p.numel() for n, p in det.backbone.named_parameters() if "lora_" not in n)
    assert 0.30e9 < backbone < 0.31e9
    assert adapters / backbone < 0.035  # 3.1 %: rank 64 on three 1024-wide layers per block (see docs)
    assert det.summary_tokens == summary and det.image_head.in_features == summary * 1024
    # Only adapters, decoder and image head train.
    trainable = {n.split(".")[0] for n, p in det.named_parameters() if p.requires_grad}
    assert trainable == {"backbone", "decoder", "image_head"}
    assert all("lora_" in n for n, p in det.backbone.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("adapter", ["dora", "lora"])
def test_merge_is_exact_and_yields_a_plain_timm_vit(adapter):
    det = tiny_detector(adapter)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        before = det(x)
        merged = det.merged_copy()
        after = merged(x)
    assert det.has_adapters and not merged.has_adapters and merged.config.adapters_merged
    torch.testing.assert_close(after.anomaly_map, before.anomaly_map, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(after.score, before.score, atol=2e-5, rtol=1e-4)
    assert all(type(m).__module__.startswith(("torch.", "timm.", "edge_ad.")) for m in merged.modules())
    qkv = merged.backbone.model.blocks[0].attn.qkv
    assert type(qkv) is torch.nn.Linear and tuple(qkv.weight.shape) == (192, 64)
    # Unadapted k rows are untouched by the merge (only q and v slices carry adapters).
    original = det.backbone.model.blocks[0].attn.qkv.k.weight
    base_k = original.base_layer.weight if hasattr(original, "base_layer") else original
    torch.testing.assert_close(qkv.weight[64:128], base_k)


def test_checkpoint_holds_merged_weights_and_reloads_without_peft(tmp_path, real_root):
    from edge_ad.data import MVTecDataset
    from edge_ad.runtime import preprocess_batch

    det = tiny_detector()
    spec = det.preprocess_spec
    good = [s.image for s in list(MVTecDataset(real_root, CATEGORY, "train"))[:8]]
    x = torch.from_numpy(preprocess_batch(good, spec, color_order="rgb"))
    det.fit_normalization(x)
    run = save_checkpoint(det, tmp_path / "run")
    assert det.has_adapters  # saving did not change the live module
    from safetensors import safe_open

    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "backbone.model.blocks.0.attn.qkv.weight" in keys and not any("lora_" in k for k in keys)
    with torch.no_grad():
        expected = det(x)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "map.npy", expected.anomaly_map.numpy())
    code = f"""
import sys
sys.modules["peft"] = None  # import peft -> ImportError: the run must not need it
import numpy as np, torch
from edge_ad.methods import load_detector
det = load_detector({str(run)!r})
assert not det.has_adapters and det.config.adapters_merged
with torch.no_grad():
    out = det(torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r})))
err = np.abs(out.anomaly_map.numpy() - np.load({str(tmp_path / 'map.npy')!r})).max()
assert err < 1e-4, err
print("ok", err)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_export_refuses_live_adapters(tmp_path):
    from edge_ad.converters import export_onnx

    with pytest.raises(Exception, match="merge_adapters"):
        export_onnx(tiny_detector(), tmp_path / "m.onnx")
    path = export_onnx(tiny_detector().merge_adapters(), tmp_path / "m.onnx")
    import onnx

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "AveragePool" in ops and "Sigmoid" in ops  # mean filter and sigmoids live in the graph


def test_focal_loss_matches_torchvision():
    tv = pytest.importorskip("torchvision.ops")
    logits = torch.randn(4, 1, 8, 8) * 3
    target = (torch.rand(4, 1, 8, 8) > 0.7).float()
    ours = focal_loss_with_logits(logits, target, 0.25, 2.0)
    torch.testing.assert_close(ours, tv.sigmoid_focal_loss(logits, target, alpha=0.25, gamma=2.0, reduction="none"))


def test_loss_terms_and_confidence():
    cfg = AnomalyVFMConfig(backbone={"name": "dinov3_vits16"})
    masks = torch.zeros(2, 1, 16, 16)
    masks[0, :, 4:8, 4:8] = 1
    labels = torch.tensor([1.0, 0.0])
    m = torch.randn(2, 1, 8, 8)
    c = torch.zeros(2, 1, 8, 8, requires_grad=True)
    img = torch.tensor([0.5, -0.5])
    terms = anomalyvfm_loss(m, c, img, masks, labels, cfg)
    up = torch.nn.functional.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False)
    base = 5 * focal_loss_with_logits(up, masks) + (torch.sigmoid(up).clamp(0.1, 0.9) - masks).abs()
    # C = 1 + exp(0) = 2: L_seg = mean(2 * base) - 0.1 * log 2.
    torch.testing.assert_close(terms["seg"], (2 * base).mean() - 0.1 * np.log(2.0))
    torch.testing.assert_close(terms["loss"], terms["seg"] + focal_loss_with_logits(img, labels).mean())
    # A larger confidence where the base loss is large costs more: the gradient pushes C down there.
    terms["seg"].backward()
    assert c.grad.sum() > 0
    plain = anomalyvfm_loss(m, c, img, masks, labels, cfg.replace(use_confidence=False))
    torch.testing.assert_close(plain["seg"], base.mean())


def test_a_tiny_detector_learns_a_fixed_batch(real_root):
    """Overfitting one batch of real images with CutPaste defects: the loss must fall clearly, and the
    trained map must rank the defect pixels above the rest."""
    from edge_ad.data import MVTecDataset
    from edge_ad.metrics import pixel_auroc
    from edge_ad.runtime import preprocess_batch
    from edge_ad.synth import CutPaste
    from edge_ad.training.supervised import SupervisedBatch

    det = build_detector("anomalyvfm", backbone={"name": "dinov3_vits16", "img_size": 64, "overrides": TINY_VIT},
                         **TINY)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images, masks = [], []
    for s in list(MVTecDataset(real_root, CATEGORY, "train"))[:4]:
        aug, mask = CutPaste()(s.image, rng)
        images.append(aug)
        masks.append(torch.from_numpy(mask.astype(np.float32))[None, None])
    spec = det.preprocess_spec
    x = torch.from_numpy(preprocess_batch(images, spec, color_order="rgb"))
    y = torch.nn.functional.interpolate(torch.cat(masks), size=(64, 64), mode="area").round()
    batch = SupervisedBatch(x, y, torch.ones(4), [CATEGORY] * 4)
    opt = torch.optim.AdamW(det.trainable_parameters(), lr=3e-3, weight_decay=1e-2)
    det.train()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = loss_fn(det, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses
    det.eval()
    with torch.no_grad():
        maps = det.forward_raw(x).anomaly_map
    assert pixel_auroc(y[:, 0].numpy().astype(bool), maps[:, 0].numpy()) > 0.8


@pytest.fixture(scope="module")
def vfm_run(real_root, tmp_path_factory):
    """A tiny AnomalyVFM run directory (random ViT, moved adapters, normaliser on real good images)."""
    from edge_ad.data import MVTecDataset
    from edge_ad.runtime import preprocess_batch

    det = tiny_detector()
    good = [s.image for s in list(MVTecDataset(real_root, CATEGORY, "train"))[:16]]
    det.fit_normalization(torch.from_numpy(preprocess_batch(good, det.preprocess_spec, color_order="rgb")))
    return save_checkpoint(det, tmp_path_factory.mktemp("vfm") / "run")


def test_convert_fp32_and_detector_reproduces_maps(vfm_run, real_root, tmp_path):
    from edge_ad.converters.convert import convert
    from edge_ad.data import MVTecDataset
    from edge_ad.evaluation import predict_dataset
    from edge_ad.runtime import Detector, read_image

    bundle = convert(vfm_run, "onnx-cpu", tmp_path / "fp32", precision="fp32", calib=real_root / CATEGORY,
                     calib_count=8, progress=False)
    runtime = Detector.load(bundle)
    test_set = MVTecDataset(real_root, CATEGORY, "test")
    ref = predict_dataset(load_detector(vfm_run), test_set, runtime.bundle.preprocess_spec, progress=False)
    for i, s in enumerate(list(test_set)[:4]):
        res = runtime.predict(read_image(s.path, "bgr"))
        np.testing.assert_allclose(res.model_map, ref.maps[i], atol=1e-3)
        assert abs(res.score - float(ref.scores[i])) < 1e-3


def test_convert_openvino_int8_and_jetson_qdq(vfm_run, real_root, tmp_path):
    import onnx

    from edge_ad.converters.convert import convert
    from edge_ad.converters.trt_check import check_tensorrt_compatible
    from edge_ad.runtime import Detector, load_bundle

    ov = load_bundle(convert(vfm_run, "intel-cpu", tmp_path / "ov", precision="int8", calib=real_root / CATEGORY,
                             calib_count=16, val_data=real_root, val_category=CATEGORY, progress=False))
    assert (ov.manifest.engine.name, ov.manifest.precision) == ("openvino", "int8")
    assert ov.fidelity["map"]["pearson_r"] > 0.9  # INT8 maps track the FP32 module's
    assert Detector.load(ov).predict(
        np.zeros((256, 256, 3), np.uint8)).model_map.shape == (64, 64)

    orin = load_bundle(convert(vfm_run, "jetson-orin", tmp_path / "orin", precision="int8",
                               calib=real_root / CATEGORY, calib_count=16, progress=False))
    model = orin.path("model.onnx")
    ops = {n.op_type for n in onnx.load(str(model)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert check_tensorrt_compatible(model) == []
    assert "map" in orin.fidelity
