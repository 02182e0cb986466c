"""Distillation objective of the ``student`` method.

For one batch of images (good ones and synthetic anomalies), with the frozen teacher's outputs
on the *same* augmented images as targets:

``loss = mse_z(map) + score_weight * mse_z(score) + feature_weight * (1 - cos(adapter(f_s), f_t))``

* ``mse_z``: squared error measured in the teacher's normalised units (divided by the teacher's
  good-image standard deviation), so the weights mean the same for every teacher.
* The map term compares full-resolution maps (upsampled + smoothed like at inference) at the
  student's input size: the student is judged on what it will output.
* The feature term (per patch, averaged) pulls the student's adapter output towards the
  teacher's fused features resampled to the student grid: ``1 - cos`` (``feature_loss="cosine"``,
  ignores the teacher's feature scale, which differs wildly between backbones) or the squared
  error divided by the teacher features' variance (``"mse"``, scale-free too, and what a
  bank head needs: its distances depend on the scale the adapter predicts).

``loss_fn(model, batch)`` calls the module (``model(images, True)``), so it works on a
``DistributedDataParallel`` wrapper in :func:`edge_ad.training.loop.fit`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StudentBatch", "distillation_loss", "loss_fn"]


@dataclass
class StudentBatch:
    """One distillation batch (all tensors on the training device).

    Attributes:
        images: (B, 3, H, W) float32 images normalised with the *student's* preprocess spec.
        target_map: (B, 1, H, W) teacher raw maps resampled to the student's input size.
        target_score: (B,) teacher raw image scores.
        target_features: (B, C_t, h, w) teacher fused features on the student grid, or None.
        map_scale, score_scale: teacher good-image standard deviations (raw units) for ``mse_z``.
        feature_weight, score_weight: loss weights (see the module docstring).
        feature_loss: ``"cosine"`` or ``"mse"``.
        student_features: (B, C_s, h, w) the images' frozen student-backbone features when
            precomputed (the model then skips its backbone), or None.
        feature_norm: teacher features' variance: mean squared distance of a good patch feature
            to the mean feature (``"mse"`` divides by it).
    """

    images: torch.Tensor
    target_map: torch.Tensor
    target_score: torch.Tensor
    target_features: torch.Tensor | None
    map_scale: float
    score_scale: float
    feature_weight: float = 0.5
    score_weight: float = 0.1
    feature_loss: str = "cosine"
    feature_norm: float = 1.0
    student_features: torch.Tensor | None = None


def distillation_loss(model: nn.Module, batch: StudentBatch) -> torch.Tensor:
    """Scalar loss of ``model`` (a StudentDetector or a DDP wrapper of one) on ``batch``."""
    out = model(batch.images, True, batch.student_features)
    if out.anomaly_map.shape != batch.target_map.shape:
        raise ValueError(f"student map {tuple(out.anomaly_map.shape)} vs target {tuple(batch.target_map.shape)}: "
                         "resample the teacher map to the student's input size")
    map_term = F.mse_loss(out.anomaly_map.float() / batch.map_scale, batch.target_map.float() / batch.map_scale)
    score_term = F.mse_loss(out.score.float() / batch.score_scale, batch.target_score.float() / batch.score_scale)
    loss = map_term + batch.score_weight * score_term
    if batch.target_features is not None and batch.feature_weight > 0:
        if out.aligned.shape != batch.target_features.shape:
            raise ValueError(f"adapter output {tuple(out.aligned.shape)} vs teacher features "
                             f"{tuple(batch.target_features.shape)}: adapter_dim must equal the teacher's feature width")
        if batch.feature_loss == "mse":
            err = (out.aligned.float() - batch.target_features.float()).pow(2).sum(dim=1).mean()
            loss = loss + batch.feature_weight * err / batch.feature_norm
        else:
            cos = F.cosine_similarity(out.aligned.float(), batch.target_features.float(), dim=1, eps=1e-6)
            loss = loss + batch.feature_weight * (1.0 - cos).mean()
    return loss


def loss_fn(model: nn.Module, batch: StudentBatch) -> torch.Tensor:
    """``(model, batch) -> loss`` for :func:`edge_ad.training.loop.fit`."""
    return distillation_loss(model, batch)
