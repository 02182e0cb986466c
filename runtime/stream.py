"""Streaming: a threaded capture -> preprocess -> infer -> postprocess pipeline over a frame source.

::

    with det.stream("rtsp://cam/1") as stream:    # or det.stream(0), a video, a folder, an iterable
        for res in stream:                         # Results, in capture order
            res.frame_index, res.capture_time, res.score, res.is_anomalous
    stream.stats                                   # captured / delivered / dropped / skipped, queue depths

Several cameras through one detector (docs/MULTI_CAMERA.md)::

    with det.stream({"cam_top": 0, "cam_side": "rtsp://cam/2"}) as stream:
        for res in stream:                         # res.source names the camera
            ...
    stream.stats.sources["cam_side"]               # per camera; stream.stats holds the totals

Threads and queues (all bounded, so a slow consumer cannot make memory grow)::

    capture[cam] --[frames: queue_size per camera]--> submit --[engine slots]--> collect --[results]--> consumer
    (one thread per source:   (FairQueue: round-robin,   (preprocess up to      (wait, postprocess  (the generator)
     read + validate)          one lane per camera)       `batch` frames into    each frame with its
                                                          a slot, engine.start)  camera's profile)

The result queue holds ``queue_size`` results per camera.

* ``capture`` reads the source, stamps each frame (``frame_index``, ``time.monotonic()``,
  ``time.time()``) and validates it; bad frames become reported skips.
* ``submit`` takes a free engine slot, *then* the next frame(s) (so in line-speed mode it takes the
  freshest ones), round-robin over the cameras that have one (fair scheduling: a busy camera
  cannot take another's turn); with a static-batch bundle (``convert --batch N``) it gathers up
  to N frames of different cameras, waiting at most ``batch_wait_ms`` after the first, and the
  engine pads the rest. It preprocesses straight into the slot's buffer and starts the engine
  asynchronously; with two slots, call k+1 is preprocessed while call k infers.
* ``collect`` waits for slots in start order, frees the slot, postprocesses (map resize,
  thresholds, regions) and hands the :class:`~edge_ad.runtime.result.Result` to the consumer.

Modes:

* line-speed (``lossless=False``, default when any source is live): a camera's full frame lane
  drops *its own* oldest frame (``dropped["stale_frame"]``) and a full result queue the oldest
  result of the same camera (else the oldest; ``dropped["slow_consumer"]``), so latency stays
  bounded when inference or the consumer is slower than the cameras, and a fast camera never
  pushes out a slow one's frames;
* lossless (``lossless=True``, default for files, folders, iterables): every frame is processed
  and delivered in order; full queues block the stage before them (back-pressure down to capture).

Accounting, exact once the stream has ended, per camera and in total: ``captured == delivered +
sum(dropped) + sum(skipped)``; frames abandoned by ``close()`` count as ``dropped["shutdown"]``.

Source loss (:class:`~edge_ad.runtime.sources.SourceError`): with ``reconnect`` the source is
re-opened with exponential back-off (:class:`ReconnectPolicy`) by its own capture thread, so
the other cameras keep delivering meanwhile; each step is reported as a :class:`StreamEvent`
(``stream.events``, with its ``source``) and logged on the ``edge_ad.runtime.stream`` logger. When
it gives up (or cannot reconnect), that camera ends; the others go on, and once every source
has ended and the results made are delivered, the iteration raises :class:`StreamError` naming
the lost source(s) and the last error.

Shutdown: ``close()``, leaving a ``with`` block, closing / breaking out of the iteration, or
Ctrl-C in the consumer stop the threads and join them; in-flight engine requests are waited for.
A source blocked inside its own ``read`` (a driver that never returns) cannot be interrupted from
Python: ``close()`` then gives up on that thread after ``join_timeout`` seconds and says so. A
stream dropped without ``close()`` is closed when it is garbage-collected: its threads hold the
pipeline (:class:`_Pipeline`), never the :class:`Stream` object, so dropping the last reference
stops them.

Faults: when a stage fails (an engine or postprocessing exception: a driver error, a
MemoryError), the stream ends with :class:`StreamError` and its shutdown waits for every engine
request still in flight (ignoring their errors) and releases the detector's slots and lock, so
the next ``det.stream()`` works. A non-finite model output (NaN / inf score or map) is not a
verdict: it is counted as a skip (``skipped["non_finite_output"]``) and the stream goes on.

The stream uses :class:`~edge_ad.runtime.Detector` through its public building blocks
(``check_frame``, ``reserve_stream_slots``, ``start_slot``, ``finish_slot``, ``abandon_slot``,
``make_result``), the same ones ``predict`` is made of.

Torch-free.
"""
from __future__ import annotations

import collections
import collections.abc
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .decode_mode import apply_decode_mode, decode_mismatch
from .detector import NonFiniteOutputError
from .fair_queue import CLOSED, FairQueue
from .preprocessing import COLOR_ORDERS
from .result import Result
from .sources import FrameSource, Skip, SourceError, open_source

if TYPE_CHECKING:  # pragma: no cover
    from .detector import Detector

__all__ = ["ReconnectPolicy", "Stream", "StreamError", "StreamEvent", "StreamStats"]

log = logging.getLogger(__name__)

#: How many skip records ``stats.skips`` keeps (the counts in ``stats.skipped`` are complete).
MAX_SKIP_RECORDS = 100
#: How many events ``stream.events`` keeps (oldest forgotten first).
MAX_EVENTS = 1000
_POLL_S = 0.05  # blocking waits wake this often to notice close() / Ctrl-C
#: Default time a batched engine call waits for frames of other cameras after the first one (ms).
DEFAULT_BATCH_WAIT_MS = 2.0
#: Longest ``batch_wait_ms`` accepted (ms): a longer wait is latency, not batching.
MAX_BATCH_WAIT_MS = 1000.0


