"""AVA-DINO training objective (the reference's weights).

``L = 0.5 (focal + dice)(cross-modal map, mask) + 0.25 (focal + dice)(calibration map, mask)
+ 0.25 CE(global logits, label) + 0.1 [MSE(w_n, 1 - y) + MSE(w_a, y)]``

with maps and routing weights averaged over the tapped blocks (as the reference does before the
losses). The supervised trainer (``edge_ad.training.supervised``) calls :func:`loss_fn` with a
``SupervisedBatch`` (images, masks, labels, categories).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .model import AVADinoOutputs

__all__ = ["avadino_loss", "dice_loss", "focal_loss", "loss_fn", "routing_loss"]

_EPS = 1e-6


def focal_loss(prob: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Binary focal loss on probabilities, mean over pixels.

    Equivalent to the reference's two-channel focal loss on ``[1 - p, p]``: ``-(1 - p_t)^gamma
    log p_t`` with ``p_t`` the probability of the true class.

    Args:
        prob: (B, 1, H, W) anomaly probability in [0, 1].
        mask: (B, 1, H, W) {0, 1} ground truth.
    """
    p_true = torch.where(mask > 0.5, prob, 1.0 - prob).clamp(_EPS, 1.0)
    return (-(1.0 - p_true).pow(gamma) * torch.log(p_true)).mean()


def dice_loss(prob: torch.Tensor, mask: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 sum(p m) + 1) / (sum p + sum m + 1)`` per image, averaged over the batch; (B, 1, H, W) inputs."""
    p = prob.flatten(1)
    m = mask.flatten(1)
    dice = (2.0 * (p * m).sum(1) + smooth) / (p.sum(1) + m.sum(1) + smooth)
    return (1.0 - dice).mean()


def routing_loss(routing: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``MSE(w_n, 1 - y) + MSE(w_a, y)``: the normal branch for good images, the anomaly branch for
    defective ones; routing (B, 2), labels (B,) in {0, 1}."""
    return F.mse_loss(routing[:, 0], 1.0 - labels) + F.mse_loss(routing[:, 1], labels)


def avadino_loss(out: AVADinoOutputs, masks: torch.Tensor, labels: torch.Tensor, *, seg_weight: float = 0.5,
                 calibration_weight: float = 0.25, global_weight: float = 0.25, routing_weight: float = 0.1,
                 focal_gamma: float = 2.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its parts (``seg``, ``calibration``, ``global``, ``routing``), in float32.

    Args:
        out: :class:`AVADinoOutputs` of a batch.
        masks: (B, 1, H, W) {0, 1} at input size; labels: (B,) {0, 1} (1 = anomalous).
    """
    if masks.shape != out.cross_modal.shape:
        raise ValueError(f"masks must be {tuple(out.cross_modal.shape)} (B, 1, H, W) at input size, got {tuple(masks.shape)}")
    masks = (masks.float() > 0.5).float()
    labels = labels.float().reshape(-1)
    cm, cal = out.cross_modal.float(), out.calibration.float()
    parts = {
        "seg": focal_loss(cm, masks, focal_gamma) + dice_loss(cm, masks),
        "calibration": focal_loss(cal, masks, focal_gamma) + dice_loss(cal, masks),
        "global": F.cross_entropy(out.global_logits.float(), labels.long()),
        "routing": routing_loss(out.routing.float(), labels),
    }
    total = (seg_weight * parts["seg"] + calibration_weight * parts["calibration"]
             + global_weight * parts["global"] + routing_weight * parts["routing"])
    return total, parts


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """``(model, SupervisedBatch) -> scalar loss`` for the supervised trainer.

    ``model`` may be a ``DistributedDataParallel`` wrapper: the prompt embeddings of each sample's
    category are looked up on the wrapped detector, the forward goes through the wrapper.
    """
    detector = getattr(model, "module", model)
    text = detector.text_for_categories(list(batch.categories)).to(batch.images.device)
    out = model(batch.images, train_outputs=True, text=text)
    cfg = detector.config
    total, _ = avadino_loss(out, batch.masks, batch.labels, seg_weight=cfg.seg_weight,
                            calibration_weight=cfg.calibration_weight, global_weight=cfg.global_weight,
                            routing_weight=cfg.routing_weight, focal_gamma=cfg.focal_gamma)
    return total
