"""draw_overlay on real hazelnut frames and real Detector results (onnx-cpu bundle of the shared knn run)."""
from __future__ import annotations

import numpy as np
import pytest

from edge_ad.converters.convert import convert
from edge_ad.runtime import Detector, draw_overlay, read_image
from edge_ad.runtime.bundle import Thresholds
from edge_ad.runtime.calibrate import apply_thresholds

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def det(knn_run, tmp_path_factory):
    path = convert(knn_run, "onnx-cpu", tmp_path_factory.mktemp("overlay") / "onnx", precision="fp32",
                   calib_count=8, progress=False)
    return Detector.load(path)


@pytest.fixture(scope="module")
def frame(real_root):
    return read_image(real_root / CATEGORY / "test" / "crack" / "000.png", "bgr")


def _hot_result(det, frame, roi=None, image_threshold=0.0):
    """A real result where ~10 % of the ROI is above the pixel threshold (threshold = its 90th percentile)."""
    raw = det.predict(frame, roi=roi).raw_map
    apply_thresholds(det, Thresholds(image_threshold=image_threshold, pixel_threshold=float(np.quantile(raw, 0.9))))
    return det.predict(frame, roi=roi)


def test_heat_map_only_where_the_map_matters(det, frame):
    res = _hot_result(det, frame)
    keep = frame.copy()
    out = draw_overlay(frame, res, show_regions=False, show_verdict=False)
    assert out.shape == frame.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(frame, keep)  # the input frame is not drawn on
    changed = np.any(out != frame, axis=2)
    hot = res.anomaly_map >= 0.5
    cold = res.anomaly_map <= 0.25
    assert hot.any() and cold.any()
    # Above the pixel threshold the blend is at full alpha: (almost) every hot pixel changes.
    assert changed[hot].mean() > 0.95
    # Below min_level (0.25) the frame is untouched.
    assert not changed[cold].any()
    # alpha=0 and nothing else drawn: the frame itself.
    np.testing.assert_array_equal(draw_overlay(frame, res, alpha=0, show_regions=False, show_verdict=False), frame)
    # min_level=0 tints everything a little (the colour map at 0 is dark blue).
    assert np.any(draw_overlay(frame, res, min_level=0.0, show_regions=False, show_verdict=False) != out)


def test_regions_verdict_and_grey_frames(det, frame):
    res = _hot_result(det, frame, image_threshold=-1e9)  # every score is above: DEFECT
    assert res.is_anomalous and res.regions
    out = draw_overlay(frame, res, alpha=0)
    r = res.regions[0]
    # Region box drawn in red on its left edge (below the banner).
    y = r.y + r.h - 1
    assert tuple(out[y, r.x]) == (0, 0, 255)
    assert tuple(out[2, 2]) == (0, 0, 255)  # red DEFECT banner
    apply_thresholds(det, Thresholds(image_threshold=1e9, pixel_threshold=1e9))
    ok = det.predict(frame)
    assert ok.is_anomalous is False and not ok.regions
    assert tuple(draw_overlay(frame, ok)[2, 2]) == (0, 170, 0)  # green OK banner
    apply_thresholds(det, None)
    with pytest.warns(UserWarning, match="until the bundle is calibrated"):
        unc = det.predict(frame)
    assert tuple(draw_overlay(frame, unc)[2, 2]) == (128, 128, 128)  # grey UNCALIBRATED banner
    grey = frame[:, :, 1].copy()
    g = draw_overlay(grey, det.predict(grey), alpha=0, show_verdict=False)
    assert g.shape == (*grey.shape, 3)
    np.testing.assert_array_equal(g, np.repeat(grey[:, :, None], 3, axis=2))


def test_roi_offset_and_mismatch(det, frame):
    roi = (40, 60, 120, 100)
    res = _hot_result(det, frame, roi=roi)
    assert res.anomaly_map.shape == (100, 120)
    out = draw_overlay(frame, res, show_regions=False, show_verdict=False)
    outside = np.ones(frame.shape[:2], bool)
    outside[60:160, 40:160] = False
    np.testing.assert_array_equal(out[outside], frame[outside])  # nothing drawn outside the ROI
    hot = np.zeros(frame.shape[:2], bool)
    hot[60:160, 40:160] = res.anomaly_map >= 0.5
    hot[60, :] = hot[159, :] = False  # the ROI outline is drawn on the border rows / columns
    hot[:, 40] = hot[:, 159] = False
    assert np.any(out != frame, axis=2)[hot].mean() > 0.95
    with pytest.raises(ValueError, match="does not fit this"):
        draw_overlay(frame[:80, :80], res)
    with pytest.raises(ValueError, match="alpha"):
        draw_overlay(frame, res, alpha=1.5)


def test_training_report_overlay_shares_the_colouring(frame):
    from edge_ad.evaluation.overlay import render_overlay
    from edge_ad.runtime.overlay import heat_colors

    amap = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    rgb = frame[:, :, ::-1].copy()
    out = render_overlay(rgb, amap, None, vmin=0.0, vmax=1.0, alpha=1.0)
    h, w = frame.shape[:2]
    import cv2

    expected = heat_colors(cv2.resize(amap, (w, h), interpolation=cv2.INTER_LINEAR))
    np.testing.assert_array_equal(out, expected)
