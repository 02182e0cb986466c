"""FoundAD's per-class foreground rules for MVTec AD and VisA class names (where CutPaste may paste).

The reference (ymxlzgy/FoundAD ``src/utils/synthesis.py:13-82``, ``generate_target_foreground_mask``)
thresholds each class its own way: the whole image for textures and busy objects, Otsu or
Triangle thresholds on the grey image or one colour channel (inverted where the object is dark on
a bright background), then a 6 x 6 morphological closing and opening. Unknown class names (custom
categories) have no rule: :func:`class_foreground` returns None and callers fall back to the
generic :func:`~edge_ad.synth.foreground.foreground_mask`.

Morphology uses OpenCV's square kernels; for even sides OpenCV anchors the kernel one pixel
differently from the reference's ``skimage.morphology.square``, which shifts a mask edge by at
most a pixel.
"""
from __future__ import annotations

import numpy as np

__all__ = ["CLASS_RULES", "class_foreground"]

#: class name -> (source, threshold, inverted, extra (closing, opening) sides or None).
#: source: "all" (the whole image), "grey", or an RGB channel index; threshold: "otsu" | "triangle".
CLASS_RULES: dict[str, tuple[str | int, str, bool, tuple[int, int] | None]] = {
    **{c: ("all", "", False, None) for c in ("carpet", "leather", "tile", "wood", "cable", "transistor", "capsules")},
    "pill": ("grey", "otsu", False, None),
    **{c: ("grey", "triangle", False, None) for c in ("hazelnut", "metal_nut", "toothbrush")},
    **{c: ("grey", "otsu", True, None) for c in ("bottle", "capsule", "grid", "screw", "zipper", "metal_plate")},
    **{c: (2, "triangle", False, (8, 3)) for c in ("pcb1", "pcb2", "pcb3", "pcb4")},
    **{c: ("grey", "otsu", False, (3, 3)) for c in ("candle", "cashew", "chewinggum", "fryum", "macaroni1",
                                                     "macaroni2", "pipe_fryum")},
    **{c: (1, "otsu", True, None) for c in ("bracket_black", "bracket_brown", "connector")},
    **{c: (2, "otsu", False, None) for c in ("bracket_white", "tubes")},
}


def _close_open(cv2, mask: np.ndarray, close: int, open_: int) -> np.ndarray:
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((close, close), np.uint8))
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((open_, open_), np.uint8))


def class_foreground(image: np.ndarray, class_name: str) -> np.ndarray | None:
    """The reference's foreground of ``image`` (uint8 (H, W, 3) RGB) for ``class_name``.

    Returns:
        bool (H, W), or None when ``class_name`` has no rule (not an MVTec AD / VisA class).
    """
    rule = CLASS_RULES.get(class_name.strip().lower())
    if rule is None:
        return None
    from edge_ad.runtime._cv import require_cv2

    cv2 = require_cv2("class foreground masks")
    source, method, inverted, extra = rule
    h, w = image.shape[:2]
    if source == "all":
        mask = np.ones((h, w), np.uint8)
    else:
        plane = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if source == "grey" else np.ascontiguousarray(image[..., source])
        flag = cv2.THRESH_OTSU if method == "otsu" else cv2.THRESH_TRIANGLE
        _, binary = cv2.threshold(plane, 0, 1, cv2.THRESH_BINARY + flag)
        mask = (1 - binary if inverted else binary).astype(np.uint8)
        if extra is not None:
            mask = _close_open(cv2, mask, *extra)
    return _close_open(cv2, mask, 6, 6).astype(bool)
