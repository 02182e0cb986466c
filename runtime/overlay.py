"""Draw a :class:`~edge_ad.runtime.Result` on its camera frame: heat map, defect regions, verdict.

::

    res = det.predict(frame, roi=roi)
    cv2.imshow("line 3", draw_overlay(frame, res))

* Heat map: :attr:`Result.anomaly_map` (the display map in [0, 1]; the calibrated pixel
  threshold is 0.5) through an OpenCV colour map, blended into the frame only where it matters:
  the blend weight rises from 0 at ``min_level`` (default 0.25, half the pixel threshold) to
  ``alpha`` at 0.5 and above, so a good part stays untouched instead of being tinted blue.
* Regions: the outline of :attr:`Result.defect_mask` and each :class:`Region`'s box with its
  peak raw score (model units, as the thresholds).
* Verdict banner: ``OK`` (green) / ``DEFECT`` (red) / ``UNCALIBRATED`` (grey: the bundle has no
  image threshold) with the image score.
* ROI: the map covers only the ROI; it is drawn at the ROI's offset and the ROI is outlined.

numpy + OpenCV, torch-free. :func:`heat_colors` and :func:`blend` are also used by the
training-side report overlays (:mod:`edge_ad.evaluation.overlay`).
"""
from __future__ import annotations

import numpy as np

from ._cv import require_cv2
from .result import Result

__all__ = ["blend", "draw_overlay", "heat_colors", "to_bgr"]

_RED = (0, 0, 255)
_GREEN = (0, 170, 0)
_GREY = (128, 128, 128)
_WHITE = (255, 255, 255)


def heat_colors(values01: np.ndarray, colormap: int | None = None) -> np.ndarray:
    """(H, W) values in [0, 1] (clipped) -> uint8 (H, W, 3) BGR colours of an OpenCV colour map (JET default)."""
    cv2 = require_cv2("colour heat maps")
    levels = (np.clip(np.asarray(values01, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return cv2.applyColorMap(levels, cv2.COLORMAP_JET if colormap is None else colormap)


def blend(base: np.ndarray, colour: np.ndarray, weight: np.ndarray | float) -> np.ndarray:
    """``base * (1 - weight) + colour * weight``, rounded to uint8; ``weight`` scalar or (H, W) in [0, 1]."""
    w = np.asarray(weight, np.float32)
    if w.ndim == 2:
        w = w[:, :, None]
    out = base.astype(np.float32) * (1.0 - w) + colour.astype(np.float32) * w
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def to_bgr(frame: np.ndarray) -> np.ndarray:
    """A uint8 BGR (H, W, 3) copy of a BGR (H, W, 3) or grey (H, W) / (H, W, 1) frame."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.uint8:
        raise TypeError(f"frame must be a uint8 numpy array (H, W, 3) BGR or (H, W) grey, got "
                        f"{getattr(frame, 'dtype', type(frame).__name__)}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 2:
        return np.repeat(frame[:, :, None], 3, axis=2)
    if frame.ndim == 3 and frame.shape[2] == 3:
        return np.ascontiguousarray(frame).copy()
    raise ValueError(f"frame must be (H, W, 3) BGR or (H, W) grey, got shape {frame.shape}")


def _verdict(result: Result) -> tuple[str, tuple[int, int, int]]:
    if result.is_anomalous is None:
        return "UNCALIBRATED", _GREY
    return ("DEFECT", _RED) if result.is_anomalous else ("OK", _GREEN)


def draw_overlay(
    frame: np.ndarray,
    result: Result,
    *,
    alpha: float = 0.5,
    colormap: int | None = None,
    min_level: float = 0.25,
    show_regions: bool = True,
    show_verdict: bool = True,
) -> np.ndarray:
    """The frame with the result drawn on it, as a new uint8 (H, W, 3) BGR image.

    Args:
        frame: the uint8 frame the result was computed on: (H, W, 3) BGR or (H, W) / (H, W, 1) grey.
        result: :meth:`Detector.predict`'s result for that frame (its ``anomaly_map`` has the
            ROI's size, or the frame's without ROI).
        alpha: heat-map opacity at and above the pixel threshold, in [0, 1] (0: no heat map).
        colormap: OpenCV colour map (``cv2.COLORMAP_*``); None = ``COLORMAP_JET``.
        min_level: display-map level below which the frame is left untouched (0 = tint everywhere).
        show_regions: outline the defect mask and box each region with its peak score.
        show_verdict: draw the OK / DEFECT / UNCALIBRATED banner with the score.

    Raises:
        ValueError: the map does not fit the frame (a result of another frame or ROI), bad alpha / min_level.
    """
    cv2 = require_cv2("draw overlays")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not 0.0 <= float(min_level) < 0.5:
        raise ValueError(f"min_level must be in [0, 0.5) (0.5 = the pixel threshold), got {min_level!r}")
    out = to_bgr(frame)
    fh, fw = out.shape[:2]
    x, y, w, h = result.roi if result.roi is not None else (0, 0, fw, fh)
    amap = np.asarray(result.anomaly_map, np.float32)
    if amap.shape != (h, w) or x < 0 or y < 0 or x + w > fw or y + h > fh:
        raise ValueError(
            f"the result's anomaly map is {amap.shape[1]}x{amap.shape[0]} (WxH) at roi {result.roi}, which does not "
            f"fit this {fw}x{fh} frame: draw a result on the frame (and ROI) it was predicted on"
        )
    if alpha > 0:
        weight = float(alpha) * np.clip((amap - min_level) / (0.5 - min_level), 0.0, 1.0)
        view = out[y : y + h, x : x + w]
        view[...] = blend(view, heat_colors(amap, colormap), weight)
    thick = max(1, round(min(fh, fw) / 300))
    scale = max(0.4, min(fh, fw) / 700)
    if result.roi is not None:
        cv2.rectangle(out, (x, y), (x + w - 1, y + h - 1), _WHITE, 1)
    if show_regions and result.defect_mask is not None and result.defect_mask.any():
        contours, _ = cv2.findContours(result.defect_mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, _RED, thick, offset=(x, y))
        for r in result.regions or []:
            cv2.rectangle(out, (r.x, r.y), (r.x + r.w - 1, r.y + r.h - 1), _RED, thick)
            cv2.putText(out, f"{r.peak:.2f}", (r.x, max(r.y - 4, 12)), cv2.FONT_HERSHEY_SIMPLEX, scale * 0.8, _RED,
                        thick, cv2.LINE_AA)
    if show_verdict:
        text, colour = _verdict(result)
        label = f"{text}  score {result.score:.3g}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        cv2.rectangle(out, (0, 0), (min(fw - 1, tw + 12), th + base + 10), colour, -1)
        cv2.putText(out, label, (6, th + 5), cv2.FONT_HERSHEY_SIMPLEX, scale, _WHITE, thick, cv2.LINE_AA)
    return out