class StreamError(RuntimeError):
    """The stream ended because its source was lost for good or a pipeline stage failed."""


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential back-off for re-opening a lost source.

    Attempt k (1-based) waits ``min(initial_delay * factor ** (k - 1), max_delay)`` seconds
    before re-opening; after ``max_attempts`` failed attempts the stream gives up.
    """

    initial_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 10.0
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if not (self.initial_delay >= 0 and self.factor >= 1 and self.max_delay >= 0):
            raise ValueError(f"ReconnectPolicy needs initial_delay >= 0, factor >= 1, max_delay >= 0; got {self}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"ReconnectPolicy.max_attempts must be an int >= 1, got {self.max_attempts!r}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based)."""
        return min(self.initial_delay * self.factor ** (attempt - 1), self.max_delay)


@dataclass(frozen=True)
class StreamEvent:
    """Something that happened to a stream (source lost, reconnect attempt, skip, end, ...).

    Attributes:
        time: ``time.monotonic()`` seconds.
        kind: ``source_lost``, ``reconnect_attempt``, ``reconnect_failed``, ``reconnected``,
            ``gave_up``, ``skip``, ``source_ended``, ``error``, ``close_timeout``.
        message: human-readable detail.
        source: the source (camera) it happened to; None for the whole stream.
    """

    time: float
    kind: str
    message: str
    source: str | None = None


@dataclass
class StreamStats:
    """A snapshot of a stream's counters (``stream.stats``); :meth:`to_dict` for JSON.

    Attributes:
        source: the source's name.
        mode: ``"lossless"`` or ``"line-speed"``.
        running: threads still running.
        captured: frames (and skipped items) read from the source.
        processed: frames inferred.
        delivered: results handed to the consumer.
        dropped: reason -> frames dropped (``stale_frame``, ``slow_consumer``, ``shutdown``).
        skipped: reason -> items skipped (``bad_frame``, ``unreadable_file``, ``none_item``,
            ``non_finite_output``; ``engine_error`` / ``postprocess_error`` for the frame a failed stage
            was on).
        skips: the first :data:`MAX_SKIP_RECORDS` skips: ``{"frame_index", "reason", "detail", "time"}``
            (``time.monotonic()`` s; the total's records also name their ``"source"``).
        reconnects: successful reconnections.
        queues: ``{"frames" | "results" | "slots": {"bound": int, "max_depth": int}}``: the deepest
            each queue ever got (never above its bound).
        elapsed_s: seconds since the stream started (to its end once ended).
        fps: delivered / elapsed_s.
        error: why the stream ended early (or a source was lost for good), or None.
        sources: source name -> that source's own :class:`StreamStats` (one entry for a
            single-source stream; the per-source entries have no ``sources`` of their own). The
            totals (this object) are the sums over the sources.
        batch: frames per engine call (the model's static batch; 1 when dynamic).
        batches: engine calls made.
        batch_fill: frames inferred / (batches * batch): 1.0 = every call full, lower = padding.
        cpu_budget: the detector's :class:`~edge_ad.runtime.cpu_budget.CpuBudget` as a dict
            (``cores``, ``engine_threads``, ``preprocess_threads``, ``policy``) plus
            ``engine_reported``: the engine's threads as the engine itself reports them.
    """

    source: str
    mode: str
    running: bool
    captured: int
    processed: int
    delivered: int
    dropped: dict[str, int]
    skipped: dict[str, int]
    skips: list[dict[str, Any]]
    reconnects: int
    queues: dict[str, dict[str, int]]
    elapsed_s: float
    fps: float
    error: str | None
    sources: dict[str, "StreamStats"] = field(default_factory=dict)
    batch: int = 1
    batches: int = 0
    batch_fill: float = 0.0
    cpu_budget: dict[str, Any] = field(default_factory=dict)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def no_result_reason(self) -> str:
        """Why a stream delivered nothing, for people: the skip reasons with the first skip's detail."""
        if self.captured == 0:
            return f"source {self.source} delivered no frames" + (f" ({self.error})" if self.error else "")
        if self.skipped_total == self.captured:
            counts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
            first = f"; first: {self.skips[0]['detail']}" if self.skips else ""
            return f"every one of the {self.captured} frames read from {self.source} was skipped ({counts}){first}"
        return (f"no result from the {self.captured} frames read from {self.source} (dropped {self.dropped}, skipped "
                f"{self.skipped})" + (f": {self.error}" if self.error else ""))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropped_total"], d["skipped_total"] = self.dropped_total, self.skipped_total
        return d


# ------------------------------------------------------------------------------------------------


