"""CutPaste synthetic anomalies (Li et al., CVPR 2021) on uint8 RGB images.

Two variants, chosen 50 / 50 by default:

* ``"normal"``: a rectangle (2-25 % of the image area, aspect 0.3-3.3, log-uniform) cut from one
  place of the image, colour-jittered, pasted at another place.
* ``"scar"``: a long thin rectangle (2-16 x 10-25 px at ``scar_side`` px, scaled with the image), jittered,
  rotated by a random angle (-45..45 degrees) and pasted.

Pasting is restricted to the image's foreground (:func:`~edge_ad.synth.foreground.foreground_mask`)
so the defect sits on the object. The returned mask is exactly the set of pixels whose value the
paste changed: always inside the foreground, and ``(augmented != image).any(-1) == mask``.
Everything is deterministic given the ``numpy.random.Generator``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .foreground import resolve_foreground

__all__ = ["CutPaste", "CutPasteConfig", "CutPasteResult", "color_jitter", "cutpaste"]

VARIANTS = ("normal", "scar")


@dataclass(frozen=True)
class CutPasteConfig:
    """CutPaste parameters.

    Attributes:
        scar_prob: probability of the scar variant (else the normal patch).
        area_ratio: (min, max) patch area as a fraction of the image area (normal variant).
        aspect_ratio: (min, max) patch width / height, sampled log-uniformly (normal variant).
        scar_width, scar_length: (min, max) scar size in pixels at a ``scar_side``-pixel image
            side; scaled by ``min(H, W) / scar_side``.
        scar_side: the image side the scar sizes refer to (256: the CutPaste paper's; FoundAD's
            reference gives them in pixels of its 512-pixel inputs, i.e. 512).
        scar_angle: (min, max) rotation of the scar in degrees.
        jitter: brightness / contrast / saturation factors are drawn from ``[1 - jitter, 1 + jitter]``.
        hue_jitter: hue rotation drawn from ``[-hue_jitter, hue_jitter]`` turns (0.5 = 180 degrees).
        use_foreground: paste only inside the estimated foreground (else anywhere).
        max_tries: re-draws when a paste changes no pixel (e.g. a uniform image); then the
            unchanged image and an empty mask are returned.
    """

    scar_prob: float = 0.5
    area_ratio: tuple[float, float] = (0.02, 0.25)
    aspect_ratio: tuple[float, float] = (0.3, 3.3)
    scar_width: tuple[float, float] = (2.0, 16.0)
    scar_length: tuple[float, float] = (10.0, 25.0)
    scar_angle: tuple[float, float] = (-45.0, 45.0)
    scar_side: float = 256.0
    jitter: float = 0.5
    hue_jitter: float = 0.1
    use_foreground: bool = True
    max_tries: int = 10

    def __post_init__(self) -> None:
        if not 0.0 <= self.scar_prob <= 1.0:
            raise ValueError(f"scar_prob must be in [0, 1], got {self.scar_prob}")
        for name in ("area_ratio", "aspect_ratio", "scar_width", "scar_length", "scar_angle"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be (min, max) with min <= max, got {(lo, hi)}")
            object.__setattr__(self, name, (float(lo), float(hi)))
        if not (0.0 < self.area_ratio[0] and self.area_ratio[1] <= 1.0):
            raise ValueError(f"area_ratio must lie in (0, 1], got {self.area_ratio}")
        if self.aspect_ratio[0] <= 0 or self.scar_width[0] <= 0 or self.scar_length[0] <= 0:
            raise ValueError("aspect_ratio, scar_width and scar_length must be positive")
        if not 0.0 <= self.jitter < 1.0 or self.hue_jitter < 0:
            raise ValueError(f"jitter must be in [0, 1) and hue_jitter >= 0, got {self.jitter}, {self.hue_jitter}")
        if not self.scar_side > 0:
            raise ValueError(f"scar_side must be a positive image side in pixels, got {self.scar_side}")
        if self.max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {self.max_tries}")


class CutPasteResult(NamedTuple):
    """One synthetic anomaly.

    Attributes:
        image: uint8 (H, W, 3) augmented image (a new array).
        mask: bool (H, W), True exactly where ``image`` differs from the input.
        variant: ``"normal"`` or ``"scar"``.
        foreground: bool (H, W) region the paste was restricted to.
    """

    image: np.ndarray
    mask: np.ndarray
    variant: str
    foreground: np.ndarray


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8 (as the data loaders give), got {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if min(image.shape[:2]) < 8:
        raise ValueError(f"image too small for CutPaste: {image.shape[0]}x{image.shape[1]}")
    return image


def color_jitter(patch: np.ndarray, rng: np.random.Generator, jitter: float = 0.5, hue: float = 0.1) -> np.ndarray:
    """Random brightness, contrast, saturation and hue change of an RGB patch (uint8 in, uint8 out).

    Brightness scales all values; contrast and saturation blend with the patch's mean grey and with
    each pixel's grey; hue rotates the chroma plane of YIQ (a linear stand-in for HSV hue that
    keeps luma). The factors are drawn even when ``jitter == 0`` so the random stream does not
    depend on the setting.
    """
    b, c, s = rng.uniform(1.0 - jitter, 1.0 + jitter, size=3)
    h = rng.uniform(-hue, hue) if hue > 0 else 0.0
    x = patch.astype(np.float32)
    x = x * b
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = (x - gray.mean()) * c + gray.mean()
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = gray[..., None] + (x - gray[..., None]) * s
    if h != 0.0:
        to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
        cos, sin = math.cos(2 * math.pi * h), math.sin(2 * math.pi * h)
        rot = np.array([[1, 0, 0], [0, cos, -sin], [0, sin, cos]], np.float32)
        m = np.linalg.inv(to_yiq) @ rot @ to_yiq
        x = x @ m.T.astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _random_center(fg: np.ndarray, rng: np.random.Generator) -> tuple[int, int]:
    ys, xs = np.nonzero(fg)
    i = int(rng.integers(len(ys)))
    return int(ys[i]), int(xs[i])


def _paste_normal(
    image: np.ndarray, fg: np.ndarray, rng: np.random.Generator, cfg: CutPasteConfig
) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    area = rng.uniform(*cfg.area_ratio) * h * w
    aspect = math.exp(rng.uniform(math.log(cfg.aspect_ratio[0]), math.log(cfg.aspect_ratio[1])))
    ph = int(np.clip(round(math.sqrt(area / aspect)), 1, h))
    pw = int(np.clip(round(math.sqrt(area * aspect)), 1, w))
    sy, sx = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    cy, cx = _random_center(fg, rng)
    # The window stays inside the image and still contains the chosen foreground pixel.
    ty = int(np.clip(cy - ph // 2, 0, h - ph))
    tx = int(np.clip(cx - pw // 2, 0, w - pw))
    patch = color_jitter(image[sy : sy + ph, sx : sx + pw], rng, cfg.jitter, cfg.hue_jitter)
    region = fg[ty : ty + ph, tx : tx + pw]
    out = image.copy()
    window = out[ty : ty + ph, tx : tx + pw]
    window[region] = patch[region]
    pasted = np.zeros((h, w), dtype=bool)
    pasted[ty : ty + ph, tx : tx + pw] = region
    return out, pasted


def _paste_scar(
    image: np.ndarray, fg: np.ndarray, rng: np.random.Generator, cfg: CutPasteConfig
) -> tuple[np.ndarray, np.ndarray]:
    h, w = image.shape[:2]
    scale = min(h, w) / cfg.scar_side
    sw = int(np.clip(round(rng.uniform(*cfg.scar_width) * scale), 1, w))
    sl = int(np.clip(round(rng.uniform(*cfg.scar_length) * scale), 1, h))
    angle = math.radians(rng.uniform(*cfg.scar_angle))
    sy, sx = int(rng.integers(0, h - sl + 1)), int(rng.integers(0, w - sw + 1))
    patch = color_jitter(image[sy : sy + sl, sx : sx + sw], rng, cfg.jitter, cfg.hue_jitter)
    cy, cx = _random_center(fg, rng)

    # Inverse mapping: for every target pixel near the centre, rotate its offset back into the
    # patch frame; it belongs to the scar iff it lands inside the (sl x sw) rectangle. Nearest
    # sampling, so every masked pixel gets exactly one patch value.
    reach = int(math.ceil(0.5 * math.hypot(sl, sw))) + 1
    y0, y1 = max(0, cy - reach), min(h, cy + reach + 1)
    x0, x1 = max(0, cx - reach), min(w, cx + reach + 1)
    dy, dx = np.mgrid[y0 - cy : y1 - cy, x0 - cx : x1 - cx].astype(np.float64)
    cos, sin = math.cos(angle), math.sin(angle)
    u = cos * dx + sin * dy  # along the scar's width
    v = -sin * dx + cos * dy  # along its length
    col = np.floor(u + sw / 2.0).astype(np.int64)
    row = np.floor(v + sl / 2.0).astype(np.int64)
    inside = (col >= 0) & (col < sw) & (row >= 0) & (row < sl) & fg[y0:y1, x0:x1]
    out = image.copy()
    window = out[y0:y1, x0:x1]
    window[inside] = patch[row[inside], col[inside]]
    pasted = np.zeros((h, w), dtype=bool)
    pasted[y0:y1, x0:x1] = inside
    return out, pasted


def cutpaste(
    image: np.ndarray,
    rng: np.random.Generator,
    config: CutPasteConfig | None = None,
    *,
    foreground: np.ndarray | None = None,
    variant: str | None = None,
) -> CutPasteResult:
    """Apply one CutPaste anomaly.

    Args:
        image: uint8 (H, W, 3) RGB.
        rng: the random source (the only one used: results are reproducible).
        config: parameters (default :class:`CutPasteConfig`).
        foreground: precomputed bool (H, W) foreground (e.g. cached per few-shot image); default:
            :func:`foreground_mask` of ``image`` (or all True when ``use_foreground`` is off).
        variant: force ``"normal"`` or ``"scar"`` (default: drawn with ``scar_prob``).

    Returns:
        :class:`CutPasteResult` (image, mask, variant, foreground).
    """
    cfg = config or CutPasteConfig()
    image = _check_image(image)
    h, w = image.shape[:2]
    fg = resolve_foreground(image, foreground, cfg.use_foreground)
    if variant is None:
        variant = "scar" if rng.random() < cfg.scar_prob else "normal"
    elif variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    paste = _paste_scar if variant == "scar" else _paste_normal
    for _ in range(cfg.max_tries):
        out, pasted = paste(image, fg, rng, cfg)
        # A pasted pixel that kept its exact value is no defect: the mask is what changed.
        mask = pasted & (out != image).any(axis=-1)
        if mask.any():
            return CutPasteResult(out, mask, variant, fg)
    return CutPasteResult(image.copy(), np.zeros((h, w), dtype=bool), variant, fg)


class CutPaste:
    """Callable CutPaste augmentation: ``aug, mask = CutPaste()(image, rng)``.

    Args:
        config: :class:`CutPasteConfig`; keyword overrides are applied on top.
    """

    def __init__(self, config: CutPasteConfig | None = None, **overrides) -> None:
        cfg = config or CutPasteConfig()
        self.config = dataclasses.replace(cfg, **overrides) if overrides else cfg

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(augmented uint8 (H, W, 3), bool (H, W) mask of changed pixels)."""
        result = self.apply(image, rng, foreground=foreground)
        return result.image, result.mask

    def apply(
        self, image: np.ndarray, rng: np.random.Generator, foreground: np.ndarray | None = None
    ) -> CutPasteResult:
        """Like ``__call__`` but returns the full :class:`CutPasteResult`."""
        return cutpaste(image, rng, self.config, foreground=foreground)

    def __repr__(self) -> str:
        return f"CutPaste({self.config})"
