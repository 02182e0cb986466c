"""Camera frame -> model input: crop, resize, normalise, HWC uint8 -> NCHW float RGB.

Two backends with one signature and the same arithmetic:

* ``"extension"``: the C++ module ``edge_ad.runtime._preprocess`` (built by ``pip install -e .``):
  releases the GIL, multi-threaded for big work, reads any-stride frames without copying;
* ``"reference"``: pure numpy (no OpenCV, no torch), used when the extension is not built.

Semantics (shared by training, evaluation and the device; both backends implement them exactly,
float rounding aside):

* ``roi = (x, y, w, h)`` crops the frame first (it must lie inside the frame).
* ``resize="bilinear"`` is OpenCV ``INTER_LINEAR`` geometry: half-pixel centres,
  ``src = (dst + 0.5) * in / out - 0.5``, clamped at the borders, no antialiasing.
* ``resize="auto"`` (the default) is ``"area"`` when neither axis upscales and ``"bilinear"``
  otherwise, decided per frame: antialiased downscaling without area's blocky upscaling.
* ``resize="area"`` is OpenCV ``INTER_AREA``: when neither axis upscales, each output pixel is the
  average of the source pixels its footprint covers, weighted by the covered fraction; when any
  axis upscales, OpenCV's INTER_AREA bilinear variant (``sx = floor(dx * scale)``,
  ``fx = (dx + 1) - (sx + 1) / scale`` wrapped to ``[0, 1)``) on both axes, as ``cv2.resize`` does.
* Both resizes are separable: ``out = Wy @ img @ Wx.T`` per channel with per-axis weight matrices
  (stored here as fixed-width taps). No intermediate rounding: results match ``cv2.resize`` to
  well under one uint8 level (OpenCV rounds to uint8 and uses fixed-point weights).
* ``value = (pixel / 255 - mean[c]) / std[c]`` in RGB order, computed as
  ``pixel * (1 / (255 std)) + (-mean / std)`` in float32; float16 output rounds to nearest even.
* Grey frames ((H, W) or (H, W, 1)) are replicated to the three RGB channels.
"""
from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence

import numpy as np

from .preprocess_spec import PreprocessSpec, effective_resize

__all__ = ["cuda_preprocess_available", "extension_available", "preprocess", "preprocess_batch"]

_EXT_API_VERSION = 2  # 2: resize mode "auto"
_BUILD_HINT = (
    "Build it from the repository root with `pip install --no-build-isolation -e .` (needs a C++17 "
    "compiler, cmake>=3.18, nanobind and scikit-build-core), or use backend='auto' / 'reference' "
    "for the pure-numpy path."
)

try:  # pragma: no branch - depends on the build
    from . import _preprocess as _ext  # type: ignore[attr-defined]

    if getattr(_ext, "API_VERSION", None) != _EXT_API_VERSION:
        _EXT_ERROR: str | None = (
            f"stale build: API_VERSION {getattr(_ext, 'API_VERSION', None)!r}, expected {_EXT_API_VERSION}"
        )
        _ext = None
    else:
        _EXT_ERROR = None
except ImportError as exc:  # not built (e.g. a source checkout without a compiler)
    _ext = None
    _EXT_ERROR = f"{type(exc).__name__}: {exc}"

COLOR_ORDERS = ("bgr", "rgb", "gray")
BACKENDS = ("auto", "extension", "reference")
_OUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


def extension_available() -> bool:
    """True when the compiled preprocessing extension is built and importable."""
    return _ext is not None


def cuda_preprocess_available() -> bool:
    """True when the extension has the CUDA kernel (built where CMake found nvcc) and a CUDA GPU is visible.

    The TensorRT engine then preprocesses on the GPU (:func:`edge_ad.runtime.cuda.preprocess_cuda_into`).
    """
    return _ext is not None and hasattr(_ext, "preprocess_cuda") and _ext.cuda_device_count() > 0


