"""Reduced-size decode of folder frames: results in the stored frame's coordinates (maps at its size,
region boxes in its pixels), the header size reader, and the default / opt-out."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from edge_ad.runtime import Detector, read_image
from edge_ad.runtime.benchmark import benchmark, format_report
from edge_ad.runtime.image_io import jpeg_size, read_image_reduced


def _block_frame(real_root, tmp_path, factor: int = 4, model: int = 64):
    """A real defective hazelnut frame made block-constant (factor x factor blocks), as a JPEG
    (quality 100, no chroma subsampling).

    Decoded in full and resized to the model (exact factor: each output pixel is one block) or
    decoded at 1/factor (one pixel per block), the model gets the same input up to the JPEG's
    rounding (measured: at most 1 grey level off, model maps within 0.005), so the results can only
    differ in the coordinates they are reported in.
    """
    frame = read_image(real_root / "mvtec_hazelnut_256" / "test" / "crack" / "000.png", "bgr")
    small = cv2.resize(frame, (model, model), interpolation=cv2.INTER_AREA)
    block = np.repeat(np.repeat(small, factor, 0), factor, 1)
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "000.jpg"), block, [cv2.IMWRITE_JPEG_QUALITY, 100, cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
                                                 cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    return folder, block


@pytest.mark.parametrize("map_resolution", ["frame", "lazy"])
def test_reduced_decode_reports_regions_and_maps_in_frame_pixels(onnx_bundle, real_root, tmp_path, map_resolution):
    det = Detector.load(onnx_bundle, map_resolution=map_resolution)
    folder, block = _block_frame(real_root, tmp_path)
    runs = {}
    for reduced in (False, True):
        with det.stream(str(folder), reduced_decode=reduced, keep_frames=True) as s:
            (runs[reduced],) = list(s)
    full, red = runs[False], runs[True]
    assert (full.decode_scale, red.decode_scale) == (1, 4)
    assert red.frame.shape == (64, 64, 3) and full.frame.shape == block.shape  # the decoded arrays
    np.testing.assert_allclose(red.model_map, full.model_map, atol=0.01)  # the model saw the same input
    # ... so the results, in the stored frame's coordinates, are the same: maps at its size, same regions
    assert red.raw_map.shape == full.raw_map.shape == block.shape[:2]
    np.testing.assert_allclose(red.raw_map, full.raw_map, atol=0.01)
    assert full.regions and len(red.regions) == len(full.regions)  # a real crack: something to compare
    for a, b in zip(red.regions, full.regions):
        assert max(abs(a.x - b.x), abs(a.y - b.y), abs(a.x + a.w - b.x - b.w), abs(a.y + a.h - b.y - b.h)) <= 1, (a, b)
        assert b.x + b.w <= 256 and b.y + b.h <= 256
    assert red.regions[0].x + red.regions[0].w > 64 or red.regions[0].y + red.regions[0].h > 64  # not decoded px


def test_reduced_decode_is_the_default_for_folders(onnx_bundle, real_root):
    det = Detector.load(onnx_bundle, map_resolution="lazy")
    with det.stream(str(real_root / "bsdata_pitting" / "test" / "pitting"), max_frames=2) as s:
        res = list(s)
    full = [read_image(p, "bgr") for p in sorted((real_root / "bsdata_pitting" / "test" / "pitting").iterdir())[:2]]
    assert [r.decode_scale for r in res] == [4, 4]  # 64 px model: 1/4 keeps >= 64 rows
    assert [r.raw_map.shape for r in res] == [f.shape[:2] for f in full]
    assert all(q.x + q.w <= f.shape[1] and q.y + q.h <= f.shape[0] for r, f in zip(res, full) for q in r.regions)
    with det.stream(str(real_root / "bsdata_pitting" / "test" / "pitting"), max_frames=2,
                    reduced_decode=False) as s:
        assert [r.decode_scale for r in s] == [1, 1]
    rep = benchmark(det, str(real_root / "bsdata_pitting" / "test" / "good"), warmup=0, iterations=30, progress=False)
    assert rep["decode_scales"] == [4, 8] and "decoded at 1/4 and 1/8" in format_report(rep)


def test_jpeg_size_from_headers_matches_the_decoded_size(real_root):
    files = sorted((real_root / "bsdata_pitting" / "test" / "pitting").iterdir())
    for f in files:
        full = read_image(f, "bgr")
        assert jpeg_size(f.read_bytes()) == full.shape[:2], f
        image, factor, size = read_image_reduced(f, (64, 64))
        assert factor in (4, 8) and size == full.shape[:2]
        assert image.shape[:2] == (-(-size[0] // factor), -(-size[1] // factor))
    png = real_root / "mvtec_hazelnut_256" / "test" / "crack" / "000.png"  # not a JPEG: decoded in full
    assert jpeg_size(png.read_bytes()) is None and jpeg_size(b"\xff\xd8\xff") is None
    image, factor, size = read_image_reduced(png, (64, 64))
    assert factor == 1 and image.shape[:2] == size == (256, 256)
    np.testing.assert_array_equal(image, read_image(png, "bgr"))


def test_run_save_draws_reduced_frames_at_the_stored_size(onnx_bundle, real_root, tmp_path):
    from edge_ad.runtime import run_stream

    saved = tmp_path / "out.avi"
    folder = real_root / "bsdata_pitting" / "test" / "pitting"
    stats = run_stream(onnx_bundle, str(folder), save=str(saved), max_frames=2, progress=False)
    assert stats.delivered == 2
    cap = cv2.VideoCapture(str(saved))
    ok, first = cap.read()
    cap.release()
    assert ok and first.shape[:2] == read_image(sorted(folder.iterdir())[0], "bgr").shape[:2]  # not 1/4 size
