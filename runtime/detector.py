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

Thread safety: one detector may be shared by threads. A single lock guards the engine's slot 0
(preprocess into its buffer, infer, copy the outputs out); frame validation and postprocessing
(resize, mask, regions) run outside it, in the caller's thread. Use one detector per thread (or
process) when calls must overlap on the engine. :meth:`Detector.stream` runs a threaded
capture -> preprocess -> infer -> postprocess pipeline on the engine's other slots
(:mod:`edge_ad.runtime.stream`), so ``predict`` stays usable while a stream runs.

Faults and limits: a frame (or its ROI) above ``max_frame_pixels`` (default
:data:`DEFAULT_MAX_FRAME_PIXELS`) is refused with a ValueError; a non-finite model score or map is
a :class:`NonFiniteOutputError` (``predict``) or a counted ``non_finite_output`` skip (streams),
never a verdict. ``map_resolution="model"`` keeps the maps at the model's resolution (cheaper on
big frames); the verdict is the same and region boxes are still in frame pixels.

Torch-free: numpy, the bundle's engine package, and OpenCV for region labelling.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from ._cv import cv2_available, require_cv2
from .bundle import Bundle, load_bundle
from .cpu_budget import CpuBudget, plan_cpu_budget
from .engines import DEFAULT_SLOTS, Engine, create_engine, runs_on_cpu
from .preprocessing import COLOR_ORDERS, _apply_roi, _axis_taps, _check_frame, _is_int, preprocess_batch
from .result import LazyMapsResult, Region, Result

if TYPE_CHECKING:  # pragma: no cover
    from .stream import ReconnectPolicy, Stream

__all__ = ["DEFAULT_MAX_FRAME_PIXELS", "MAP_RESOLUTIONS", "Detector", "NonFiniteOutputError"]

#: Stand-in pixel threshold of the display mapping when the bundle has none (model units).
DEFAULT_DISPLAY_THRESHOLD = 3.0
#: Largest frame (or ROI) a detector takes by default, in pixels: 8192 x 8192 (67 MP), above any
#: line-scan / 8K camera frame. A 20000 x 20000 frame would otherwise cost seconds and GBs of maps.
DEFAULT_MAX_FRAME_PIXELS = 8192 * 8192
#: ``Detector.load(map_resolution=...)``: maps at the frame's (ROI's) resolution, or the model's.
MAP_RESOLUTIONS = ("frame", "model", "lazy")
_MIN_SIDE = 2


class NonFiniteOutputError(RuntimeError):
    """The engine returned a NaN / inf score or map for a frame: no verdict can be given for it."""


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


def _regions(mask: np.ndarray, raw: np.ndarray, offset: tuple[int, int],
             size: tuple[int, int] | None = None) -> list[Region]:
    """Connected regions of ``mask`` (h, w) as boxes in frame pixels.

    ``size`` (H, W): the frame / ROI size when ``mask`` is at a smaller (model) resolution; boxes
    are then scaled to it (outward, so a box always covers its region) and ``area_px`` is the
    region's mask-pixel count times the pixel area ratio, rounded.
    """
    if not mask.any():
        return []
    cv2 = require_cv2("label defect regions")
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    sy, sx = (1.0, 1.0) if size is None else (size[0] / mask.shape[0], size[1] / mask.shape[1])
    out = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        peak = float(raw[y : y + h, x : x + w][labels[y : y + h, x : x + w] == k].max())
        if size is not None:
            x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
            x1, y1 = min(size[1], int(np.ceil((x + w) * sx))), min(size[0], int(np.ceil((y + h) * sy)))
            x, y, w, h, area = x0, y0, x1 - x0, y1 - y0, int(round(area * sx * sy))
        out.append(Region(x + offset[0], y + offset[1], w, h, area, peak))
    out.sort(key=lambda r: -r.area_px)
    return out