# ------------------------------------------------------------------------------------------------
# Validation (shared by both backends, so both fail the same way)
# ------------------------------------------------------------------------------------------------


def _check_spec(spec: PreprocessSpec) -> None:
    if not isinstance(spec, PreprocessSpec):
        raise TypeError(f"spec must be a PreprocessSpec, got {type(spec).__name__}")


def _check_options(color_order: str, backend: str, num_threads: int) -> None:
    if color_order not in COLOR_ORDERS:
        raise ValueError(f"color_order must be one of {COLOR_ORDERS}, got {color_order!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, numbers.Integral) or num_threads < 0:
        raise ValueError(f"num_threads must be an int >= 0 (0 = automatic), got {num_threads!r}")


def _out_dtype(dtype: np.dtype | type) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"dtype must be np.float32 or np.float16, got {dtype!r}") from exc
    if dt not in _OUT_DTYPES:
        raise TypeError(f"dtype must be np.float32 or np.float16, got {dt}")
    return dt


def _check_frame(frame: np.ndarray, color_order: str, where: str = "frame") -> np.ndarray:
    """Validate one frame; return it as a (H, W) or (H, W, 3) uint8 view (no copy)."""
    if not isinstance(frame, np.ndarray):
        raise TypeError(
            f"{where} must be a numpy uint8 array (H, W) or (H, W, 3), got {type(frame).__name__}; "
            "convert it with np.asarray(...)"
        )
    if frame.dtype != np.uint8:
        raise TypeError(
            f"{where} has dtype {frame.dtype}, but preprocessing takes uint8 frames (0..255): convert it "
            "to uint8 first, e.g. np.clip(frame * 255, 0, 255).astype(np.uint8) for 0..1 floats, "
            "frame.astype(np.uint8) for 0..255 values, or (frame >> 8).astype(np.uint8) for 16-bit"
        )
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 3 and frame.shape[2] == 4:
        raise ValueError(
            f"{where} has 4 channels (shape {frame.shape}); drop alpha first: frame[..., :3] "
            "(or cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR))"
        )
    if frame.ndim == 4:
        raise ValueError(f"{where} is 4-D (shape {frame.shape}); use preprocess_batch for a batch of frames")
    if frame.ndim not in (2, 3) or (frame.ndim == 3 and frame.shape[2] != 3):
        raise ValueError(f"{where} must have shape (H, W), (H, W, 1) or (H, W, 3), got {frame.shape}")
    if frame.size == 0:
        raise ValueError(f"{where} is empty (shape {frame.shape}); check the camera / decoder output")
    if color_order == "gray" and frame.ndim == 3:
        raise ValueError(
            f"color_order='gray' but {where} has 3 channels (shape {frame.shape}); pass color_order='bgr' "
            "or 'rgb', or convert it to grey first (cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY))"
        )
    return frame


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _apply_roi(frame: np.ndarray, roi: Sequence[int] | None, where: str = "frame") -> np.ndarray:
    if roi is None:
        return frame
    try:
        values = tuple(roi)
    except TypeError:
        values = ()
    if len(values) != 4 or not all(_is_int(v) for v in values):
        raise TypeError(f"the roi of {where} must be a tuple of four ints (x, y, w, h) in pixels, got {roi!r}")
    x, y, w, h = (int(v) for v in values)
    fh, fw = frame.shape[:2]
    if w <= 0 or h <= 0:
        raise ValueError(f"the roi of {where}: width and height must be positive, got (x, y, w, h) = {values}")
    if x < 0 or y < 0 or x + w > fw or y + h > fh:
        raise ValueError(
            f"roi (x, y, w, h) = {values} lies outside the {fw}x{fh} (WxH) {where}; it must satisfy "
            f"0 <= x, 0 <= y, x + w <= {fw}, y + h <= {fh}"
        )
    return frame[y : y + h, x : x + w]


