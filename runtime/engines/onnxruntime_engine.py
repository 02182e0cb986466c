"""onnxruntime engine (CPU execution provider; CUDA when asked for and available).

Asynchronous slots use ``InferenceSession.run_async``: the inference runs on one of onnxruntime's
own C++ threads and signals an event, so no Python thread is created (nothing to join on
shutdown). Builds without ``run_async`` (or whose session refuses it, e.g. a single-threaded
intra-op pool) fall back to running the request inside ``start``: still correct, just not
overlapped.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from . import DEFAULT_SLOTS, SlotEngine, _output_indices, check_slot, check_slots, split_outputs

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Bundle

_PROVIDERS = {"CPU": "CPUExecutionProvider", "GPU": "CUDAExecutionProvider", "CUDA": "CUDAExecutionProvider"}


def _import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise ImportError(
            f"this bundle runs on onnxruntime, but the onnxruntime package cannot be imported ({exc}). Install it "
            "with `pip install onnxruntime` (x86 / ARM CPU) or `pip install onnxruntime-gpu` (NVIDIA)."
        ) from exc
    return onnxruntime


class _Slot:
    """One request slot: its input buffer and the state of its in-flight run."""

    def __init__(self, buffer: np.ndarray) -> None:
        self.buffer = buffer
        self.done = threading.Event()
        self.n = 0
        self.busy = False
        self.outputs: Any = None
        self.error: str | None = None


class OnnxRuntimeEngine(SlotEngine):
    """``model.onnx`` in an onnxruntime session; each slot's numpy buffer is handed to the session as is.

    Args:
        bundle: the loaded bundle.
        device: ``"CPU"``, ``"CUDA"`` / ``"GPU"`` or ``"auto"`` (the bundle target's device).
        slots: request slots (slot 0 = the synchronous API / ``Detector.predict``).
        spinning: let onnxruntime's intra-op threads spin-wait between runs (lower latency on an
            otherwise idle machine, wasted cores in a pipeline); off by default.
        threads: ``intra_op_num_threads`` (the CPU budget, :mod:`edge_ad.runtime.cpu_budget`);
            None = onnxruntime's default (one per physical core). With 1 thread onnxruntime has
            no worker thread for ``run_async``: slots then run inside ``start`` (not overlapped).
    """

    name = "onnxruntime"

    def __init__(self, bundle: "Bundle", device: str = "auto", *, slots: int = DEFAULT_SLOTS,
                 spinning: bool = False, threads: int | None = None) -> None:
        ort = _import_onnxruntime()
        device = bundle.target.device if device == "auto" else str(device)
        provider = _PROVIDERS.get(device.upper())
        if provider is None:
            raise ValueError(f"device {device!r} is not one onnxruntime can use here; pass one of {sorted(_PROVIDERS)} "
                             "or 'auto'")
        available = ort.get_available_providers()
        if provider not in available:
            raise ValueError(f"device {device!r} needs onnxruntime's {provider}, which this onnxruntime build lacks "
                             f"(available: {', '.join(available)})")
        self.device = device.upper()
        self.version = str(ort.__version__)
        self.num_slots = check_slots(slots)
        options = ort.SessionOptions()
        # onnxruntime's intra-op threads spin-wait between runs by default. In a stream they would
        # burn the cores that capture, postprocessing and the other slot need (measured on a 2-core
        # CPU: stream throughput about doubled with spinning off); a caller that owns a dedicated
        # machine and calls predict in a tight loop may turn it back on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1  # sequential execution: no inter-op pool is used
        self.session = ort.InferenceSession(str(bundle.path("model.onnx")), options, providers=[provider])
        #: intra_op_num_threads as the session holds it (None: onnxruntime's default, 0 in its options).
        self.threads = int(self.session.get_session_options().intra_op_num_threads) or None
        inp = self.session.get_inputs()[0]
        self._input_name = inp.name
        dim0 = inp.shape[0]
        self.batch = int(dim0) if isinstance(dim0, int) else None
        self._dtype = np.float16 if "float16" in inp.type else np.float32
        self._hw = (bundle.manifest.input.height, bundle.manifest.input.width)
        names = [o.name for o in self.session.get_outputs()]
        self._map_idx, self._score_idx = _output_indices(bundle, names)
        self._async = hasattr(self.session, "run_async")
        self._slots = [_Slot(np.zeros((self.batch or 1, 3, *self._hw), self._dtype)) for _ in range(self.num_slots)]

    def io_specs(self) -> tuple[list[Any], list[Any]]:
        """The session's real (inputs, outputs) as :class:`~edge_ad.runtime.engine_io.TensorSpec` lists."""
        from ..engine_io import TensorSpec, dtype_name

        def spec(t: Any) -> TensorSpec:
            return TensorSpec(t.name, tuple(d if isinstance(d, int) else None for d in t.shape), dtype_name(t.type))

        return [spec(t) for t in self.session.get_inputs()], [spec(t) for t in self.session.get_outputs()]

    # -- asynchronous API ----------------------------------------------------------------------

    def slot_buffer(self, slot: int, n: int) -> np.ndarray:
        s = self._slots[check_slot(slot, self.num_slots)]
        if self.batch is None and len(s.buffer) < n:
            s.buffer = np.zeros((n, 3, *self._hw), self._dtype)
        return s.buffer

    def start(self, slot: int, n: int) -> None:
        s = self._slots[check_slot(slot, self.num_slots)]
        if s.busy:
            raise RuntimeError(f"slot {slot} is still in flight: call wait({slot}) before starting it again")
        s.n, s.busy, s.outputs, s.error = n, True, None, None
        s.done.clear()
        feed = {self._input_name: s.buffer if self.batch is not None else s.buffer[:n]}
        if self._async:
            try:
                self.session.run_async(None, feed, self._on_done, s)
                return
            except Exception:  # e.g. no intra-op thread pool for async runs: run inline from now on
                self._async = False
        try:
            s.outputs = self.session.run(None, feed)
        except Exception as exc:
            s.error = f"{type(exc).__name__}: {exc}"
        s.done.set()

    @staticmethod
    def _on_done(outputs: Any, s: _Slot, err: str) -> None:
        # Runs on an onnxruntime C++ thread; only hands the outputs over.
        s.outputs, s.error = outputs, (err or None)
        s.done.set()

    def wait(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        s = self._slots[check_slot(slot, self.num_slots)]
        if not s.busy:
            raise RuntimeError(f"slot {slot} has no inference in flight: call start({slot}, n) first")
        s.done.wait()
        s.busy = False
        if s.error:
            raise RuntimeError(f"onnxruntime inference failed: {s.error}")
        outs, s.outputs = s.outputs, None
        return split_outputs(outs[self._map_idx], outs[self._score_idx], s.n)
