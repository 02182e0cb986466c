"""A small procedurally generated MVTec-layout dataset: the demo's fallback when no real images exist.

edge_ad ships no third-party images (MVTec AD is CC BY-NC-SA). When ``../shared/data/real`` is not
beside the checkout, the demo writes this dataset instead: a woven-texture "tile" category whose
defects are scratches and spots, with exact masks. It is deterministic for a seed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_ad.runtime._cv import require_cv2

CATEGORY = "synthetic_tile"


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A woven texture (H, W, 3) uint8 with per-image jitter in phase and brightness."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    period = 12.0
    weave = np.sin(2 * np.pi * xx / period + phase[0]) * np.sin(2 * np.pi * yy / period + phase[1])
    base = 130 + 35 * weave + rng.normal(0, 6, size=(size, size))
    base += rng.uniform(-10, 10)
    rgb = np.stack([base * 0.95, base * 0.85, base * 0.7], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _scratch(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    cv2 = require_cv2("draw synthetic defects")
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], np.uint8)
    p0 = rng.integers(size // 5, 4 * size // 5, size=2)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.2, 0.45) * size
    p1 = (p0 + length * np.array([np.cos(angle), np.sin(angle)])).astype(int)
    cv2.line(mask, tuple(int(v) for v in p0), tuple(int(v) for v in np.clip(p1, 0, size - 1)), 255,
             int(rng.integers(2, 5)))
    image[mask > 0] = np.array([40, 35, 30], np.uint8)
    return mask


def _spot(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    cv2 = require_cv2("draw synthetic defects")
    size = image.shape[0]
    mask = np.zeros(image.shape[:2], np.uint8)
    centre = tuple(int(v) for v in rng.integers(size // 5, 4 * size // 5, size=2))
    axes = tuple(int(v) for v in rng.integers(size // 40 + 2, size // 12 + 3, size=2))
    cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
    image[mask > 0] = np.array([200, 120, 60], np.uint8)
    return mask


def make_synthetic_dataset(root: str | Path, *, size: int = 256, num_train: int = 16, num_test_per_type: int = 6,
                           seed: int = 0) -> Path:
    """Write ``root/synthetic_tile`` in MVTec layout and return ``root``.

    Layout: ``train/good`` (num_train images), ``test/{good,scratch,spot}`` (num_test_per_type each),
    ``ground_truth/{scratch,spot}/<stem>_mask.png``. Existing files are overwritten.
    """
    cv2 = require_cv2("write the synthetic dataset")
    root = Path(root)
    cat = root / CATEGORY
    rng = np.random.default_rng(seed)

    def save(path: Path, image: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
        if not cv2.imwrite(str(path), bgr):
            raise OSError(f"could not write {path}")

    for i in range(num_train):
        save(cat / "train" / "good" / f"{i:03d}.png", _texture(rng, size))
    for i in range(num_test_per_type):
        save(cat / "test" / "good" / f"{i:03d}.png", _texture(rng, size))
    for defect, draw in (("scratch", _scratch), ("spot", _spot)):
        for i in range(num_test_per_type):
            image = _texture(rng, size)
            mask = draw(rng, image)
            save(cat / "test" / defect / f"{i:03d}.png", image)
            save(cat / "ground_truth" / defect / f"{i:03d}_mask.png", mask)
    return root
