"""On-site calibration: refit a bundle's decision thresholds on this camera's good frames.

The thresholds shipped in a bundle were fitted on the training line's held-out good images. A
new camera, lens, lighting or part batch shifts the model's score distribution, so the site
refits them on its own good frames (no labels, no defects needed)::

    det = Detector.load("bundle/")
    report = det.calibrate("good_frames/", target_fpr=0.01)      # or a video, or a list of frames
    # edge-ad calibrate bundle/ --source good_frames/ --target-fpr 0.01

What happens (numpy only, torch-free; the bundle's own engine runs the frames):

1. every good frame goes through the detector exactly as in production (same ROI, colour order,
   decode, preprocessing and engine), collecting the image score and the model-resolution anomaly
   map. An image folder is decoded as a stream decodes it: JPEGs at reduced size by default, in
   full with ``reduced_decode=False`` (``--full-decode``), and the mode is recorded in
   ``thresholds.details["decode"]`` (:mod:`edge_ad.runtime.decode_mode`: a stream whose decode
   differs warns once);
2. :func:`edge_ad.calibration.fit_thresholds` (the same order-statistic rule as at conversion
   time) gives the image threshold at ``target_fpr`` over the scores and the pixel threshold at
   ``pixel_fpr`` over all map pixels;
3. the thresholds are written to ``manifest.yaml`` with :func:`~edge_ad.runtime.update_manifest`
   (re-sealed; the model graph is untouched: thresholds live in the manifest, never in the
   graph, so nothing is re-exported), with provenance in ``thresholds.details``: frames used,
   target FPRs, achieved FPRs, date, source, ROI, engine and the previous thresholds;
4. a :class:`~edge_ad.runtime.Detector` calibrated through :meth:`Detector.calibrate` uses the
   new thresholds from its next frame on.

"Refit normalisation": the models normalise their outputs in-graph (``manifest.normalization``:
good training images map to ~0 with unit spread), and that stays as exported. The site's shift is
absorbed by the thresholds alone, and the display mapping follows them: ``Result.anomaly_map =
clip(raw_map / (2 * pixel_threshold), 0, 1)``, so after calibration the refit pixel threshold is
again the middle (0.5) of the colour scale and this camera's good pixels sit below it.

At least :data:`MIN_FRAMES` frames are required; fewer than ``1 / target_fpr`` frames is allowed
but warned about (the threshold is then the highest good score seen, see
:mod:`edge_ad.calibration.thresholds`). Use frames of good parts only: a defect among them raises
the threshold.

Degenerate frames and the margin floor: frames that are (nearly) all the same image (a still
picture, a frozen camera) put the order statistic exactly on their common score, so one grey
level more reads as anomalous. Each threshold is therefore floored at the median of its good
values plus :data:`MIN_MARGIN` model units (the models normalise their outputs so that good
training images have unit spread: the floor is one such standard deviation); it rarely binds on
real frames (typical margins are 2-3 units). A score spread below :data:`DEGENERATE_SCORE_STD`
is warned about, and both facts are recorded in ``thresholds.details["margin_floor"]``.

Memory and live sources: scores are kept (4 bytes a frame), maps are not: a bounded sample of at
most :data:`MAX_PIXEL_SAMPLE` map pixels, stratified over the frames (every frame keeps the same
number of randomly chosen pixels, halved for all frames when the sample would overflow), feeds
the pixel threshold (exact while all pixels fit). A live source (camera, RTSP, GStreamer) never
ends, so calibrating on one requires ``max_frames``.
"""
from __future__ import annotations

import datetime as _dt
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bundle import Thresholds, load_bundle, update_manifest

if TYPE_CHECKING:  # pragma: no cover
    from .detector import Detector

__all__ = ["DEGENERATE_SCORE_STD", "MAX_PIXEL_SAMPLE", "MIN_FRAMES", "MIN_MARGIN", "CalibrationReport",
           "PixelSample", "apply_thresholds", "calibrate_bundle", "iter_frames"]

