"""OpenVINO engine: the bundle's IR compiled with its pinned ``INFERENCE_PRECISION_HINT``.

One ``InferRequest`` per slot (``start_async`` / ``wait``). Preprocessing writes straight into
each request's own input tensor (``tensor.data``), so no copy happens between preprocessing and
inference.

CPU budget (``threads``, :mod:`edge_ad.runtime.cpu_budget`): ``INFERENCE_NUM_THREADS`` = threads
and, unless the bundle pins another, ``PERFORMANCE_HINT`` = ``LATENCY`` (one executor stream that
uses all of them): a stream keeps one engine call in flight while it preprocesses the next, so
one stream with the whole thread budget finishes each call soonest; a ``THROUGHPUT`` hint would
split the budget into streams that only help with more calls in flight.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from . import DEFAULT_SLOTS, SlotEngine, _output_indices, check_slot, check_slots, split_outputs

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Bundle


def _import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(
            f"this bundle runs on OpenVINO, but the openvino package cannot be imported ({exc}). "
            "Install it with `pip install openvino`."
        ) from exc
    return openvino


class OpenVINOEngine(SlotEngine):
    """``openvino/model.xml`` compiled for ``device`` ("auto" = the bundle target's device)."""

    name = "openvino"

    def __init__(self, bundle: "Bundle", device: str = "auto", *, slots: int = DEFAULT_SLOTS,
                 threads: int | None = None) -> None:
        ov = _import_openvino()
        self.device = bundle.target.device if device == "auto" else str(device)
        self.version = str(ov.get_version())
        self.num_slots = check_slots(slots)
        config = dict(bundle.manifest.engine.hints)  # INFERENCE_PRECISION_HINT is always pinned in the bundle
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = int(threads)
            config.setdefault("PERFORMANCE_HINT", "LATENCY")
        self.config = config
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(bundle.path("openvino/model.xml"))), self.device, config)
        #: INFERENCE_NUM_THREADS as the compiled model reports it (CPU only; None elsewhere).
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS")) if self.device.upper() == "CPU" \
            else None
        shape = self.compiled.inputs[0].get_partial_shape()
        self.batch = int(shape[0].get_length()) if shape[0].is_static else None
        self._hw = (bundle.manifest.input.height, bundle.manifest.input.width)
        # A port's names are a set: name each port by the manifest's name when it is one of them.
        wanted = {o.name for o in bundle.manifest.outputs}
        names = [next(iter(sorted(o.get_names() & wanted)), None) or next(iter(sorted(o.get_names())), str(i))
                 for i, o in enumerate(self.compiled.outputs)]
        self._map_idx, self._score_idx = _output_indices(bundle, names)
        self._dtype = np.float16 if self.compiled.inputs[0].get_element_type() == ov.Type.f16 else np.float32
        self._ov = ov
        from ..engine_io import check_engine_io

        check_engine_io(bundle, self)  # before buffers shaped from the manifest meet the model
        self.requests = [self.compiled.create_infer_request() for _ in range(self.num_slots)]
        self.request = self.requests[0]  # the synchronous API's request (kept for callers of the old attribute)
        self._buffers: list[np.ndarray] = [np.empty(0)] * self.num_slots
        self._sizes = [0] * self.num_slots
        self._n = [0] * self.num_slots
        self._busy = [False] * self.num_slots
        for slot in range(self.num_slots):
            self._set_input(slot, self.batch or 1)

    def _set_input(self, slot: int, n: int) -> None:
        tensor = self._ov.Tensor(np.zeros((n, 3, *self._hw), self._dtype))
        self.requests[slot].set_input_tensor(tensor)
        self._buffers[slot] = self.requests[slot].get_input_tensor().data  # a view of the tensor's memory
        self._sizes[slot] = n

    def io_specs(self) -> tuple[list[Any], list[Any]]:
        """The compiled model's real (inputs, outputs) as :class:`~edge_ad.runtime.engine_io.TensorSpec` lists."""
        from ..engine_io import TensorSpec, dtype_name

        def spec(port: Any, i: int) -> TensorSpec:
            shape = port.get_partial_shape()
            dims = tuple(int(d.get_length()) if d.is_static else None for d in shape)
            # A port's names are a set (NNCF / the IR reader add e.g. '/Squeeze_output_0' beside 'score'):
            # sorted for a stable message, all of them matched against the manifest.
            names = sorted(port.get_names()) or [str(i)]
            return TensorSpec(names[0], dims, dtype_name(port.get_element_type().to_dtype()), tuple(names[1:]))

        return ([spec(p, i) for i, p in enumerate(self.compiled.inputs)],
                [spec(p, i) for i, p in enumerate(self.compiled.outputs)])

    # -- asynchronous API ----------------------------------------------------------------------

    def slot_buffer(self, slot: int, n: int) -> np.ndarray:
        slot = check_slot(slot, self.num_slots)
        # A dynamic-batch model infers the whole tensor, so it is sized to exactly n frames.
        if self.batch is None and n != self._sizes[slot]:
            self._set_input(slot, n)
        return self._buffers[slot]

    def start(self, slot: int, n: int) -> None:
        slot = check_slot(slot, self.num_slots)
        if self._busy[slot]:
            raise RuntimeError(f"slot {slot} is still in flight: call wait({slot}) before starting it again")
        self._n[slot], self._busy[slot] = n, True
        try:
            self.requests[slot].start_async()
        except BaseException:
            self._busy[slot] = False  # nothing is in flight: the slot must stay usable
            raise

    def wait(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        slot = check_slot(slot, self.num_slots)
        if not self._busy[slot]:
            raise RuntimeError(f"slot {slot} has no inference in flight: call start({slot}, n) first")
        req = self.requests[slot]
        try:
            req.wait()
        finally:
            self._busy[slot] = False
        return split_outputs(req.get_output_tensor(self._map_idx).data, req.get_output_tensor(self._score_idx).data,
                             self._n[slot])