def _check_out(out: np.ndarray, batch: int | None, spec: PreprocessSpec) -> np.ndarray:
    """Validate a caller buffer; return a (B, 3, H, W) view of it (same memory)."""
    h, w = spec.size
    expected = f"(1, 3, {h}, {w}) or (3, {h}, {w})" if batch is None else f"({batch}, 3, {h}, {w})"
    if not isinstance(out, np.ndarray):
        raise TypeError(f"out must be a numpy array of shape {expected}, got {type(out).__name__}")
    if out.dtype not in _OUT_DTYPES:
        raise TypeError(
            f"out has dtype {out.dtype}; it must be float32 or float16 (native byte order), e.g. "
            f"np.empty({expected}, np.float32)"
        )
    if batch is None:
        ok = out.shape in ((1, 3, h, w), (3, h, w))
    else:
        ok = out.shape == (batch, 3, h, w)
    if not ok:
        raise ValueError(f"out has shape {out.shape}, expected {expected} for this spec")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous; allocate it with np.empty(...) (or np.ascontiguousarray)")
    if not out.flags.writeable:
        raise ValueError("out is read-only; pass a writeable array (e.g. np.empty(...) or out.copy())")
    return out.reshape(-1, 3, h, w)


def _resolve_backend(backend: str) -> bool:
    """True to use the extension."""
    if backend == "reference":
        return False
    if backend == "extension" and _ext is None:
        raise ImportError(
            f"backend='extension' but the native preprocessing extension edge_ad.runtime._preprocess "
            f"is not available ({_EXT_ERROR}). {_BUILD_HINT}"
        )
    return _ext is not None


# ------------------------------------------------------------------------------------------------
# Reference (pure numpy) implementation
# ------------------------------------------------------------------------------------------------


def _axis_kinds(mode: str, src_h: int, src_w: int, dst_h: int, dst_w: int) -> tuple[str, str]:
    if effective_resize(mode, (src_h, src_w), (dst_h, dst_w)) == "bilinear":
        return "linear", "linear"
    kind = "box" if (src_h >= dst_h and src_w >= dst_w) else "area_linear"
    return kind, kind


