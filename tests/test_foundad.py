"""FoundAD: projector architecture, patch / image scores, training hooks and loss."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_ad.methods import build_detector
from edge_ad.methods.foundad import (
    FoundAD,
    FoundADBatch,
    FoundADConfig,
    ManifoldProjector,
    ProjectionPair,
    foundad_loss,
    loss_fn,
    projection_loss,
)

from test_methods_contract import IMG, make_backbone, make_detector


def test_reference_projector_architecture() -> None:
    """Defaults = the paper: Linear(C->384), 6 pre-norm blocks (12 heads, MLP 1536, GELU), LN, Linear(384->C)."""
    cfg = FoundADConfig()
    assert (cfg.projector_dim, cfg.projector_depth, cfg.projector_heads) == (384, 6, 12)
    assert cfg.feature_dropout == 0.2 and cfg.top_k == 10 and cfg.smoothing_sigma == 4.0
    assert cfg.backbone.name == "dinov3_vitb16" and cfg.backbone.layers == (9,) and cfg.backbone.img_size == (512, 512)
    proj = ManifoldProjector(768, cfg.projector_dim, cfg.projector_depth, cfg.projector_heads, cfg.projector_mlp_ratio)
    assert (proj.embed.in_features, proj.embed.out_features) == (768, 384)
    assert (proj.head.in_features, proj.head.out_features) == (384, 768)
    assert len(proj.blocks) == 6
    block = proj.blocks[0]
    assert block.attn.num_heads == 12 and block.attn.head_dim == 32
    assert block.mlp[0].out_features == 1536 and isinstance(block.mlp[1], nn.GELU)
    assert isinstance(proj.norm, nn.LayerNorm)
    # No positional embedding anywhere: the projector is permutation-equivariant over tokens.
    assert not any("pos" in name for name, _ in proj.named_parameters())
    x = torch.randn(1, 7, 768)
    perm = torch.randperm(7)
    torch.testing.assert_close(proj(x)[:, perm], proj(x[:, perm]), rtol=1e-4, atol=1e-5)


def test_projector_re_adds_embedded_input_after_every_block() -> None:
    proj = ManifoldProjector(6, dim=8, depth=3, num_heads=2)

    class Zero(nn.Module):
        def forward(self, x):
            return torch.zeros_like(x)

    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    x = torch.randn(2, 5, 6)
    e = proj.embed(x)
    proj.blocks = nn.ModuleList([Zero(), Zero(), Zero()])
    torch.testing.assert_close(proj(x), proj.head(proj.norm(e)))
    # x = blk(x) + e with blk = 2x: e -> 3e -> 7e -> 15e.
    proj.blocks = nn.ModuleList([Double(), Double(), Double()])
    torch.testing.assert_close(proj(x), proj.head(proj.norm(15 * e)))


def test_patch_score_is_channel_mean_squared_residual() -> None:
    det = make_detector("foundad")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        f = det.features(x)  # (B, N, C)
        expected = (f - det.projector(f)).pow(2).mean(-1).reshape(2, 1, *det.grid_size)
        torch.testing.assert_close(det.patch_scores(x), expected)
        # With a projector that outputs zeros the score is the mean squared feature.
        nn.init.zeros_(det.projector.head.weight)
        nn.init.zeros_(det.projector.head.bias)
        torch.testing.assert_close(det.patch_scores(x), f.pow(2).mean(-1).reshape(2, 1, *det.grid_size))
    # Token order is row-major over the grid, so patch (i, j) is token i * w + j.
    fmap = det.extract_features(x)
    torch.testing.assert_close(f[:, 1 * det.grid_size[1] + 2], fmap[:, :, 1, 2])


def test_channel_feature_norm_standardises_tokens_with_good_image_statistics() -> None:
    torch.manual_seed(0)
    det = make_detector("foundad", "cnn")  # EfficientNet-Lite0 stages, raw (un-normalised) features
    assert det.config.feature_norm == "channel"
    good = torch.randn(4, 3, IMG, IMG)
    raw = det._raw_features(good)
    torch.testing.assert_close(det.features(good), raw)  # identity until fitted
    stats = det.fit_feature_norm(good)
    flat = raw.reshape(-1, det.feature_dim).double()
    var = flat.var(0, unbiased=False)
    assert stats["tokens"] == 4 * det.num_patches
    expected = (raw - flat.mean(0).float()) / (var + 0.01 * var.mean()).sqrt().float()
    with torch.no_grad():
        f = det.features(good)
        torch.testing.assert_close(f, expected, rtol=1e-4, atol=1e-4)
        assert f.reshape(-1, det.feature_dim).mean(0).abs().max() < 1e-4
        # The residual (patch score) lives in the standardised units.
        torch.testing.assert_close(det.patch_scores(good),
                                   (f - det.projector(f)).pow(2).mean(-1).reshape(4, 1, *det.grid_size))
    # "none" keeps the raw features and has no statistics to fit or save.
    plain = make_detector("foundad", "cnn", feature_norm="none")
    assert plain.fit_feature_norm(good) == {} and "feature_mean" not in plain.state_dict()
    torch.testing.assert_close(plain.features(good), plain._raw_features(good))
    with pytest.raises(ValueError, match="feature_norm must be one of"):
        FoundADConfig(feature_norm="layer")


def test_feature_norm_round_trips_and_old_configs_load_without_it(tmp_path: Path) -> None:
    from edge_ad.methods import load_detector, save_checkpoint

    det = make_detector("foundad", "cnn")
    det.fit_feature_norm(torch.randn(2, 3, IMG, IMG))
    save_checkpoint(det, tmp_path / "run")
    back = load_detector(tmp_path / "run")
    for k in ("feature_mean", "feature_std"):
        torch.testing.assert_close(back.state_dict()[k], det.state_dict()[k])
    # A config saved before the field existed was trained on raw features.
    doc = det.config.to_dict()
    del doc["feature_norm"]
    assert FoundADConfig.from_dict(doc).feature_norm == "none"


def test_top_k_image_score_hand_computed() -> None:
    det = make_detector("foundad", "cnn", top_k=3)  # 8 x 8 patch grid
    h, w = det.grid_size
    patches = torch.zeros(2, 1, h, w)
    patches[0, 0, 0, 0], patches[0, 0, 3, 4], patches[0, 0, 7, 7], patches[0, 0, 5, 5] = 9.0, 6.0, 3.0, 1.0
    patches[1] = 2.0
    patches[1, 0, 2, 2] = 8.0
    score = det.image_score(patches)
    torch.testing.assert_close(score, torch.tensor([(9 + 6 + 3) / 3, (8 + 2 + 2) / 3]))


def test_top_k_is_clamped_to_patch_count_at_build_time() -> None:
    det = make_detector("foundad", top_k=10_000)
    assert det.top_k == det.num_patches == 16
    patches = torch.rand(1, 1, *det.grid_size)
    torch.testing.assert_close(det.image_score(patches), patches.mean().reshape(1))


def test_cnn_layers_fused_on_finest_grid() -> None:
    det = make_detector("foundad", "cnn")  # EfficientNet-Lite0 stages of strides 8 and 16
    assert det.backbone.info.feature_strides == (8, 16)
    assert det.grid_size == (IMG // 8, IMG // 8)
    assert det.feature_dim == sum(det.backbone.info.feature_dims) == 40 + 112
    assert det.projector.embed.in_features == det.projector.head.out_features == 152
    assert det.features(torch.randn(1, 3, IMG, IMG)).shape == (1, 64, 152)


def test_training_forward_and_dropout() -> None:
    det = make_detector("foundad", feature_dropout=0.5)
    clean = torch.randn(2, 3, IMG, IMG)
    context = clean + 0.5 * torch.randn_like(clean)
    det.train()
    pair = det(clean, context)
    assert isinstance(pair, ProjectionPair)
    assert pair.predicted.shape == pair.target.shape == (2, det.num_patches, det.feature_dim)
    assert pair.predicted.requires_grad and not pair.target.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(pair.target, det.features(clean))
    # Dropout is active in training (two calls differ) and off at inference.
    again = det(clean, context)
    assert not torch.allclose(pair.predicted, again.predicted)
    det.eval()
    a, b = det(clean, context), det(clean, context)
    torch.testing.assert_close(a.predicted, b.predicted)
    with torch.no_grad():
        torch.testing.assert_close(a.predicted, det.projector(det.features(context)))
    # Precomputed tokens work as inputs too (e.g. cached encoder outputs).
    with torch.no_grad():
        tokens = det.features(clean)
    from_tokens = det(tokens, tokens)
    torch.testing.assert_close(from_tokens.predicted, det.projector(tokens))
    with pytest.raises(ValueError, match="tokens"):
        det(tokens[:, :5], tokens[:, :5])
    with pytest.raises(ValueError, match="batches differ"):
        det(clean, context[:1])


def test_loss_is_mse_and_trains_only_the_projector() -> None:
    torch.manual_seed(0)
    det = make_detector("foundad")
    det.train()
    clean = torch.randn(4, 3, IMG, IMG)
    context = clean.clone()
    context[:, :, 8:24, 8:24] = torch.randn(4, 3, 16, 16)
    loss = foundad_loss(det, clean, context)
    with torch.no_grad():
        det.eval()
        pair = det(clean, context)
        det.train()
    # Hand-computed MSE (eval mode, no dropout) equals projection_loss.
    torch.testing.assert_close(projection_loss(*pair), ((pair.predicted - pair.target) ** 2).mean())
    loss.backward()
    assert all(p.grad is None for p in det.backbone.parameters())
    assert all(p.grad is not None for p in det.projector.parameters())
    # The generic loop's loss_fn accepts the batch dataclass, a dict and a pair.
    batch = FoundADBatch(clean, context, torch.ones(4, dtype=torch.bool), torch.zeros(4, IMG, IMG, dtype=torch.bool))
    det.eval()
    ref = foundad_loss(det, clean, context)
    for b in (batch, {"clean": clean, "context": context}, (clean, context)):
        torch.testing.assert_close(loss_fn(det, b), ref)
    with pytest.raises(ValueError, match="differ in shape"):
        projection_loss(torch.zeros(1, 2, 3), torch.zeros(1, 3, 3))


def test_a_few_steps_reduce_the_loss() -> None:
    torch.manual_seed(0)
    det = make_detector("foundad", feature_dropout=0.0)
    det.train()
    clean = torch.randn(4, 3, IMG, IMG)
    opt = torch.optim.AdamW(det.trainable_parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = foundad_loss(det, clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_ddp_style_call_goes_through_forward() -> None:
    """loss_fn only calls ``model(...)``, so a wrapper that intercepts forward (like DDP) sees it."""
    det = make_detector("foundad")
    calls = []

    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args):
            calls.append(len(args))
            return self.module(*args)

    x = torch.randn(2, 3, IMG, IMG)
    loss_fn(Wrapper(det), (x, x))
    assert calls == [2]


def test_build_training_batch_on_real_images(real_root: Path) -> None:
    pytest.importorskip("edge_ad.runtime.preprocessing", reason="runtime.preprocess not available yet")
    from edge_ad.methods.foundad import build_training_batch
    from edge_ad.runtime import read_image

    det = make_detector("foundad")
    folder = real_root / "mvtec_hazelnut_256" / "train" / "good"
    images = [read_image(folder / f"{i:03d}.png") for i in range(4)]
    batch = build_training_batch(images, det.preprocess_spec, np.random.default_rng(0), synthetic_prob=0.5)
    assert batch.clean.shape == batch.context.shape == (4, 3, IMG, IMG)
    assert batch.clean.dtype == torch.float32 and batch.masks.shape == (4, IMG, IMG)
    for i in range(4):
        same = torch.equal(batch.clean[i], batch.context[i])
        assert same == (not bool(batch.synthetic[i]))
        assert bool(batch.masks[i].any()) <= bool(batch.synthetic[i])
    again = build_training_batch(images, det.preprocess_spec, np.random.default_rng(0), synthetic_prob=0.5)
    assert torch.equal(again.context, batch.context)
    all_clean = build_training_batch(images, det.preprocess_spec, np.random.default_rng(0), synthetic_prob=0.0)
    assert torch.equal(all_clean.context, all_clean.clean) and not all_clean.synthetic.any()
    loss = loss_fn(det, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_fit_mode_and_registry_build() -> None:
    backbone = make_backbone("vit")
    det = build_detector("foundad", backbone=backbone, projector_dim=16, projector_depth=1, projector_heads=2)
    assert isinstance(det, FoundAD) and det.fit_mode == "gradient"
    assert det.config.backbone.name == "dinov3_vits16" and det.config.backbone.layers == (1,)
