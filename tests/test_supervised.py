"""The zero-shot protocol (edge_ad.training.supervised), the loop's accumulation / param groups, Perlin anomalies.

A small supervised detector defined here (a linear pixel classifier on real EfficientNet-Lite0
features) stands in for the zero-shot methods, so the protocol is tested on its own: it must learn
synthetic anomalies on real images, hold data back, and resume exactly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edge_ad.methods.base import AnomalyDetector, BackboneSpec, MethodConfig
from edge_ad.synth import PerlinAnomaly, perlin_noise
from edge_ad.training.loop import LOSS_CURVE_FILE, FitConfig, fit
from edge_ad.training.supervised import (
    SupervisedBatch,
    evaluate_holdout,
    fit_supervised,
    good_image_batches,
    load_auxiliary,
    resolve_categories,
)

CATS = ["magnetic_tile", "mvtec_transistor_256"]


@dataclass
class PixelHeadConfig(MethodConfig):
    steps: int = 40
    batch_size: int = 4
    accumulate: int = 1
    lr: float = 3e-2
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 1.0


class PixelHead(AnomalyDetector):
    """Linear pixel classifier on frozen features: the smallest supervised detector."""

    method = "pixel_head_test"
    config_class = PixelHeadConfig
    fit_mode = "supervised"

    def __init__(self, config: PixelHeadConfig, backbone=None) -> None:
        super().__init__(config, backbone)
        self.head = nn.Conv2d(self.feature_dim, 1, 1)

    def forward(self, images: torch.Tensor, train_outputs: bool = False):
        if train_outputs:
            return self.head(self.extract_features(images))
        return super().forward(images)

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.extract_features(images)))

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:
        return patch_scores.flatten(1).amax(1)


def pixel_loss(model: nn.Module, batch: SupervisedBatch) -> torch.Tensor:
    logits = model(batch.images, train_outputs=True)
    target = F.adaptive_max_pool2d(batch.masks, logits.shape[-2:])  # a cell is defective if any pixel is
    return F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(4.0))


def make_detector(seed: int = 0) -> PixelHead:
    torch.manual_seed(seed)
    cfg = PixelHeadConfig(backbone=BackboneSpec("efficientnet_lite0", layers=(2,), img_size=(64, 64), pretrained=True),
                          smoothing_sigma=1.0)
    return PixelHead(cfg)


def test_load_auxiliary_splits_deterministically_and_disjointly(real_root):
    a = load_auxiliary(real_root, CATS, holdout_fraction=0.25, seed=3)
    b = load_auxiliary(real_root, CATS, holdout_fraction=0.25, seed=3)
    assert [i.record.path for i in a.annotated] == [i.record.path for i in b.annotated]
    train = {i.record.path for i in a.annotated + a.good}
    hold = {i.record.path for i in a.holdout_annotated + a.holdout_good}
    assert train and hold and not train & hold
    # both classes are held back per category
    for cat in CATS:
        labels = {i.record.label for i in a.holdout_annotated if i.category == cat}
        assert labels == {0, 1}, (cat, labels)
    assert a.categories == CATS


def test_resolve_categories_errors_name_the_available_ones(real_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="magnetic_tile"):
        resolve_categories(real_root, ["no_such_category"])
    with pytest.raises(FileNotFoundError, match="no MVTec-layout categories"):
        resolve_categories(tmp_path, None)
    pairs = resolve_categories([tmp_path, real_root], ["magnetic_tile"])
    assert pairs == [(real_root, "magnetic_tile")]


def test_batches_are_step_addressed_and_masks_match_labels(real_root):
    from edge_ad.training.supervised import _BatchMaker

    det = make_detector()
    aux = load_auxiliary(real_root, CATS, seed=0)
    maker = _BatchMaker(det, aux, batch_size=6, synthetic_fraction=0.5, seed=1, device=torch.device("cpu"))
    b1, b2 = maker(7, 0), maker(7, 0)
    assert torch.equal(b1.images, b2.images) and torch.equal(b1.masks, b2.masks)
    assert b1.images.shape == (6, 3, 64, 64) and b1.masks.shape == (6, 1, 64, 64)
    assert set(torch.unique(b1.masks).tolist()) <= {0.0, 1.0}
    assert torch.equal(b1.labels, (b1.masks.flatten(1).amax(1) > 0).float())
    assert not torch.equal(maker(8, 0).images, b1.images)
    with pytest.raises(ValueError, match="synthetic_fraction"):
        _BatchMaker(det, aux, batch_size=2, synthetic_fraction=1.5, seed=0, device=torch.device("cpu"))
    # synthetic-only batches: every sample anomalous by default, clean negatives when asked
    only = _BatchMaker(det, aux, batch_size=8, synthetic_fraction=1.0, seed=2, device=torch.device("cpu"))
    assert all(only(s, 0).labels.min() == 1 for s in range(3))
    mixed = _BatchMaker(det, aux, batch_size=8, synthetic_fraction=1.0, seed=2, device=torch.device("cpu"),
                        anomaly_prob=0.5)
    labels = torch.cat([mixed(s, 0).labels for s in range(3)])
    assert 0 < labels.sum() < len(labels)
    with pytest.raises(ValueError, match="synthetic_anomaly_prob"):
        _BatchMaker(det, aux, batch_size=2, synthetic_fraction=1.0, seed=0, device=torch.device("cpu"), anomaly_prob=0)


def test_protocol_learns_synthetic_anomalies_and_resumes_exactly(real_root, tmp_path):
    aux = load_auxiliary(real_root, CATS, seed=0)
    det = make_detector()
    before = evaluate_holdout(det, aux, seed=0)["synthetic"]["pixel_auroc"]
    record = fit_supervised(det, aux, tmp_path / "full", loss_fn=pixel_loss, synthetic_fraction=1.0, seed=0,
                            device=torch.device("cpu"), progress=False)
    det.fit_normalization(good_image_batches(det, aux))
    after = evaluate_holdout(det, aux, seed=0)
    assert after["synthetic"]["n"] == 3 * len(aux.holdout_good)  # each clean + 2 synthetic anomalies
    assert after["synthetic"]["anomalous"] == 2 * len(aux.holdout_good)
    # A linear head on real features learns synthetic defects well above chance and above its start
    # (measured: 0.56 -> 0.77 pixel AUROC with this seed).
    assert after["synthetic"]["pixel_auroc"] > 0.7 and after["synthetic"]["pixel_auroc"] > before + 0.1, (before, after)
    assert after["synthetic"]["image_auroc"] is not None
    assert after["real"]["n"] == len(aux.holdout_annotated) and after["real"]["pixel_auroc"] is not None
    curve = (tmp_path / "full" / LOSS_CURVE_FILE).read_text().splitlines()
    assert curve[0] == "step,loss" and len(curve) == 1 + len(record["fit"]["losses"])

    # interrupted at step 20 then resumed == uninterrupted
    half = make_detector()
    part = tmp_path / "part"
    fit_supervised(half, aux, part, loss_fn=pixel_loss, synthetic_fraction=1.0, seed=0, steps=20,
                   device=torch.device("cpu"), progress=False)
    resumed = make_detector()
    fit_supervised(resumed, aux, part, loss_fn=pixel_loss, synthetic_fraction=1.0, seed=0,
                   device=torch.device("cpu"), resume=True, progress=False)
    for (n, p), (_, q) in zip(det.head.named_parameters(), resumed.head.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), n


def test_fit_supervised_rejects_configs_without_training_fields(real_root, tmp_path):
    aux = load_auxiliary(real_root, ["magnetic_tile"], seed=0)

    class Bare(PixelHead):
        config_class = MethodConfig

    det = Bare(MethodConfig(backbone=BackboneSpec("efficientnet_lite0", layers=(2,), img_size=(64, 64))))
    with pytest.raises(TypeError, match="supervised training fields"):
        fit_supervised(det, aux, tmp_path, loss_fn=pixel_loss, device=torch.device("cpu"), progress=False)


# ---------------------------------------------------------------------------------- loop features


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.zeros(3))
        self.b = nn.Parameter(torch.zeros(3))


def _quad_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return ((model.a - batch) ** 2).sum() + 100 * ((model.b - batch) ** 2).sum()


def test_accumulation_averages_micro_batches(tmp_path):
    targets = {i: torch.full((3,), float(i)) for i in range(8)}
    make = lambda step, rank: targets[step]  # noqa: E731 - micro-batch k of step s is make(s * n + k)
    m1 = Quadratic()
    fit(m1, make, _quad_loss, FitConfig(steps=1, lr=0.1, weight_decay=0, accumulate=4, amp=False), tmp_path / "a",
        device=torch.device("cpu"), progress=False)
    # one step on the mean loss of micro-batches 0..3: AdamW's first step moves every coordinate by lr
    # in the direction of the mean gradient (towards the mean target 1.5).
    assert torch.allclose(m1.a, torch.full((3,), 0.1), atol=1e-5)
    with pytest.raises(ValueError, match="accumulate"):
        FitConfig(accumulate=0)


def test_param_groups_lr_and_per_group_clip(tmp_path):
    model = Quadratic()
    seen = {}

    def groups(m):
        return [{"params": [m.a], "lr": 0.5, "grad_clip": 1e-3}, {"params": [m.b], "lr": 0.01}]

    def loss(m, batch):
        value = _quad_loss(m, batch)
        seen["called"] = True
        return value

    fit(model, lambda s, r: torch.ones(3), loss, FitConfig(steps=1, lr=1.0, weight_decay=0, amp=False), tmp_path,
        device=torch.device("cpu"), progress=False, param_groups=groups)
    # AdamW's first step is lr * sign(grad) regardless of clipping: the group lrs are what moved them
    assert torch.allclose(model.a, torch.full((3,), 0.5), atol=1e-4)
    assert torch.allclose(model.b, torch.full((3,), 0.01), atol=1e-4)
    with pytest.raises(ValueError, match="left trainable parameters out"):
        fit(Quadratic(), lambda s, r: torch.ones(3), _quad_loss, FitConfig(steps=1, amp=False), tmp_path / "x",
            device=torch.device("cpu"), progress=False, param_groups=lambda m: [{"params": [m.a]}])


# ---------------------------------------------------------------------------------- Perlin anomalies


def test_perlin_mask_is_exactly_the_changed_pixels_inside_the_foreground(real_root):
    from edge_ad.data import MVTecDataset
    from edge_ad.synth import foreground_mask

    image = MVTecDataset(real_root, "mvtec_hazelnut_256", "train")[0].image
    fg = foreground_mask(image)
    rng = np.random.default_rng(0)
    for texture in ("self", "noise"):
        for _ in range(5):
            out, mask = PerlinAnomaly(texture=texture)(image, rng, foreground=fg)
            assert out.dtype == np.uint8 and out.shape == image.shape
            assert np.array_equal((out != image).any(-1), mask)
            assert mask.any() and not (mask & ~fg).any()
    a = PerlinAnomaly()(image, np.random.default_rng(5))
    b = PerlinAnomaly()(image, np.random.default_rng(5))
    assert np.array_equal(a[0], b[0])


def test_perlin_noise_is_smooth_and_bad_input_is_rejected():
    field = perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert field.shape == (64, 64) and field.dtype == np.float32
    # neighbouring pixels differ far less than the field's range: noise, not white noise
    assert np.abs(np.diff(field, axis=1)).mean() < 0.05 * np.ptp(field)
    with pytest.raises(ValueError, match="uint8"):
        PerlinAnomaly()(np.zeros((8, 8, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="threshold"):
        PerlinAnomaly(threshold=1.5)


def test_train_api_rejects_zero_shot_arguments_for_few_shot_methods(real_root, tmp_path):
    from edge_ad.training import train

    with pytest.raises(ValueError, match="zero-shot"):
        train("knn", "efficientnet_lite0", real_root, "magnetic_tile", tmp_path / "r", categories=["x"])
    with pytest.raises(ValueError, match="category"):
        train("knn", "efficientnet_lite0", real_root, None, tmp_path / "r")


def test_train_log_json_is_serialisable(real_root, tmp_path):
    aux = load_auxiliary(real_root, ["magnetic_tile"], seed=0)
    det = make_detector()
    rec = fit_supervised(det, aux, tmp_path, loss_fn=pixel_loss, synthetic_fraction=1.0, steps=2, seed=0,
                         device=torch.device("cpu"), progress=False)
    json.dumps(rec)
    assert rec["optimizer"]["effective_batch"] == 4
