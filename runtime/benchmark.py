"""``edge-ad benchmark``: streaming and bare-engine speed of a bundle on this device, with device facts.

What one run measures (same bundle, same process, same engine):

* ``engine_fps``: the bare engine, ``start`` + ``wait`` on slot 0 with a preprocessed input, in a
  loop (``iterations`` calls after ``warmup``), times the static batch;
* the stream: ``Detector.stream`` over the source (default: synthetic frames generated in memory,
  or ``source`` = a video / folder / camera), lossless for finite sources. A finite source (video,
  folder) shorter than ``warmup + iterations`` frames is cycled (re-opened at its end) until it
  has delivered enough; fewer than :data:`MIN_FPS_FRAMES` measured results give no FPS figure
  (None, and the text report says why) rather than a number from a handful of frames. With
  ``sources=N`` the stream has N cameras (``cam0`` ...), each its own copy of the source (synthetic:
  a different seed), and the report adds per-camera FPS and capture-to-decision p50 / p99, and the
  batch fill ratio of the engine calls (a static-batch bundle gathers frames across cameras).
  ``end_to_end_fps`` is
  results delivered per second after the first ``warmup`` results; per-stage p50 / p95 / p99 in
  milliseconds for ``capture``, ``preprocess``, ``infer``, ``postprocess`` and
  ``capture_to_decision`` (capture timestamp -> result ready); dropped / skipped frames;
* ``cpu_budget``: how the cores were split (:mod:`edge_ad.runtime.cpu_budget`: engine threads,
  stream preprocessing threads, policy, and the engine's own report of its threads); the bare
  engine runs with the same engine threads as the stream;
* ``peak_rss_mb``: the process's peak resident memory (``getrusage``), MiB;
* device facts (:func:`device_facts`): CPU model, GPU, engine + version, precision, target, and on
  Jetson the board model (``/proc/device-tree/model``), nvpmodel power mode and whether clocks are
  pinned (``jetson_clocks``), each when readable.

Torch-free.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .sources import FrameSource, IterableSource, open_source

__all__ = ["MIN_FPS_FRAMES", "STAGES", "benchmark", "device_facts", "format_report", "synthetic_frames"]

#: Fewest measured stream results an FPS figure is computed from (fewer: the FPS is None).
MIN_FPS_FRAMES = 30

#: Per-frame timings (``Result.timings`` keys) summarised by the benchmark.
STAGES = ("capture", "preprocess", "infer", "postprocess", "capture_to_decision")


def synthetic_frames(count: int, height: int = 480, width: int = 640, *, distinct: int = 8,
                     seed: int = 0) -> Iterator[np.ndarray]:
    """``count`` uint8 BGR (height, width, 3) frames: ``distinct`` smooth textured images, cycled.

    Made once (a few MB) and yielded by reference, so generating them costs nothing per frame and
    memory stays flat however many frames are streamed.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    pool = []
    for k in range(distinct):
        fx, fy = rng.uniform(0.005, 0.05, 2)
        base = 128 + 60 * np.sin(xx * fx + k) * np.cos(yy * fy)
        img = base[:, :, None] + rng.normal(0, 12, (height, width, 3))
        pool.append(np.clip(img, 0, 255).astype(np.uint8))
    for i in range(count):
        yield pool[i % distinct]


def describe_source(source: Any) -> str:
    """A short printable name of a source: the spec itself for strings / paths / camera indices,
    ``"list of N frames"``-style for in-memory frames (never their pixel values)."""
    if isinstance(source, (str, os.PathLike, int)):
        return str(source)
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    if isinstance(source, np.ndarray):
        return f"array {tuple(source.shape)} {source.dtype}"
    try:
        return f"{type(source).__name__} of {len(source)} frames"
    except TypeError:
        return f"{type(source).__name__} of frames"


