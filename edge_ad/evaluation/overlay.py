"""Heat-map overlays with the ground-truth contour, for reports."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_ad.runtime._cv import require_cv2
from edge_ad.runtime.overlay import blend, heat_colors


def render_overlay(
    image_rgb: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None,
    *,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    caption: str | None = None,
) -> np.ndarray:
    """Blend a JET heat map of ``anomaly_map`` over the image and draw the GT contour in green.

    Args:
        image_rgb: uint8 (H, W, 3) RGB.
        anomaly_map: float (h, w); resized to (H, W) for display.
        mask: bool (h', w') ground truth or None; resized (nearest) to (H, W).
        vmin, vmax: map values mapped to the ends of the colour scale (fixed per report so
            images are comparable; never per-image min-max, which makes every image look defective).
        caption: text drawn in the top-left corner.

    Returns:
        uint8 (H, W, 3) BGR, ready for ``cv2.imwrite``.
    """
    cv2 = require_cv2("render overlays")
    h, w = image_rgb.shape[:2]
    heat = cv2.resize(anomaly_map.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    heat = (heat - vmin) / max(vmax - vmin, 1e-12)
    # Same colouring and blending as the device-side overlay (edge_ad.runtime.overlay).
    out = blend(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), heat_colors(heat), alpha)
    if mask is not None and mask.any():
        m = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, (0, 255, 0), max(1, round(min(h, w) / 200)))
    if caption:
        scale = max(0.35, min(h, w) / 600)
        cv2.putText(out, caption, (4, int(18 * scale / 0.5)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return out


def write_png(path: str | Path, image_bgr: np.ndarray) -> None:
    cv2 = require_cv2("write PNG files")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".png", image_bgr)
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    path.write_bytes(buf.tobytes())
