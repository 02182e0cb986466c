"""Runtime inference engines: one module per bundle ``engine.name``, all torch-free.

An engine owns the compiled model and preallocated input buffers that preprocessing writes into
directly (no copy between preprocessing and inference). Engines are not thread-safe per slot:
one slot is used by one thread at a time. :class:`edge_ad.runtime.Detector` serialises slot 0
(``input_buffer`` / ``run``) with one lock; a stream (:mod:`edge_ad.runtime.stream`) owns the
other slots.

Asynchronous API (every engine implements it; streaming overlaps preprocessing of frame k+1 with
inference of frame k through it):

* ``num_slots``: how many requests can be in flight at once (>= 1), each with its own buffer;
* ``slot_buffer(slot, n)``: that slot's C-contiguous (B, 3, H, W) input buffer, B >= n;
* ``start(slot, n)``: launch inference on the slot's first ``n`` frames; returns at once;
* ``wait(slot)``: block until it is done; copies ``(maps (n, h, w) float32, scores (n,) float32)``.

The synchronous ``input_buffer(n)`` / ``run(n)`` are ``slot_buffer(0, n)`` and
``start(0, n)`` + ``wait(0)``.

``engine.name`` -> engine:

* ``onnxruntime``: :class:`OnnxRuntimeEngine` (needs the ``onnxruntime`` package);
* ``openvino``: :class:`OpenVINOEngine` (needs ``openvino``), with the bundle's pinned
  ``INFERENCE_PRECISION_HINT``;
* ``tensorrt``: :class:`TensorRTEngine` (needs ``tensorrt`` + cuda-python or pycuda): the bundle's engine
  for this GPU, built on first use (``edge-ad build-engine``), CUDA stream + pinned buffers per slot.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Bundle

__all__ = ["DEFAULT_SLOTS", "Engine", "SlotEngine", "create_engine", "runs_on_cpu"]

#: Slots an engine gets by default: slot 0 for synchronous ``predict`` calls, slots 1 and 2 for a
#: stream's double buffering (one inferring while the next frame is preprocessed).
DEFAULT_SLOTS = 3


class Engine(Protocol):
    """What :class:`~edge_ad.runtime.Detector` and streams need from an engine."""

    name: str
    device: str
    #: Version of the engine's package (e.g. onnxruntime's ``__version__``).
    version: str
    #: Static batch of the model, or None when the batch dimension is dynamic.
    batch: int | None
    #: Requests that may be in flight at once (>= 1), each with its own input buffer.
    num_slots: int
    #: The engine's CPU inference threads as the engine reports them (read back from the compiled
    #: model / session), or None when it does not run on the CPU or leaves it to its default.
    threads: int | None

    def input_buffer(self, n: int) -> np.ndarray:
        """``slot_buffer(0, n)``."""

    def run(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``start(0, n)`` then ``wait(0)``."""

    def slot_buffer(self, slot: int, n: int) -> np.ndarray:
        """A C-contiguous (B, 3, H, W) buffer of ``slot`` with B >= n (B == ``batch`` when static)."""

    def start(self, slot: int, n: int) -> None:
        """Launch inference on the first ``n`` frames of the slot's buffer; returns at once."""

    def wait(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Block until the slot's inference is done; copies ``(maps (n, h, w) float32, scores (n,) float32)``."""


class SlotEngine:
    """Base of the engines: the synchronous API is slot 0 of the asynchronous one.

    Subclasses implement ``slot_buffer`` / ``start`` / ``wait``; ``input_buffer`` and ``run`` then
    follow, so the two APIs can never disagree.
    """

    def input_buffer(self, n: int) -> np.ndarray:
        """Slot 0's input buffer (the synchronous API)."""
        return self.slot_buffer(0, n)  # type: ignore[attr-defined]

    def run(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """``start(0, n)`` then ``wait(0)``."""
        self.start(0, n)  # type: ignore[attr-defined]
        return self.wait(0)  # type: ignore[attr-defined]


def check_slot(slot: int, num_slots: int) -> int:
    """Validate a slot index (clear error instead of an IndexError deep in an engine)."""
    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < num_slots:
        raise ValueError(f"slot must be an int in [0, {num_slots}), got {slot!r}")
    return int(slot)


def check_slots(num_slots: int) -> int:
    """Validate the ``slots`` argument of an engine constructor."""
    if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 1:
        raise ValueError(f"slots must be an int >= 1 (3 = predict + double-buffered streaming), got {num_slots!r}")
    return num_slots


def split_outputs(maps: np.ndarray, scores: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw engine outputs (B, [1,] h, w) and (B, [1]) -> copies of the first ``n``: (n, h, w), (n,) float32."""
    maps = np.asarray(maps, np.float32)
    b = maps.shape[0]
    maps = maps.reshape(b, maps.shape[-2], maps.shape[-1])[:n].copy()
    return maps, np.asarray(scores, np.float32).reshape(b, -1)[:n, 0].copy()


def _output_indices(bundle: "Bundle", names: list[str]) -> tuple[int, int]:
    """Indices of the anomaly map and score outputs among the engine's ``names`` (manifest order else)."""
    wanted = [o.name for o in bundle.manifest.outputs]
    if len(wanted) >= 2 and wanted[0] in names and wanted[1] in names:
        return names.index(wanted[0]), names.index(wanted[1])
    if len(names) < 2:
        raise RuntimeError(f"the model has outputs {names}; expected (anomaly_map, score)")
    return 0, 1


def runs_on_cpu(bundle: "Bundle", device: str = "auto") -> bool:
    """Whether the bundle's engine on ``device`` infers on the CPU (so its thread count is ours to set)."""
    device = bundle.target.device if device == "auto" else str(device)
    return bundle.manifest.engine.name in ("openvino", "onnxruntime") and device.upper() == "CPU"


def create_engine(bundle: "Bundle", device: str = "auto", *, slots: int = DEFAULT_SLOTS,
                  threads: int | None = None) -> Engine:
    """Build the engine the bundle was made for (``manifest.engine.name``) with ``slots`` request slots.

    ``threads``: the engine's CPU inference threads (:mod:`edge_ad.runtime.cpu_budget`); None
    keeps the engine's default. Only for engines on the CPU (:func:`runs_on_cpu`).
    """
    name = bundle.manifest.engine.name
    if threads is not None and not runs_on_cpu(bundle, device):
        raise ValueError(f"threads={threads}: engine {name!r} on device {device!r} does not run on the CPU; "
                         "leave the thread count unset")
    if name == "onnxruntime":
        from .onnxruntime_engine import OnnxRuntimeEngine

        return OnnxRuntimeEngine(bundle, device, slots=slots, threads=threads)
    if name == "openvino":
        from .openvino_engine import OpenVINOEngine

        return OpenVINOEngine(bundle, device, slots=slots, threads=threads)
    if name == "tensorrt":
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine(bundle, device, slots=slots)
    raise NotImplementedError(f"bundle {bundle.source} names engine {name!r}, which this edge_ad runtime has no engine for")