class CycledSource(FrameSource):
    """A finite source read again from its start at its end, until ``count`` items were read.

    A benchmark needs more frames than a short clip or a 25-image folder holds; cycling keeps the
    frames real. A source that yields nothing in a whole pass ends the cycle (no endless loop).
    """

    def __init__(self, spec: Any, count: int, name: str | None = None) -> None:
        super().__init__()
        self._spec, self._count, self._read = spec, count, 0
        self._inner: FrameSource = open_source(spec)
        self.name = name or self._inner.name
        self.fps = self._inner.fps
        self._pass_items = 0
        self._min_size: tuple[int, int] | None = None

    @property
    def last_scale(self) -> int:  # type: ignore[override]
        return self._inner.last_scale

    @property
    def last_size(self) -> tuple[int, int] | None:  # type: ignore[override]
        return self._inner.last_size

    def reduce_decode(self, min_size: tuple[int, int]) -> bool:
        self._min_size = min_size
        return self._inner.reduce_decode(min_size)

    def open(self) -> None:
        self._inner.open()
        self.fps = self._inner.fps

    def read(self) -> Any:
        if self._read >= self._count:
            return None
        item = self._inner.read()
        if item is None:
            if self._pass_items == 0:  # an empty pass: nothing to cycle
                self.end_message = self._inner.end_message
                return None
            self._inner.close()
            self._inner = open_source(self._spec)
            if self._min_size is not None:
                self._inner.reduce_decode(self._min_size)
            self._inner.open()
            self._pass_items = 0
            item = self._inner.read()
            if item is None:
                return None
        self._read += 1
        self._pass_items += 1
        return item

    def close(self) -> None:
        self._inner.close()


def _bench_sources(source: Any, sources: int, per_source: int, frame_size: tuple[int, int]) -> tuple[Any, str]:
    """The stream's source argument for ``sources`` cameras of ``per_source`` frames each, and its name."""
    live = source is not None and open_source(source).live
    if source is None:
        name = f"synthetic {frame_size[0]}x{frame_size[1]} BGR"
        made = [IterableSource(synthetic_frames(per_source, *frame_size, seed=k), name=f"cam{k}")
                for k in range(sources)]
    elif live:  # a camera / URL is not cycled (max_frames bounds it)
        name = describe_source(source)
        if sources > 1:
            raise ValueError("--sources N > 1 needs a file / folder source (or none: synthetic frames); a live "
                             "source cannot be opened N times")
        return source, name
    else:
        name = describe_source(source)
        made = [CycledSource(source, per_source, name=f"cam{k}" if sources > 1 else None) for k in range(sources)]
    if sources == 1:
        return made[0], name
    return {m.name: m for m in made}, f"{sources} x {name}"


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").replace("\x00", "").strip()
    except OSError:
        return None


