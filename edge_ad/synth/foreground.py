"""Per-image foreground estimation, so synthetic defects land on the object, not the background.

No class names, no learned model: an Otsu threshold on the smoothed luminance splits the image in
two; the side touching the image border less is the object (this handles dark-on-bright and
bright-on-dark alike). When the luminance is not bimodal, when both sides touch the border a lot
(a texture, or an object filling the frame) or when the "object" is tiny, the split is noise and
the whole image is the foreground.
"""
from __future__ import annotations

import numpy as np

__all__ = ["foreground_mask", "otsu_threshold"]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (any shape, float or int): maximises between-class variance.

    Returns:
        t such that ``values > t`` is one class; for constant input, that value (one class empty).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    lo, hi = float(v.min()), float(v.max())
    if hi - lo < 1e-12:
        return lo
    hist, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = hist.astype(np.float64) / v.size
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(p)  # weight of the class "<= bin i"
    mu = np.cumsum(p * centres)
    mu_total = mu[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_total * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    # Every threshold inside an empty gap between the modes scores the same: take the middle of
    # that plateau rather than its first bin (which hugs the lower mode).
    best = np.flatnonzero(between >= between.max() * (1.0 - 1e-9))
    i, j = int(best[0]), int(best[-1])
    return float(0.5 * (edges[i + 1] + edges[j + 1]))  # thresholds are upper edges of the low class


def _luminance(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        return img.astype(np.float32)
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got shape {img.shape}")
    if img.shape[2] == 1:
        return img[..., 0].astype(np.float32)
    f = img.astype(np.float32)
    return 0.299 * f[..., 0] + 0.587 * f[..., 1] + 0.114 * f[..., 2]  # ITU-R BT.601 luma of RGB


def _main_components(fg: np.ndarray, border: np.ndarray, ndimage, min_relative_area: float = 0.1) -> np.ndarray:
    """Keep the largest component, plus components >= ``min_relative_area`` of it that do not touch
    the border: drops holes, slots and specks of the background that share the object's polarity
    while keeping several separate objects (e.g. a tray of pills)."""
    labels, n = ndimage.label(fg)
    if n <= 1:
        return fg
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    areas[0] = 0
    largest = int(np.argmax(areas))
    touching = np.zeros(n + 1, dtype=bool)
    touching[np.unique(labels[border])] = True
    keep = (areas >= min_relative_area * areas[largest]) & ~touching
    keep[largest] = True
    keep[0] = False
    return keep[labels]


def foreground_mask(
    image: np.ndarray,
    *,
    smooth_sigma: float | None = None,
    min_fraction: float = 0.02,
    max_border_contact: float = 0.3,
    min_separability: float = 0.72,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict]:
    """Estimate the object region of one image.

    Args:
        image: uint8 (H, W, 3) RGB or (H, W) grey.
        smooth_sigma: Gaussian blur before thresholding, in pixels (default ``min(H, W) / 128``:
            2 px at 256 px), so texture and noise do not fragment the split.
        min_fraction: a foreground smaller than this fraction of the image is treated as noise.
        max_border_contact: if even the less-border-touching side covers more than this fraction
            of the border pixels, there is no isolated object (texture / full-frame object).
        min_separability: Otsu's effectiveness ``between-class / total variance`` below which the
            luminance is not bimodal (a uniform ramp scores 0.75, one Gaussian mode 0.64; object on
            background typically > 0.77): no object/background split, fall back.
        return_info: also return a dict with ``threshold``, ``separability``, ``border_contact``,
            ``fraction``, ``fallback`` (None, ``"unimodal"``, ``"texture"`` or ``"tiny"``) and
            ``polarity`` (``"bright"``/``"dark"``).

    Returns:
        bool (H, W) mask, True on the object (all True on fallback); with ``return_info`` a tuple.
    """
    from scipy import ndimage

    gray = _luminance(image)
    h, w = gray.shape
    if h < 4 or w < 4:
        raise ValueError(f"image too small for foreground estimation: {h}x{w}")
    sigma = min(h, w) / 128.0 if smooth_sigma is None else float(smooth_sigma)
    if sigma > 0:
        gray = ndimage.gaussian_filter(gray, sigma, mode="nearest")
    t = otsu_threshold(gray)
    bright = gray > t
    w1 = float(bright.mean())
    total_var = float(gray.var())
    if 0.0 < w1 < 1.0 and total_var > 1e-12:
        separability = w1 * (1.0 - w1) * (float(gray[bright].mean()) - float(gray[~bright].mean())) ** 2 / total_var
    else:
        separability = 0.0

    border = np.zeros((h, w), dtype=bool)
    band = max(1, min(h, w) // 64)  # a few pixels, so a thin frame artefact does not decide alone
    border[:band, :] = border[-band:, :] = True
    border[:, :band] = border[:, -band:] = True
    bright_contact = float(bright[border].mean())
    dark_contact = 1.0 - bright_contact
    polarity = "bright" if bright_contact <= dark_contact else "dark"
    fg = bright if polarity == "bright" else ~bright
    contact = min(bright_contact, dark_contact)

    fallback = None
    if separability < min_separability:
        fallback = "unimodal"
    elif contact > max_border_contact:
        fallback = "texture"
    else:
        # Clean up: drop specks, close small gaps, fill holes (dark spots on a bright object are
        # still the object).
        r = max(1, min(h, w) // 128)
        structure = np.ones((2 * r + 1, 2 * r + 1), dtype=bool)
        fg = ndimage.binary_opening(fg, structure=structure)
        fg = ndimage.binary_closing(fg, structure=structure, border_value=0)
        fg = ndimage.binary_fill_holes(fg)
        fg = _main_components(fg, border, ndimage)
        if fg.mean() < min_fraction:
            fallback = "tiny"
    if fallback is not None:
        fg = np.ones((h, w), dtype=bool)
    fg = np.ascontiguousarray(fg, dtype=bool)
    if return_info:
        info = {
            "threshold": t,
            "separability": separability,
            "border_contact": contact,
            "fraction": float(fg.mean()),
            "fallback": fallback,
            "polarity": polarity,
        }
        return fg, info
    return fg


def resolve_foreground(image: np.ndarray, foreground: np.ndarray | None, use_foreground: bool = True) -> np.ndarray:
    """The bool (H, W) region a synthesizer may put a defect in.

    ``foreground`` given (e.g. cached per few-shot image): checked against the image size; an empty
    one falls back to the whole image. None: :func:`foreground_mask` of ``image`` (which falls back
    itself), or the whole image when ``use_foreground`` is off.
    """
    h, w = image.shape[:2]
    if foreground is None:
        return foreground_mask(image) if use_foreground else np.ones((h, w), dtype=bool)
    fg = np.asarray(foreground, dtype=bool)
    if fg.shape != (h, w):
        raise ValueError(f"foreground must be ({h}, {w}), got {fg.shape}")
    return fg if fg.any() else np.ones((h, w), dtype=bool)
