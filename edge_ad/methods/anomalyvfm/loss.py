"""AnomalyVFM training objective: confidence-weighted pixel loss + image focal loss.

Per pixel (logits upsampled bilinearly to the mask's input resolution, so the loss sees the same
map the inference graph resizes):

* base loss ``L_base = focal_weight * focal(m, M) + |clip(sigma(m), low, high) - M|`` (5, 0.1, 0.9);
  the clip stops the L1 term from pushing confident pixels further (it has zero gradient beyond
  the clip bounds);
* confidence ``C = 1 + exp(c)`` >= 1 from the confidence logit ``c``;
  ``L_seg = mean(C * L_base - alpha * log C)`` (alpha 0.1): the model may down-weight pixels it
  finds ambiguous (small C) at a log-penalty, which tolerates label noise of synthetic masks. For
  a fixed ``L_base`` the optimum is ``C = alpha / L_base``;

Per image: ``L_img = focal(image_logit, label)`` (alpha 0.25, gamma 2). Total ``L_seg + L_img``.

The trainer calls :func:`loss_fn` ``(model, SupervisedBatch) -> scalar``; it calls the module
(``model(images, train_outputs=True)``) so a DDP wrapper sees the forward.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import AnomalyVFMConfig

__all__ = ["CONF_LOGIT_MAX", "anomalyvfm_loss", "focal_loss_with_logits", "loss_fn"]

#: Upper clamp of the confidence logit inside the loss: exp(10) ~ 2.2e4 keeps ``C * L_base`` finite
#: in float16 / bfloat16 autocast; the optimum ``C = alpha / L_base`` is far below it in practice.
CONF_LOGIT_MAX = 10.0


def focal_loss_with_logits(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
                           gamma: float = 2.0) -> torch.Tensor:
    """Element-wise binary focal loss (Lin et al. 2017), same shape as ``logits``.

    ``-a_t (1 - p_t)^gamma log p_t`` with ``p_t = p`` where target is 1, ``1 - p`` where 0, and
    ``a_t = alpha`` / ``1 - alpha``. Computed from logits (stable log-sigmoid). ``alpha < 0``
    disables the class weighting. Soft targets in [0, 1] interpolate both terms.
    """
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t).pow(gamma)
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss


def anomalyvfm_loss(
    mask_logit: torch.Tensor,
    conf_logit: torch.Tensor,
    image_logit: torch.Tensor,
    masks: torch.Tensor,
    labels: torch.Tensor,
    config: AnomalyVFMConfig,
) -> dict[str, torch.Tensor]:
    """All loss terms, in float32.

    Args:
        mask_logit, conf_logit: (B, 1, h', w') decoder logits.
        image_logit: (B,) image logit.
        masks: (B, 1, H, W) ground truth in {0, 1} (soft values allowed) at input size.
        labels: (B,) image labels in {0, 1}.
        config: loss weights (``focal_*``, ``l1_clip``, ``confidence_alpha``, ``use_confidence``).

    Returns:
        ``{"loss", "seg", "img", "base", "confidence"}`` scalars; ``confidence`` is mean C (a log
        value, no gradient needed).
    """
    if masks.ndim != 4 or masks.shape[1] != 1:
        raise ValueError(f"masks must be (B, 1, H, W), got {tuple(masks.shape)}")
    if labels.shape != image_logit.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match image logits {tuple(image_logit.shape)}")
    size = tuple(masks.shape[-2:])
    m = mask_logit.float()
    c = conf_logit.float()
    if tuple(m.shape[-2:]) != size:
        m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        c = F.interpolate(c, size=size, mode="bilinear", align_corners=False)
    target = masks.float()
    low, high = config.l1_clip
    base = config.focal_weight * focal_loss_with_logits(m, target, config.focal_alpha, config.focal_gamma)
    base = base + (torch.sigmoid(m).clamp(low, high) - target).abs()
    c = c.clamp(max=CONF_LOGIT_MAX)
    if config.use_confidence:
        confidence = 1.0 + torch.exp(c)
        # log C = log(1 + exp(c)) = softplus(c), exact and stable for negative c.
        seg = (confidence * base - config.confidence_alpha * F.softplus(c)).mean()
    else:
        confidence = torch.ones_like(c)
        seg = base.mean()
    img = focal_loss_with_logits(image_logit.float(), labels.float(), config.focal_alpha, config.focal_gamma).mean()
    return {"loss": seg + img, "seg": seg, "img": img, "base": base.mean().detach(),
            "confidence": confidence.mean().detach()}


def _detector(model: nn.Module) -> Any:
    return getattr(model, "module", model)  # DDP wraps the detector in .module


def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
    """``(model, SupervisedBatch) -> scalar`` for the supervised trainer.

    ``batch`` needs ``images`` (B, 3, H, W), ``masks`` (B, 1, H, W) and ``labels`` (B,)
    (:class:`edge_ad.training.supervised.SupervisedBatch`).
    """
    out = model(batch.images, train_outputs=True)
    terms = anomalyvfm_loss(out.mask_logit, out.conf_logit, out.image_logit, batch.masks, batch.labels,
                            _detector(model).config)
    return terms["loss"]
