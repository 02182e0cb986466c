"""Preprocessing: C++ extension vs pure-numpy reference vs OpenCV, layouts, buffers, errors.

Tests that need the extension FAIL (never skip) when it is not built; only
``test_reference_fallback_without_extension`` exercises the numpy path on its own.
"""
from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from edge_ad.runtime import PreprocessSpec, extension_available, preprocess, preprocess_batch, read_image

from edge_ad.runtime.preprocess_spec import effective_resize

pp = importlib.import_module("edge_ad.runtime.preprocessing")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _ext():
    """The compiled module, or a test failure saying how to build it."""
    assert extension_available(), (
        f"the C++ preprocessing extension is not built ({pp._EXT_ERROR}); "
        "run `pip install --no-build-isolation -e .` from the repository root"
    )
    return pp._ext


@pytest.fixture(scope="module")
def cv2():
    return pytest.importorskip("cv2")


def _rng(seed=0):
    return np.random.default_rng(seed)


def _frame(h, w, c=3, seed=0):
    shape = (h, w) if c is None else (h, w, c)
    return _rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _levels(out: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """(1, 3, H, W) or (3, H, W) normalised output -> (H, W, 3) RGB in uint8 levels (float64)."""
    x = np.asarray(out, np.float64).reshape(3, spec.height, spec.width)
    x = x * np.asarray(spec.std)[:, None, None] + np.asarray(spec.mean)[:, None, None]
    return np.moveaxis(x * 255.0, 0, 2)


def _cv2_rgb(cv2, bgr, spec: PreprocessSpec) -> np.ndarray:
    mode = effective_resize(spec.resize, bgr.shape[:2], spec.size)
    flag = cv2.INTER_LINEAR if mode == "bilinear" else cv2.INTER_AREA
    r = cv2.resize(np.ascontiguousarray(bgr), (spec.width, spec.height), interpolation=flag)
    if r.ndim == 2:
        return np.repeat(r[:, :, None], 3, axis=2).astype(np.float64)
    return r[:, :, ::-1].astype(np.float64)


def _maxdiff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


# ------------------------------------------------------------------------------------------------
# Extension present, agreement with the reference and with OpenCV
# ------------------------------------------------------------------------------------------------


def test_extension_is_built():
    ext = _ext()
    assert ext.API_VERSION == pp._EXT_API_VERSION
    assert ext.auto_threads() >= 1


GEOMETRIES = [
    # (src_h, src_w), (dst_h, dst_w)
    ((480, 640), (224, 224)),  # downscale, non-integer factors
    ((97, 131), (31, 17)),  # non-square, odd sizes
    ((448, 224), (224, 112)),  # exact 2x (OpenCV's area fast path)
    ((300, 300), (100, 100)),  # exact 3x
    ((37, 53), (224, 224)),  # upscale
    ((5, 7), (64, 48)),  # strong upscale
    ((300, 40), (100, 120)),  # down in y, up in x (INTER_AREA uses its bilinear variant)
    ((30, 400), (90, 100)),  # up in y, down in x
    ((64, 64), (64, 64)),  # identity
    ((1, 1), (8, 6)),  # single source pixel
    ((50, 60), (1, 1)),  # single output pixel
]


@pytest.mark.parametrize("mode", ["auto", "bilinear", "area"])
@pytest.mark.parametrize("src,dst", GEOMETRIES, ids=[f"{s[0]}x{s[1]}-{d[0]}x{d[1]}" for s, d in GEOMETRIES])
def test_matches_cv2_and_reference(cv2, mode, src, dst):
    _ext()
    bgr = _frame(*src, seed=src[0] * 7 + dst[1])
    spec = PreprocessSpec(*dst, resize=mode)
    got = preprocess(bgr, spec, backend="extension")
    ref = preprocess(bgr, spec, backend="reference")
    assert got.shape == (1, 3, *dst) and got.dtype == np.float32
    assert _maxdiff(_levels(got, spec), _levels(ref, spec)) <= 1e-3
    assert _maxdiff(_levels(got, spec), _cv2_rgb(cv2, bgr, spec)) <= 1.0


@pytest.mark.parametrize("mode", ["auto", "bilinear", "area"])
def test_full_hd_frame_to_224(cv2, mode):
    _ext()
    bgr = _frame(1080, 1920, seed=5)
    spec = PreprocessSpec(224, 224, resize=mode)
    got = preprocess(bgr, spec)
    assert _maxdiff(_levels(got, spec), _cv2_rgb(cv2, bgr, spec)) <= 1.0
    assert _maxdiff(got, preprocess(bgr, spec, backend="reference")) <= 1e-4


@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_auto_resize_is_area_down_and_bilinear_up(cv2, backend):
    """The default mode antialiases a downscale (INTER_AREA) and interpolates an upscale (INTER_LINEAR)."""
    if backend == "extension":
        _ext()
    assert PreprocessSpec(8, 8).resize == "auto"
    down, up = PreprocessSpec(64, 96), PreprocessSpec(300, 200)
    bgr = _frame(250, 370, seed=3)
    got = _levels(preprocess(bgr, down, backend=backend), down)
    area = cv2.resize(bgr, (96, 64), interpolation=cv2.INTER_AREA)[:, :, ::-1]
    linear = cv2.resize(bgr, (96, 64), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]
    assert _maxdiff(got, area) <= 1.0 and _maxdiff(got, linear) > 20  # random pixels: the modes differ a lot
    got = _levels(preprocess(bgr, up, backend=backend), up)
    assert _maxdiff(got, cv2.resize(bgr, (200, 300), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]) <= 1.0
    mixed = PreprocessSpec(100, 500)  # down in y, up in x: not a pure downscale -> bilinear
    got = _levels(preprocess(bgr, mixed, backend=backend), mixed)
    assert _maxdiff(got, cv2.resize(bgr, (500, 100), interpolation=cv2.INTER_LINEAR)[:, :, ::-1]) <= 1.0


def test_effective_resize():
    assert effective_resize("auto", (480, 640), (240, 320)) == "area"
    assert effective_resize("auto", (240, 320), (240, 320)) == "area"
    assert effective_resize("auto", (200, 640), (240, 320)) == "bilinear"
    assert effective_resize("bilinear", (480, 640), (240, 320)) == "bilinear"
    with pytest.raises(ValueError, match="resize must be one of"):
        effective_resize("cubic", (1, 1), (1, 1))


def test_normalisation_formula():
    # A constant frame resizes to itself: (p / 255 - mean) / std exactly (float32 rounding aside).
    _ext()
    spec = PreprocessSpec(7, 9, mean=(0.1, 0.5, 0.9), std=(0.2, 0.3, 0.4))
    rgb = np.empty((20, 30, 3), np.uint8)
    rgb[...] = (10, 128, 250)
    out = preprocess(rgb, spec, color_order="rgb")
    expected = (np.array([10, 128, 250]) / 255 - np.array(spec.mean)) / np.array(spec.std)
    np.testing.assert_allclose(out[0, :, 3, 4], expected, rtol=1e-5, atol=1e-6)
    assert np.ptp(out[0], axis=(1, 2)).max() < 1e-5


@pytest.mark.parametrize("order", [0, 1])
@pytest.mark.parametrize("mode", ["auto", "bilinear", "area"])
def test_both_pass_orders_agree(mode, order):
    # The extension picks horizontal-first or vertical-first by a cost model; force each one.
    ext = _ext()
    spec = PreprocessSpec(45, 70, resize=mode)
    for frame in (_frame(123, 157), _frame(123, 157)[:, ::2], _frame(31, 29, c=None), _frame(20, 26)[:, :, ::-1]):
        out = np.empty((1, 3, 45, 70), np.float32)
        ext.preprocess_into([frame], out, True, mode, spec.mean, spec.std, 1, order)
        ref = preprocess(frame, spec, backend="reference")
        assert _maxdiff(out, ref) <= 1e-4


def test_taps_match_reference_weights():
    ext = _ext()
    for src, dst, kind in [(1920, 224, "linear"), (10, 37, "linear"), (1080, 224, "box"), (7, 3, "box"),
                           (40, 120, "area_linear"), (300, 100, "area_linear"), (1, 5, "linear")]:
        k, start, w = ext.taps(src, dst, kind)
        dense_c = np.zeros((dst, src))
        for d in range(dst):
            dense_c[d, start[d]:start[d] + k] += np.asarray(w[d * k:(d + 1) * k])
        idx, wr = pp._axis_taps(src, dst, kind)
        dense_r = np.zeros((dst, src))
        np.add.at(dense_r, (np.repeat(np.arange(dst), idx.shape[1]), idx.ravel()), wr.ravel())
        np.testing.assert_allclose(dense_c, dense_r, atol=1e-6, err_msg=f"{src}->{dst} {kind}")
        np.testing.assert_allclose(dense_c.sum(axis=1), 1.0, atol=2e-3)  # (box: OpenCV's 1e-3 cut-off)


# ------------------------------------------------------------------------------------------------
# Colour orders, grey, ROI, strides
# ------------------------------------------------------------------------------------------------


def test_bgr_and_rgb_give_the_same_rgb_output():
    _ext()
    spec = PreprocessSpec(50, 40)
    bgr = _frame(90, 70)
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    a = preprocess(bgr, spec, color_order="bgr")
    assert np.array_equal(a, preprocess(rgb, spec, color_order="rgb"))
    # A channel-reversed view (negative channel stride) is read in place.
    assert _maxdiff(a, preprocess(bgr[:, :, ::-1], spec, color_order="rgb")) <= 1e-5
    # Wrong order swaps R and B.
    swapped = preprocess(bgr, spec, color_order="rgb")
    assert _maxdiff(_levels(swapped, spec)[..., ::-1], _levels(a, spec)) <= 1e-3


@pytest.mark.parametrize("mode", ["auto", "bilinear", "area"])
def test_grey_frames_replicate_to_rgb(cv2, mode):
    _ext()
    spec = PreprocessSpec(33, 47, resize=mode)
    grey = _frame(71, 95, c=None)
    out = preprocess(grey, spec, color_order="gray")
    for order in ("bgr", "rgb"):
        assert np.array_equal(out, preprocess(grey, spec, color_order=order))
    assert np.array_equal(out, preprocess(grey[:, :, None], spec, color_order="gray"))
    lv = _levels(out, spec)
    assert _maxdiff(lv[..., 0], lv[..., 1]) < 1e-3 and _maxdiff(lv[..., 0], lv[..., 2]) < 1e-3
    assert _maxdiff(lv, _cv2_rgb(cv2, grey, spec)) <= 1.0
    assert _maxdiff(out, preprocess(grey, spec, backend="reference")) <= 1e-4


@pytest.mark.parametrize("mode", ["auto", "bilinear", "area"])
def test_roi_crops_before_resizing(cv2, mode):
    _ext()
    spec = PreprocessSpec(64, 48, resize=mode)
    frame = _frame(200, 300)
    x, y, w, h = 37, 21, 150, 111
    crop = np.ascontiguousarray(frame[y:y + h, x:x + w])
    got = preprocess(frame, spec, roi=(x, y, w, h))
    assert _maxdiff(got, preprocess(crop, spec)) <= 1e-5
    assert _maxdiff(_levels(got, spec), _cv2_rgb(cv2, crop, spec)) <= 1.0
    assert _maxdiff(got, preprocess(frame, spec, roi=(x, y, w, h), backend="reference")) <= 1e-4
    # numpy integers are fine, and the full frame as ROI equals no ROI.
    assert np.array_equal(got, preprocess(frame, spec, roi=tuple(np.int64(v) for v in (x, y, w, h))))
    assert np.array_equal(preprocess(frame, spec, roi=(0, 0, 300, 200)), preprocess(frame, spec))


@pytest.mark.parametrize(
    "view",
    [
        lambda f: f[::2, 10:-10],  # row step 2, column slice of a bigger frame
        lambda f: f[:, ::3],  # pixel stride 9 bytes
        lambda f: f[::-1],  # negative row stride
        lambda f: f[:, ::-1],  # negative pixel stride
        lambda f: f.transpose(1, 0, 2),  # column-major pixels
        lambda f: np.asfortranarray(f),  # channel stride = H * W
        lambda f: f[5:100, 7:90][::3, ::2],  # ROI view of a view
        lambda f: np.concatenate([f, f[..., :1]], axis=2)[..., :3],  # BGR view of a BGRA frame
    ],
    ids=["rows2-cols", "cols3", "flipud", "fliplr", "transposed", "fortran", "nested", "bgra-view"],
)
@pytest.mark.parametrize("mode", ["auto", "bilinear", "area"])
def test_strided_views_match_contiguous_copies(view, mode):
    _ext()
    spec = PreprocessSpec(40, 56, resize=mode)
    v = view(_frame(180, 240))
    expected = preprocess(np.ascontiguousarray(v), spec)
    assert _maxdiff(preprocess(v, spec), expected) <= 1e-4
    assert _maxdiff(preprocess(v, spec, backend="reference"), expected) <= 1e-4


def test_read_only_and_broadcast_frames():
    _ext()
    spec = PreprocessSpec(10, 12)
    frame = _frame(30, 40)
    frame.flags.writeable = False
    assert preprocess(frame, spec).shape == (1, 3, 10, 12)
    flat = np.broadcast_to(np.array([10, 20, 30], np.uint8), (30, 40, 3))  # zero strides
    out = preprocess(flat, spec, color_order="rgb")
    assert _maxdiff(_levels(out, spec)[0, 0], [10, 20, 30]) < 1e-3


# ------------------------------------------------------------------------------------------------
# Output buffers, float16, batches, threads
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["nchw", "chw"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_writes_into_caller_buffer_without_reallocation(shape, dtype):
    _ext()
    spec = PreprocessSpec(24, 32)
    buf = np.full((1, 3, 24, 32) if shape == "nchw" else (3, 24, 32), np.nan, dtype)
    address = buf.__array_interface__["data"][0]
    for backend in ("reference", "extension"):  # the extension's result stays in buf
        res = preprocess(_frame(50, 60), spec, out=buf, backend=backend)
        assert res is buf
        assert res.__array_interface__["data"][0] == address
        assert np.isfinite(buf).all()
    expected = preprocess(_frame(50, 60), spec, dtype=dtype)
    assert np.array_equal(buf.reshape(expected.shape), expected)


def test_float16_output(cv2):
    ext = _ext()
    spec = PreprocessSpec(64, 80, resize="area")
    frame = _frame(150, 170)
    h = preprocess(frame, spec, dtype=np.float16)
    f = preprocess(frame, spec)
    assert h.dtype == np.float16 and h.shape == f.shape
    # Round to nearest even of the float32 result (as numpy's astype).
    assert np.array_equal(h.view(np.uint16), f.astype(np.float16).view(np.uint16))
    assert _maxdiff(_levels(h, spec), _cv2_rgb(cv2, frame, spec)) <= 1.0
    assert _maxdiff(h, preprocess(frame, spec, dtype=np.float16, backend="reference")) <= 2e-3
    # The portable float -> half conversion itself, on edge cases and a dense sweep.
    special = np.array([0.0, -0.0, 1.0, -2.5, 65504, 65519.99, 65520, 1e6, -1e6, np.inf, -np.inf, 6.1e-5,
                        6.0e-8, 2.98e-8, 2.99e-8, 1e-10, 5.96e-8 * 1.5, 0.333333, 1 + 2**-11, 1 + 3 * 2**-11],
                       np.float32)
    sweep = np.concatenate([special, _rng(1).standard_normal(200_000).astype(np.float32) * 4,
                            np.ldexp(_rng(2).random(50_000), _rng(3).integers(-30, 17, 50_000)).astype(np.float32)])
    bits = np.empty(sweep.shape, np.uint16)
    ext.f32_to_f16(sweep, bits)
    with np.errstate(over="ignore"):
        assert np.array_equal(bits, sweep.astype(np.float16).view(np.uint16))
    nan_bits = np.empty(1, np.uint16)
    ext.f32_to_f16(np.array([np.nan], np.float32), nan_bits)
    assert np.isnan(nan_bits.view(np.float16)[0])


@pytest.mark.parametrize("backend", ["extension", "reference"])
def test_batch_matches_single_frames(backend):
    _ext()
    spec = PreprocessSpec(36, 28, resize="area")
    frames = [_frame(100, 80, seed=1), _frame(57, 91, c=None, seed=2), _frame(120, 160, seed=3)[::2, 5:-5],
              _frame(30, 20, c=1, seed=4)]
    out = preprocess_batch(frames, spec, backend=backend)
    assert out.shape == (4, 3, 36, 28) and out.dtype == np.float32
    for i, f in enumerate(frames):
        assert _maxdiff(out[i], preprocess(f, spec, backend="extension")[0]) <= 1e-4
    # Per-frame ROIs (None = whole frame), one shared ROI, a caller buffer, a 4-D array, float16.
    rois = [(1, 2, 50, 40), None, (0, 0, 10, 10), (3, 3, 10, 20)]
    buf = np.empty((4, 3, 36, 28), np.float16)
    res = preprocess_batch(frames, spec, roi=rois, out=buf, backend=backend)
    assert res is buf
    for i, (f, r) in enumerate(zip(frames, rois)):
        assert _maxdiff(buf[i], preprocess(f, spec, roi=r, dtype=np.float16)[0]) <= 2e-3
    stack = np.stack([_frame(64, 64, seed=s) for s in range(3)])
    both = preprocess_batch(stack, spec, roi=(4, 4, 40, 50), backend=backend)
    for i in range(3):
        assert _maxdiff(both[i], preprocess(stack[i], spec, roi=(4, 4, 40, 50))[0]) <= 1e-4


def test_threads_do_not_change_results():
    ext = _ext()
    frame = _frame(1080, 1920, seed=9)
    for mode in ("bilinear", "area"):
        spec = PreprocessSpec(500, 700, resize=mode)  # large output: worth several threads
        one = preprocess(frame, spec, num_threads=1)
        for n in (0, 2, 3, 8):
            assert np.array_equal(preprocess(frame, spec, num_threads=n), one)
        out = np.empty((1, 3, 500, 700), np.float32)
        used = ext.preprocess_into([frame], out, True, mode, spec.mean, spec.std, 4, -1)
        assert 2 <= used <= 4  # big work is split...
        assert np.array_equal(out, one)
    small = np.empty((1, 3, 8, 8), np.float32)
    assert ext.preprocess_into([_frame(16, 16)], small, True, "bilinear", MEAN, STD, 8, -1) == 1  # ...tiny is not
    batch = preprocess_batch([frame[::2, ::2]] * 3, PreprocessSpec(224, 224), num_threads=3)
    assert np.array_equal(batch[2], preprocess(frame[::2, ::2], PreprocessSpec(224, 224), num_threads=1)[0])


def test_concurrent_python_threads():
    # The extension releases the GIL and shares a taps cache between threads: results must not mix.
    _ext()
    specs = [PreprocessSpec(60 + 7 * i, 50 + 3 * i, resize=("area", "bilinear")[i % 2]) for i in range(8)]
    frame = _frame(300, 400)
    expected = [preprocess(frame, s) for s in specs]
    errors: list[str] = []

    def work(k: int) -> None:
        for j in range(12):
            i = (k + j) % len(specs)
            if not np.array_equal(preprocess(frame, specs[i], num_threads=2), expected[i]):
                errors.append(f"thread {k} spec {i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


# ------------------------------------------------------------------------------------------------
# Real images
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "bilinear", "area"])
def test_real_hazelnut_png(cv2, real_root, mode):
    _ext()
    path = real_root / "mvtec_hazelnut_256" / "train" / "good" / "000.png"
    bgr = read_image(path, mode="bgr")
    rgb = read_image(path, mode="rgb")
    spec = PreprocessSpec(224, 224, resize=mode)
    out = preprocess(bgr, spec)
    assert np.array_equal(out, preprocess(rgb, spec, color_order="rgb"))
    assert _maxdiff(_levels(out, spec), _cv2_rgb(cv2, bgr, spec)) <= 1.0
    assert _maxdiff(out, preprocess(bgr, spec, backend="reference")) <= 1e-4
    up = PreprocessSpec(300, 280, resize=mode)
    assert _maxdiff(_levels(preprocess(bgr, up), up), _cv2_rgb(cv2, bgr, up)) <= 1.0


def test_real_magnetic_tile_grey_jpg(cv2, real_root):
    _ext()
    path = sorted((real_root / "magnetic_tile").rglob("*.jpg"))[0]
    grey = read_image(path, mode="gray")
    assert grey.ndim == 2
    for mode in ("bilinear", "area"):
        spec = PreprocessSpec(224, 224, resize=mode)
        out = preprocess(grey, spec, color_order="gray")
        assert _maxdiff(_levels(out, spec), _cv2_rgb(cv2, grey, spec)) <= 1.0
        assert _maxdiff(out, preprocess(grey, spec, backend="reference")) <= 1e-4
        # Same pixels read as 3-channel BGR give the same input.
        bgr = read_image(path, mode="bgr")
        assert _maxdiff(preprocess(bgr, spec), out) <= 1e-4


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

SPEC = PreprocessSpec(16, 16)


@pytest.mark.parametrize("backend", ["extension", "reference"])
@pytest.mark.parametrize(
    "frame,exc,match",
    [
        (np.zeros((20, 20, 3), np.float32), TypeError, "convert it to uint8"),
        (np.zeros((20, 20, 3), np.uint16), TypeError, "uint8"),
        (np.zeros((20, 20), bool), TypeError, "uint8"),
        ([[1, 2], [3, 4]], TypeError, "numpy uint8 array"),
        (np.zeros((20, 20, 4), np.uint8), ValueError, "drop alpha"),
        (np.zeros((20, 20, 2), np.uint8), ValueError, r"\(H, W, 3\)"),
        (np.zeros(20, np.uint8), ValueError, r"\(H, W\)"),
        (np.zeros((2, 20, 20, 3), np.uint8), ValueError, "preprocess_batch"),
        (np.zeros((0, 20, 3), np.uint8), ValueError, "empty"),
        (np.zeros((20, 0), np.uint8), ValueError, "empty"),
    ],
    ids=["float32", "uint16", "bool", "list", "bgra", "2ch", "1d", "4d", "empty-rows", "empty-cols"],
)
def test_bad_frames(frame, exc, match, backend):
    with pytest.raises(exc, match=match):
        preprocess(frame, SPEC, backend=backend)


def test_gray_order_on_colour_frame():
    with pytest.raises(ValueError, match="COLOR_BGR2GRAY"):
        preprocess(_frame(20, 20), SPEC, color_order="gray")


@pytest.mark.parametrize(
    "roi,exc,match",
    [
        ((15, 10, 26, 5), ValueError, "outside"),
        ((0, 26, 5, 5), ValueError, "outside"),
        ((0, 0, 41, 30), ValueError, "outside"),
        ((-1, 0, 5, 5), ValueError, "outside"),
        ((0, 0, 0, 5), ValueError, "positive"),
        ((0, 0, 5), TypeError, "four ints"),
        ((0.0, 0, 5, 5), TypeError, "four ints"),
        ((True, 0, 5, 5), TypeError, "four ints"),
        (5, TypeError, "four ints"),
    ],
)
def test_bad_roi(roi, exc, match):
    with pytest.raises(exc, match=match):
        preprocess(_frame(30, 40), SPEC, roi=roi)


@pytest.mark.parametrize(
    "out,exc,match",
    [
        (np.empty((1, 3, 16, 15), np.float32), ValueError, r"expected \(1, 3, 16, 16\) or \(3, 16, 16\)"),
        (np.empty((16, 16, 3), np.float32), ValueError, "expected"),
        (np.empty((2, 3, 16, 16), np.float32), ValueError, "expected"),
        (np.empty((1, 3, 16, 16), np.float64), TypeError, "float32 or float16"),
        (np.empty((1, 3, 16, 16), np.uint8), TypeError, "float32 or float16"),
        (np.empty((1, 3, 16, 16), ">f4"), TypeError, "float32 or float16"),
        (np.empty((1, 16, 16, 3), np.float32).transpose(0, 3, 1, 2), ValueError, "C-contiguous"),
        (np.empty((1, 3, 16, 32), np.float32)[..., ::2], ValueError, "C-contiguous"),
        ([0.0] * 768, TypeError, "numpy array"),
    ],
    ids=["width", "hwc", "batch2", "float64", "uint8", "big-endian", "transposed", "strided", "list"],
)
def test_bad_out(out, exc, match):
    with pytest.raises(exc, match=match):
        preprocess(_frame(30, 40), SPEC, out=out)


def test_read_only_out_and_dtype_conflicts():
    ro = np.empty((1, 3, 16, 16), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        preprocess(_frame(30, 40), SPEC, out=ro)
    with pytest.raises(TypeError, match="contradicts"):
        preprocess(_frame(30, 40), SPEC, out=np.empty((1, 3, 16, 16), np.float32), dtype=np.float16)
    with pytest.raises(TypeError, match="np.float32 or np.float16"):
        preprocess(_frame(30, 40), SPEC, dtype=np.float64)
    with pytest.raises(TypeError, match="np.float32 or np.float16"):
        preprocess(_frame(30, 40), SPEC, dtype="not a dtype")
    # out's dtype decides when dtype is left at its default.
    half = np.empty((3, 16, 16), np.float16)
    assert preprocess(_frame(30, 40), SPEC, out=half) is half


def test_bad_options():
    frame = _frame(30, 40)
    with pytest.raises(ValueError, match="color_order"):
        preprocess(frame, SPEC, color_order="BGR")
    with pytest.raises(ValueError, match="backend"):
        preprocess(frame, SPEC, backend="cuda")
    for n in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_threads"):
            preprocess(frame, SPEC, num_threads=n)
    with pytest.raises(TypeError, match="PreprocessSpec"):
        preprocess(frame, (16, 16))


def test_bad_batches():
    spec = PreprocessSpec(8, 8)
    with pytest.raises(ValueError, match="empty"):
        preprocess_batch([], spec)
    with pytest.raises(ValueError, match="one per frame"):
        preprocess_batch([_frame(20, 20)] * 3, spec, roi=[(0, 0, 5, 5)] * 2)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 8, 8\)"):
        preprocess_batch([_frame(20, 20)] * 2, spec, out=np.empty((3, 3, 8, 8), np.float32))
    with pytest.raises(TypeError, match=r"frames\[1\].*uint8"):
        preprocess_batch([_frame(20, 20), np.zeros((20, 20, 3))], spec)
    with pytest.raises(ValueError, match=r"frames\[0\]"):
        preprocess_batch([_frame(20, 20)], spec, roi=(10, 10, 20, 20))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        preprocess_batch(np.zeros((4, 4), np.uint8), spec)
    with pytest.raises(TypeError, match="sequence"):
        preprocess_batch(5, spec)


def test_extension_rechecks_its_inputs():
    # Direct calls to the low-level module cannot write out of bounds or convert silently.
    ext = _ext()
    out = np.empty((1, 3, 4, 4), np.float32)
    with pytest.raises(TypeError):
        ext.preprocess_into([np.zeros((8, 8, 3), np.float32)], out, True, "bilinear", MEAN, STD, 0, -1)
    with pytest.raises(ValueError, match="shape"):
        ext.preprocess_into([_frame(8, 8)] * 2, out, True, "bilinear", MEAN, STD, 0, -1)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        ext.preprocess_into([np.zeros((8, 8, 2), np.uint8)], out, True, "bilinear", MEAN, STD, 0, -1)
    with pytest.raises(ValueError, match="empty"):
        ext.preprocess_into([np.zeros((0, 8, 3), np.uint8)], out, True, "bilinear", MEAN, STD, 0, -1)
    with pytest.raises(ValueError, match="resize mode"):
        ext.preprocess_into([_frame(8, 8)], out, True, "cubic", MEAN, STD, 0, -1)
    with pytest.raises(ValueError, match="std"):
        ext.preprocess_into([_frame(8, 8)], out, True, "area", MEAN, (0.2, 0.0, 0.2), 0, -1)
    with pytest.raises(TypeError, match="float32 or float16"):
        ext.preprocess_into([_frame(8, 8)], out.astype(np.float64), True, "area", MEAN, STD, 0, -1)


# ------------------------------------------------------------------------------------------------
# Without the extension
# ------------------------------------------------------------------------------------------------


def test_reference_fallback_without_extension(monkeypatch):
    spec = PreprocessSpec(20, 30, resize="area")
    frame = _frame(64, 48)
    expected = preprocess(frame, spec, backend="reference")
    monkeypatch.setattr(pp, "_ext", None)
    monkeypatch.setattr(pp, "_EXT_ERROR", "ImportError: simulated")
    assert not extension_available()
    assert np.array_equal(preprocess(frame, spec), expected)  # auto -> reference
    assert preprocess_batch([frame, frame[:, :, 0]], spec).shape == (2, 3, 20, 30)
    with pytest.raises(ImportError, match="pip install --no-build-isolation -e ."):
        preprocess(frame, spec, backend="extension")


def test_runtime_imports_without_extension_cv2_and_torch():
    code = textwrap.dedent(
        """
        import sys
        for name in ("edge_ad.runtime._preprocess", "cv2", "torch"):
            sys.modules[name] = None  # makes `import name` raise ImportError
        import numpy as np
        import edge_ad.runtime as rt
        assert not rt.extension_available()
        out = rt.preprocess(np.full((30, 40, 3), 100, np.uint8), rt.PreprocessSpec(8, 12, resize="area"))
        assert out.shape == (1, 3, 8, 12), out.shape
        try:
            rt.preprocess(np.zeros((30, 40, 3), np.uint8), rt.PreprocessSpec(8, 12), backend="extension")
        except ImportError as exc:
            assert "pip install" in str(exc)
        else:
            raise AssertionError("backend='extension' should raise")
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_module_and_function_access():
    # The function is exported from the package (and lazily from edge_ad); the module keeps its own name.
    import edge_ad
    import edge_ad.runtime

    assert edge_ad.runtime.preprocessing is pp
    assert edge_ad.runtime.preprocess is pp.preprocess and edge_ad.preprocess is pp.preprocess
    assert pp.extension_available() == extension_available()
    assert edge_ad.preprocess(_frame(20, 20), SPEC).shape == (1, 3, 16, 16)
