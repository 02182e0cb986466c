"""The CPU budget of a detector: how many cores the engine's threads get, and the pipeline's.

On a small box (2-4 cores) the engine's own threads (OpenVINO, onnxruntime) and a stream's
threads (capture / JPEG decode, preprocessing in the C++ extension, postprocessing) compete for
the same cores; left to themselves the engines size their pools to every core and inference
stretches inside a stream (docs/MULTI_CAMERA.md, "CPU budget"). :func:`plan_cpu_budget` makes
the split explicit:

* ``engine_threads``: the engine's intra-op threads (OpenVINO ``INFERENCE_NUM_THREADS`` with one
  ``LATENCY`` stream, onnxruntime ``intra_op_num_threads``); None for engines that do not run on
  the CPU (TensorRT, OpenVINO GPU / NPU, onnxruntime CUDA), which keep their own settings;
* ``preprocess_threads``: the C++ preprocessing extension's ``num_threads`` inside a stream
  (the cores the engine does not get, at least 1; ``predict`` keeps the automatic choice, since
  its preprocessing never overlaps inference).

Default policy (``engine_threads=None``): the engine gets the usable cores
(``os.sched_getaffinity``) minus ``floor(cores * AUTO_PIPELINE_SHARE)``, at least 1: on 2-3
cores every core, on 4 cores 3, on 8 cores 6. Why (measurement in docs/MULTI_CAMERA.md, 224 px
INT8 knn on 0.5 MP JPEGs): the pipeline's own work per frame (JPEG decode + preprocessing +
lazy postprocessing, ~2 core-ms) is about a quarter of the per-frame CPU work (the engine ~5.4
core-ms); on 2 cores, reserving a whole core for it (engine 1 thread) left that core mostly idle
and cut end-to-end FPS by about a third, while the engine on both cores (its threads sharing
them with the pipeline's) gave the most frames per second. So only whole cores' worth of
pipeline work (a quarter of the cores, rounded down) is kept from the engine. The stream's
threads (one capture thread per camera, submit, collect) share what is left with it.

Torch-free, no engine import.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["AUTO_PIPELINE_SHARE", "CpuBudget", "check_engine_threads", "plan_cpu_budget", "usable_cores"]

#: Share of the usable cores kept from the engine for the stream's threads by default (rounded
#: down: on fewer than 4 cores the engine gets them all). Measured: docs/MULTI_CAMERA.md.
AUTO_PIPELINE_SHARE = 0.25


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cgroup cpusets), else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS / Windows have no sched_getaffinity
        return max(1, os.cpu_count() or 1)


def check_engine_threads(value: Any, cores: int | None = None) -> int | None:
    """Validate an ``engine_threads`` argument -> None (the default policy) or an int in [1, cores].

    Raises:
        ValueError: not None / an int, below 1, or more than the usable cores (oversubscribing the
            cores is what the budget exists to prevent).
    """
    if value is None:
        return None
    cores = usable_cores() if cores is None else cores
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"engine_threads must be None (automatic: docs/MULTI_CAMERA.md) or an int >= 1 (the engine's "
                         f"CPU threads), got {value!r}")
    if value > cores:
        raise ValueError(f"engine_threads={value} is more than the {cores} cores this process may use "
                         f"(os.sched_getaffinity); pass at most {cores}, or None for the automatic budget")
    return value


@dataclass(frozen=True)
class CpuBudget:
    """How a detector's work is spread over the cores (``Detector.cpu_budget``, ``stream.stats.cpu_budget``).

    Attributes:
        cores: usable cores of the process (:func:`usable_cores`).
        engine_threads: the engine's CPU threads; None when the engine does not run on the CPU
            (its own settings stay).
        preprocess_threads: the C++ preprocessing extension's threads inside a stream.
        policy: ``"auto"`` (the default policy, :data:`AUTO_PIPELINE_SHARE`) or ``"explicit"`` (the caller's
            ``engine_threads``); ``"engine"`` when the engine is not on the CPU.
    """

    cores: int
    engine_threads: int | None
    preprocess_threads: int
    policy: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for reports: ``2 cores: engine 2 threads, stream preprocessing 1 (auto)``."""
        engine = "engine's own threads (not on the CPU)" if self.engine_threads is None else \
            f"engine {self.engine_threads} thread{'s' * (self.engine_threads != 1)}"
        return f"{self.cores} cores: {engine}, stream preprocessing {self.preprocess_threads} ({self.policy})"


def plan_cpu_budget(engine_threads: int | None = None, *, cpu_engine: bool = True,
                    cores: int | None = None) -> CpuBudget:
    """The budget for a detector whose engine runs on the CPU (``cpu_engine``) or not.

    Args:
        engine_threads: None = the default policy; else the engine's threads (validated by
            :func:`check_engine_threads`).
        cpu_engine: False for TensorRT / GPU / NPU devices: an explicit ``engine_threads`` is then
            refused (it would be silently ignored).
        cores: usable cores (default :func:`usable_cores`; tests pass a number).

    Raises:
        ValueError: a bad ``engine_threads``, or one given for an engine that is not on the CPU.
    """
    cores = usable_cores() if cores is None else int(cores)
    engine_threads = check_engine_threads(engine_threads, cores)
    if not cpu_engine:
        if engine_threads is not None:
            raise ValueError(f"engine_threads={engine_threads} only applies to inference on the CPU (OpenVINO / "
                             "onnxruntime on 'CPU'); this engine runs on another device and keeps its own threads: "
                             "leave engine_threads unset")
        return CpuBudget(cores, None, max(1, cores), "engine")
    policy = "explicit" if engine_threads is not None else "auto"
    if engine_threads is None:
        engine_threads = max(1, cores - int(cores * AUTO_PIPELINE_SHARE))
    return CpuBudget(cores, engine_threads, max(1, cores - engine_threads), policy)