@functools.lru_cache(maxsize=128)
def _axis_taps(src: int, dst: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-axis taps: indices (dst, K) int64 and weights (dst, K) float32; row d of the dense
    weight matrix is ``W[d, idx[d, k]] += w[d, k]``. Zero weights may point anywhere in range."""
    d = np.arange(dst, dtype=np.float64)
    scale = src / dst
    if kind == "box":
        a = d * scale
        b = np.minimum(a + scale, float(src))
        cell = b - a
        k = int(np.ceil(scale)) + 1
        i = np.floor(a).astype(np.int64)[:, None] + np.arange(k)[None, :]
        overlap = np.minimum(i + 1.0, b[:, None]) - np.maximum(i.astype(np.float64), a[:, None])
        w = np.where(overlap > 1e-3, overlap / cell[:, None], 0.0)  # OpenCV's 1e-3 cut-off
        return np.clip(i, 0, src - 1), w.astype(np.float32)
    if kind == "linear":
        f = ((d + 0.5) * scale - 0.5).astype(np.float32)
        s = np.floor(f).astype(np.int64)
        f = f - s.astype(np.float32)
    elif kind == "area_linear":
        s = np.floor(d * scale).astype(np.int64)
        f = ((d + 1) - (s + 1) * (dst / src)).astype(np.float32)
        f = np.where(f <= 0, np.float32(0), f - np.floor(f)).astype(np.float32)
    else:  # pragma: no cover - internal
        raise ValueError(kind)
    low = s < 0
    s = np.where(low, 0, s)
    f = np.where(low, np.float32(0), f)
    high = s >= src - 1
    s = np.where(high, src - 1, s)
    f = np.where(high, np.float32(0), f).astype(np.float32)
    idx = np.stack([s, np.minimum(s + 1, src - 1)], axis=1)
    w = np.stack([np.float32(1) - f, f], axis=1).astype(np.float32)
    return idx, w


def _reference_resize(img: np.ndarray, out_h: int, out_w: int, mode: str) -> np.ndarray:
    """(H, W, C) uint8 -> (out_h, out_w, C) float32, separable taps, horizontal pass first on only
    the rows the vertical taps use."""
    src_h, src_w = img.shape[:2]
    ky, kx = _axis_kinds(mode, src_h, src_w, out_h, out_w)
    iy, wy = _axis_taps(src_h, out_h, ky)
    ix, wx = _axis_taps(src_w, out_w, kx)
    rows = np.unique(iy[wy != 0])
    sub = img[rows]  # (R, W, C) uint8
    tmp = np.zeros((len(rows), out_w, img.shape[2]), np.float32)
    for k in range(ix.shape[1]):
        if np.any(wx[:, k]):
            tmp += sub[:, ix[:, k]].astype(np.float32) * wx[:, k][None, :, None]
    pos = np.minimum(np.searchsorted(rows, iy), len(rows) - 1)
    res = np.zeros((out_h, out_w, img.shape[2]), np.float32)
    for k in range(iy.shape[1]):
        if np.any(wy[:, k]):
            res += tmp[pos[:, k]] * wy[:, k][:, None, None]
    return res


def _norm_constants(spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    std = np.asarray(spec.std, np.float64)
    mean = np.asarray(spec.mean, np.float64)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def _reference_into(frame: np.ndarray, out3: np.ndarray, spec: PreprocessSpec, bgr: bool) -> None:
    """One validated frame ((H, W) or (H, W, 3) uint8, any strides) into out3 (3, H, W)."""
    img = frame[:, :, None] if frame.ndim == 2 else frame
    if img.shape[2] == 3 and bgr:
        img = img[:, :, ::-1]
    res = _reference_resize(img, spec.height, spec.width, spec.resize)  # (h, w, 1 or 3)
    scale, offset = _norm_constants(spec)
    chw = np.moveaxis(res, 2, 0)  # (1 or 3, h, w), RGB
    out3[...] = chw * scale[:, None, None] + offset[:, None, None]


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def _run(frames: list[np.ndarray], out4: np.ndarray, spec: PreprocessSpec, bgr: bool, use_ext: bool,
         num_threads: int) -> None:
    if use_ext:
        _ext.preprocess_into(frames, out4, bgr, spec.resize, spec.mean, spec.std, min(int(num_threads), 1024))
    else:
        for frame, out3 in zip(frames, out4):
            _reference_into(frame, out3, spec, bgr)


def preprocess(
    frame: np.ndarray,
    spec: PreprocessSpec,
    *,
    color_order: str = "bgr",
    roi: tuple[int, int, int, int] | None = None,
    out: np.ndarray | None = None,
    dtype: np.dtype | type = np.float32,
    backend: str = "auto",
    num_threads: int = 0,
) -> np.ndarray:
    """Turn one uint8 frame into a normalised (1, 3, H, W) RGB model input.

    Args:
        frame: uint8 (H, W) / (H, W, 1) grey or (H, W, 3) colour array, any strides (a slice of a
            bigger frame is read in place, without a copy).
        spec: output size, resize mode and RGB mean/std.
        color_order: channel order of 3-channel frames, ``"bgr"`` (OpenCV cameras) or ``"rgb"``;
            ``"gray"`` asserts a single-channel frame. Grey frames are accepted with any order and
            replicated to RGB. The output is always RGB.
        roi: optional crop ``(x, y, w, h)`` in frame pixels, applied before resizing; must lie
            inside the frame.
        out: optional C-contiguous, writeable float32/float16 buffer of shape (1, 3, H, W) or
            (3, H, W); written in place and returned (no allocation). Its dtype decides the output
            type (``dtype`` may be left at its default).
        dtype: ``np.float32`` or ``np.float16`` when ``out`` is not given.
        backend: ``"auto"`` (extension if built, else reference), ``"extension"`` (ImportError
            if not built) or ``"reference"`` (pure numpy).
        num_threads: extension threads; 0 = automatic. Work is only split when the output is
            large enough to pay for the threads, so this is an upper bound. Ignored by the
            reference backend.

    Returns:
        ``out`` if given, else a new (1, 3, H, W) array of ``dtype``.
    """
    _check_spec(spec)
    _check_options(color_order, backend, num_threads)
    dt = _out_dtype(dtype)
    frame = _apply_roi(_check_frame(frame, color_order), roi)
    use_ext = _resolve_backend(backend)
    if out is None:
        result = np.empty((1, 3, spec.height, spec.width), dt)
        out4 = result
    else:
        out4 = _check_out(out, None, spec)
        if dt != np.float32 and dt != out.dtype:
            raise TypeError(f"dtype={dt} contradicts out.dtype={out.dtype}; leave dtype out when passing out")
        result = out
    _run([frame], out4, spec, color_order == "bgr", use_ext, num_threads)
    return result


def preprocess_batch(
    frames: Sequence[np.ndarray],
    spec: PreprocessSpec,
    *,
    color_order: str = "bgr",
    roi: tuple[int, int, int, int] | Sequence[tuple[int, int, int, int] | None] | None = None,
    out: np.ndarray | None = None,
    dtype: np.dtype | type = np.float32,
    backend: str = "auto",
    num_threads: int = 0,
) -> np.ndarray:
    """Preprocess several frames (sizes may differ) into one (B, 3, H, W) batch.

    Same arguments as :func:`preprocess`; ``frames`` is a sequence of frames (or a (B, H, W, C) /
    (B, H, W) uint8 array), ``roi`` is one crop for every frame or a sequence of one crop (or
    None) per frame, and ``out`` has shape (B, 3, H, W). The extension processes the whole batch
    in one call, spreading frames and rows over its threads.
    """
    _check_spec(spec)
    _check_options(color_order, backend, num_threads)
    dt = _out_dtype(dtype)
    if isinstance(frames, np.ndarray):
        if frames.ndim not in (3, 4):
            raise ValueError(
                f"frames array must be (B, H, W) or (B, H, W, C), got shape {frames.shape}; "
                "for a single frame use preprocess"
            )
        frames = list(frames)
    else:
        try:
            frames = list(frames)
        except TypeError as exc:
            raise TypeError(f"frames must be a sequence of numpy arrays, got {type(frames).__name__}") from exc
    if not frames:
        raise ValueError("frames is empty: pass at least one frame")
    batch = len(frames)
    if roi is None:
        rois: list = [None] * batch
    elif not isinstance(roi, Sequence):
        raise TypeError(f"roi must be (x, y, w, h) or a sequence of one per frame, got {roi!r}")
    elif len(roi) == 4 and all(_is_int(v) for v in roi):
        rois = [roi] * batch
    else:
        rois = list(roi)
        if len(rois) != batch:
            raise ValueError(
                f"roi must be one (x, y, w, h) for all frames or one per frame; got {len(rois)} for {batch} frames"
            )
    views = [
        _apply_roi(_check_frame(f, color_order, f"frames[{i}]"), r, f"frames[{i}]")
        for i, (f, r) in enumerate(zip(frames, rois))
    ]
    use_ext = _resolve_backend(backend)
    if out is None:
        out4 = np.empty((batch, 3, spec.height, spec.width), dt)
        result = out4
    else:
        out4 = _check_out(out, batch, spec)
        if dt != np.float32 and dt != out.dtype:
            raise TypeError(f"dtype={dt} contradicts out.dtype={out.dtype}; leave dtype out when passing out")
        result = out
    _run(views, out4, spec, color_order == "bgr", use_ext, num_threads)
    return result
