"""Perlin-noise anomalies (the DRAEM recipe, Zavrtanik et al. ICCV 2021) on uint8 RGB images.

A thresholded 2-D Perlin noise field gives irregular blob-shaped defect regions; inside them the
image is blended with a foreign texture: by default a colour-jittered, flipped and shifted copy of
the image itself (no texture dataset needed, so it runs anywhere), or a second Perlin field rendered
in a random colour. Same call convention as :class:`~edge_ad.synth.cutpaste.CutPaste`, so the two are
interchangeable in the training protocols::

    augmented, mask = PerlinAnomaly()(image, rng, foreground=fg)

The returned mask is exactly the set of pixels whose value changed (``(augmented != image).any(-1)
== mask``) and lies inside the foreground when one is used. Deterministic given the generator.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .cutpaste import color_jitter
from .foreground import resolve_foreground

__all__ = ["PerlinAnomaly", "PerlinConfig", "perlin_noise"]

TEXTURES = ("self", "noise")


def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)  # Perlin's quintic: C2-continuous cell seams


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` (H, W) with ``cells`` = (cy, cx) lattice cells.

    Returns:
        float32 (H, W), roughly in [-0.7, 0.7], zero at lattice points; one "blob" spans about
        H / cy x W / cx pixels.
    """
    h, w = int(shape[0]), int(shape[1])
    cy, cx = max(1, int(cells[0])), max(1, int(cells[1]))
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(cy + 1, cx + 1))
    grad = np.stack([np.cos(angles), np.sin(angles)], axis=-1)  # unit gradient at each lattice point
    y = (np.arange(h) + 0.5) * cy / h
    x = (np.arange(w) + 0.5) * cx / w
    y0 = np.minimum(np.floor(y).astype(np.int64), cy - 1)
    x0 = np.minimum(np.floor(x).astype(np.int64), cx - 1)
    fy = (y - y0)[:, None]
    fx = (x - x0)[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        g = grad[(y0 + dy)[:, None], (x0 + dx)[None, :]]  # (H, W, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)  # dot(gradient, offset to the corner)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return (top * (1 - uy) + bottom * uy).astype(np.float32)


@dataclass(frozen=True)
class PerlinConfig:
    """Perlin-anomaly parameters.

    Attributes:
        scale_exponents: lattice cells per side are ``2**k`` for k drawn in this inclusive range
            (per axis): 1 = one or two big blobs, 6 = fine speckle.
        threshold: fraction of the field's peak |value| above which a pixel is defective (relative, so
            the defect area does not depend on how far a given draw happens to swing).
        opacity: (min, max) weight of the original image inside the defect (``beta``); the foreign
            texture gets ``1 - beta``.
        texture: ``"self"`` (jittered, flipped, shifted copy of the image) or ``"noise"``
            (a second Perlin field in a random colour).
        min_area_ratio: re-draw when the defect covers less than this fraction of the image.
        use_foreground: keep the defect inside the estimated foreground.
        max_tries: re-draws before returning the unchanged image with an empty mask.
    """

    scale_exponents: tuple[int, int] = (0, 4)
    threshold: float = 0.5
    opacity: tuple[float, float] = (0.0, 0.6)
    texture: str = "self"
    min_area_ratio: float = 0.002
    use_foreground: bool = True
    max_tries: int = 10

    def __post_init__(self) -> None:
        lo, hi = self.scale_exponents
        if not (0 <= lo <= hi <= 8):
            raise ValueError(f"scale_exponents must satisfy 0 <= min <= max <= 8, got {self.scale_exponents}")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0.0 <= self.opacity[0] <= self.opacity[1] < 1.0:
            raise ValueError(f"opacity must satisfy 0 <= min <= max < 1, got {self.opacity}")
        if self.texture not in TEXTURES:
            raise ValueError(f"texture must be one of {TEXTURES}, got {self.texture!r}")


def _texture(image: np.ndarray, rng: np.random.Generator, kind: str) -> np.ndarray:
    h, w = image.shape[:2]
    if kind == "noise":
        field = perlin_noise((h, w), (int(rng.integers(2, 17)), int(rng.integers(2, 17))), rng)
        field = (field - field.min()) / max(float(np.ptp(field)), 1e-6)
        colour = rng.uniform(0, 255, size=3)
        return np.clip(field[..., None] * colour + (1 - field[..., None]) * (255 - colour), 0, 255).astype(np.uint8)
    tex = image[::-1] if rng.random() < 0.5 else image[:, ::-1]
    tex = np.roll(tex, (int(rng.integers(0, h)), int(rng.integers(0, w))), axis=(0, 1))
    return color_jitter(np.ascontiguousarray(tex), rng, jitter=0.6, hue=0.25)


class PerlinAnomaly:
    """Callable Perlin-noise anomaly: ``aug, mask = PerlinAnomaly()(image, rng, foreground=None)``.

    Args:
        config: :class:`PerlinConfig`; keyword overrides are applied on top.
    """

    def __init__(self, config: PerlinConfig | None = None, **overrides) -> None:
        cfg = config or PerlinConfig()
        self.config = dataclasses.replace(cfg, **overrides) if overrides else cfg

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(augmented uint8 (H, W, 3), bool (H, W) mask of changed pixels) of a uint8 (H, W, 3) image."""
        cfg = self.config
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 (H, W, 3) RGB, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        fg = resolve_foreground(image, foreground, cfg.use_foreground)
        lo, hi = cfg.scale_exponents
        for _ in range(cfg.max_tries):
            cells = (2 ** int(rng.integers(lo, hi + 1)), 2 ** int(rng.integers(lo, hi + 1)))
            noise = perlin_noise((h, w), cells, rng)
            region = (noise > cfg.threshold * float(np.abs(noise).max() or 1.0)) & fg
            if region.mean() < cfg.min_area_ratio:
                continue
            beta = rng.uniform(*cfg.opacity)
            texture = _texture(image, rng, cfg.texture).astype(np.float32)
            blended = beta * image.astype(np.float32) + (1.0 - beta) * texture
            out = image.copy()
            out[region] = np.clip(np.rint(blended[region]), 0, 255).astype(np.uint8)
            mask = region & (out != image).any(axis=-1)
            if mask.any():
                return out, mask
        return image.copy(), np.zeros((h, w), dtype=bool)

    def __repr__(self) -> str:
        return f"PerlinAnomaly({self.config})"
