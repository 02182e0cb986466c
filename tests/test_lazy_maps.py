"""map_resolution="lazy": frame-resolution maps made on first access (same values as "frame") and
regions found at the model's resolution, scaled to frame pixels: the same regions within one model
pixel, on real defective images."""
from __future__ import annotations

import math

import numpy as np
import pytest

from edge_ad.data import MVTecDataset
from edge_ad.runtime import Detector, read_image
from edge_ad.runtime.result import LazyMapsResult

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def bundle(onnx_bundle):
    return onnx_bundle


@pytest.fixture(scope="module")
def frames(real_root):
    return [read_image(s.path, "bgr") for s in MVTecDataset(real_root, CATEGORY, "test")]


def _iou(a, b) -> float:
    x0, y0 = max(a.x, b.x), max(a.y, b.y)
    x1, y1 = min(a.x + a.w, b.x + b.w), min(a.y + a.h, b.y + b.h)
    inter = max(0, x1 - x0) * max(0, y1 - y0)
    return inter / (a.w * a.h + b.w * b.h - inter)


def test_lazy_maps_equal_frame_maps_and_regions_within_one_model_pixel(bundle, frames):
    lazy, full = Detector.load(bundle, map_resolution="lazy"), Detector.load(bundle)
    assert lazy.pixel_threshold is not None
    h, w = lazy.spec.size
    found = 0
    for frame in frames:
        a, b = lazy.predict(frame), full.predict(frame)
        assert isinstance(a, LazyMapsResult) and not a._cache  # nothing made yet
        assert a.score == b.score and a.is_anomalous == b.is_anomalous
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        np.testing.assert_array_equal(a.raw_map, b.raw_map)
        np.testing.assert_array_equal(a.defect_mask, b.defect_mask)
        assert a.anomaly_map is a.anomaly_map  # cached
        # One model pixel, in frame pixels along each axis.
        tol_x, tol_y = math.ceil(frame.shape[1] / w), math.ceil(frame.shape[0] / h)
        assert len(a.regions) == len(b.regions)
        for r in a.regions:
            m = max(b.regions, key=lambda q: _iou(r, q))
            assert abs(r.x - m.x) <= tol_x and abs(r.x + r.w - m.x - m.w) <= tol_x, (r, m)
            assert abs(r.y - m.y) <= tol_y and abs(r.y + r.h - m.y - m.h) <= tol_y, (r, m)
            found += 1
    assert found > 0  # real defects were compared


def test_lazy_results_through_a_stream_with_roi(bundle, frames):
    lazy = Detector.load(bundle, map_resolution="lazy")
    roi = (10, 20, 200, 180)
    with lazy.stream({"cam": frames[:3]}, roi=roi) as stream:
        res = list(stream)
    assert [r.raw_map.shape for r in res] == [(180, 200)] * 3
    for r in res:
        assert all(q.x >= 10 and q.y >= 20 and q.x + q.w <= 210 and q.y + q.h <= 200 for q in r.regions)
