"""VisualAD training objective and AdamW parameter groups (supervised / zero-shot protocol).

Per tapped layer, the upsampled score map ``m_l`` (cosine difference) becomes a probability
``sigmoid(m_l)``; focal + dice against the ground-truth mask train the segmentation. The image
logit (top-1 % mean of ``sum_l m_l``) gets a BCE against the label, and a margin loss
``clamp(cos(t_a, t_n) + margin, 0)`` keeps the two (enhanced, deepest-layer) tokens apart:

    loss = sum_l [focal(sigmoid(m_l), mask) + dice(sigmoid(m_l), mask)] + BCE(score, label) + margin

(the public reference code's ``train.py``, weights all 1). ``loss_fn(model, batch)`` is what the
supervised trainer calls; ``param_groups(detector, lr)`` gives the tokens lr ``lr`` with a
per-token gradient clip and everything else ``lr * rest_lr_ratio``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["binary_dice_loss", "binary_focal_loss", "loss_fn", "param_groups", "token_margin_loss", "visualad_loss"]

_EPS = 1e-5  # probability smoothing of the focal loss (log(0) guard), as AnomalyCLIP-style losses


def binary_focal_loss(prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Focal loss ``-(1 - p_t)^gamma log p_t`` averaged over pixels.

    Args:
        prob: (B, H, W) or (B, 1, H, W) anomaly probability in [0, 1].
        target: same shape, {0, 1} mask (1 = anomalous pixel).
    """
    target = target.to(prob.dtype)
    p_t = prob * target + (1.0 - prob) * (1.0 - target)
    # Smoothed one-hot as the reference: the true class weighs 1 - eps, the other eps, plus eps.
    p_t = p_t * (1.0 - _EPS) + (1.0 - p_t) * _EPS + _EPS
    return (-((1.0 - p_t) ** gamma) * torch.log(p_t)).mean()


def binary_dice_loss(prob: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 |p g| + s) / (|p| + |g| + s)`` per image, averaged over the batch (s = 1 keeps good
    images, whose mask is empty, from dividing by zero and rewards an all-zero prediction there)."""
    p = prob.flatten(1)
    g = target.to(prob.dtype).flatten(1)
    dice = (2.0 * (p * g).sum(1) + smooth) / (p.sum(1) + g.sum(1) + smooth)
    return 1.0 - dice.mean()


def token_margin_loss(anomaly: torch.Tensor, normal: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """``mean(clamp(cos(t_a, t_n) + margin, 0))`` over the batch; tokens (B, C)."""
    cos = F.cosine_similarity(anomaly, normal, dim=-1, eps=1e-8)
    return torch.clamp(cos + margin, min=0.0).mean()


def visualad_loss(
    outputs: Any, masks: torch.Tensor, labels: torch.Tensor, margin: float = 0.5
) -> tuple[torch.Tensor, dict[str, float]]:
    """Total loss and its parts for one batch.

    Args:
        outputs: :class:`~edge_ad.methods.visualad.model.TrainOutputs`.
        masks: (B, 1, H, W) or (B, H, W) float {0, 1} masks at input size.
        labels: (B,) float {0, 1} image labels (1 = anomalous).
        margin: token margin.

    Returns:
        (scalar loss, {"seg", "image", "margin"} as floats for logging). Computed in float32.
    """
    maps = outputs.layer_maps.float()  # (B, L, H, W)
    if masks.ndim == 3:
        masks = masks.unsqueeze(1)
    if masks.shape[0] != maps.shape[0] or tuple(masks.shape[-2:]) != tuple(maps.shape[-2:]):
        raise ValueError(
            f"masks {tuple(masks.shape)} must be (B, 1, H, W) at the detector's input size "
            f"{tuple(maps.shape[-2:])} with B = {maps.shape[0]}"
        )
    target = (masks.float() > 0.5).float()  # binarised as the reference (resized masks are soft)
    probs = torch.sigmoid(maps)
    seg = maps.new_zeros(())
    for layer in range(maps.shape[1]):
        p = probs[:, layer : layer + 1]
        seg = seg + binary_focal_loss(p, target) + binary_dice_loss(p, target)
    image = F.binary_cross_entropy_with_logits(outputs.score.float(), labels.float().reshape(-1))
    sep = token_margin_loss(outputs.anomaly_token.float(), outputs.normal_token.float(), margin)
    total = seg + image + sep
    return total, {"seg": float(seg.detach()), "image": float(image.detach()), "margin": float(sep.detach())}


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the detector in .module


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """``(model, SupervisedBatch) -> scalar loss`` for the supervised trainer.

    ``batch`` needs ``images`` (B, 3, H, W), ``masks`` (B, 1, H, W) and ``labels`` (B,) (an
    ``edge_ad.training.supervised.SupervisedBatch`` or a dict with those keys). The module itself
    is called, so a DDP wrapper sees the forward.
    """
    get = batch.get if isinstance(batch, dict) else lambda k: getattr(batch, k)
    outputs = model(get("images"), train_outputs=True)
    total, _ = visualad_loss(outputs, get("masks"), get("labels"), _unwrap(model).config.margin)
    return total


def param_groups(detector: nn.Module, lr: float) -> list[dict[str, Any]]:
    """AdamW groups: each token alone at ``lr`` with ``grad_clip = token_grad_clip`` (the reference
    clips the two tokens' gradients separately), everything else at ``lr * rest_lr_ratio``."""
    detector = _unwrap(detector)
    cfg = detector.config
    groups: list[dict[str, Any]] = [
        {"params": [p], "lr": float(lr), "grad_clip": cfg.token_grad_clip} for p in detector.token_parameters()
    ]
    rest = detector.head_parameters()
    if rest:
        groups.append({"params": rest, "lr": float(lr) * cfg.rest_lr_ratio})
    return groups
