"""Layers shared by the detectors: feature fusion, Gaussian smoothing, score normalisation.

Everything here is export-friendly: shapes are fixed at build time, no Python branch depends on
tensor values, and every op maps to a plain ONNX operator (Resize, Concat, Pad(reflect), Conv,
Sub/Div).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GaussianBlur2d",
    "ScoreNormalizer",
    "fuse_feature_maps",
    "gaussian_kernel1d",
    "gaussian_radius",
    "iterate_image_batches",
    "upsample_to",
]


def fuse_feature_maps(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate multi-layer feature maps on the grid of the finest (largest) map.

    Deeper maps are bilinearly upsampled (``align_corners=False``) to the shallowest requested
    grid, as PatchCore does, so every cell carries both local (shallow) and semantic (deep) context.

    Args:
        features: maps (B, C_i, h_i, w_i); a single map is returned unchanged.

    Returns:
        (B, sum C_i, h, w) with (h, w) the largest grid among the inputs.
    """
    if len(features) == 0:
        raise ValueError("fuse_feature_maps needs at least one feature map")
    if len(features) == 1:
        return features[0]
    # The finest grid is the one with the most cells; sizes are static at export time.
    h, w = max((tuple(f.shape[-2:]) for f in features), key=lambda s: s[0] * s[1])
    resized = [
        f if tuple(f.shape[-2:]) == (h, w) else F.interpolate(f, size=(h, w), mode="bilinear", align_corners=False)
        for f in features
    ]
    return torch.cat(resized, dim=1)


def upsample_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (B, C, h, w) -> (B, C, *size) with half-pixel centres (``align_corners=False``)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def gaussian_radius(sigma: float, truncate: float = 4.0) -> int:
    """Half-width of the discrete kernel, in pixels, the way ``scipy.ndimage`` rounds it."""
    return int(truncate * float(sigma) + 0.5)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Normalised 1-D Gaussian taps (2r+1,), float64, identical to ``scipy.ndimage.gaussian_filter1d``'s."""
    radius = gaussian_radius(sigma, truncate)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / float(sigma)) ** 2)
    return k / k.sum()