def threshold_values(thresholds: Any) -> tuple[float | None, float | None, float]:
    """A bundle ``Thresholds`` (or None) -> ``(image, pixel, display)`` thresholds in model units.

    ``display`` is the pixel threshold of the display mapping (:data:`DEFAULT_DISPLAY_THRESHOLD`
    when there is none or it is not positive).
    """
    image = thresholds.image_threshold if thresholds is not None else None
    pixel = thresholds.pixel_threshold if thresholds is not None else None
    return image, pixel, (pixel if pixel is not None and pixel > 0 else DEFAULT_DISPLAY_THRESHOLD)


class Detector:
    """Runs a bundle on the engine it was made for. Build with :meth:`load`."""

    def __init__(self, bundle: Bundle, engine: Engine, *, regions: bool = True, map_resolution: str = "frame",
                 max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS, cpu_budget: CpuBudget | None = None) -> None:
        if map_resolution not in MAP_RESOLUTIONS:
            raise ValueError(f"map_resolution must be one of {MAP_RESOLUTIONS}, got {map_resolution!r}")
        if isinstance(max_frame_pixels, bool) or not isinstance(max_frame_pixels, int) or max_frame_pixels < 4:
            raise ValueError(f"max_frame_pixels must be an int >= 4 (pixels), got {max_frame_pixels!r}")
        self.bundle = bundle
        self.engine = engine
        self.spec = bundle.preprocess_spec
        self.regions = bool(regions)
        self.map_resolution = map_resolution
        self.max_frame_pixels = max_frame_pixels
        #: How the cores are split between the engine's threads and a stream's (docs/MULTI_CAMERA.md);
        #: an engine built elsewhere keeps its own threads (policy "engine").
        self.cpu_budget = cpu_budget if cpu_budget is not None else plan_cpu_budget(cpu_engine=False)
        self._lock = threading.Lock()  # slot 0: predict, and streams on a single-slot engine
        self._stream_lease = threading.Lock()  # slots 1..N: one stream at a time
        self._warned = False
        self.set_thresholds(bundle.thresholds)
        from .camera_profile import camera_profiles

        self.cameras = camera_profiles(bundle.manifest)  # BundleError for a malformed info.cameras
        self._unknown_cameras: set[str] = set()
        #: (camera, calibrated decode, stream decode) already warned about (decode_mode.decode_mismatch).
        self.decode_warned: set[tuple[str, str, str]] = set()
        self._cameras_lock = threading.Lock()
        if self.regions and not cv2_available():
            require_cv2("label defect regions in Detector results (or load with regions=False)")

    @classmethod
    def load(cls, bundle: Bundle | str | os.PathLike, device: str = "auto", *, regions: bool = True,
             verify: bool = True, slots: int = DEFAULT_SLOTS, map_resolution: str = "frame",
             max_frame_pixels: int = DEFAULT_MAX_FRAME_PIXELS,
             verify_key: str | os.PathLike | None = None, engine_threads: int | None = None) -> "Detector":
        """Load a bundle (directory, ``.tar`` or :class:`Bundle`) on its engine.

        Args:
            bundle: what :func:`~edge_ad.runtime.load_bundle` takes, or a loaded :class:`Bundle`.
            device: the engine's device (OpenVINO ``"CPU"`` / ``"GPU"`` / ``"NPU"``, onnxruntime
                ``"CPU"`` / ``"CUDA"``); ``"auto"`` = the bundle target's device.
            regions: label connected defect regions (needs OpenCV).
            verify: check the bundle's checksums when loading from a path.
            slots: engine request slots: slot 0 serves :meth:`predict`, the others a stream's
                in-flight frames (3 = double-buffered streaming).
            map_resolution: ``"frame"`` (default): ``Result`` maps at the frame's (ROI's)
                resolution; ``"model"``: at the model's input resolution only (no full-size maps:
                for integrators who need the verdict and regions; region boxes stay in frame pixels);
                ``"lazy"``: maps at the frame's resolution made on first access
                (:class:`~edge_ad.runtime.result.LazyMapsResult`, same values as ``"frame"``) and
                regions found at the model's resolution, scaled to frame pixels (boxes within
                one model pixel of ``"frame"``'s: docs/MULTI_CAMERA.md); the cheapest per-frame
                postprocessing when maps are rarely read.
            max_frame_pixels: largest frame (or ROI) accepted, H * W pixels (default
                :data:`DEFAULT_MAX_FRAME_PIXELS` = 8192 x 8192); larger ones raise ValueError.
            verify_key: PEM file of the Ed25519 public key the bundle must be signed with; unsigned
                or foreign bundles are refused (:mod:`edge_ad.runtime.bundle.signing`).
            engine_threads: the engine's CPU inference threads (OpenVINO ``INFERENCE_NUM_THREADS``,
                onnxruntime ``intra_op_num_threads``), 1 .. usable cores; the remaining cores
                (at least one) are the stream's preprocessing threads. None = the default
                policy (:func:`~edge_ad.runtime.cpu_budget.plan_cpu_budget`, measured in
                docs/MULTI_CAMERA.md). Not for engines off the CPU (TensorRT, GPU / NPU devices):
                ValueError. The result is :attr:`cpu_budget` (also in ``stream.stats.cpu_budget``).

        Raises:
            ImportError: the engine's package (onnxruntime / openvino / tensorrt + CUDA bindings) is
                not installed.
            NotImplementedError: the bundle names an engine this runtime has none for.
            BundleError: the engine's real inputs / outputs (names, shapes, dtypes) differ from the
                manifest's (:func:`~edge_ad.runtime.engine_io.check_engine_io`).
        """
        from .engine_io import check_engine_io

        if not isinstance(bundle, Bundle):
            bundle = load_bundle(bundle, verify=verify, verify_key=verify_key)
        elif verify_key is not None:
            bundle.check_signature(verify_key)
        if not isinstance(device, str) or not device:
            raise ValueError(f"device must be a non-empty string ('auto', 'CPU', ...), got {device!r}")
        budget = plan_cpu_budget(engine_threads, cpu_engine=runs_on_cpu(bundle, device))
        engine = create_engine(bundle, device, slots=slots, threads=budget.engine_threads)
        check_engine_io(bundle, engine)
        return cls(bundle, engine, regions=regions, map_resolution=map_resolution, max_frame_pixels=max_frame_pixels,
                   cpu_budget=budget)

    def __repr__(self) -> str:
        m = self.bundle.manifest
        return (f"Detector({str(self.bundle.source)!r}, engine={self.engine.name}, device={self.engine.device}, "
                f"precision={m.precision}, input={m.input.height}x{m.input.width})")

    # ------------------------------------------------------------------------------------------

    def predict(self, frame: np.ndarray, *, color_order: str = "bgr",
                roi: tuple[int, int, int, int] | None = None) -> Result:
        """One uint8 frame ((H, W) grey, (H, W, 1) or (H, W, 3) in ``color_order``) -> :class:`Result`.

        Raises:
            TypeError / ValueError: a frame or ROI it cannot take (the message names the fix).
            NonFiniteOutputError: the engine returned a NaN / inf score or map: no verdict.
        """
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

    def stream(self, source: Any, *, lossless: bool | None = None, queue_size: int = 2, color_order: str = "bgr",
               roi: tuple[int, int, int, int] | None = None, reconnect: bool | ReconnectPolicy = True,
               keep_frames: bool = False, max_frames: int | None = None,
               batch_wait_ms: float = 2.0, reduced_decode: bool = True) -> Stream:
        """Run the detector on a live source in a threaded pipeline; iterate it for :class:`Result` s.

        ::

            with det.stream(0) as stream:            # camera 0, line-speed mode
                for res in stream:
                    res.frame_index, res.capture_time, res.score, res.is_anomalous
            print(stream.stats)                      # captured / delivered / dropped / skipped ...

            with det.stream({"cam_top": 0, "cam_side": "rtsp://..."}) as stream:   # several cameras
                for res in stream:
                    res.source, res.frame_index, res.is_anomalous    # judged by that camera's profile
            stream.stats.sources["cam_top"]          # per camera; stream.stats = the totals

        Args:
            source: what :func:`~edge_ad.runtime.sources.open_source` takes: camera index or V4L2
                device path, video file, RTSP URL, GStreamer pipeline ending in ``appsink``, image
                folder, an iterable of uint8 frames, or a :class:`~edge_ad.runtime.sources.FrameSource`;
                or several of them: a ``{name: source}`` mapping (names are the cameras' profile
                names and ``Result.source``) or a list of sources that are not frames (camera
                indices, paths, URLs, FrameSources; named by their source names). See
                docs/MULTI_CAMERA.md.
            lossless: True processes every frame (capture blocks on full queues); False is line-speed
                mode (stale frames and unread results are dropped, counted in ``stats.dropped``);
                None (default) = line-speed for live sources (cameras, RTSP, GStreamer), lossless
                for files, folders and iterables.
            queue_size: bound of the frame queue and of the result queue (frames, >= 1).
            color_order: channel order of the source's frames (OpenCV sources deliver ``"bgr"``).
            roi: ``(x, y, w, h)`` crop applied to every frame.
            reconnect: True (default back-off), False, or a
                :class:`~edge_ad.runtime.stream.ReconnectPolicy`: what to do when a live source fails.
            keep_frames: attach each frame to its result (``Result.frame``), e.g. to draw overlays.
            max_frames: stop after this many frames read from the source (None = until it ends);
                per source.
            batch_wait_ms: with a static-batch bundle (``convert --batch N``), how long an engine
                call waits for frames of other cameras after the first one (ms, bounded latency;
                fewer frames are padded). Ignored for batch-1 bundles.
            reduced_decode: decode image-folder JPEG frames at 1/2, 1/4 or 1/8 size when
                that keeps them at least the model input's size
                (:class:`~edge_ad.runtime.sources.FolderSource`; default on, ``False`` decodes in
                full). Results stay in the stored frame's pixels (maps at its size, region boxes
                scaled to it); ``Result.decode_scale`` says the factor, ``Result.frame`` is the
                decoded (smaller) array. Scores move by a few per cent, as the model sees a
                differently resampled input (docs/MULTI_CAMERA.md). Not applied to sources with a
                ROI (its pixels refer to the full frame), nor to cameras, streams and video files.
                Calibrate with the same setting (:meth:`calibrate` decodes as a stream does; its
                ``reduced_decode``): a camera whose thresholds were calibrated on the other decode
                gets one UserWarning (:mod:`edge_ad.runtime.decode_mode`).

        Returns:
            A :class:`~edge_ad.runtime.stream.Stream` (iterable, context manager, ``stats``, ``close()``).
            One stream of a detector runs at a time (a second one raises RuntimeError when it
            starts); a failed, closed or dropped stream gives its engine slots back.
        """
        from .stream import Stream

        return Stream(self, source, lossless=lossless, queue_size=queue_size, color_order=color_order, roi=roi,
                      reconnect=reconnect, keep_frames=keep_frames, max_frames=max_frames,
                      batch_wait_ms=batch_wait_ms, reduced_decode=reduced_decode)

    # ------------------------------------------------------------------------------------------

    def _predict(self, frames: list, color_order: str, rois: list, single: bool) -> list[Result]:
        if color_order not in COLOR_ORDERS:
            raise ValueError(f"color_order must be one of {COLOR_ORDERS}, got {color_order!r}")
        where = ["frame" if single else f"frames[{i}]" for i in range(len(frames))]
        views = [self.check_frame(frame, roi=roi, color_order=color_order, where=w)
                 for frame, roi, w in zip(frames, rois, where)]
        self.warn_if_uncalibrated()
        maps, scores, t_pre, t_inf = self._infer(views, color_order)
        results = []
        for i, view in enumerate(views):
            t0 = time.perf_counter()
            roi = tuple(int(v) for v in rois[i]) if rois[i] is not None else None
            results.append(self.make_result(maps[i], float(scores[i]), view.shape[:2], roi, where=where[i]))
            results[-1].timings = {"preprocess": t_pre, "infer": t_inf,
                                   "postprocess": (time.perf_counter() - t0) * 1e3}
        return results

    # -- building blocks of predict, public for streams and calibration ---------------------------

    def check_frame(self, frame: np.ndarray, *, roi: Any = None, color_order: str = "bgr",
                    where: str = "frame") -> np.ndarray:
        """Validate one frame and crop its ROI -> (h, w) or (h, w, 3) uint8 view (no copy).

        Raises TypeError / ValueError naming ``where`` for a frame :meth:`predict` would refuse
        (wrong dtype / shape, ROI outside it, fewer than 2x2 or more than ``max_frame_pixels`` pixels).
        """
        view = _apply_roi(_check_frame(frame, color_order, where), roi, where)
        what = f"the roi {tuple(roi)} of {where}" if roi is not None else where
        if view.shape[0] < _MIN_SIDE or view.shape[1] < _MIN_SIDE:
            raise ValueError(f"{what} is {view.shape[1]}x{view.shape[0]} (WxH) pixels; the detector needs at "
                             f"least {_MIN_SIDE}x{_MIN_SIDE} (check the camera / decoder output and the roi)")
        if view.shape[0] * view.shape[1] > self.max_frame_pixels:
            raise ValueError(f"{what} is {view.shape[1]}x{view.shape[0]} (WxH) = {view.shape[0] * view.shape[1]} "
                             f"pixels, above this detector's max_frame_pixels={self.max_frame_pixels}; crop it with "
                             "roi=, downscale it, or load with Detector.load(..., max_frame_pixels=N) (and "
                             "map_resolution='model' to keep the maps small)")
        return view

    def start_slot(self, slot: int, views: list[np.ndarray], color_order: str) -> None:
        """Preprocess checked ``views`` into engine ``slot`` and start its inference (returns at once).

        Slot 0 is :meth:`predict`'s: starting it takes the detector's lock, which
        :meth:`finish_slot` / :meth:`abandon_slot` release (possibly from another thread).
        """
        if slot == 0:
            self._lock.acquire()
        try:
            # Inside a stream, preprocessing overlaps the engine: it keeps to the budget's share.
            self._preprocess_into(slot, views, color_order, self.cpu_budget.preprocess_threads)
            self.engine.start(slot, len(views))
        except BaseException:
            if slot == 0:
                self._lock.release()
            raise

    def finish_slot(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Wait for a started slot -> ``(maps (n, h, w), scores (n,))`` float32; frees the slot even on error."""
        try:
            return self.engine.wait(slot)
        finally:
            if slot == 0:
                self._lock.release()

    def abandon_slot(self, slot: int) -> None:
        """Wait for a started slot and drop its outputs, ignoring its error (shutdown after a fault)."""
        try:
            self.finish_slot(slot)
        except Exception:  # noqa: BLE001 - the stream already reported the fault that got us here
            pass

    @contextmanager
    def slot0(self) -> Iterator[Engine]:
        """Hold slot 0 (:meth:`predict`'s) for direct engine calls, e.g. a bare-engine benchmark.

        Yields the engine; ``predict`` (and a stream on a single-slot engine) waits meanwhile.
        """
        with self._lock:
            yield self.engine

    def reserve_stream_slots(self) -> list[int]:
        """The engine slots a stream may use (slot 0 is shared with predict when it is the only one).

        With several slots, one stream at a time owns slots 1..N until :meth:`release_stream_slots`.

        Raises:
            RuntimeError: another stream of this detector is still running.
        """
        if self.engine.num_slots == 1:
            return [0]
        if not self._stream_lease.acquire(blocking=False):
            raise RuntimeError("another stream of this detector is still running: close it (or leave its with "
                               "block) first, or load a second Detector for a parallel stream")
        return list(range(1, self.engine.num_slots))

    def release_stream_slots(self) -> None:
        """Give back what :meth:`reserve_stream_slots` took (after every started slot was finished)."""
        if self.engine.num_slots > 1 and self._stream_lease.locked():
            self._stream_lease.release()

    def make_result(self, model_map: np.ndarray, score: float, size: tuple[int, int],
                    roi: tuple[int, int, int, int] | None = None, *, where: str = "frame",
                    thresholds: Any = None) -> Result:
        """Engine outputs of one frame -> :class:`Result` (map resize, thresholds, mask, regions).

        Args:
            model_map: (h, w) float32 map at the model's resolution.
            score: the image score.
            size: (H, W) of the frame (or its ROI), the resolution of the returned maps with
                ``map_resolution="frame"``.
            roi: the crop the frame was taken from (region boxes are offset by it).
            where: how error messages name the frame.
            thresholds: a bundle ``Thresholds`` to judge this frame by (a camera's profile);
                None = the detector's current thresholds.

        Raises:
            NonFiniteOutputError: the score or a map value is NaN / inf.
        """
        if not np.isfinite(score) or not np.isfinite(model_map).all():
            bad = int(np.count_nonzero(~np.isfinite(model_map)))
            raise NonFiniteOutputError(
                f"bundle {self.bundle.source}: the engine returned a non-finite result for {where} (score {score}, "
                f"{bad} of {model_map.size} map values NaN/inf); there is no verdict for this frame. A faulty "
                "engine / device / precision (try the FP32 bundle or another device) or a corrupt model")
        if thresholds is None:
            image, pixel, display_t = self.image_threshold, self.pixel_threshold, self.display_threshold
        else:
            image, pixel, display_t = threshold_values(thresholds)
        if self.map_resolution == "lazy":
            mask_m = model_map > np.float32(pixel) if pixel is not None else None
            regions_l = None if not self.regions else [] if mask_m is None else _regions(
                mask_m, model_map, (roi[0], roi[1]) if roi is not None else (0, 0), tuple(size))
            return LazyMapsResult(model_map=model_map, size=size, display_threshold=display_t, pixel_threshold=pixel,
                                  score=score, is_anomalous=bool(score > image) if image is not None else None,
                                  regions=regions_l, roi=roi)
        model_res = self.map_resolution == "model"
        raw = model_map.copy() if model_res else resize_map(model_map, size[0], size[1])
        display = np.clip(raw * np.float32(1.0 / (2.0 * display_t)), 0.0, 1.0).astype(np.float32)
        is_anomalous = bool(score > image) if image is not None else None
        mask = raw > np.float32(pixel) if pixel is not None else None
        if not self.regions:
            regions = None
        elif mask is None:
            regions = []
        else:
            regions = _regions(mask, raw, (roi[0], roi[1]) if roi is not None else (0, 0),
                               tuple(size) if model_res else None)
        return Result(anomaly_map=display, raw_map=raw, model_map=model_map, score=score, is_anomalous=is_anomalous,
                      defect_mask=mask, regions=regions, roi=roi)

    def set_thresholds(self, thresholds: Any) -> None:
        """Use ``thresholds`` (a bundle ``Thresholds`` or None) from the next frame on: verdict and display mapping.

        Each attribute assignment is atomic; a frame being postprocessed by another thread at that
        instant may see the old image threshold with the new pixel threshold.
        """
        #: The bundle ``Thresholds`` in use (None: none); its ``details["decode"]`` says which decode they were fitted on.
        self.thresholds = thresholds
        self.image_threshold, self.pixel_threshold, self.display_threshold = threshold_values(thresholds)
        self._warned = False  # warn again if the new thresholds are still incomplete

    def camera_profile(self, name: str) -> Any:
        """The :class:`~edge_ad.runtime.camera_profile.CameraProfile` of camera ``name``, or None.

        When the bundle has camera profiles but none named ``name``, the camera uses the bundle's
        defaults and a UserWarning says so (once per name and detector). A bundle without any
        profile never warns (a single-camera bundle).
        """
        profile = self.cameras.get(name)
        if profile is None and self.cameras and name not in self._unknown_cameras:
            self._unknown_cameras.add(name)
            warnings.warn(f"bundle {self.bundle.source} has no camera profile {name!r} (it has "
                          f"{', '.join(sorted(self.cameras))}); this camera uses the bundle's default thresholds. "
                          f"Calibrate it with det.calibrate(frames, camera={name!r}) or name the source like a "
                          "profiled camera", UserWarning, stacklevel=5)
        return profile

    def set_camera_profile(self, profile: Any) -> None:
        """Use ``profile`` (a :class:`~edge_ad.runtime.camera_profile.CameraProfile`) for its camera from
        the next stream on (a running stream keeps the profiles it started with)."""
        with self._cameras_lock:  # two calibrations finishing at once both land
            self.cameras = {**self.cameras, profile.name: profile}

    def warn_if_uncalibrated(self) -> None:
        """Warn once (UserWarning) when the bundle lacks an image or pixel threshold."""
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

    # -- internals ------------------------------------------------------------------------------

    def _infer(self, views: list[np.ndarray], color_order: str) -> tuple[np.ndarray, np.ndarray, float, float]:
        """Preprocess into the engine buffer and infer, chunk by chunk, under the lock."""
        step = self.engine.batch or len(views)
        maps, scores, t_pre, t_inf = [], [], 0.0, 0.0
        with self._lock:
            for start in range(0, len(views), step):
                chunk = views[start : start + step]
                n = len(chunk)
                t0 = time.perf_counter()
                self._preprocess_into(0, chunk, color_order)
                t1 = time.perf_counter()
                self.engine.start(0, n)
                m, s = self.engine.wait(0)
                t2 = time.perf_counter()
                maps.append(m)
                scores.append(s)
                t_pre += (t1 - t0) * 1e3
                t_inf += (t2 - t1) * 1e3
        return np.concatenate(maps), np.concatenate(scores), t_pre, t_inf

    def _preprocess_into(self, slot: int, views: list[np.ndarray], color_order: str, num_threads: int = 0) -> None:
        """Resize + normalise ``views`` straight into the engine slot's input (GPU when the engine can).

        Engines with their own ``preprocess`` (TensorRT with the CUDA extension: uint8 frames are
        uploaded and the kernel writes the device input) take the frames; the others expose a host
        buffer that the C++ extension fills in place. Either way there is no intermediate copy.
        ``num_threads``: the extension's threads (0 = automatic).
        """
        own = getattr(self.engine, "preprocess", None)
        if own is not None:
            own(slot, views, self.spec, color_order=color_order)
            return
        buf = self.engine.slot_buffer(slot, len(views))
        preprocess_batch(views, self.spec, color_order=color_order, out=buf[: len(views)], num_threads=num_threads)


    def calibrate(self, good_frames: Any, target_fpr: float = 0.01, **kwargs: Any) -> Any:
        """Refit the thresholds on this site's good frames, save them to the bundle and use them now.

        ``good_frames``: a source (image folder, video file, camera...), an array or an iterable of
        uint8 frames of good parts. Other keyword arguments (``pixel_fpr``, ``roi``, ``color_order``,
        ``max_frames``, ``save``, ``progress``, ``camera``, ``reduced_decode``) as :func:`edge_ad.runtime.calibrate.calibrate_bundle`;
        ``camera="cam_side"`` fits that camera's profile only (``det.stream({"cam_side": ...})`` judges
        its frames by it; the bundle's default thresholds stay). An image folder is decoded as
        :meth:`stream` decodes it (reduced JPEG decode by default, ``reduced_decode=False`` for
        streams that decode in full), so the thresholds fit the stream's scores.
        Returns its :class:`~edge_ad.runtime.calibrate.CalibrationReport`.
        """
        from .calibrate import calibrate_bundle

        return calibrate_bundle(self.bundle.source, good_frames, target_fpr, detector=self, **kwargs)
