"""What :meth:`edge_ad.runtime.Detector.predict` (and each step of a stream) returns for one frame."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

__all__ = ["LazyMapsResult", "Region", "Result"]


class Region(NamedTuple):
    """One connected defect region (8-connectivity) of :attr:`Result.defect_mask`.

    ``x, y, w, h`` is the bounding box in *full-frame* pixels (the ROI offset is added, so it can be
    drawn on the camera frame as is); ``area_px`` counts mask pixels; ``peak`` is the highest raw
    map value inside the region.
    """

    x: int
    y: int
    w: int
    h: int
    area_px: int
    peak: float


@dataclass
class Result:
    """Detector output for one frame.

    Attributes:
        anomaly_map: (H, W) float32 in [0, 1] for display, at the ROI's (or frame's) resolution
            (the model's (h, w) when the detector was loaded with ``map_resolution="model"``, as are
            ``raw_map`` and ``defect_mask``; the verdict and region boxes do not change units):
            ``clip(raw_map / (2 * pixel_threshold), 0, 1)``, so the pixel threshold maps to 0.5 and
            normal pixels (raw ~0 after the model's built-in normalisation) to ~0. Without a
            calibrated ``pixel_threshold`` (or one <= 0), 3.0 stands in for it.
        raw_map: (H, W) float32 model map (in the model's normalised units, the units of the
            bundle thresholds), resized bilinearly to the ROI's (or frame's) resolution.
        model_map: (h, w) float32 model map at the model's input resolution, unresized (for exact
            comparison with the training-side pipeline).
        score: the model's image score (raw model output, float).
        is_anomalous: ``score > thresholds.image_threshold``; None when the bundle has no image threshold.
        defect_mask: (H, W) bool, ``raw_map > thresholds.pixel_threshold``; None without a pixel threshold.
        regions: connected components of ``defect_mask`` (:class:`Region` tuples, largest first);
            ``[]`` without a pixel threshold, None when the detector was loaded with ``regions=False``.
        roi: the ``(x, y, w, h)`` crop the frame was taken from, or None for the whole frame.
        timings: milliseconds: ``preprocess``, ``infer``, ``postprocess`` (for ``predict_batch``,
            ``preprocess`` and ``infer`` are for the whole batch call, ``postprocess`` for this frame).
            Stream results add ``capture`` (reading the frame from the source) and
            ``capture_to_decision`` (capture timestamp -> result ready for the consumer); with a
            static-batch bundle ``preprocess`` and ``infer`` are those of the whole engine call
            the frame was part of.
        frame_index: position of the frame in its source, counting every frame read (also the
            dropped and skipped ones, so gaps show drops); None outside a stream.
        capture_time: ``time.monotonic()`` seconds when the frame was captured (streams); None
            for ``predict``. Compare it with ``time.monotonic()`` for latency.
        capture_wall_time: ``time.time()`` (Unix epoch seconds) of the same instant, for logs.
        source: name of the stream's source (e.g. ``"camera:0"``, a file path, or the camera name
            of a multi-source stream: ``"cam_side"``); None for ``predict``.
        frame: the frame the result is for (the uint8 array the source delivered, not a copy) when
            the stream was asked to keep frames (``keep_frames=True``, e.g. for overlays), else None.
        decode_scale: the source decoded this frame at 1/``decode_scale`` of the file's size on
            each axis (reduced decode of a folder source: 2, 4 or 8; else 1), for information:
            maps and regions are still in the file's (stored frame's) pixels; only ``frame`` is
            the decoded, smaller array ((ceil(H / decode_scale), ceil(W / decode_scale))).
    """

    anomaly_map: np.ndarray
    raw_map: np.ndarray
    model_map: np.ndarray
    score: float
    is_anomalous: bool | None
    defect_mask: np.ndarray | None
    regions: list[Region] | None
    roi: tuple[int, int, int, int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    frame_index: int | None = None
    capture_time: float | None = None
    capture_wall_time: float | None = None
    source: str | None = None
    frame: np.ndarray | None = field(default=None, repr=False)
    decode_scale: int = 1


class LazyMapsResult(Result):
    """A :class:`Result` whose frame-resolution maps are made on first access (``map_resolution="lazy"``).

    ``raw_map`` (bilinear resize of ``model_map`` to the frame's / ROI's (H, W)), ``anomaly_map``
    and ``defect_mask`` hold exactly the values a ``map_resolution="frame"`` detector gives, but
    cost nothing until read: a consumer that only needs the verdict and the regions never pays
    for a full-resolution map. Each is computed once and cached (reading it from two threads at
    once may compute it twice, with the same values). ``regions`` were found at the model's
    resolution and scaled to frame pixels (see :class:`~edge_ad.runtime.Detector`).
    """

    def __init__(self, *, model_map: np.ndarray, size: tuple[int, int], display_threshold: float,
                 pixel_threshold: float | None, score: float, is_anomalous: bool | None,
                 regions: list[Region] | None, roi: tuple[int, int, int, int] | None) -> None:
        self.model_map, self.score, self.is_anomalous, self.regions, self.roi = (
            model_map, score, is_anomalous, regions, roi)
        self.timings = {}
        self.frame_index = self.capture_time = self.capture_wall_time = self.source = self.frame = None
        self._size, self._display_t, self._pixel = (int(size[0]), int(size[1])), display_threshold, pixel_threshold
        self._cache: dict[str, np.ndarray | None] = {}

    @property  # type: ignore[override]
    def raw_map(self) -> np.ndarray:
        if "raw" not in self._cache:
            from .detector import resize_map  # the detector's resize: identical values to "frame" mode

            self._cache["raw"] = resize_map(self.model_map, *self._size)
        return self._cache["raw"]

    @property  # type: ignore[override]
    def anomaly_map(self) -> np.ndarray:
        if "display" not in self._cache:
            scale = np.float32(1.0 / (2.0 * self._display_t))
            self._cache["display"] = np.clip(self.raw_map * scale, 0.0, 1.0).astype(np.float32)
        return self._cache["display"]

    @property  # type: ignore[override]
    def defect_mask(self) -> np.ndarray | None:
        if "mask" not in self._cache:
            self._cache["mask"] = self.raw_map > np.float32(self._pixel) if self._pixel is not None else None
        return self._cache["mask"]