def device_facts(root: str | os.PathLike = "/") -> dict[str, Any]:
    """What the machine is, from files (``root`` lets tests point at a fake file tree).

    Returns:
        ``{"cpu", "cores", "machine", "os", "gpu", "jetson_model", "nvpmodel", "clocks"}``; a fact
        that cannot be read is None. ``clocks`` is ``"pinned"`` when every CPU core's minimum
        frequency equals its maximum (what ``jetson_clocks`` does), ``"dynamic"`` otherwise.
    """
    root = Path(root)
    cpu = None
    for line in (_read(root / "proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            cpu = value.strip()
            break
    gpus = []
    for info in sorted((root / "proc/driver/nvidia/gpus").glob("*/information")):
        for line in (_read(info) or "").splitlines():
            if line.startswith("Model:"):
                gpus.append(line.partition(":")[2].strip())
    jetson = _read(root / "proc/device-tree/model")
    # nvpmodel writes its current mode here ("pmode:0002 fmode:..."); the mode names live in
    # /etc/nvpmodel.conf as "< POWER_MODEL ID=2 NAME=15W >".
    nvp = None
    status = _read(root / "var/lib/nvpmodel/status")
    if status:
        mode = status.split()[0].partition(":")[2].lstrip("0") or "0"
        nvp = f"mode {mode}"
        for line in (_read(root / "etc/nvpmodel.conf") or "").splitlines():
            if "POWER_MODEL" in line and f"ID={mode} " in line.replace(">", " "):
                name = line.split("NAME=")[-1].split()[0].rstrip(">") if "NAME=" in line else None
                if name:
                    nvp = f"mode {mode} ({name})"
    clocks = None
    pinned = []
    for cpu_dir in sorted((root / "sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq")):
        lo, hi = _read(cpu_dir / "scaling_min_freq"), _read(cpu_dir / "scaling_max_freq")
        if lo and hi:
            pinned.append(lo == hi)
    if pinned:
        clocks = "pinned" if all(pinned) else "dynamic"
    return {"cpu": cpu or platform.processor() or None, "cores": os.cpu_count(), "machine": platform.machine(),
            "os": f"{platform.system()} {platform.release()}", "gpu": ", ".join(gpus) or None,
            "jetson_model": jetson or None, "nvpmodel": nvp, "clocks": clocks}


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    p = np.percentile(np.asarray(values, np.float64), [50, 95, 99])
    return {"p50": float(p[0]), "p95": float(p[1]), "p99": float(p[2])}


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _engine_fps(det: Any, warmup: int, iterations: int) -> float:
    """Bare engine throughput (frames/s): slot 0, input preprocessed once, start + wait in a loop."""
    engine = det.engine
    n = engine.batch or 1
    frame = next(synthetic_frames(1, det.spec.size[0], det.spec.size[1]))
    with det.slot0():  # predict's slot, held for the whole measurement
        buf = engine.slot_buffer(0, n)
        from .preprocessing import preprocess_batch

        preprocess_batch([frame] * n, det.spec, out=buf[:n])
        for _ in range(warmup):
            engine.start(0, n)
            engine.wait(0)
        t0 = time.perf_counter()
        for _ in range(iterations):
            engine.start(0, n)
            engine.wait(0)
        dt = time.perf_counter() - t0
    return n * iterations / dt


def benchmark(bundle: Any, source: Any = None, *, warmup: int = 20, iterations: int = 200, device: str = "auto",
              json_path: str | os.PathLike | None = None, frame_size: tuple[int, int] = (480, 640),
              lossless: bool | None = None, progress: bool = True, sources: int = 1,
              batch_wait_ms: float = 2.0, map_resolution: str = "frame",
              reduced_decode: bool = True, engine_threads: int | None = None) -> dict[str, Any]:
    """Benchmark a bundle: bare engine and end-to-end streaming on this device.

    Args:
        bundle: bundle path / :class:`~edge_ad.runtime.Bundle` / loaded :class:`~edge_ad.runtime.Detector`.
        source: frames to stream (anything :func:`~edge_ad.runtime.sources.open_source` takes);
            None = ``warmup + iterations`` synthetic (height, width) = ``frame_size`` BGR frames.
        warmup: engine calls / stream results left out of the figures (cold caches, lazy init).
        iterations: measured engine calls, and at most this many measured stream results.
        device: engine device (``"auto"`` = the bundle target's).
        json_path: also write the report there as JSON.
        frame_size: (height, width) of the synthetic frames.
        lossless: stream mode (None = the source's default: lossless for files and synthetic frames).
        progress: print a one-line note per phase to stderr.
        sources: number of cameras streamed at once through the one detector (each a copy of
            ``source``, cycled; synthetic frames with a different seed each).
        batch_wait_ms: as :meth:`~edge_ad.runtime.Detector.stream` (static-batch bundles).
        map_resolution: as :meth:`~edge_ad.runtime.Detector.load` when ``bundle`` is not a
            loaded detector (``"lazy"``: no full-resolution map per frame).
        reduced_decode: as :meth:`~edge_ad.runtime.Detector.stream` (image folders decoded at
            reduced size; default on, False = full decode).
        engine_threads: as :meth:`~edge_ad.runtime.Detector.load` (None = the default budget);
            refused with a loaded detector.

    Returns:
        The report: ``{"bundle", "source", "frames", "mode", "engine_fps", "end_to_end_fps",
        "stream_vs_engine", "stages": {stage: {p50, p95, p99}} (ms), "capture_to_decision_p99_ms",
        "captured", "delivered", "dropped", "skipped", "peak_rss_mb", "engine", "engine_version",
        "device", "precision", "target", "device_facts", "sources": {camera: {"delivered", "fps",
        "capture_to_decision": {p50, p95, p99}}}, "batch", "batch_fill", "cpu_budget", "decode_scales"}``
        (``decode_scales``: the reduced-decode factors of the measured frames, [1] = full decode). FPS values are None when
        fewer than :data:`MIN_FPS_FRAMES` results were measured.
    """
    from .detector import Detector

    for name, v in (("warmup", warmup), ("iterations", iterations)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "warmup" else 1):
            raise ValueError(f"{name} must be an int >= {0 if name == 'warmup' else 1}, got {v!r}")
    if (not isinstance(frame_size, (tuple, list)) or len(frame_size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 2 for v in frame_size)):
        raise ValueError(f"frame_size must be (height, width) in pixels, each >= 2, got {frame_size!r}")
    if isinstance(sources, bool) or not isinstance(sources, int) or sources < 1:
        raise ValueError(f"sources must be an int >= 1 (cameras), got {sources!r}")
    if isinstance(bundle, Detector) and engine_threads is not None:
        raise ValueError("engine_threads is set when a detector is loaded: pass Detector.load(..., engine_threads=N) "
                         "or a bundle path here")
    det = bundle if isinstance(bundle, Detector) else Detector.load(bundle, device, map_resolution=map_resolution,
                                                                     engine_threads=engine_threads)
    if progress:
        print(f"[benchmark] bare engine: {warmup} warm-up + {iterations} calls", file=sys.stderr)
    engine_fps = _engine_fps(det, warmup, iterations)

    total = warmup + iterations
    per_source = -(-total // sources)  # ceil: every camera streams its share
    src, name = _bench_sources(source, sources, per_source, frame_size)
    if progress:
        print(f"[benchmark] stream: {name}, up to {per_source * sources} frames", file=sys.stderr)
    times = {s: [] for s in STAGES}
    per_cam: dict[str, list[tuple[float, float]]] = {}  # camera -> [(arrival time, capture_to_decision ms)]
    t_first = t_last = None
    measured = 0
    scales: set[int] = set()
    live = isinstance(src, FrameSource) and src.live or not isinstance(src, (FrameSource, dict))
    with det.stream(src, lossless=lossless, max_frames=total if live and source is not None else None,
                    batch_wait_ms=batch_wait_ms, reduced_decode=reduced_decode) as stream:
        for k, res in enumerate(stream):
            if k < warmup:
                continue
            now = time.monotonic()
            if t_first is None:
                t_first = now
            t_last = now
            measured += 1
            for s in STAGES:
                times[s].append(res.timings[s])
            per_cam.setdefault(res.source, []).append((now, res.timings["capture_to_decision"]))
            scales.add(res.decode_scale)
    stats = stream.stats
    if stats.delivered == 0:  # a table of NaN would hide it
        raise RuntimeError(f"benchmark measured nothing: {stats.no_result_reason()}")
    # Rate over the measured results: (results - 1) intervals between the first and last one.
    span = (t_last - t_first) if measured > 1 else 0.0
    e2e = (measured - 1) / span if measured >= MIN_FPS_FRAMES and span > 0 else None
    cams = {cam: {"delivered": len(v),
                  "fps": len(v) / span if e2e is not None else None,
                  "capture_to_decision": _percentiles([ms for _, ms in v])} for cam, v in sorted(per_cam.items())}
    m = det.bundle.manifest
    stages = {s: _percentiles(v) for s, v in times.items()}
    report = {
        "bundle": str(det.bundle.source), "source": name, "frames": measured, "mode": stats.mode,
        "decode_scales": sorted(scales),
        "engine_fps": engine_fps, "end_to_end_fps": e2e,
        "stream_vs_engine": e2e / engine_fps if e2e is not None else None,
        "sources": cams, "batch": stats.batch, "batch_fill": stats.batch_fill, "cpu_budget": stats.cpu_budget,
        "stages": stages, "capture_to_decision_p99_ms": stages["capture_to_decision"]["p99"],
        "captured": stats.captured, "delivered": stats.delivered, "dropped": stats.dropped,
        "skipped": stats.skipped, "peak_rss_mb": _peak_rss_mb(), "engine": det.engine.name,
        "engine_version": getattr(det.engine, "version", None), "device": det.engine.device,
        "precision": m.precision, "target": m.target, "input": f"{m.input.height}x{m.input.width}",
        "device_facts": device_facts(),
    }
    if json_path is not None:
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table to paste into a test report."""
    f = report["device_facts"]
    lines = [
        f"bundle      {report['bundle']}",
        f"engine      {report['engine']} {report['engine_version']} on {report['device']}, {report['precision']}, "
        f"target {report['target']}, input {report['input']}",
        f"cpu         {f['cpu']} ({f['cores']} cores, {f['machine']})",
    ]
    if f["gpu"]:
        lines.append(f"gpu         {f['gpu']}")
    b = report.get("cpu_budget")
    if b:
        from .cpu_budget import CpuBudget

        reported = b.get("engine_reported")
        budget = CpuBudget(b["cores"], b["engine_threads"], b["preprocess_threads"], b["policy"])
        lines.append(f"cpu budget  {budget.describe()}"
                     + (f"; engine reports {reported}" if reported is not None else ""))
    if f["jetson_model"]:
        lines.append(f"board       {f['jetson_model']}, power {f['nvpmodel'] or 'unknown'}, clocks "
                     f"{f['clocks'] or 'unknown'}")
    lines += [
        f"source      {report['source']} ({report['mode']}, {report['frames']} measured frames"
        + (f", decoded at 1/{' and 1/'.join(map(str, report['decode_scales']))}"
           if any(k > 1 for k in report.get("decode_scales", ())) else "") + ")",
        "",
        f"{'stage':<22}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}",
    ]
    for s, p in report["stages"].items():
        lines.append(f"{s:<22}{p['p50']:>10.3f}{p['p95']:>10.3f}{p['p99']:>10.3f}")
    dropped = sum(report["dropped"].values())
    skipped = sum(report["skipped"].values())
    lines += [
        "",
        f"engine_fps        {report['engine_fps']:.1f}   (bare engine, batch {report.get('batch', 1)})",
        (f"end_to_end_fps    {report['end_to_end_fps']:.1f}   ({100 * report['stream_vs_engine']:.0f} % of engine)"
         if report["end_to_end_fps"] is not None else
         f"end_to_end_fps    n/a   (only {report['frames']} measured frames; at least {MIN_FPS_FRAMES} needed: "
         "raise --iterations)"),
        f"batch fill        {report.get('batch_fill', 1.0):.2f}   (frames per engine call / batch "
        f"{report.get('batch', 1)})",
        f"capture->decision p99 {report['capture_to_decision_p99_ms']:.2f} ms",
        f"frames            captured {report['captured']}, delivered {report['delivered']}, dropped {dropped}, "
        f"skipped {skipped}",
        f"peak RSS          {report['peak_rss_mb']:.0f} MiB",
    ]
    if len(report.get("sources", {})) > 1:
        lines += ["", f"{'camera':<12}{'delivered':>10}{'fps':>9}{'c2d p50 ms':>12}{'c2d p99 ms':>12}"]
        for cam, c in report["sources"].items():
            fps = f"{c['fps']:.1f}" if c["fps"] is not None else "n/a"
            lines.append(f"{cam:<12}{c['delivered']:>10}{fps:>9}{c['capture_to_decision']['p50']:>12.2f}"
                         f"{c['capture_to_decision']['p99']:>12.2f}")
    return "\n".join(lines)
