"""Mask helpers shared by synthesis, training and evaluation."""
from __future__ import annotations

import numpy as np


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask (H, W) to ``size`` = (h, w), pixel-centre sampling.

    Pixel-centre sampling (``src = floor((dst + 0.5) * H / h)``) keeps thin defects centred, where
    corner-aligned nearest neighbour shifts them by up to one source pixel.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    h, w = size
    ys = np.minimum(((np.arange(h) + 0.5) * mask.shape[0] / h).astype(np.int64), mask.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * mask.shape[1] / w).astype(np.int64), mask.shape[1] - 1)
    return mask[ys[:, None], xs[None, :]].astype(bool)