class BoundedQueue:
    """A FIFO of at most ``maxsize`` items that records its deepest fill (``max_depth``).

    ``put(drop_oldest=True)`` never blocks: a full queue gives up its oldest item (returned to the
    caller to count). ``put(drop_oldest=False)`` blocks until there is room or the queue closes.
    """

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self.max_depth = 0
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: Any, *, drop_oldest: bool, prefer: Any = None) -> tuple[bool, Any]:
        """-> (accepted, dropped item or None). Not accepted only when the queue was closed.

        ``prefer``: a predicate; a full queue drops its oldest item matching it when there is
        one (a camera's own stale result before another camera's), else its oldest item.
        """
        with self._cond:
            dropped = None
            while len(self._items) >= self.maxsize and not self._closed:
                if drop_oldest:
                    match = next((k for k, old in enumerate(self._items) if prefer(old)), 0) if prefer else 0
                    dropped = self._items[match]
                    del self._items[match]
                    break
                self._cond.wait(_POLL_S)
            if self._closed:
                return False, dropped
            self._items.append(item)
            self.max_depth = max(self.max_depth, len(self._items))
            self._cond.notify_all()
            return True, dropped

    def get(self) -> Any:
        """Oldest item; blocks; :data:`CLOSED` once the queue is closed and empty."""
        with self._cond:
            while not self._items:
                if self._closed:
                    return CLOSED
                self._cond.wait(_POLL_S)  # timed, so Ctrl-C reaches a consumer blocked here
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        """Refuse new items; ``get`` drains what is left, then returns :data:`CLOSED`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items


@dataclass
class _Frame:
    lane: int
    index: int
    frame: np.ndarray
    view: np.ndarray
    t_mono: float
    t_wall: float
    capture_ms: float
    decode_scale: int = 1
    #: (H, W) the results are given in: the frame's (ROI's) as stored, also when it was decoded smaller.
    size: tuple[int, int] = (0, 0)
    preprocess_ms: float = 0.0
    t_start: float = 0.0


@dataclass
class _Lane:
    """One source of a stream (a camera): its reader, its settings and its counters."""

    index: int
    name: str
    source: FrameSource
    roi: tuple[int, int, int, int] | None
    color_order: str
    #: The camera's thresholds (a bundle ``Thresholds``), or None for the detector's.
    thresholds: Any = None
    captured: int = 0
    processed: int = 0
    delivered: int = 0
    reconnects: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    skips: list = field(default_factory=list)
    error: BaseException | None = None


def _is_source_spec(item: Any) -> bool:
    """One element of a list of sources (camera index, path, URL, pipeline, FrameSource), not a frame."""
    return (isinstance(item, (str, os.PathLike, FrameSource))
            or (isinstance(item, (int, np.integer)) and not isinstance(item, (bool, np.bool_))))


def split_sources(source: Any) -> list[tuple[str | None, Any]]:
    """``det.stream``'s source argument -> ``[(name or None, spec), ...]``, one per camera.

    A mapping ``{name: spec}`` or a list / tuple of specs (camera indices, paths, URLs, pipelines,
    :class:`~edge_ad.runtime.sources.FrameSource` s) is several sources; anything else (a list of
    frames included) is one.
    """
    if isinstance(source, collections.abc.Mapping):
        if not source:
            raise ValueError("the sources mapping is empty: pass {'cam_name': camera_index_or_path, ...}")
        for name in source:
            if not isinstance(name, str) or not name.strip():
                raise TypeError(f"source names must be non-empty strings (e.g. 'cam_top'), got {name!r}")
        return [(name, spec) for name, spec in source.items()]
    if isinstance(source, (list, tuple)) and source and all(_is_source_spec(s) for s in source):
        return [(None, spec) for spec in source]
    return [(None, source)]


class _Pipeline:
    """The threads, queues and counters of one :class:`Stream` (which only wraps it).

    The threads reference this object, never the :class:`Stream`, so a dropped stream can be
    garbage-collected and its finaliser can close the pipeline.
    """

    def __init__(self, detector: "Detector", source: Any, *, lossless: bool | None = None, queue_size: int = 2,
                 color_order: str = "bgr", roi: tuple[int, int, int, int] | None = None,
                 reconnect: bool | ReconnectPolicy = True, keep_frames: bool = False, max_frames: int | None = None,
                 batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, join_timeout: float = 5.0,
                 reduced_decode: bool = True) -> None:
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an int >= 1 (frames), got {queue_size!r}")
        if color_order not in COLOR_ORDERS:
            raise ValueError(f"color_order must be one of {COLOR_ORDERS}, got {color_order!r}")
        if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                       or max_frames < 1):
            raise ValueError(f"max_frames must be None or an int >= 1, got {max_frames!r}")
        if isinstance(batch_wait_ms, bool) or not isinstance(batch_wait_ms, (int, float)) or not (
                0 <= batch_wait_ms <= MAX_BATCH_WAIT_MS):
            raise ValueError(f"batch_wait_ms must be a number of milliseconds in [0, {MAX_BATCH_WAIT_MS}], got "
                             f"{batch_wait_ms!r}")
        if reconnect is True:
            reconnect = ReconnectPolicy()
        elif reconnect is not False and not isinstance(reconnect, ReconnectPolicy):
            raise TypeError(f"reconnect must be True, False or a ReconnectPolicy, got {reconnect!r}")
        roi = _check_roi(roi)
        self.detector = detector
        self.lanes: list[_Lane] = []
        for name, spec in split_sources(source):
            src = open_source(spec)
            name = name or src.name
            if any(lane.name == name for lane in self.lanes):
                name = f"{name}#{len(self.lanes)}"
            profile = detector.camera_profile(name) if name is not None else None
            lane_roi = _check_roi(profile.roi) if profile is not None and profile.roi is not None else roi
            lane_order = profile.color_order if profile is not None and profile.color_order else color_order
            # A ROI is in full-frame pixels: never reduced under it. Calibration decodes the same way
            # (calibrate.py); thresholds fitted on the other decode are warned about once per camera.
            mode = apply_decode_mode(src, reduced_decode, lane_roi, detector.spec.size)
            decode_mismatch(profile.thresholds if profile is not None and profile.thresholds is not None
                            else detector.thresholds, mode, name, detector.decode_warned)
            self.lanes.append(_Lane(len(self.lanes), name, src, lane_roi, lane_order,
                                    profile.thresholds if profile is not None else None))
        self.lossless = (not any(lane.source.live for lane in self.lanes)) if lossless is None else bool(lossless)
        self.queue_size = queue_size
        self.color_order = color_order
        self.roi = roi
        self.reconnect: ReconnectPolicy | None = reconnect or None
        self.keep_frames = bool(keep_frames)
        self.max_frames = max_frames
        self.join_timeout = float(join_timeout)
        #: Frames per engine call: the model's static batch (1 when dynamic).
        self.batch = int(detector.engine.batch or 1)
        self.batch_wait_s = float(batch_wait_ms) / 1e3 if self.batch > 1 else 0.0

        # Slot 0 belongs to Detector.predict (under its lock); a stream uses the others (reserved
        # at start). An engine with a single slot is shared with predict through the detector's lock.
        num_slots = max(1, detector.engine.num_slots - 1)
        self._frames = FairQueue(len(self.lanes), queue_size)
        self._inflight = BoundedQueue(num_slots)
        self._free = BoundedQueue(num_slots)
        self._pending: dict[int, list[_Frame]] = {}  # started, not finished engine slots (waited for at close)
        self._reserved = False
        self._results = BoundedQueue(queue_size * len(self.lanes))
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the counters (here and in the lanes)
        self._max_inflight = 0
        self._batches = self._batched_frames = 0
        self.events: collections.deque[StreamEvent] = collections.deque(maxlen=MAX_EVENTS)
        self._error: BaseException | None = None
        self._threads: list[threading.Thread] = []
        self._started = self._closed = False
        self._t0 = self._t_end = 0.0

    # -- public ----------------------------------------------------------------------------------

    @property
    def source(self) -> FrameSource:
        return self.lanes[0].source

    @property
    def mode(self) -> str:
        return "lossless" if self.lossless else "line-speed"

    def _lane_stats(self, lane: _Lane, running: bool, elapsed: float) -> StreamStats:
        return StreamStats(
            source=lane.name, mode=self.mode, running=running, captured=lane.captured, processed=lane.processed,
            delivered=lane.delivered, dropped=dict(lane.dropped), skipped=dict(lane.skipped), skips=list(lane.skips),
            reconnects=lane.reconnects,
            queues={"frames": {"bound": self._frames.maxsize, "max_depth": self._frames.max_depth[lane.index]},
                    "results": {"bound": self._results.maxsize, "max_depth": self._results.max_depth},
                    "slots": {"bound": self._free.maxsize, "max_depth": self._max_inflight}},
            elapsed_s=elapsed, fps=lane.delivered / elapsed if elapsed > 0 else 0.0,
            error=str(lane.error) if lane.error is not None else None)

    @property
    def stats(self) -> StreamStats:
        """A consistent snapshot of the counters (safe to read from any thread, any time)."""
        with self._lock:
            end = self._t_end or time.monotonic()
            elapsed = end - self._t0 if self._started else 0.0
            running = any(t.is_alive() for t in self._threads)
            per = {lane.name: self._lane_stats(lane, running, elapsed) for lane in self.lanes}
            total = self._lane_stats(self.lanes[0], running, elapsed)
            if len(self.lanes) > 1:
                total.source = ", ".join(per)
                total.captured, total.processed, total.delivered, total.reconnects = (
                    sum(getattr(s, k) for s in per.values()) for k in ("captured", "processed", "delivered",
                                                                       "reconnects"))
                total.dropped = dict(sum((lane.dropped for lane in self.lanes), collections.Counter()))
                total.skipped = dict(sum((lane.skipped for lane in self.lanes), collections.Counter()))
                total.skips = sorted((dict(r, source=lane.name) for lane in self.lanes for r in lane.skips),
                                     key=lambda r: r["time"])[:MAX_SKIP_RECORDS]
                total.queues["frames"]["max_depth"] = max(self._frames.max_depth)
                total.fps = total.delivered / elapsed if elapsed > 0 else 0.0
            errors = ([str(self._error)] if self._error is not None else []) + [
                s.error for s in per.values() if s.error is not None and (len(self.lanes) > 1 or self._error is None)]
            total.error = "; ".join(errors) if errors else None
            total.sources = per
            total.batch = self.batch
            total.batches = self._batches
            total.batch_fill = self._batched_frames / (self._batches * self.batch) if self._batches else 0.0
            total.cpu_budget = {**self.detector.cpu_budget.to_dict(),
                                "engine_reported": getattr(self.detector.engine, "threads", None)}
            return total

    def start(self) -> "_Pipeline":
        """Reserve the detector's stream slots, open the sources and start the threads."""
        if self._closed:
            raise RuntimeError("this stream was closed; start a new one with detector.stream(...)")
        if self._started:
            return self
        slots = self.detector.reserve_stream_slots()  # RuntimeError while another stream runs
        opened: list[FrameSource] = []
        try:
            for lane in self.lanes:
                lane.source.open()  # SourceError / ImportError reach the caller directly
                opened.append(lane.source)
        except BaseException:
            for src in opened:
                src.close()
            self.detector.release_stream_slots()
            raise
        self._reserved = True
        for s in slots:
            self._free.put(s, drop_oldest=False)
        self.detector.warn_if_uncalibrated()
        self._started = True
        self._t0 = time.monotonic()
        stages = [(f"capture-{lane.name}" if len(self.lanes) > 1 else "capture", self._capture_loop, (lane,))
                  for lane in self.lanes]
        stages += [("submit", self._submit_loop, ()), ("collect", self._collect_loop, ())]
        for name, target, args in stages:
            t = threading.Thread(target=self._guard, args=(name, target, args), name=f"edge_ad-stream-{name}",
                                 daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def next_result(self) -> Result | None:
        """The next result for the consumer (blocks); None once the stream has ended (then raises its error)."""
        item = self._results.get()
        if item is CLOSED:
            self._join()
            errors = [self._error] if self._error is not None else []
            errors += [lane.error for lane in self.lanes if lane.error is not None]
            if errors:
                if len(errors) == 1:
                    raise StreamError(str(errors[0])) from errors[0]
                raise StreamError("; ".join(str(e) for e in errors)) from errors[0]
            return None
        lane, res = item
        with self._lock:
            self.lanes[lane].delivered += 1
        return res

    def close(self) -> None:
        """Stop the threads, wait for in-flight inference, release the sources and the slots. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            if self._started:
                self._shutdown()
        finally:
            for lane in self.lanes:
                lane.source.close()

    def _drop_left(self) -> None:
        """Count what the queues still hold as ``dropped["shutdown"]`` (per source)."""
        left = [lane for lane, _ in self._frames.drain()] + [lane for lane, _ in self._results.drain()]
        with self._lock:
            for lane in left:
                self.lanes[lane].dropped["shutdown"] += 1

    def _shutdown(self) -> None:
        # Close before draining, so no stage can slip an item in between.
        self._frames.close()
        self._free.close()
        self._results.close()
        self._drop_left()
        self._join()
        self._drop_left()  # anything a stage enqueued between the drain and its exit
        self._reap()

    def _reap(self) -> None:
        """Wait for the engine requests still in flight (errors ignored), then give the slots back."""
        if any(t.is_alive() for t in self._threads if not t.name.startswith("edge_ad-stream-capture")):
            # submit / collect stuck inside the engine: its slots cannot be handed on safely.
            self._event("close_timeout", "an engine request did not finish; this detector's stream slots stay "
                                         "reserved (load a new Detector)", logging.ERROR)
            return
        with self._lock:
            pending, self._pending = dict(self._pending), {}
            for items in pending.values():
                for item in items:
                    self.lanes[item.lane].dropped["shutdown"] += 1
        for slot in pending:
            self.detector.abandon_slot(slot)
        if self._reserved:
            self._reserved = False
            self.detector.release_stream_slots()

    # -- internals -------------------------------------------------------------------------------

    def _join(self) -> None:
        deadline = time.monotonic() + self.join_timeout
        for t in self._threads:
            if t is threading.current_thread():
                continue
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                self._event("close_timeout", f"thread {t.name} did not stop within {self.join_timeout:g} s (a source "
                                             "read that never returns?); it is a daemon thread and will not block exit")
        with self._lock:
            if not self._t_end:
                self._t_end = time.monotonic()

    def _event(self, kind: str, message: str, level: int = logging.INFO, lane: _Lane | None = None) -> None:
        name = (lane or self.lanes[0]).name if lane is not None or len(self.lanes) == 1 else None
        self.events.append(StreamEvent(time.monotonic(), kind, message, name))
        log.log(level, "%s: %s: %s", name or "stream", kind, message)

    def _guard(self, name: str, target: Any, args: tuple) -> None:
        """Run a stage; an unexpected exception stops the whole stream and is re-raised to the consumer."""
        try:
            target(*args)
        except BaseException as exc:  # noqa: BLE001 - reported to the consumer, never swallowed
            with self._lock:
                if self._error is None:
                    self._error = exc if isinstance(exc, StreamError) else StreamError(
                        f"stream stage '{name}' failed: {type(exc).__name__}: {exc}")
                    self._error.__cause__ = exc
            self._event("error", str(self._error), logging.ERROR)
            self._stop.set()
            # Unblock the other stages; the consumer gets what is queued, then the error.
            self._frames.close()
            self._free.close()
            self._inflight.close()
            self._results.close()

    def _skip(self, lane: _Lane, index: int, reason: str, detail: str) -> None:
        with self._lock:
            lane.skipped[reason] += 1
            if len(lane.skips) < MAX_SKIP_RECORDS:
                lane.skips.append({"frame_index": index, "reason": reason, "detail": detail,
                                   "time": time.monotonic()})
        self._event("skip", f"frame {index}: {reason}: {detail}", logging.WARNING, lane)

    def _read(self, lane: _Lane) -> Any:
        """One item from the lane's source, reconnecting with back-off when it is lost. None = ended."""
        source = lane.source
        try:
            return source.read()
        except SourceError as exc:
            lost = exc
        self._event("source_lost", str(lost), logging.WARNING, lane)
        policy = self.reconnect
        if policy is None or not source.reopenable:
            why = "reconnect is off" if policy is None else "this kind of source cannot be re-opened"
            raise StreamError(f"source {lane.name} was lost ({lost}) and {why}")
        last: Exception = lost
        t_lost = time.monotonic()
        for attempt in range(1, policy.max_attempts + 1):
            delay = policy.delay(attempt)
            self._event("reconnect_attempt", f"attempt {attempt}/{policy.max_attempts} in {delay:.2f} s", lane=lane)
            if self._stop.wait(delay):
                return None
            try:
                source.close()
                source.open()
            except (SourceError, OSError) as exc:
                last = exc
                self._event("reconnect_failed", f"attempt {attempt}: {exc}", logging.WARNING, lane)
                continue
            with self._lock:
                lane.reconnects += 1
            self._event("reconnected", f"after {attempt} attempt(s), {time.monotonic() - t_lost:.2f} s", lane=lane)
            return self._read(lane)
        message = (f"gave up on source {lane.name} after {policy.max_attempts} reconnect attempts over "
                   f"{time.monotonic() - t_lost:.1f} s; last error: {last}. Check the cable / network / path, or "
                   "pass reconnect=ReconnectPolicy(max_attempts=...) to wait longer")
        self._event("gave_up", message, logging.ERROR, lane)
        raise StreamError(message)

    def _capture_loop(self, lane: _Lane) -> None:
        """Read one source into its lane; a source lost for good ends this lane only."""
        index = 0
        drop = not self.lossless
        try:
            while not self._stop.is_set():
                if self.max_frames is not None and index >= self.max_frames:
                    self._event("source_ended", f"max_frames={self.max_frames} reached", lane=lane)
                    break
                t0 = time.perf_counter()
                try:
                    item = self._read(lane)
                except StreamError as exc:  # gone for good: the others go on; the stream raises at its end
                    with self._lock:
                        lane.error = exc
                    break
                t_mono, t_wall = time.monotonic(), time.time()
                if item is None:
                    msg = lane.source.end_message
                    self._event("source_ended", msg or "end of source", logging.WARNING if msg else logging.INFO,
                                lane)
                    break
                capture_ms = (time.perf_counter() - t0) * 1e3
                with self._lock:
                    lane.captured += 1
                i, index = index, index + 1
                if isinstance(item, Skip):
                    self._skip(lane, i, item.reason, item.detail)
                    continue
                try:
                    view = self.detector.check_frame(item, roi=lane.roi, color_order=lane.color_order,
                                                     where=f"frame {i} of {lane.name}")
                except (TypeError, ValueError) as exc:
                    self._skip(lane, i, "bad_frame", str(exc))
                    continue
                # A reduced-size decode (never under a ROI) is reported in the stored frame's pixels.
                scale = lane.source.last_scale
                size = lane.source.last_size if scale > 1 and lane.source.last_size else view.shape[:2]
                ok, old = self._frames.put(lane.index, _Frame(lane.index, i, item, view, t_mono, t_wall, capture_ms,
                                                              scale, (int(size[0]), int(size[1]))),
                                           drop_oldest=drop)
                with self._lock:
                    if old is not None:
                        lane.dropped["stale_frame"] += 1
                    if not ok:
                        lane.dropped["shutdown"] += 1
        finally:
            self._frames.close_lane(lane.index)

    def _submit_loop(self) -> None:
        det = self.detector
        # Frames of one engine call share a colour order (preprocessing converts a whole batch alike).
        key = (lambda f: self.lanes[f.lane].color_order) if len(self.lanes) > 1 else None
        try:
            while True:
                slot = self._free.get()
                if slot is CLOSED:
                    break
                items = self._frames.get_batch(self.batch, self.batch_wait_s, key)
                if items is CLOSED:
                    break
                t0 = time.perf_counter()
                try:
                    det.start_slot(slot, [it.view for it in items], self.lanes[items[0].lane].color_order)
                except BaseException as exc:  # the stream ends; the frames are accounted for
                    for it in items:
                        self._skip(self.lanes[it.lane], it.index, "engine_error", f"{type(exc).__name__}: {exc}")
                    raise
                t1 = time.perf_counter()
                for it in items:
                    it.preprocess_ms, it.t_start = (t1 - t0) * 1e3, t1
                with self._lock:
                    self._pending[slot] = items
                    self._batches += 1
                    self._batched_frames += len(items)
                # Refused only when the stream is failing / closing: close() then waits for the slot.
                self._inflight.put((slot, items), drop_oldest=False)
                with self._lock:
                    self._max_inflight = max(self._max_inflight, self._inflight.max_depth)
        finally:
            self._inflight.close()

    def _collect_loop(self) -> None:
        det = self.detector
        drop = not self.lossless
        try:
            while True:
                entry = self._inflight.get()
                if entry is CLOSED:
                    break
                slot, items = entry
                try:
                    maps, scores = det.finish_slot(slot)
                except BaseException as exc:  # the stream ends; the frames are accounted for
                    for it in items:
                        self._skip(self.lanes[it.lane], it.index, "engine_error", f"{type(exc).__name__}: {exc}")
                    raise
                finally:  # finish_slot frees the slot even when the engine failed
                    with self._lock:
                        self._pending.pop(slot, None)
                    self._free.put(slot, drop_oldest=False)
                t1 = time.perf_counter()
                with self._lock:
                    for it in items:
                        self.lanes[it.lane].processed += 1
                for j, item in enumerate(items):
                    lane = self.lanes[item.lane]
                    if self._stop.is_set():  # closing: in-flight work is finished but not delivered
                        with self._lock:
                            lane.dropped["shutdown"] += 1
                        continue
                    t2 = time.perf_counter()
                    try:
                        res = det.make_result(maps[j], float(scores[j]), item.size, lane.roi,
                                              where=f"frame {item.index} of {lane.name}", thresholds=lane.thresholds)
                    except NonFiniteOutputError as exc:  # a fault, never a verdict: counted, and the stream goes on
                        self._skip(lane, item.index, "non_finite_output", str(exc))
                        continue
                    except BaseException as exc:  # the stream ends; the frames are accounted for
                        self._skip(lane, item.index, "postprocess_error", f"{type(exc).__name__}: {exc}")
                        with self._lock:
                            for rest in items[j + 1 :]:
                                self.lanes[rest.lane].dropped["shutdown"] += 1
                        raise
                    t3 = time.perf_counter()
                    res.frame_index, res.capture_time, res.capture_wall_time = item.index, item.t_mono, item.t_wall
                    res.source = lane.name
                    res.decode_scale = item.decode_scale
                    res.frame = item.frame if self.keep_frames else None
                    res.timings = {"capture": item.capture_ms, "preprocess": item.preprocess_ms,
                                   "infer": (t1 - item.t_start) * 1e3, "postprocess": (t3 - t2) * 1e3,
                                   "capture_to_decision": (time.monotonic() - item.t_mono) * 1e3}
                    ok, old = self._results.put((item.lane, res), drop_oldest=drop,
                                                prefer=lambda old, lane=item.lane: old[0] == lane)
                    with self._lock:
                        if old is not None:
                            self.lanes[old[0]].dropped["slow_consumer"] += 1
                        if not ok:
                            lane.dropped["shutdown"] += 1
        finally:
            self._results.close()


def _check_roi(roi: Any) -> tuple[int, int, int, int] | None:
    """Fail at stream creation, not as one skip per frame."""
    if roi is None:
        return None
    from .preprocessing import _is_int

    if len(tuple(roi)) != 4 or not all(_is_int(v) for v in roi):
        raise TypeError(f"roi must be a tuple of four ints (x, y, w, h) in pixels, got {roi!r}")
    return tuple(int(v) for v in roi)


class Stream:
    """A running (or ready) stream of :class:`Result` s; build it with :meth:`Detector.stream`.

    Iterate it once. Threads start at the first iteration (or ``with``); a source that cannot be
    opened raises :class:`~edge_ad.runtime.sources.SourceError` right there. Arguments as
    :meth:`Detector.stream` (plus ``join_timeout``: seconds ``close()`` waits for each thread).
    Dropping a stream without closing it closes it (its threads end).
    """

    def __init__(self, detector: "Detector", source: Any, **options: Any) -> None:
        self._pipeline = _Pipeline(detector, source, **options)
        self._iterated = False
        # The finaliser holds the pipeline, not the stream: it runs when the stream is dropped.
        self._finalizer = weakref.finalize(self, self._pipeline.close)
        self._finalizer.atexit = False  # at interpreter exit the daemon threads just stop

    @property
    def detector(self) -> "Detector":
        return self._pipeline.detector

    @property
    def source(self) -> FrameSource:
        """The :class:`~edge_ad.runtime.sources.FrameSource` being read (the first one of a multi-source stream)."""
        return self._pipeline.source

    @property
    def sources(self) -> dict[str, FrameSource]:
        """Source name (``Result.source``) -> :class:`~edge_ad.runtime.sources.FrameSource`, in the given order."""
        return {lane.name: lane.source for lane in self._pipeline.lanes}

    @property
    def lossless(self) -> bool:
        return self._pipeline.lossless

    @property
    def mode(self) -> str:
        """``"lossless"`` or ``"line-speed"``."""
        return self._pipeline.mode

    @property
    def stats(self) -> StreamStats:
        """A consistent snapshot of the counters (safe to read from any thread, any time)."""
        return self._pipeline.stats

    @property
    def events(self) -> collections.deque[StreamEvent]:
        """The last :data:`MAX_EVENTS` :class:`StreamEvent` s."""
        return self._pipeline.events

    def start(self) -> "Stream":
        """Open the source and start the threads (iteration and ``with`` do this for you).

        Raises:
            RuntimeError: the stream was closed, or another stream of this detector is running.
        """
        self._pipeline.start()
        return self

    def close(self) -> None:
        """Stop the threads, wait for in-flight inference, release the source and the engine slots. Idempotent."""
        self._pipeline.close()

    def __iter__(self) -> Iterator[Result]:
        if self._iterated:
            raise RuntimeError("a stream can be iterated once; start a new one with detector.stream(...)")
        self._iterated = True
        try:
            self._pipeline.start()
        except BaseException:
            self._pipeline.close()  # releases what the failed open may hold
            raise
        return self._results_gen()

    def _results_gen(self) -> Iterator[Result]:
        try:
            while (res := self._pipeline.next_result()) is not None:
                yield res
        finally:  # normal end, break / generator close, consumer exception, Ctrl-C
            self._pipeline.close()

    def __enter__(self) -> "Stream":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats
        return (f"Stream({self.source.name!r}, {self.mode}, captured={s.captured}, delivered={s.delivered}, "
                f"dropped={s.dropped_total}, skipped={s.skipped_total})")


# ------------------------------------------------------------------------------------------------
# run_stream: what `edge-ad run` does
# ------------------------------------------------------------------------------------------------


def result_record(res: Result) -> dict[str, Any]:
    """One stream :class:`Result` as the JSON-lines object of ``edge-ad run --jsonl`` (no maps).

    Keys: ``frame_index``, ``capture_time`` (monotonic s), ``capture_wall_time`` (Unix s),
    ``source``, ``score``, ``is_anomalous``, ``regions`` (list of ``{x, y, w, h, area_px, peak}``
    in frame pixels, or null), ``roi``, ``decode_scale`` (the frame was decoded at 1/N size;
    regions are still in the stored frame's pixels), ``timings`` (ms).
    """
    return {
        "frame_index": res.frame_index, "capture_time": res.capture_time, "capture_wall_time": res.capture_wall_time,
        "source": res.source, "score": float(res.score), "is_anomalous": res.is_anomalous,
        "regions": [r._asdict() for r in res.regions] if res.regions is not None else None,
        "roi": list(res.roi) if res.roi is not None else None,
        "decode_scale": res.decode_scale,
        "timings": {k: round(float(v), 4) for k, v in res.timings.items()},
    }


def run_stream(bundle: Any, source: Any, *, show: bool = False, save: str | None = None, jsonl: str | None = None,
               lossless: bool | None = None, max_frames: int | None = None, device: str = "auto",
               roi: tuple[int, int, int, int] | None = None, color_order: str = "bgr", queue_size: int = 2,
               reconnect: bool | ReconnectPolicy = True, progress: bool = True,
               batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS, reduced_decode: bool = True,
               engine_threads: int | None = None) -> StreamStats:
    """Stream a bundle over a source, writing JSON lines / an overlay video / a window. ``edge-ad run``.

    Args:
        bundle: bundle directory / ``.tar`` / :class:`~edge_ad.runtime.Bundle`, or a loaded
            :class:`~edge_ad.runtime.Detector`.
        source: what :func:`~edge_ad.runtime.sources.open_source` takes, or several sources
            (a ``{name: source}`` mapping: :meth:`Detector.stream`).
        show: show frames with the overlay in an OpenCV window (press ``q`` or Esc to stop).
        save: write the overlaid frames to this video file (``.mp4`` mp4v / ``.avi`` MJPG) at the
            source's frame rate (25 fps when unknown).
        jsonl: write one JSON object per result (:func:`result_record`), then a final
            ``{"stats": ...}`` line (:meth:`StreamStats.to_dict`).
        lossless, max_frames, roi, color_order, queue_size, reconnect, batch_wait_ms,
            reduced_decode: as :meth:`Detector.stream`.
        device: engine device (``"auto"`` = the bundle target's).
        engine_threads: the engine's CPU threads, as :meth:`~edge_ad.runtime.Detector.load`
            (None = the default budget); refused with a loaded detector (it has its engine already).
        progress: a tqdm bar (when tqdm is installed) counting results.

    Returns:
        The stream's final :class:`StreamStats`.

    Raises:
        StreamError: the source was lost for good (after the results made so far were written).
    """
    import json

    from .detector import Detector

    if (show or save) and len(split_sources(source)) > 1:
        raise ValueError("show / save draw one camera's video; with several sources write --jsonl (each record "
                         "names its source) or run one camera with --show / --save")
    if isinstance(bundle, Detector) and engine_threads is not None:
        raise ValueError("engine_threads is set when a detector is loaded: pass Detector.load(..., engine_threads=N) "
                         "or a bundle path here")
    det = bundle if isinstance(bundle, Detector) else Detector.load(bundle, device, engine_threads=engine_threads)
    draw = None
    if show or save:
        from .overlay import draw_overlay as draw  # written by the overlay module; imported only when drawing
    cv2 = None
    if show or save:
        from ._cv import require_cv2

        cv2 = require_cv2("show / save overlay frames")
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(desc="edge-ad run", unit="frame", total=max_frames)
        except ImportError:
            bar = None
    for what, path in (("--save video", save), ("--jsonl file", jsonl)):
        folder = Path(path).parent if path else None
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"cannot write the {what} {path}: folder {folder} does not exist (create it first)")
    out = open(jsonl, "w", encoding="utf-8") if jsonl else None  # noqa: SIM115 - closed in finally
    writer = None
    writer_size = (0, 0)
    stream = det.stream(source, lossless=lossless, queue_size=queue_size, color_order=color_order, roi=roi,
                        reconnect=reconnect, keep_frames=bool(show or save), max_frames=max_frames,
                        batch_wait_ms=batch_wait_ms, reduced_decode=reduced_decode)
    try:
        with stream:
            for res in stream:
                if out is not None:
                    out.write(json.dumps(result_record(res)) + "\n")
                if draw is not None:
                    frame = res.frame if res.frame.ndim == 3 else cv2.cvtColor(res.frame, cv2.COLOR_GRAY2BGR)
                    if res.decode_scale > 1:  # decoded smaller; the maps and boxes are in the stored pixels
                        frame = cv2.resize(frame, (res.anomaly_map.shape[1], res.anomaly_map.shape[0]))
                    if color_order == "rgb":
                        frame = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
                    image = draw(frame, res)
                    if save:
                        if writer is None:
                            fourcc = "MJPG" if str(save).lower().endswith(".avi") else "mp4v"
                            writer = cv2.VideoWriter(str(save), cv2.VideoWriter_fourcc(*fourcc),
                                                     stream.source.fps or 25.0, (image.shape[1], image.shape[0]))
                            if not writer.isOpened():
                                raise OSError(f"cannot write video {save}: this OpenCV has no {fourcc} encoder; try "
                                              "a .avi file name (MJPG)")
                            writer_size = (image.shape[1], image.shape[0])
                        # A video has one frame size; a source whose size changes is resized to the first.
                        if (image.shape[1], image.shape[0]) != writer_size:
                            image = cv2.resize(image, writer_size)
                        writer.write(image)
                    if show:
                        cv2.imshow("edge-ad run", image)
                        if cv2.waitKey(1) & 0xFF in (ord("q"), 27):
                            break
                if bar is not None:
                    bar.update(1)
    finally:
        stats = stream.stats
        if out is not None:
            out.write(json.dumps({"stats": stats.to_dict()}) + "\n")
            out.close()
        if writer is not None:
            writer.release()
        if show and cv2 is not None:
            cv2.destroyAllWindows()
        if bar is not None:
            bar.close()
    return stats

