"""``Detector``: a bundle on its engine, camera frames in, :class:`~edge_ad.runtime.result.Result` out.

::

    from edge_ad.runtime import Detector

    det = Detector.load("bundle/")              # engine and device from the bundle's target
    res = det.predict(frame)                    # uint8 BGR camera frame, any size
    res.score, res.is_anomalous, res.anomaly_map, res.regions, res.timings

Pipeline: validate the frame -> crop the ROI -> resize + normalise straight into the engine's
preallocated input buffer (:func:`~edge_ad.runtime.preprocess`, no intermediate copy) -> infer ->
resize the map back to the ROI's (or frame's) resolution (``cv2.resize`` INTER_LINEAR when OpenCV
is available, else the same half-pixel bilinear in numpy) -> thresholds, mask and regions.

Display mapping (:attr:`Result.anomaly_map`): ``clip(raw_map / (2 * pixel_threshold), 0, 1)``.
The models normalise their own outputs (``manifest.normalization``), so a normal pixel is ~0 and
the calibrated pixel threshold lands on 0.5 in the display map; 3.0 stands in for a missing (or
non-positive) pixel threshold. ``raw_map`` keeps the unmapped values.

Thread safety: one detector may be shared by threads. A single lock guards the shared input
buffer and the engine call (preprocess into the buffer, infer, copy the outputs out); frame
validation and postprocessing (resize, mask, regions) run outside it, in the caller's thread.
Use one detector per thread (or process) when calls must overlap on the engine.

Torch-free: numpy, the bundle's engine package, and OpenCV for region labelling.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._cv import cv2_available, require_cv2
from .bundle import Bundle, load_bundle
from .engines import Engine, create_engine
from .preprocessing import COLOR_ORDERS, _apply_roi, _axis_taps, _check_frame, _is_int, preprocess_batch
from .result import Region, Result

__all__ = ["Detector"]

#: Stand-in pixel threshold of the display mapping when the bundle has none (model units).
DEFAULT_DISPLAY_THRESHOLD = 3.0
_MIN_SIDE = 2


def resize_map(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) float32 -> (height, width) float32, OpenCV INTER_LINEAR geometry (half-pixel centres)."""
    m = np.ascontiguousarray(m, np.float32)
    if m.shape == (height, width):
        return m.copy()
    if cv2_available():
        cv2 = require_cv2("resize anomaly maps")
        return cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    iy, wy = _axis_taps(m.shape[0], height, "linear")
    ix, wx = _axis_taps(m.shape[1], width, "linear")
    tmp = m[:, ix[:, 0]] * wx[:, 0] + m[:, ix[:, 1]] * wx[:, 1]
    return (tmp[iy[:, 0]] * wy[:, 0, None] + tmp[iy[:, 1]] * wy[:, 1, None]).astype(np.float32)


def _regions(mask: np.ndarray, raw: np.ndarray, offset: tuple[int, int]) -> list[Region]:
    if not mask.any():
        return []
    cv2 = require_cv2("label defect regions")
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    out = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        peak = float(raw[y : y + h, x : x + w][labels[y : y + h, x : x + w] == k].max())
        out.append(Region(x + offset[0], y + offset[1], w, h, area, peak))
    out.sort(key=lambda r: -r.area_px)
    return out


