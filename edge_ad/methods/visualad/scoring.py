"""Exportable map post-processing of VisualAD: scipy-style Gaussian smoothing and top-1 % mean.

Both are built for a fixed map size, so every shape decision is made in Python at build time and
the exported graph holds only constants (Gather, Conv, AveragePool, TopK, ReduceMean).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..common import gaussian_kernel1d, gaussian_radius

__all__ = ["SymmetricGaussianBlur", "TopFractionMean", "top_fraction_mean_exact"]


def _symmetric_index(n: int, r: int) -> torch.Tensor:
    """Indices that pad a length-``n`` axis by ``r`` on both sides, edge repeated
    (``c b a | a b c | c b a``), i.e. scipy.ndimage's ``mode="reflect"``; longer pads fold again."""
    idx = []
    period = 2 * n
    for i in range(-r, n + r):
        j = i % period
        idx.append(j if j < n else period - 1 - j)
    return torch.tensor(idx, dtype=torch.long)


class SymmetricGaussianBlur(nn.Module):
    """Separable Gaussian smoothing equal to ``scipy.ndimage.gaussian_filter(x, sigma)`` (default
    ``mode="reflect"``, ``truncate=4``), as the VisualAD reference smooths its maps.

    torch / ONNX "reflect" padding does not repeat the edge pixel (that is scipy's ``"mirror"``),
    and ONNX Pad has no symmetric mode, so the padding is a Gather with constant indices, followed
    by two fixed depthwise convolutions. Kernel and indices are non-persistent buffers derived from
    ``sigma`` and the size.

    Args:
        sigma: standard deviation in pixels (> 0).
        size: (H, W) of the maps it will smooth.

    Shape: (B, 1, H, W) -> (B, 1, H, W).
    """

    def __init__(self, sigma: float, size: tuple[int, int]) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = float(sigma)
        self.radius = gaussian_radius(sigma)
        taps = gaussian_kernel1d(sigma).to(torch.float32)
        self.register_buffer("kernel_v", taps.view(1, 1, -1, 1), persistent=False)
        self.register_buffer("kernel_h", taps.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("index_h", _symmetric_index(size[0], self.radius), persistent=False)
        self.register_buffer("index_w", _symmetric_index(size[1], self.radius), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(torch.index_select(x, 2, self.index_h), self.kernel_v)
        return F.conv2d(torch.index_select(x, 3, self.index_w), self.kernel_h)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, radius={self.radius}, padding=symmetric (scipy 'reflect')"


def top_fraction_mean_exact(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Reference definition: mean of the ``ceil(fraction * H * W)`` largest pixels of each map.

    Args:
        maps: (B, 1, H, W). Returns (B,).
    """
    flat = maps.flatten(1)
    k = max(1, math.ceil(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


class TopFractionMean(nn.Module):
    """Image score = mean of the top ``fraction`` of a (B, 1, H, W) map, with a bounded TopK.

    When ``K = ceil(fraction * H * W)`` is at most ``max_k`` (TensorRT's TopK accepts K <= 3840)
    this is exactly :func:`top_fraction_mean_exact`. Above it, the map is first average-pooled with
    an ``s x s`` window (stride s, the smallest s that brings K under the limit; a remainder of
    fewer than s rows / columns at the bottom / right is dropped) and the top ``fraction`` of the
    pooled cells is averaged. The smoothed, bilinearly upsampled maps VisualAD produces are nearly
    constant over s x s windows for small s, so the two agree closely (tests measure the gap).

    Args:
        size: (H, W) of the maps.
        fraction: share of pixels averaged (0.01 = 1 %).
        max_k: the largest TopK K allowed.

    Attributes:
        pool: the pooling window s (1 = exact).
        k: TopK K on the (pooled) map.
    """

    def __init__(self, size: tuple[int, int], fraction: float = 0.01, max_k: int = 3840) -> None:
        super().__init__()
        h, w = int(size[0]), int(size[1])
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        pool = 1
        while max(1, math.ceil(fraction * (h // pool) * (w // pool))) > max_k:
            pool += 1
            if pool > min(h, w):
                raise ValueError(
                    f"top {fraction:.2%} of a {h}x{w} map cannot be taken with TopK K <= {max_k}; "
                    "lower top_fraction or raise max_topk"
                )
        self.pool = pool
        self.k = max(1, math.ceil(fraction * (h // pool) * (w // pool)))

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            maps = F.avg_pool2d(maps, self.pool, self.pool)
        return maps.flatten(1).topk(self.k, dim=1).values.mean(dim=1)

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}, pool={self.pool}, k={self.k}"
