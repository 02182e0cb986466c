"""``--image-size auto:N``: an input size that keeps the parts' typical aspect ratio.

A long thin part (frames ~1:2.5) squashed into a square input loses resolution along its length
and stretches defects across; a non-square input of the same pixel budget keeps the geometry at
the same latency. :func:`auto_image_size` picks that size from the images' headers.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["AUTO_PREFIX", "auto_image_size", "is_auto_size", "parse_auto_size", "typical_aspect"]

AUTO_PREFIX = "auto:"


def is_auto_size(value: object) -> bool:
    """True for an ``"auto:N"`` image-size request."""
    return isinstance(value, str) and value.lower().startswith(AUTO_PREFIX)


def parse_auto_size(text: str) -> int:
    """``"auto:256"`` -> 256 (the side of the square whose pixel count the chosen size keeps)."""
    if not is_auto_size(text):
        raise ValueError(f"expected 'auto:N', got {text!r}")
    try:
        side = int(text[len(AUTO_PREFIX):])
    except ValueError:
        side = 0
    if side <= 0:
        raise ValueError(f"image size {text!r}: N in 'auto:N' must be a positive integer of pixels, e.g. auto:256")
    return side


def typical_aspect(paths: Sequence[str | Path], limit: int = 64) -> float:
    """Median width / height of up to ``limit`` images (evenly spread over ``paths``), read from the
    file headers (no pixel decoding)."""
    from PIL import Image

    if not paths:
        raise ValueError("no images to take the typical frame size from")
    idx = np.unique(np.linspace(0, len(paths) - 1, min(limit, len(paths))).round().astype(int))
    ratios = []
    for i in idx:
        with Image.open(paths[int(i)]) as im:
            w, h = im.size
        ratios.append(w / h)
    return float(np.median(ratios))


def auto_image_size(paths: Sequence[str | Path], side: int, multiple: int = 32) -> tuple[int, int]:
    """(H, W) with about ``side * side`` pixels and the images' typical aspect ratio.

    ``H = side / sqrt(a)``, ``W = side * sqrt(a)`` for the median aspect ``a = W / H`` of the
    frames, each rounded to the nearest multiple of ``multiple`` (the backbone's largest stride;
    at least one multiple). Square frames give ``(side, side)`` when ``side`` is a multiple.
    """
    if side <= 0 or multiple <= 0:
        raise ValueError(f"side and multiple must be positive, got {side}, {multiple}")
    root = math.sqrt(typical_aspect(paths))

    def snap(v: float) -> int:
        return max(multiple, int(round(v / multiple)) * multiple)

    return snap(side / root), snap(side * root)
