"""FoundAD training objective and batch builder.

The projector learns ``projector(f(context)) ~= f(clean)`` where ``context`` is the clean image or,
with probability ``synthetic_prob``, a CutPaste-corrupted copy of it: features of good patches must
stay put and features of corrupted patches must be pulled back to what the good image had there.

How a generic loop (``edge_ad.training.loop.fit``) drives FoundAD::

    cfg = detector.config
    rng_for = lambda step, rank: np.random.default_rng(step_seed(seed, step, rank))
    def make_batch(step, rank):
        images = pick cfg.batch_size uint8 RGB training images (augmented) for this step
        return build_training_batch(images, detector.preprocess_spec, rng_for(step, rank),
                                    synthetic_prob=cfg.synthetic_prob).to(device)
    fit(detector, make_batch, loss_fn, FitConfig(steps=cfg.steps, lr=cfg.lr,
        weight_decay=cfg.weight_decay), run_dir, device=device)
    detector.fit_normalization(good_images)      # then save_checkpoint(detector, run_dir, ...)

``loss_fn`` calls the module (``model(clean, context)``), so it works on a DDP wrapper too.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FoundADBatch", "build_training_batch", "foundad_loss", "loss_fn", "projection_loss"]


def projection_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every token and channel (computed in float32 under autocast).

    Args:
        predicted: (B, N, C) projector output.
        target: (B, N, C) clean-image features (no gradient).
    """
    if predicted.shape != target.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} differ in shape")
    return F.mse_loss(predicted.float(), target.detach().float())


def foundad_loss(model: nn.Module, clean: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """FoundAD loss for one batch.

    Args:
        model: a :class:`~edge_ad.methods.foundad.model.FoundAD` (or a DDP wrapper of one).
        clean: (B, 3, H, W) normalised clean images, or their backbone tokens (B, N, C) (e.g. cached
            with ``detector.features``): the target.
        context: the same for the projector's input (clean or synthetic images / tokens); None =
            ``clean``.

    Returns:
        Scalar MSE between ``projector(dropout(f(context)))`` and ``f(clean)``.
    """
    out = model(clean, clean if context is None else context)
    return projection_loss(out.predicted, out.target)


@dataclass
class FoundADBatch:
    """One training batch.

    Attributes:
        clean: (B, 3, H, W) float32 normalised clean images (the target).
        context: (B, 3, H, W) float32 normalised projector inputs (clean or CutPaste).
        synthetic: (B,) bool, True where ``context`` is a synthetic anomaly.
        masks: (B, H, W) bool CutPaste masks at input resolution (all False for clean samples);
            FoundAD does not use them, they are there for logging / other methods.
    """

    clean: torch.Tensor
    context: torch.Tensor
    synthetic: torch.Tensor
    masks: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "FoundADBatch":
        return FoundADBatch(*(t.to(device, non_blocking=non_blocking) for t in
                              (self.clean, self.context, self.synthetic, self.masks)))


def loss_fn(model: nn.Module, batch: FoundADBatch | dict[str, Any] | Sequence[torch.Tensor]) -> torch.Tensor:
    """``(model, batch) -> loss`` for the generic loop; ``batch`` is a :class:`FoundADBatch`, a dict
    with ``clean`` / ``context`` or a ``(clean, context)`` pair."""
    if isinstance(batch, FoundADBatch):
        clean, context = batch.clean, batch.context
    elif isinstance(batch, dict):
        clean, context = batch["clean"], batch.get("context")
    else:
        clean, context = batch[0], batch[1]
    return foundad_loss(model, clean, context)


def build_training_batch(
    images: Sequence[np.ndarray],
    spec: Any,
    rng: np.random.Generator,
    *,
    synthetic_prob: float = 0.5,
    cutpaste: Any = None,
    foregrounds: Sequence[np.ndarray | None] | None = None,
) -> FoundADBatch:
    """Turn uint8 RGB images into a :class:`FoundADBatch`, on the CPU.

    Each sample's context is a CutPaste copy with probability ``synthetic_prob`` (drawn per sample
    from ``rng``; the reference code draws once per batch, which is the same in expectation).
    Pixels go through :func:`edge_ad.runtime.preprocessing.preprocess_batch` with ``spec`` (the
    detector's ``preprocess_spec``), the same function evaluation and the device use. Images are
    cut and pasted at their own resolution before resizing, so the defect is resampled exactly
    like a real one.

    Args:
        images: uint8 (H, W, 3) RGB images (any, possibly different, sizes).
        spec: the detector's :class:`~edge_ad.runtime.preprocess_spec.PreprocessSpec`.
        rng: random source for the synthetic choice and CutPaste.
        synthetic_prob: probability of a synthetic context per sample.
        cutpaste: a :class:`~edge_ad.synth.CutPaste` (default settings when None).
        foregrounds: optional cached foreground masks, one per image (None entries = compute).
    """
    from edge_ad.data.masks import resize_mask
    from edge_ad.runtime.preprocessing import preprocess_batch
    from edge_ad.synth import CutPaste

    if len(images) == 0:
        raise ValueError("build_training_batch needs at least one image")
    cutpaste = cutpaste or CutPaste()
    contexts, synthetic, masks = [], [], []
    for i, image in enumerate(images):
        if rng.random() < synthetic_prob:
            fg = foregrounds[i] if foregrounds is not None else None
            aug, mask = cutpaste(image, rng, foreground=fg)
            contexts.append(aug)
            synthetic.append(True)
        else:
            contexts.append(image)
            mask = np.zeros(image.shape[:2], dtype=bool)
            synthetic.append(False)
        masks.append(resize_mask(mask, (spec.height, spec.width)))
    clean = torch.from_numpy(np.ascontiguousarray(preprocess_batch(list(images), spec, color_order="rgb")))
    context = torch.from_numpy(np.ascontiguousarray(preprocess_batch(contexts, spec, color_order="rgb")))
    return FoundADBatch(
        clean=clean.float(),
        context=context.float(),
        synthetic=torch.tensor(synthetic, dtype=torch.bool),
        masks=torch.from_numpy(np.stack(masks)),
    )