class Detector:
    """Runs a bundle on the engine it was made for. Build with :meth:`load`."""

    def __init__(self, bundle: Bundle, engine: Engine, *, regions: bool = True) -> None:
        self.bundle = bundle
        self.engine = engine
        self.spec = bundle.preprocess_spec
        self.regions = bool(regions)
        self._lock = threading.Lock()
        self._warned = False
        t = bundle.thresholds
        self.image_threshold = t.image_threshold if t is not None else None
        self.pixel_threshold = t.pixel_threshold if t is not None else None
        display = self.pixel_threshold if self.pixel_threshold is not None and self.pixel_threshold > 0 else None
        self.display_threshold = display if display is not None else DEFAULT_DISPLAY_THRESHOLD
        if self.regions and not cv2_available():
            require_cv2("label defect regions in Detector results (or load with regions=False)")

    @classmethod
    def load(cls, bundle: Bundle | str | os.PathLike, device: str = "auto", *, regions: bool = True,
             verify: bool = True) -> "Detector":
        """Load a bundle (directory, ``.tar`` or :class:`Bundle`) on its engine.

        Args:
            bundle: what :func:`~edge_ad.runtime.load_bundle` takes, or a loaded :class:`Bundle`.
            device: the engine's device (OpenVINO ``"CPU"`` / ``"GPU"`` / ``"NPU"``, onnxruntime
                ``"CPU"`` / ``"CUDA"``); ``"auto"`` = the bundle target's device.
            regions: label connected defect regions (needs OpenCV).
            verify: check the bundle's checksums when loading from a path.

        Raises:
            ImportError: the engine's package (onnxruntime / openvino) is not installed.
            NotImplementedError: a TensorRT bundle (that runtime engine is not written yet).
        """
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle, verify=verify)
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be a non-empty string ('auto', 'CPU', ...), got {device!r}")
        return cls(bundle, create_engine(bundle, device), regions=regions)

    def __repr__(self) -> str:
        m = self.bundle.manifest
        return (f"Detector({str(self.bundle.source)!r}, engine={self.engine.name}, device={self.engine.device}, "
                f"precision={m.precision}, input={m.input.height}x{m.input.width})")

    # ------------------------------------------------------------------------------------------

    def predict(self, frame: np.ndarray, *, color_order: str = "bgr",
                roi: tuple[int, int, int, int] | None = None) -> Result:
        """One uint8 frame ((H, W) grey, (H, W, 1) or (H, W, 3) in ``color_order``) -> :class:`Result`."""
        return self._predict([frame], color_order, [roi], single=True)[0]

    __call__ = predict

    def predict_batch(self, frames: Sequence[np.ndarray] | np.ndarray, *, color_order: str = "bgr",
                      roi: Any = None) -> list[Result]:
        """Several frames (sizes may differ) -> one :class:`Result` each, same values as :meth:`predict`.

        ``roi`` is one ``(x, y, w, h)`` for every frame or a sequence of one (or None) per frame.
        Frames are inferred in chunks of the model's static batch (all at once when it is dynamic).
        """
        if isinstance(frames, np.ndarray):
            if frames.ndim not in (3, 4):
                raise ValueError(f"frames array must be (B, H, W) or (B, H, W, C), got shape {frames.shape}; "
                                 "for a single frame use predict")
            frames = list(frames)
        elif not isinstance(frames, Sequence) or isinstance(frames, (str, bytes)):
            raise TypeError(f"frames must be a sequence of numpy uint8 arrays, got {type(frames).__name__}")
        frames = list(frames)
        if not frames:
            raise ValueError("frames is empty: pass at least one frame")
        if roi is None:
            rois: list = [None] * len(frames)
        elif isinstance(roi, Sequence) and len(roi) == 4 and all(_is_int(v) for v in roi):
            rois = [tuple(roi)] * len(frames)
        elif isinstance(roi, Sequence):
            rois = list(roi)
            if len(rois) != len(frames):
                raise ValueError(f"roi must be one (x, y, w, h) for all frames or one per frame; got {len(rois)} "
                                 f"for {len(frames)} frames")
        else:
            raise TypeError(f"roi must be (x, y, w, h) or a sequence of one per frame, got {roi!r}")
        return self._predict(frames, color_order, rois, single=False)

    # ------------------------------------------------------------------------------------------

    def _predict(self, frames: list, color_order: str, rois: list, single: bool) -> list[Result]:
        if color_order not in COLOR_ORDERS:
            raise ValueError(f"color_order must be one of {COLOR_ORDERS}, got {color_order!r}")
        views = []
        for i, (frame, roi) in enumerate(zip(frames, rois)):
            where = "frame" if single else f"frames[{i}]"
            view = _apply_roi(_check_frame(frame, color_order, where), roi, where)
            if view.shape[0] < _MIN_SIDE or view.shape[1] < _MIN_SIDE:
                what = f"the roi {tuple(roi)} of {where}" if roi is not None else where
                raise ValueError(f"{what} is {view.shape[1]}x{view.shape[0]} (WxH) pixels; the detector needs at "
                                 f"least {_MIN_SIDE}x{_MIN_SIDE} (check the camera / decoder output and the roi)")
            views.append(view)
        self._warn_uncalibrated()
        maps, scores, t_pre, t_inf = self._infer(views, color_order)
        results = []
        for i, view in enumerate(views):
            t0 = time.perf_counter()
            roi = tuple(int(v) for v in rois[i]) if rois[i] is not None else None
            results.append(self._postprocess(maps[i], float(scores[i]), view.shape[:2], roi))
            results[-1].timings = {"preprocess": t_pre, "infer": t_inf,
                                   "postprocess": (time.perf_counter() - t0) * 1e3}
        return results

    def _infer(self, views: list[np.ndarray], color_order: str) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Preprocess into the engine buffer and infer, chunk by chunk, under the lock."""
        step = self.engine.batch or len(views)
        maps, scores, t_pre, t_inf = [], [], 0.0, 0.0
        with self._lock:
            for start in range(0, len(views), step):
                chunk = views[start : start + step]
                n = len(chunk)
                t0 = time.perf_counter()
                buf = self.engine.input_buffer(n)
                preprocess_batch(chunk, self.spec, color_order=color_order, out=buf[:n])
                t1 = time.perf_counter()
                m, s = self.engine.run(n)
                t2 = time.perf_counter()
                maps.append(m)
                scores.append(s)
                t_pre += (t1 - t0) * 1e3
                t_inf += (t2 - t1) * 1e3
        return np.concatenate(maps), np.concatenate(scores), t_pre, t_inf

    def _postprocess(self, model_map: np.ndarray, score: float, size: tuple[int, int],
                     roi: tuple[int, int, int, int] | None) -> Result:
        raw = resize_map(model_map, size[0], size[1])
        display = np.clip(raw * np.float32(1.0 / (2.0 * self.display_threshold)), 0.0, 1.0).astype(np.float32)
        is_anomalous = bool(score > self.image_threshold) if self.image_threshold is not None else None
        mask = raw > np.float32(self.pixel_threshold) if self.pixel_threshold is not None else None
        if not self.regions:
            regions = None
        elif mask is None:
            regions = []
        else:
            regions = _regions(mask, raw, (roi[0], roi[1]) if roi is not None else (0, 0))
        return Result(anomaly_map=display, raw_map=raw, model_map=model_map, score=score, is_anomalous=is_anomalous,
                      defect_mask=mask, regions=regions, roi=roi)

    def _warn_uncalibrated(self) -> None:
        if self._warned or (self.image_threshold is not None and self.pixel_threshold is not None):
            return
        self._warned = True
        missing = [n for n, v in (("image_threshold", self.image_threshold), ("pixel_threshold", self.pixel_threshold))
                   if v is None]
        warnings.warn(
            f"bundle {self.bundle.source} has no {' / '.join(missing)}: Result.is_anomalous / defect_mask are None "
            "until the bundle is calibrated. Run calibration on good images (edge-ad convert with --calib / "
            "validation data, or edge_ad.calibration, then edge_ad.runtime.update_manifest(bundle, {'thresholds': ...}))",
            UserWarning, stacklevel=4,
        )
