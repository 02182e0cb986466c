"""FoundAD's training augmentation, as its reference code stages it (uint8 RGB in, uint8 RGB out).

The reference (ymxlzgy/FoundAD ``src/datasets/dataset.py``, ``build_train_transform_staged``) applies,
before resizing, two independent stages:

* orientation, with probability ``p_orient`` (0.3): one of horizontal flip, vertical flip,
  rotation by 90 or 270 degrees, chosen uniformly;
* appearance, with probability ``p_appear`` (0.3): one of colour jitter (brightness / contrast /
  saturation 0.3, hue 0.05), greyscale, Gaussian blur (kernel 23 px, sigma uniform in 0.1..2),
  chosen uniformly.

Geometric operations are applied to an optional mask too (the CutPaste foreground), so pasting
stays on the object after a flip or rotation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["AugmentResult", "ReferenceAugment"]

ORIENTATIONS = ("hflip", "vflip", "rot90or270")
APPEARANCES = ("jitter", "grey", "blur")


class AugmentResult(NamedTuple):
    """The augmented image (a new array, or the input when nothing was applied), the mask moved
    with it (or None), and the operations applied (empty tuple = the image is unchanged)."""

    image: np.ndarray
    mask: np.ndarray | None
    applied: tuple[str, ...]


@dataclass(frozen=True)
class ReferenceAugment:
    """Staged orientation + appearance augmentation (see the module docstring).

    Attributes:
        p_orient: probability of one orientation operation.
        p_appear: probability of one appearance operation.
        jitter, hue: colour-jitter strength (factors in ``[1 - jitter, 1 + jitter]``, hue in turns).
        blur_kernel: Gaussian blur kernel side in pixels (odd).
        blur_sigma: (min, max) blur sigma in pixels.
    """

    p_orient: float = 0.3
    p_appear: float = 0.3
    jitter: float = 0.3
    hue: float = 0.05
    blur_kernel: int = 23
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        if not (0.0 <= self.p_orient <= 1.0 and 0.0 <= self.p_appear <= 1.0):
            raise ValueError(f"p_orient and p_appear must be in [0, 1], got {self.p_orient}, {self.p_appear}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd number of pixels, got {self.blur_kernel}")

    def __call__(self, image: np.ndarray, rng: np.random.Generator, mask: np.ndarray | None = None) -> AugmentResult:
        """Augment ``image`` (uint8 (H, W, 3)); ``mask`` ((H, W)) follows the geometric operations.

        The coins, the choices, the rotation and the blur sigma are drawn up front; colour jitter
        draws its factors from ``rng`` only when it fires. The result is deterministic in ``rng``.
        """
        from edge_ad.runtime._cv import require_cv2
        from edge_ad.synth.cutpaste import color_jitter

        orient_coin, orient_pick = rng.random(), int(rng.integers(len(ORIENTATIONS)))
        appear_coin, appear_pick = rng.random(), int(rng.integers(len(APPEARANCES)))
        quarter_turns = 1 if rng.random() < 0.5 else 3
        sigma = float(rng.uniform(*self.blur_sigma))
        applied: list[str] = []
        if orient_coin < self.p_orient:
            op = ORIENTATIONS[orient_pick]
            applied.append(op)

            def geometric(a: np.ndarray) -> np.ndarray:
                if op == "hflip":
                    return a[:, ::-1]
                if op == "vflip":
                    return a[::-1]
                return np.rot90(a, quarter_turns)

            image = np.ascontiguousarray(geometric(image))
            mask = None if mask is None else np.ascontiguousarray(geometric(mask))
        if appear_coin < self.p_appear:
            op = APPEARANCES[appear_pick]
            applied.append(op)
            if op == "jitter":
                image = color_jitter(image, rng, self.jitter, self.hue)
            elif op == "grey":
                grey = np.rint(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))
                image = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
            else:
                cv2 = require_cv2("blur augmentation")
                image = cv2.GaussianBlur(image, (self.blur_kernel, self.blur_kernel), sigma)
        return AugmentResult(image, mask, tuple(applied))