#: Fewest good frames calibration accepts: below this the order statistic is mostly noise.
MIN_FRAMES = 20
#: Smallest distance (model units) of a threshold above the median of its good values.
MIN_MARGIN = 1.0
#: Good-score standard deviation (model units) below which the frames are called degenerate.
DEGENERATE_SCORE_STD = 0.05
#: Most map pixels kept for the pixel threshold (float32: 8 MiB).
MAX_PIXEL_SAMPLE = 1 << 21
_CHUNK = 8


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`calibrate_bundle` fitted and saved.

    Attributes:
        thresholds: the new manifest thresholds (model units, as the detector compares them).
        previous: the bundle's thresholds before calibration (None if it had none).
        num_frames: good frames used.
        image_fpr: fraction of those frames scoring above the new image threshold (<= target).
        pixel_fpr: fraction of their (sampled, :class:`PixelSample`) model-resolution map pixels above
            the new pixel threshold.
        scores: (num_frames,) float32 image scores of the frames, in input order.
        saved: whether the manifest was updated.
        camera: the camera profile the thresholds were fitted for (None: the bundle's defaults).
        decode: how the frames were decoded (:data:`~edge_ad.runtime.decode_mode.DECODE_MODES`:
            ``"reduced"``, ``"full"`` or ``"given"``); the details are in ``thresholds.details["decode"]``.
    """

    thresholds: Thresholds
    previous: Thresholds | None
    num_frames: int
    image_fpr: float
    pixel_fpr: float
    scores: np.ndarray
    saved: bool
    camera: str | None = None
    decode: str = "full"


class PixelSample:
    """A bounded sample of map pixels, stratified over frames (see the module docstring).

    ``add`` each (h, w) map; :meth:`array` gives (N, 1, k): k pixels of each of the N frames, with
    N * k <= ``budget`` (while k >= 1) and k = h * w (every pixel) while they all fit.
    """

    def __init__(self, budget: int = MAX_PIXEL_SAMPLE, seed: int = 0) -> None:
        self.budget = int(budget)
        self.per_frame: int | None = None
        self.shape: tuple[int, int] | None = None
        self._rows: list[np.ndarray] = []
        self._rng = np.random.default_rng(seed)

    def _pick(self, values: np.ndarray, k: int) -> np.ndarray:
        return values if values.size <= k else self._rng.choice(values, k, replace=False)

    def add(self, model_map: np.ndarray) -> None:
        values = np.asarray(model_map, np.float32).ravel()
        if self.per_frame is None:
            self.per_frame, self.shape = values.size, tuple(np.shape(model_map)[-2:])
        self._rows.append(self._pick(values, self.per_frame).copy())
        while len(self._rows) * self.per_frame > self.budget and self.per_frame > 1:
            self.per_frame //= 2
            self._rows = [self._pick(r, self.per_frame) for r in self._rows]

    def __len__(self) -> int:
        return len(self._rows)

    def array(self) -> np.ndarray:
        if not self._rows:
            return np.zeros((0, 1, 1), np.float32)
        return np.stack(self._rows)[:, None, :]


def _source_frames(spec: Any, max_frames: int | None, decode: dict[str, Any], reduced_decode: bool, roi: Any,
                   min_size: tuple[int, int]) -> tuple[Iterator[np.ndarray], str]:
    """Frames of a source spec (folder, video file, camera...) through ``edge_ad.runtime.sources``, decoded as a
    stream lane decodes them (:func:`~edge_ad.runtime.decode_mode.apply_decode_mode`); ``decode`` gets the mode
    and counts each frame's decode factor."""
    from .decode_mode import apply_decode_mode
    from .sources import Skip, open_source

    source = open_source(os.fspath(spec) if isinstance(spec, os.PathLike) else spec)
    if source.live and max_frames is None:
        raise ValueError(f"{source.name} is a live source: it never ends, so calibration needs a frame budget; pass "
                         f"max_frames (edge-ad calibrate --max-frames N, N >= {MIN_FRAMES}, e.g. 500)")
    decode["mode"] = apply_decode_mode(source, reduced_decode, roi, min_size)
    if decode["mode"] == "reduced":
        decode["min_size"] = [int(min_size[0]), int(min_size[1])]

    def frames() -> Iterator[np.ndarray]:
        source.open()
        try:
            while True:
                item = source.read()
                if item is None:
                    return
                if isinstance(item, Skip):  # an unreadable file: calibration goes on without it
                    warnings.warn(f"calibration skipped {item.detail}", UserWarning, stacklevel=2)
                    continue
                key = str(int(source.last_scale))
                decode["scales"][key] = decode["scales"].get(key, 0) + 1
                yield item
        finally:
            source.close()

    return frames(), str(getattr(source, "name", spec))


def iter_frames(good_frames: Any, max_frames: int | None = None, *, reduced_decode: bool = True, roi: Any = None,
                min_size: tuple[int, int] = (1, 1)) -> tuple[Iterator[np.ndarray], str, dict[str, Any]]:
    """``(frames, description, decode)`` from a source spec (path, camera index, URL, FrameSource), a (N, H, W[, C])
    array or an iterable of frames. A live source needs ``max_frames``.

    A source is decoded exactly as a stream decodes it: with ``reduced_decode`` and no ``roi``, an image folder's
    JPEGs at the largest factor keeping ``min_size`` (height, width: the model input) pixels. ``decode`` is the
    record calibration stores in ``thresholds.details["decode"]``: ``mode`` (``"reduced"`` / ``"full"`` /
    ``"given"`` for arrays and iterables: :mod:`edge_ad.runtime.decode_mode`), ``scales`` (decode factor -> frames,
    filled while the frames are read) and, when reduced, ``min_size``.
    """
    from .sources import FrameSource

    if isinstance(max_frames, bool) or not (max_frames is None or isinstance(max_frames, int)):
        raise ValueError(f"max_frames must be an int >= {MIN_FRAMES} (or None for all), got {max_frames!r}")
    decode: dict[str, Any] = {"mode": "given", "scales": {}}
    if isinstance(good_frames, (str, os.PathLike, int, FrameSource)) and not isinstance(good_frames, bool):
        frames, name = _source_frames(good_frames, max_frames, decode, reduced_decode, roi, min_size)
    elif isinstance(good_frames, np.ndarray):
        if good_frames.ndim not in (3, 4):
            raise ValueError(f"good_frames array must be (N, H, W) or (N, H, W, C), got shape {good_frames.shape}")
        frames, name = iter(list(good_frames)), f"array{tuple(good_frames.shape)}"
    elif isinstance(good_frames, Iterable):
        frames, name = iter(good_frames), f"iterable:{type(good_frames).__name__}"
    else:
        raise TypeError(f"good_frames must be a source (folder / video path, camera spec), an array or an iterable of "
                        f"uint8 frames, got {type(good_frames).__name__}")
    if max_frames is not None:
        if max_frames < MIN_FRAMES:
            raise ValueError(f"max_frames must be an int >= {MIN_FRAMES} (or None for all), got {max_frames!r}")
        frames = (f for i, f in zip(range(max_frames), frames))
    return frames, name, decode


def _run_frames(detector: "Detector", frames: Iterator[np.ndarray], roi: Any, color_order: str,
                progress: bool) -> tuple[np.ndarray, PixelSample]:
    """Scores (N,) and a bounded sample of the model-resolution map pixels of all frames, in chunks."""
    step = detector.engine.batch or _CHUNK
    bar = None
    if progress:
        try:
            from tqdm import tqdm  # optional on the device

            bar = tqdm(desc="calibrating", unit="frame")
        except ImportError:
            pass
    scores: list[float] = []
    sample = PixelSample(MAX_PIXEL_SAMPLE)
    chunk: list[np.ndarray] = []

    def flush() -> None:
        with warnings.catch_warnings():  # "uncalibrated" is exactly what we are fixing
            warnings.simplefilter("ignore", UserWarning)
            results = detector.predict_batch(chunk, color_order=color_order, roi=roi)
        for r in results:
            scores.append(r.score)
            sample.add(r.model_map)
        if bar is not None:
            bar.update(len(chunk))
        chunk.clear()

    try:
        for frame in frames:
            chunk.append(frame)
            if len(chunk) == step:
                flush()
        if chunk:
            flush()
    finally:
        if bar is not None:
            bar.close()
    return np.asarray(scores, np.float32), sample


def _floor_margins(scores: np.ndarray, maps: np.ndarray, image: float, pixel: float,
                   source_name: str) -> tuple[float, float, dict[str, Any]]:
    """Floor both thresholds at median + :data:`MIN_MARGIN`; warn on degenerate (near-constant) scores.

    Returns the floored (image, pixel) thresholds and the record for ``details["margin_floor"]``.
    """
    image_floor = float(np.median(scores)) + MIN_MARGIN
    pixel_floor = float(np.median(maps)) + MIN_MARGIN
    spread = float(np.std(scores))
    degenerate = spread < DEGENERATE_SCORE_STD
    if degenerate:
        warnings.warn(
            f"the {scores.size} good frames of {source_name} have near-zero score spread (std {spread:.3g} < "
            f"{DEGENERATE_SCORE_STD} model units): they are (nearly) the same image (a still picture, a frozen "
            f"camera?). The image threshold is floored at their median + {MIN_MARGIN}; calibrate on frames of "
            "different good parts, positions and lighting", UserWarning, stacklevel=3)
    record = {"min_margin": MIN_MARGIN, "score_std": spread, "degenerate": degenerate,
              "image_floor": image_floor, "image_floored": image < image_floor,
              "pixel_floor": pixel_floor, "pixel_floored": pixel < pixel_floor}
    return max(image, image_floor), max(pixel, pixel_floor), record


def apply_thresholds(detector: "Detector", thresholds: Thresholds | None) -> None:
    """Make ``detector`` use ``thresholds`` from its next frame on (:meth:`Detector.set_thresholds`)."""
    detector.set_thresholds(thresholds)


def calibrate_bundle(
    bundle_dir: str | os.PathLike,
    good_frames: Any,
    target_fpr: float = 0.01,
    *,
    pixel_fpr: float | None = None,
    device: str = "auto",
    roi: tuple[int, int, int, int] | None = None,
    color_order: str | None = None,
    max_frames: int | None = None,
    save: bool = True,
    detector: "Detector | None" = None,
    progress: bool = True,
    camera: str | None = None,
    reduced_decode: bool = True,
) -> CalibrationReport:
    """Refit a bundle's image and pixel thresholds on good frames of this site and save them.

    Args:
        bundle_dir: the bundle directory (a ``.tar`` only with ``save=False``: extract it first).
        good_frames: frames of good parts only: a source spec (image folder, video file, camera
            index / device, RTSP URL, GStreamer pipeline: :func:`edge_ad.runtime.sources.open_source`),
            a (N, H, W[, C]) uint8 array, or an iterable of uint8 frames.
        target_fpr: image false-positive rate to allow on good parts, in (0, 1) (0.01 = 1 %).
        pixel_fpr: pixel false-positive rate for the pixel threshold; default: the bundle's
            current ``pixel_fpr``, else 0.01.
        device: engine device when ``detector`` is not given (``"auto"`` = the bundle target's).
        roi: ``(x, y, w, h)`` crop applied to every frame, as in production (with ``camera``:
            default the camera profile's, and it is stored in the profile).
        color_order: ``"bgr"`` (OpenCV cameras), ``"rgb"`` or ``"gray"``; None = the camera
            profile's, else ``"bgr"``.
        max_frames: use at most this many frames (>= :data:`MIN_FRAMES`; None = all; required for a
            live source: camera, RTSP, GStreamer).
        save: write the thresholds into ``manifest.yaml`` (re-sealed).
        detector: run the frames on this already loaded detector of the same bundle.
        progress: show a tqdm bar when tqdm is installed.
        camera: fit the thresholds of this camera's profile only (manifest ``info.cameras``,
            :mod:`edge_ad.runtime.camera_profile`): the bundle's default thresholds and the
            other cameras' profiles stay as they are. None = the bundle's default thresholds.
        reduced_decode: decode an image folder's JPEGs at reduced size, exactly as a stream does by
            default (same factor rule, never under a ROI), so the thresholds are fitted on the scores
            the stream will produce; False = full decode, for streams run with
            ``reduced_decode=False`` / ``--full-decode``. Recorded in ``thresholds.details["decode"]``
            (a stream whose decode differs warns once: :mod:`edge_ad.runtime.decode_mode`).
            Arrays and iterables of frames are used as given.

    Returns:
        :class:`CalibrationReport`.

    Raises:
        ValueError: fewer than :data:`MIN_FRAMES` frames, a bad ``target_fpr`` / ``pixel_fpr``,
            a live source without ``max_frames``, or ``save=True`` on a ``.tar`` bundle.

    Warns:
        UserWarning: near-constant good scores (degenerate frames; the margin floor applies).
    """
    from edge_ad.calibration.thresholds import fit_thresholds  # numpy only

    for name, value in (("target_fpr", target_fpr), ("pixel_fpr", pixel_fpr)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0.0 < float(value) < 1.0):
            raise ValueError(f"{name} must be a fraction in (0, 1) (0.01 = 1 %), got {value!r}")
    if not isinstance(reduced_decode, bool):
        raise ValueError(f"reduced_decode must be True (decode as a stream does by default) or False (full decode, "
                         f"as --full-decode), got {reduced_decode!r}")
    path = Path(bundle_dir)
    if save and not path.is_dir():
        raise ValueError(f"{path} is not a bundle directory: calibration saves thresholds into manifest.yaml, so "
                         "extract the .tar first (or pass save=False)")
    if detector is None:
        from .detector import Detector

        detector = Detector.load(path, device)
    profile = None
    if camera is not None:
        if not isinstance(camera, str) or not camera.strip():
            raise ValueError(f"camera must be a non-empty camera name (e.g. 'cam_side'), got {camera!r}")
        profile = detector.cameras.get(camera)
        if roi is None and profile is not None:
            roi = profile.roi
        if color_order is None and profile is not None:
            color_order = profile.color_order
    color_order = color_order or "bgr"
    previous = profile.thresholds if profile is not None and profile.thresholds is not None \
        else detector.bundle.thresholds
    if pixel_fpr is None:
        pixel_fpr = previous.pixel_fpr if previous is not None and previous.pixel_fpr else 0.01

    frames, source_name, decode = iter_frames(good_frames, max_frames, reduced_decode=reduced_decode, roi=roi,
                                              min_size=detector.spec.size)
    scores, sample = _run_frames(detector, frames, roi, color_order, progress)
    maps = sample.array()
    n = int(scores.size)
    if n < MIN_FRAMES:
        raise ValueError(
            f"on-site calibration got {n} good frame(s) from {source_name}; it needs at least {MIN_FRAMES} (and "
            f"{int(round(1 / target_fpr))} for one expected false positive at target_fpr={target_fpr:g}). Record more "
            "frames of good parts (different parts, positions and lighting of a normal shift)"
        )
    fitted = fit_thresholds(scores, maps, target_fpr=float(target_fpr), pixel_fpr=float(pixel_fpr))
    image_threshold, pixel_threshold, floor = _floor_margins(scores, maps, fitted.image_threshold,
                                                             fitted.pixel_threshold, source_name)
    image_fit = float(np.count_nonzero(scores > image_threshold)) / n
    pixel_fit = float(np.count_nonzero(maps > pixel_threshold)) / maps.size
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    details = {
        "calibrated": "on-site",
        "date": created,
        "num_images": n,
        "fit_fpr": image_fit,
        "pixel_fit_fpr": pixel_fit,
        "method": fitted.method,
        "score_stats": fitted.score_stats,
        "map_stats": fitted.map_stats,
        "map_resolution": f"{sample.shape[0]}x{sample.shape[1]}",
        "pixel_sample": {"pixels_per_frame": int(maps.shape[2]), "pixels": int(maps.size)},
        "margin_floor": floor,
        "roi": None if roi is None else ",".join(str(int(v)) for v in roi),
        "color_order": color_order,
        "engine": f"{detector.engine.name}:{detector.engine.device}",
        "camera": camera,
        "decode": decode,
        "previous": {"image_threshold": previous.image_threshold if previous else None,
                     "pixel_threshold": previous.pixel_threshold if previous else None,
                     "source": previous.source if previous else None},
    }
    thresholds = Thresholds(image_threshold=image_threshold, pixel_threshold=pixel_threshold,
                            target_fpr=float(target_fpr), pixel_fpr=float(pixel_fpr),
                            source=f"on-site: {n} good frames of {source_name}", details=details)
    if camera is not None:
        from .camera_profile import CameraProfile, save_camera_profile

        new_profile = CameraProfile(camera, roi=roi, color_order=color_order, thresholds=thresholds)
        if save:
            save_camera_profile(path, new_profile)
            detector.bundle = load_bundle(path, verify=False)
        detector.set_camera_profile(new_profile)  # this camera's next stream uses it; the others are untouched
    else:
        if save:
            update_manifest(path, {"thresholds": thresholds})
            detector.bundle = load_bundle(path, verify=False)  # the manifest the detector reports is the saved one
        apply_thresholds(detector, thresholds)
    return CalibrationReport(thresholds=thresholds, previous=previous, num_frames=n, image_fpr=image_fit,
                             pixel_fpr=pixel_fit, scores=scores, saved=bool(save), camera=camera,
                             decode=str(decode["mode"]))