class GaussianBlur2d(nn.Module):
    """Separable Gaussian smoothing as two fixed depthwise convolutions.

    Borders use reflect padding (``d c b | a b c d | c b a``: the edge pixel is not repeated), i.e.
    ``scipy.ndimage.gaussian_filter(..., mode="mirror")``. It exports as ONNX ``Pad(mode=reflect)``
    plus two ``Conv`` nodes; TensorRT, OpenVINO and onnxruntime all run that.

    The kernel is a non-persistent buffer: it is derived from ``sigma``, which the checkpoint config
    already records, so it never lands in (or has to match) a checkpoint.

    Args:
        sigma: standard deviation in pixels (> 0).
        channels: channel count of the input (each smoothed independently).
        truncate: kernel half-width in standard deviations (scipy's default 4).

    Shape:
        (B, channels, H, W) -> (B, channels, H, W); requires H, W > radius (reflect-padding limit).
    """

    def __init__(self, sigma: float, channels: int = 1, truncate: float = 4.0) -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = float(sigma)
        self.channels = int(channels)
        self.radius = gaussian_radius(sigma, truncate)
        taps = gaussian_kernel1d(sigma, truncate).to(torch.float32)
        self.register_buffer("kernel_v", taps.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), persistent=False)
        self.register_buffer("kernel_h", taps.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), persistent=False)

    def check_size(self, size: tuple[int, int]) -> None:
        """Raise if a (H, W) input is too small for reflect padding (call at build time)."""
        if min(size) <= self.radius:
            raise ValueError(
                f"Gaussian smoothing with sigma={self.sigma} px needs a map larger than its radius "
                f"{self.radius} px, got {size[0]}x{size[1]}; lower smoothing_sigma (0 disables it)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.radius
        x = F.pad(x, (r, r, r, r), mode="reflect")
        x = F.conv2d(x, self.kernel_v, groups=self.channels)
        return F.conv2d(x, self.kernel_h, groups=self.channels)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, channels={self.channels}, radius={self.radius}"


class ScoreNormalizer(nn.Module):
    """Affine normalisation of anomaly maps and scores with statistics of good images.

    ``normalised = (raw - loc) / scale`` with ``loc`` / ``scale`` the mean / standard deviation of
    the raw values on good (defect-free) images, kept as buffers so they travel with the
    checkpoint and the exported graph. A normalised value is therefore "standard deviations above
    a typical good image": thresholds transfer between categories and runs, and evaluation never
    needs the test set's min / max (which would leak labels into the scale).

    Before :meth:`fit` the statistics are ``loc=0, scale=1`` (identity) and ``num_images=0``.

    Buffers (all float32 scalars except ``num_images``, int64):
        map_loc, map_scale: over every pixel of the good images' anomaly maps.
        score_loc, score_scale: over the good images' image scores.
        num_images: how many good images the statistics come from (0 = not fitted).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("map_loc", torch.tensor(0.0))
        self.register_buffer("map_scale", torch.tensor(1.0))
        self.register_buffer("score_loc", torch.tensor(0.0))
        self.register_buffer("score_scale", torch.tensor(1.0))
        self.register_buffer("num_images", torch.tensor(0, dtype=torch.int64))

    @property
    def fitted(self) -> bool:
        return int(self.num_images) > 0

    def forward(self, anomaly_map: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (anomaly_map - self.map_loc) / self.map_scale, (score - self.score_loc) / self.score_scale

    @torch.no_grad()
    def fit(self, maps: Iterable[torch.Tensor], scores: Iterable[torch.Tensor]) -> None:
        """Set the statistics from raw maps (B, 1, H, W) and scores (B,) of good images.

        Accumulates in float64 so millions of pixels do not lose precision. With a single image the
        score spread is undefined; the pixel spread of its map stands in for it (with a warning),
        which keeps one-shot runs usable.
        """
        n_pix = 0
        s1 = torch.zeros((), dtype=torch.float64)
        s2 = torch.zeros((), dtype=torch.float64)
        all_scores = []
        for m, s in zip(maps, scores):
            m64 = m.detach().to("cpu", torch.float64)
            n_pix += m64.numel()
            s1 += m64.sum()
            s2 += (m64 * m64).sum()
            all_scores.append(s.detach().to("cpu", torch.float64).reshape(-1))
        if not all_scores:
            raise ValueError("fit_normalization got no images: pass at least one good image")
        sc = torch.cat(all_scores)
        if not (torch.isfinite(sc).all() and torch.isfinite(s1) and torch.isfinite(s2)):
            raise ValueError("non-finite anomaly values while fitting the normalisation")
        map_mean = s1 / n_pix
        map_std = torch.sqrt(torch.clamp(s2 / n_pix - map_mean**2, min=0.0))
        score_mean = sc.mean()
        if sc.numel() >= 2:
            score_std = sc.std(unbiased=True)
        else:
            warnings.warn(
                "fit_normalization with a single good image: the image-score spread is estimated by the "
                "anomaly-map pixel spread; use more good images for calibrated scores",
                stacklevel=3,
            )
            score_std = map_std
        self.map_loc.fill_(float(map_mean))
        self.map_scale.fill_(_safe_scale(map_std, map_mean))
        self.score_loc.fill_(float(score_mean))
        self.score_scale.fill_(_safe_scale(score_std, score_mean))
        self.num_images.fill_(int(sc.numel()))

    def stats(self) -> dict[str, float]:
        """Plain-float view, for logs and manifests."""
        return {
            "map_loc": float(self.map_loc),
            "map_scale": float(self.map_scale),
            "score_loc": float(self.score_loc),
            "score_scale": float(self.score_scale),
            "num_images": int(self.num_images),
        }


def _safe_scale(std: torch.Tensor, loc: torch.Tensor) -> float:
    """A strictly positive scale: constant inputs (std 0) must not turn into inf / NaN outputs.

    The floor is relative to the location (1e-3 of it): a near-constant good-image score (e.g. an
    untrained image head of a sigmoid model) would otherwise divide float32 rounding, and any
    quantisation error, by ~1e-6 and blow them up into whole normalised units.
    """
    floor = max(1e-6, 1e-3 * abs(float(loc)))
    return max(float(std), floor)


def iterate_image_batches(
    images: torch.Tensor | Iterable[torch.Tensor], feature_dim: int | None = None
) -> Iterable[torch.Tensor]:
    """Yield (B, 3, H, W) batches from a tensor (split in chunks of 16) or an iterable of tensors.

    Iterables may also yield ``(images, ...)`` tuples / lists (a DataLoader of pairs): the first
    element is taken. A single (3, H, W) image becomes a batch of one, except that 3-D tensors whose
    last axis is ``feature_dim`` are (B, N, C) feature batches and pass through unchanged.
    """

    def single_image(t: torch.Tensor) -> bool:
        return t.ndim == 3 and t.shape[0] == 3 and (feature_dim is None or t.shape[-1] != feature_dim)

    if isinstance(images, torch.Tensor):
        if single_image(images):
            images = images.unsqueeze(0)
        yield from images.split(16)
        return
    for batch in images:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"expected image batches as torch tensors (B, 3, H, W), got {type(batch).__name__}")
        yield batch.unsqueeze(0) if single_image(batch) else batch
