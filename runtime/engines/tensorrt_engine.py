"""TensorRT engine: the bundle's serialized engine for this GPU, run with ``execute_async_v3``.

Where the engine comes from: :func:`edge_ad.converters.engine.build_bundle_engine` (torch-free)
returns the bundle's cached ``engines/<key>.engine`` whose key matches this device (TensorRT
version, compute capability, device name and SM count, precision, DLA core, build options) or
builds one from ``model.onnx`` first. So an engine built for another GPU or TensorRT version is never loaded: its
key differs and a matching one is built. If a matching engine still fails to deserialize (a
driver / TensorRT patch mismatch the key does not see), it is rebuilt once with ``force``; with
``build=False`` a missing engine is an error naming ``edge-ad build-engine``.

Buffers (TensorRT 10 name-based I/O API): one input tensor (B, 3, H, W) and the outputs, named in
the engine; the anomaly map and the score are picked by the manifest's output names. Each of
``num_slots`` slots owns an execution context (each with its own activation memory: GPU memory
grows with the slots), a CUDA stream, an event, page-locked host buffers and device buffers for
every I/O tensor, with the device addresses bound once (``set_tensor_address``). :meth:`start`
queues H2D copy -> ``execute_async_v3`` -> D2H copies -> event on the slot's stream and returns;
:meth:`wait` waits on the event. While one slot runs on the GPU, the caller preprocesses the next
frames into another (double buffering).

Preprocessing on the GPU: when the preprocessing extension was built with the CUDA kernel
(:func:`edge_ad.runtime.preprocessing.cuda_preprocess_available`), :meth:`preprocess` writes the
normalised input straight into the slot's *device* input buffer (uint8 frames are uploaded, not
float tensors) and :meth:`start` skips the H2D copy; otherwise it preprocesses on the CPU into the
page-locked host buffer. Each slot stages frames through its own persistent device scratch buffer
(no per-frame allocation); if a CUDA call of that path fails, the engine logs it once and
preprocesses on the CPU from then on.

Multi-GPU: ``cudaSetDevice`` is per thread, so the engine's device is made current around every
CUDA call, ``execute_async_v3`` and the preprocessing kernel, on whichever thread makes them.
Teardown (:meth:`close`) waits for queued work before it frees contexts and buffers.

Torch-free: needs ``tensorrt`` and cuda-python or pycuda (:mod:`edge_ad.runtime.cuda`).
"""
from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cuda import CudaApi, CudaScratch, load_cuda
from ..preprocessing import preprocess_batch
from . import DEFAULT_SLOTS, SlotEngine, _output_indices, check_slot, check_slots, split_outputs

if TYPE_CHECKING:  # pragma: no cover
    from ..bundle import Bundle
    from ..preprocess_spec import PreprocessSpec

__all__ = ["TENSORRT_RUNTIME_MISSING", "TensorRTEngine"]

log = logging.getLogger(__name__)

TENSORRT_RUNTIME_MISSING = (
    "this bundle runs on TensorRT, but the tensorrt package cannot be imported. Install it with "
    "`pip install edge-ad[tensorrt]` (x86 with an NVIDIA GPU: TensorRT 10 + cuda-python 12); on Jetson, TensorRT comes "
    "with JetPack (`sudo apt install python3-libnvinfer`; JetPack 6 = TensorRT 10.3, JetPack 7 = 10.13), never "
    "from pip there; see docs/JETSON.md"
)

_DEVICE = re.compile(r"^(GPU|CUDA|DLA)(?::(\d+))?$")


def _import_tensorrt() -> Any:
    """``tensorrt`` (imported per call so tests can stub it), or ImportError with what to install."""
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as exc:  # noqa: BLE001 - missing, or libnvinfer failing to load
        raise ImportError(f"{TENSORRT_RUNTIME_MISSING} ({type(exc).__name__}: {exc})") from exc
    if not hasattr(trt, "Runtime"):  # the PyPI download stub without its wheel
        raise ImportError(f"{TENSORRT_RUNTIME_MISSING} (the importable 'tensorrt' has no Runtime)")
    return trt


def _parse_device(device: str) -> tuple[int, int | None]:
    """``"auto"`` / ``"GPU"`` / ``"GPU:1"`` / ``"CUDA:0"`` / ``"DLA:0"`` -> (CUDA device index, DLA core or None)."""
    text = "GPU" if device == "auto" else str(device).strip().upper()
    match = _DEVICE.match(text)
    if match is None:
        raise ValueError(f"device {device!r} is not one the TensorRT engine can use; pass 'auto', 'GPU', 'GPU:<index>' "
                         "or 'DLA:<core>' (Jetson AGX / NX)")
    kind, index = match.group(1), int(match.group(2) or 0)
    return (0, index) if kind == "DLA" else (index, None)


class _Slot:
    """One in-flight request: context, stream, event and the host / device buffers of every I/O tensor."""

    def __init__(self, engine: Any, cuda: CudaApi, inputs: dict[str, tuple[tuple[int, ...], np.dtype]],
                 outputs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = cuda.stream()
        self.scratch = CudaScratch(cuda, self.stream)  # the GPU preprocessing's staging buffer
        self.event = cuda.event()
        self.host: dict[str, np.ndarray] = {}
        self.device: dict[str, int] = {}
        for name, (shape, dtype) in {**inputs, **outputs}.items():
            self.host[name] = cuda.host_empty(shape, dtype)
            self.device[name] = cuda.device_alloc(self.host[name].nbytes)
            if not self.context.set_tensor_address(name, self.device[name]):
                raise RuntimeError(f"TensorRT refused the device address of tensor {name!r}")
        self.pending: int | None = None  # frames in flight (None: idle)
        self.input_on_device = False  # the GPU preprocessing kernel already wrote the device input


class TensorRTEngine(SlotEngine):
    """A bundle's TensorRT engine with ``num_slots`` asynchronous request slots.

    Args:
        bundle: a loaded TensorRT bundle (directory; a ``.tar`` works only when its ``engines/``
            already holds the engine for this device).
        device: ``"auto"`` / ``"GPU"`` (CUDA device 0), ``"GPU:<i>"``, or ``"DLA:<core>"`` (Jetson
            targets with DLA; layers DLA cannot run fall back to the GPU). The device is made
            current around each CUDA / TensorRT call, so any thread may drive the engine.
        slots: request slots (>= 1; default: slot 0 for ``predict`` + two for double-buffered streaming).
        build: build the engine when no matching one is cached (minutes on a Jetson); False
            raises instead.
        cuda: a :class:`~edge_ad.runtime.cuda.CudaApi` (default: :func:`~edge_ad.runtime.cuda.load_cuda`).
        workspace_mb: builder workspace when building (part of the engine's cache key).

    Raises:
        ImportError: tensorrt, or both cuda-python and pycuda, missing (the message says what to install).
        FileNotFoundError: ``build=False`` and no engine for this device in the bundle.
        RuntimeError: the engine does not deserialize even after a rebuild; I/O tensors not as the
            bundle says.
    """

    name = "tensorrt"

    def __init__(self, bundle: "Bundle", device: str = "auto", *, slots: int = DEFAULT_SLOTS, build: bool = True,
                 cuda: CudaApi | None = None, workspace_mb: int = 1024) -> None:
        num_slots = check_slots(slots)
        trt = _import_tensorrt()
        self._trt = trt
        self.version = str(trt.__version__)
        self.bundle = bundle
        index, dla_core = _parse_device(device)
        self.device = f"DLA:{dla_core}" if dla_core is not None else f"GPU:{index}"
        self._cuda = cuda if cuda is not None else load_cuda(index)
        self._slots: list[_Slot] = []
        self._gpu_preprocess = True  # turned off for good after a failed CUDA preprocessing call
        try:
            self._logger = trt.Logger(trt.Logger.WARNING)
            self.engine_path, self._engine = self._load_engine(bundle, index, dla_core, build, workspace_mb)
            inputs, outputs = self._io_tensors(bundle)
            self._slots = [_Slot(self._engine, self._cuda, inputs, outputs) for _ in range(num_slots)]
        except BaseException:
            self.close()
            raise
        self.num_slots = num_slots
        self.threads = None  # inference runs on the GPU: no CPU thread budget

    # ------------------------------------------------------------------------------------ setup
    def _load_engine(self, bundle: "Bundle", index: int, dla_core: int | None, build: bool,
                     workspace_mb: int) -> tuple[Path, Any]:
        # Imported here: converters.engine / converters.tensorrt are torch-free and import TensorRT lazily.
        from edge_ad.converters.engine import build_bundle_engine, bundle_engine_options
        from edge_ad.converters.tensorrt import device_engine_key, device_info, find_cached_engine

        dev = device_info(index)  # TensorRT version, compute capability, name, SMs: what the engine must match
        opts = bundle_engine_options(bundle, workspace_mb=workspace_mb, dla_core=dla_core)
        key = device_engine_key(bundle.path("model.onnx"), opts, dev)
        cached = find_cached_engine(bundle.engines_dir, key.digest())
        is_dir = Path(bundle.source).is_dir()
        if cached is None and not (build and is_dir):
            why = ("build=False" if is_dir else f"{bundle.source} is a .tar (engines built into a temporary "
                   "extraction would be lost): extract it first")
            dla = f", DLA core {dla_core}" if dla_core is not None else ""
            flags = (f" --dla-core {dla_core}" if dla_core is not None else "") + (
                f" --workspace-mb {workspace_mb}" if workspace_mb != 1024 else "")
            raise FileNotFoundError(
                f"no TensorRT engine for this device (TensorRT {dev.trt_version}, compute capability "
                f"{dev.compute_capability}, {opts.precision}{dla}) in {bundle.engines_dir} ({why}). Build it on this "
                f"device with `edge-ad build-engine {bundle.source}{flags}`, or load with build=True"
            )
        path = cached
        if path is None:
            log.info("building the TensorRT engine of %s for %s (minutes on a Jetson)", bundle.source, dev)
            path = build_bundle_engine(bundle.source, workspace_mb=workspace_mb, dla_core=dla_core, device=dev)
        runtime = self._trt.Runtime(self._logger)
        if dla_core is not None:
            runtime.DLA_core = dla_core  # a DLA engine is deserialised onto the runtime's DLA core
        engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None and build and is_dir:
            # The key matched but this TensorRT / driver cannot load it (a patch-level change the key
            # does not see, or a file damaged after its record was written): rebuild it once.
            log.warning("cached engine %s does not deserialize on this device; rebuilding it", path)
            path = build_bundle_engine(bundle.source, workspace_mb=workspace_mb, dla_core=dla_core, device=dev,
                                       force=True)
            engine = runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:
            raise RuntimeError(
                f"TensorRT {dev.trt_version} cannot deserialize {path} on this device (compute capability "
                f"{dev.compute_capability}); rebuild it here with `edge-ad build-engine {bundle.source} --force`"
                f" (remove {Path(path).name} if the rebuild fails too)"
            )
        self._runtime = runtime  # TensorRT requires the runtime to outlive its engines
        return Path(path), engine

    def _io_tensors(self, bundle: "Bundle") -> tuple[dict, dict]:
        trt, eng = self._trt, self._engine
        inputs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        outputs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            shape = tuple(int(d) for d in eng.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(name)))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"engine tensor {name!r} has dynamic shape {shape}; edge_ad engines are static "
                                   "(rebuild with `edge-ad build-engine --force` from the bundle's static ONNX)")
            is_input = eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (inputs if is_input else outputs)[name] = (shape, dtype)
        h, w = bundle.manifest.input.height, bundle.manifest.input.width
        if len(inputs) != 1:
            raise RuntimeError(f"the engine has inputs {list(inputs)}; edge_ad models have exactly one image input")
        (self._input_name, (in_shape, in_dtype)), = inputs.items()
        if len(in_shape) != 4 or in_shape[1:] != (3, h, w) or in_dtype not in (np.float32, np.float16):
            raise RuntimeError(
                f"engine input {self._input_name!r} is {in_shape} {in_dtype}, the bundle says (B, 3, {h}, {w}) "
                "float32/float16: the engine is not this bundle's (rebuild with `edge-ad build-engine --force`)"
            )
        self.batch: int | None = in_shape[0]
        self._hw = (h, w)
        names = list(outputs)
        map_idx, score_idx = _output_indices(bundle, names)
        self._map_name, self._score_name = names[map_idx], names[score_idx]
        self.input_names = [self._input_name]
        self.output_names = names
        return inputs, outputs

    def io_specs(self) -> tuple[list[Any], list[Any]]:
        """The engine's real (inputs, outputs) as :class:`~edge_ad.runtime.engine_io.TensorSpec` lists."""
        from ..engine_io import TensorSpec, dtype_name

        trt, eng = self._trt, self._engine
        inputs, outputs = [], []
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            dims = tuple(int(d) if int(d) >= 0 else None for d in eng.get_tensor_shape(name))
            spec = TensorSpec(name, dims, dtype_name(trt.nptype(eng.get_tensor_dtype(name))))
            (inputs if eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
        return inputs, outputs

    # ------------------------------------------------------------------------------------ async API
    def _slot(self, slot: int) -> _Slot:
        return self._slots[check_slot(slot, len(self._slots))]

    def _check_n(self, n: int) -> int:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.batch:
            raise ValueError(f"n must be 1..{self.batch} (the engine's static batch), got {n!r}")
        return int(n)

    def slot_buffer(self, slot: int, n: int) -> np.ndarray:
        """The slot's page-locked (B, 3, H, W) host input buffer (B = the engine batch >= n)."""
        self._check_n(n)
        s = self._slot(slot)
        if s.pending is not None:
            raise RuntimeError(f"slot {slot} is in flight: wait({slot}) before writing its buffer again")
        s.input_on_device = False  # the caller writes the host buffer: it must be copied up
        return s.host[self._input_name]

    def preprocess(self, slot: int, frames: Sequence[np.ndarray], spec: "PreprocessSpec", *,
                   color_order: str = "bgr") -> str:
        """Preprocess ``frames`` (validated, ROI-cropped uint8 views) into the slot's input.

        GPU (uint8 frames uploaded, the kernel writes the device input; no float host copy) when
        :func:`~edge_ad.runtime.preprocessing.cuda_preprocess_available`, else CPU into the host
        buffer. Returns ``"gpu"`` or ``"cpu"``.
        """
        from ..cuda import preprocess_cuda_into
        from ..preprocessing import cuda_preprocess_available

        n = self._check_n(len(frames))
        s = self._slot(slot)
        if s.pending is not None:
            raise RuntimeError(f"slot {slot} is in flight: wait({slot}) before preprocessing into it")
        host = s.host[self._input_name]
        if self._gpu_preprocess and cuda_preprocess_available():
            try:
                preprocess_cuda_into(list(frames), spec, s.device[self._input_name], host.dtype, s.scratch,
                                     color_order=color_order)
                s.input_on_device = True
                return "gpu"
            except Exception as exc:  # noqa: BLE001 - any CUDA failure: the CPU path gives the same input
                log.warning("CUDA preprocessing failed (%s: %s); preprocessing on the CPU from now on",
                            type(exc).__name__, exc)
                self._gpu_preprocess = False
        preprocess_batch(list(frames), spec, color_order=color_order, out=host[:n])
        s.input_on_device = False
        return "cpu"

    def start(self, slot: int, n: int) -> None:
        """Queue copy-in (unless the GPU preprocessing wrote it), inference and copy-out on the slot's stream."""
        n = self._check_n(n)
        s = self._slot(slot)
        if s.pending is not None:
            raise RuntimeError(f"slot {slot} is already in flight: wait({slot}) first")
        cuda, stream = self._cuda, s.stream
        name = self._input_name
        if not s.input_on_device:
            # Only the first n frames carry data; the static batch's tail is stale and ignored.
            cuda.htod_async(s.device[name], s.host[name], s.host[name][:n].nbytes, stream)
        with cuda.activate():  # TensorRT enqueues on the current device of this thread
            ok = s.context.execute_async_v3(cuda.stream_handle(stream))
        if not ok:
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log above")
        for out in self.output_names:
            cuda.dtoh_async(s.host[out], s.device[out], s.host[out].nbytes, stream)
        cuda.record(s.event, stream)
        s.pending = n
        s.input_on_device = False

    def wait(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Block until the slot's request is done; copies ``(maps (n, h, w) float32, scores (n,) float32)``."""
        s = self._slot(slot)
        if s.pending is None:
            raise RuntimeError(f"slot {slot} has nothing in flight: start({slot}, n) first")
        n = s.pending
        try:
            self._cuda.synchronize(s.event)
        finally:
            s.pending = None
        return split_outputs(s.host[self._map_name], s.host[self._score_name], n)

    def close(self) -> None:
        """Free the GPU and page-locked memory (the engine is unusable afterwards). Idempotent.

        Work still in flight (a started, never waited-for slot) is waited for first: destroying an
        execution context or freeing buffers under a running kernel is undefined behaviour.
        """
        cuda = getattr(self, "_cuda", None)
        for s in getattr(self, "_slots", []):
            try:
                cuda.stream_synchronize(s.stream)
            except Exception:  # noqa: BLE001 - best effort at teardown; cuda.close() syncs again
                pass
            s.pending = None
        self._slots = []
        self._engine = None
        if cuda is not None:
            cuda.close()

    def __del__(self) -> None:  # pragma: no cover - depends on garbage collection
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
