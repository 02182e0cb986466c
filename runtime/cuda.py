"""CUDA memory, streams and events for the TensorRT engine, through cuda-python or pycuda.

TensorRT's Python API runs an engine on device pointers and a CUDA stream but allocates no
buffers itself; one of two binding packages does that here, whichever imports (in this order):

* cuda-python: ``cuda.bindings.runtime`` (>= 12.6) or ``cuda.cudart`` (older layout). Every call
  returns ``(cudaError_t, *values)``; a non-success code raises :class:`CudaError` naming the call.
  The device is made current (``cudaSetDevice``, which is per thread) before every call.
* pycuda: ``pycuda.driver`` on the device's *primary* context (the one the CUDA runtime, and so
  TensorRT, uses), pushed around every call so any thread may use the engine.

A binding is used only when its first CUDA call works: cuda-python 13.x imports fine on JetPack 6
(CUDA 12.6, driver < 580) and fails at that call (``cudaErrorInsufficientDriver``); that, like a
failed import, moves on to the next binding. :meth:`CudaApi.activate` makes the engine's device
current around calls into TensorRT (``execute_async_v3``) and the CUDA preprocessing kernel, so
``GPU:1`` works from any thread.

Both give the same small API (:class:`CudaApi`): page-locked host arrays (numpy views of
``cudaHostAlloc`` memory, so async copies really overlap), device buffers (plain ``int``
addresses, what ``IExecutionContext.set_tensor_address`` takes), streams (:meth:`CudaApi.stream_handle`
is the ``int`` that ``execute_async_v3`` takes) and events.

Importing this module never needs CUDA; :func:`load_cuda` raises :class:`ImportError` with
:data:`CUDA_MISSING` (what to install) when neither package imports. Torch-free.
"""
from __future__ import annotations

import ctypes
import importlib
import threading
from contextlib import contextmanager
from typing import Any, Iterator, NamedTuple

import numpy as np

__all__ = ["CUDA_BINDINGS_HINT", "CUDA_MISSING", "CudaApi", "CudaError", "CudaScratch", "DeviceProperties",
           "cuda_available", "load_cuda", "preprocess_cuda_into"]

#: Which CUDA Python bindings match which CUDA (the major version must not exceed the driver's).
CUDA_BINDINGS_HINT = (
    "install the CUDA Python bindings matching this machine's CUDA: JetPack 6 (CUDA 12.6) "
    "`pip install 'cuda-python>=12.6,<13'` (cuda-python 13 needs CUDA 13 / driver >= 580); JetPack 7 (CUDA 13) "
    "and x86 with driver >= 580 `pip install 'cuda-python>=13,<14'`; or pycuda (`pip install pycuda`, builds "
    "against the local CUDA)"
)

CUDA_MISSING = (
    "the TensorRT engine needs CUDA Python bindings to allocate buffers and streams, and neither cuda-python "
    "(`cuda.bindings.runtime` / `cuda.cudart`) nor pycuda can be imported. Install them with "
    "`pip install edge-ad[tensorrt]` (x86: TensorRT + cuda-python), or " + CUDA_BINDINGS_HINT + "; on Jetson, "
    "TensorRT comes with JetPack (python3-libnvinfer) and the bindings are pip-installed on top"
)

_CUDART_MODULES = ("cuda.bindings.runtime", "cuda.cudart")


class CudaError(RuntimeError):
    """A CUDA call failed; the message names the call and CUDA's error code."""


class DeviceProperties(NamedTuple):
    """What an engine is specific to on the CUDA side.

    Attributes:
        name: device name (``"Orin"``, ``"NVIDIA L4"``...).
        compute_capability: ``"major.minor"``.
        sm_count: streaming multiprocessors (tells Orin Nano / NX / AGX apart; all are 8.7).
    """

    name: str
    compute_capability: str
    sm_count: int


class CudaApi:
    """What the TensorRT engine needs from CUDA. Buffers are freed by :meth:`close` (idempotent).

    Attributes:
        name: ``"cuda-python"`` or ``"pycuda"``.
    """

    name = "?"
    device = 0

    def device_properties(self) -> DeviceProperties:
        """Name, compute capability and SM count of the device."""
        raise NotImplementedError

    @contextmanager
    def activate(self) -> Iterator[None]:
        """Make the device current on the calling thread for the block (TensorRT / kernel calls)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def device_free(self, address: int) -> None:
        """Free a buffer from :meth:`device_alloc` before :meth:`close` (its stream must be done with it)."""
        raise NotImplementedError

    def stream_synchronize(self, stream: Any) -> None:
        """Block until all work queued on ``stream`` is done."""
        raise NotImplementedError

    def host_empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A C-contiguous page-locked host array (valid until :meth:`close`)."""
        raise NotImplementedError

    def device_alloc(self, nbytes: int) -> int:
        """``nbytes`` of device memory; returns the device address."""
        raise NotImplementedError

    def stream(self) -> Any:
        """A new non-blocking stream object."""
        raise NotImplementedError

    def stream_handle(self, stream: Any) -> int:
        """The ``cudaStream_t`` of ``stream`` as an int (``execute_async_v3`` takes this)."""
        raise NotImplementedError

    def htod_async(self, dst: int, src: np.ndarray, nbytes: int, stream: Any) -> None:
        """Copy the first ``nbytes`` of host array ``src`` to device address ``dst`` on ``stream``."""
        raise NotImplementedError

    def dtoh_async(self, dst: np.ndarray, src: int, nbytes: int, stream: Any) -> None:
        """Copy ``nbytes`` from device address ``src`` into host array ``dst`` on ``stream``."""
        raise NotImplementedError

    def event(self) -> Any:
        """A new event (timing disabled: it is only waited on)."""
        raise NotImplementedError

    def record(self, event: Any, stream: Any) -> None:
        """Record ``event`` on ``stream`` (it completes when the work queued before it does)."""
        raise NotImplementedError

    def synchronize(self, event: Any) -> None:
        """Block the calling thread until ``event`` has completed."""
        raise NotImplementedError

    def close(self) -> None:
        """Wait for the work queued on this object's streams, then free every buffer, stream and event it made."""
        raise NotImplementedError


def _host_view(address: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A numpy array over ``prod(shape) * itemsize`` bytes at host ``address`` (no copy, no ownership)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (ctypes.c_char * max(nbytes, 1)).from_address(address)
    return np.frombuffer(raw, dtype=dtype, count=nbytes // dtype.itemsize).reshape(shape)


class _CudaPython(CudaApi):
    """cuda-python's runtime API (``cudaHostAlloc``, ``cudaMalloc``, ``cudaMemcpyAsync``, events)."""

    name = "cuda-python"

    def __init__(self, cudart: Any, device: int = 0) -> None:
        self._rt = cudart
        self.device = int(device)
        self._lock = threading.Lock()
        self._host: list[Any] = []
        self._device: list[Any] = []
        self._streams: list[Any] = []
        self._events: list[Any] = []
        self._call("cudaSetDevice", self.device)  # the first CUDA call: fails here if the binding cannot work

    def _call(self, fn: str, *args: Any) -> Any:
        if fn != "cudaSetDevice":
            # cudaSetDevice is per thread, and the engine may be driven from several (GPU:1 otherwise
            # allocates on device 1 from the constructing thread and on device 0 from the others).
            self._raw("cudaSetDevice", self.device)
        return self._raw(fn, *args)

    def _raw(self, fn: str, *args: Any) -> Any:
        result = getattr(self._rt, fn)(*args)
        err = result[0] if isinstance(result, tuple) else result
        if err != self._rt.cudaError_t.cudaSuccess:
            raise CudaError(f"CUDA call {fn} failed: {getattr(err, 'name', err)} (is an NVIDIA GPU visible and the "
                            "driver loaded? `nvidia-smi` / `tegrastats` should show it)")
        rest = result[1:] if isinstance(result, tuple) else ()
        return rest[0] if len(rest) == 1 else rest

    def device_properties(self) -> DeviceProperties:
        props = self._call("cudaGetDeviceProperties", self.device)
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return DeviceProperties(name.rstrip("\x00").strip(), f"{int(props.major)}.{int(props.minor)}",
                                int(props.multiProcessorCount))

    @contextmanager
    def activate(self) -> Iterator[None]:
        previous = self._raw("cudaGetDevice")
        self._raw("cudaSetDevice", self.device)
        try:
            yield
        finally:
            if int(previous) != self.device:
                self._raw("cudaSetDevice", int(previous))

    def device_free(self, address: int) -> None:
        with self._lock:
            match = next((p for p in self._device if int(p) == int(address)), None)
            if match is None:
                raise ValueError(f"device address {address:#x} was not allocated here (or already freed)")
            self._device.remove(match)
        self._call("cudaFree", match)

    def stream_synchronize(self, stream: Any) -> None:
        self._call("cudaStreamSynchronize", stream)

    def host_empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        ptr = self._call("cudaHostAlloc", max(nbytes, 1), self._rt.cudaHostAllocDefault)
        with self._lock:
            self._host.append(ptr)
        return _host_view(int(ptr), tuple(shape), dtype)

    def device_alloc(self, nbytes: int) -> int:
        ptr = self._call("cudaMalloc", max(int(nbytes), 1))
        with self._lock:
            self._device.append(ptr)
        return int(ptr)

    def stream(self) -> Any:
        s = self._call("cudaStreamCreateWithFlags", self._rt.cudaStreamNonBlocking)
        with self._lock:
            self._streams.append(s)
        return s

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def htod_async(self, dst: int, src: np.ndarray, nbytes: int, stream: Any) -> None:
        self._call("cudaMemcpyAsync", dst, src.ctypes.data, nbytes, self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                   stream)

    def dtoh_async(self, dst: np.ndarray, src: int, nbytes: int, stream: Any) -> None:
        self._call("cudaMemcpyAsync", dst.ctypes.data, src, nbytes, self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                   stream)

    def event(self) -> Any:
        e = self._call("cudaEventCreateWithFlags", self._rt.cudaEventDisableTiming)
        with self._lock:
            self._events.append(e)
        return e

    def record(self, event: Any, stream: Any) -> None:
        self._call("cudaEventRecord", event, stream)

    def synchronize(self, event: Any) -> None:
        self._call("cudaEventSynchronize", event)

    def close(self) -> None:
        with self._lock:
            # Work still queued (a slot started and never waited for) reads and writes these buffers:
            # wait for it before anything is freed.
            for stream in self._streams:
                try:
                    self._call("cudaStreamSynchronize", stream)
                except Exception:  # noqa: BLE001 - best effort at teardown (interpreter exit)
                    pass
            items = [("cudaEventDestroy", self._events), ("cudaStreamDestroy", self._streams),
                     ("cudaFree", self._device), ("cudaFreeHost", self._host)]
            for fn, handles in items:
                while handles:
                    h = handles.pop()
                    try:
                        self._call(fn, h)
                    except Exception:  # noqa: BLE001 - best effort at teardown (interpreter exit)
                        pass


class _PyCuda(CudaApi):
    """pycuda's driver API on the device's primary context (shared with TensorRT)."""

    name = "pycuda"

    def __init__(self, driver: Any, device: int = 0) -> None:
        self._cuda = driver
        self.device = int(device)
        driver.init()
        self._dev = driver.Device(self.device)
        self._ctx = self._dev.retain_primary_context()
        self._keep: list[Any] = []  # pycuda frees a buffer when its Python object dies
        with self._active():  # the first CUDA call: fails here if the driver cannot use the device
            driver.Context.synchronize()

    @contextmanager
    def _active(self) -> Iterator[None]:
        # pycuda needs a current context on the calling thread; the engine may be driven from any thread.
        self._ctx.push()
        try:
            yield
        finally:
            self._cuda.Context.pop()

    activate = _active  # the runtime (TensorRT, the kernel) uses the current primary context

    def device_properties(self) -> DeviceProperties:
        major, minor = self._dev.compute_capability()
        sms = self._dev.get_attribute(self._cuda.device_attribute.MULTIPROCESSOR_COUNT)
        return DeviceProperties(str(self._dev.name()).strip(), f"{int(major)}.{int(minor)}", int(sms))

    def device_free(self, address: int) -> None:
        match = next((b for b in self._keep if isinstance(b, self._cuda.DeviceAllocation) and int(b) == int(address)),
                     None)
        if match is None:
            raise ValueError(f"device address {address:#x} was not allocated here (or already freed)")
        self._keep.remove(match)
        with self._active():
            match.free()

    def stream_synchronize(self, stream: Any) -> None:
        with self._active():
            stream.synchronize()

    def host_empty(self, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        with self._active():
            arr = self._cuda.pagelocked_empty(tuple(shape), np.dtype(dtype))
        self._keep.append(arr)
        return arr

    def device_alloc(self, nbytes: int) -> int:
        with self._active():
            buf = self._cuda.mem_alloc(max(int(nbytes), 1))
        self._keep.append(buf)
        return int(buf)

    def stream(self) -> Any:
        with self._active():
            s = self._cuda.Stream()
        self._keep.append(s)
        return s

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def htod_async(self, dst: int, src: np.ndarray, nbytes: int, stream: Any) -> None:
        flat = src.reshape(-1).view(np.uint8)[:nbytes]
        with self._active():
            self._cuda.memcpy_htod_async(dst, flat, stream)

    def dtoh_async(self, dst: np.ndarray, src: int, nbytes: int, stream: Any) -> None:
        flat = dst.reshape(-1).view(np.uint8)[:nbytes]
        with self._active():
            self._cuda.memcpy_dtoh_async(flat, src, stream)

    def event(self) -> Any:
        with self._active():
            e = self._cuda.Event()
        self._keep.append(e)
        return e

    def record(self, event: Any, stream: Any) -> None:
        with self._active():
            event.record(stream)

    def synchronize(self, event: Any) -> None:
        with self._active():
            event.synchronize()

    def close(self) -> None:
        if not self._keep:
            return
        with self._active():
            for obj in self._keep:  # queued work reads and writes the buffers: let it finish first
                if isinstance(obj, self._cuda.Stream):
                    try:
                        obj.synchronize()
                    except Exception:  # noqa: BLE001 - best effort at teardown
                        pass
            for obj in reversed(self._keep):
                # A page-locked array is a numpy array whose .base is pycuda's HostAllocation.
                owner = obj.base if isinstance(obj, np.ndarray) else obj
                free = getattr(owner, "free", None)
                if free is not None:
                    try:
                        free()
                    except Exception:  # noqa: BLE001 - best effort at teardown
                        pass
            self._keep.clear()


def _import_first(names: tuple[str, ...]) -> tuple[Any | None, list[str]]:
    tried = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - missing, or a broken install failing to load libcudart
            tried.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if module is not None:
            return module, tried
    return None, tried


def load_cuda(device: int = 0, prefer: str | None = None) -> CudaApi:
    """The :class:`CudaApi` of whichever binding package imports (cuda-python first, then pycuda).

    Args:
        device: CUDA device index.
        prefer: ``"cuda-python"`` or ``"pycuda"`` to use only that package.

    A package counts only when it imports *and* its first CUDA call on ``device`` works; otherwise
    (e.g. cuda-python 13 on a CUDA 12 driver) the next one is tried.

    Raises:
        ImportError: neither package imports (:data:`CUDA_MISSING`, with what each import said).
        CudaError: a package imports but none can use the device (each failure named, plus
            :data:`CUDA_BINDINGS_HINT`).
    """
    if prefer not in (None, "cuda-python", "pycuda"):
        raise ValueError(f"prefer must be None, 'cuda-python' or 'pycuda', got {prefer!r}")
    tried: list[str] = []
    failed: list[str] = []
    candidates: list[tuple[str, tuple[str, ...], Any]] = []
    if prefer in (None, "cuda-python"):
        candidates.append(("cuda-python", _CUDART_MODULES, _CudaPython))
    if prefer in (None, "pycuda"):
        candidates.append(("pycuda", ("pycuda.driver",), _PyCuda))
    for label, modules, cls in candidates:
        module, tried_here = _import_first(modules)
        tried += tried_here
        if module is None:
            continue
        try:
            return cls(module, device)
        except Exception as exc:  # noqa: BLE001 - any failure of the first call: this binding is not usable
            failed.append(f"{label}: {type(exc).__name__}: {exc}")
    if failed:
        raise CudaError(f"no CUDA binding can use device {device} ({'; '.join(failed + tried)}). Is an NVIDIA GPU "
                        f"visible and the driver loaded (`nvidia-smi` / `tegrastats`)? Otherwise {CUDA_BINDINGS_HINT}")
    raise ImportError(f"{CUDA_MISSING} (tried: {'; '.join(tried)})")


def cuda_available() -> bool:
    """Whether cuda-python or pycuda imports (says nothing about a GPU being present)."""
    return any(_import_first((name,))[0] is not None for name in (*_CUDART_MODULES, "pycuda.driver"))


def _packed_rows(frame: np.ndarray) -> bool:
    """Pixels packed within each row (what the CUDA upload needs); rows may be any positive stride apart."""
    channels = 1 if frame.ndim == 2 else frame.shape[2]
    if frame.ndim == 3 and frame.strides[2] != 1:
        return False
    return frame.strides[1] == channels and frame.strides[0] >= frame.shape[1] * channels


class CudaScratch:
    """A device scratch buffer used only on one stream (the CUDA preprocessing's staging area).

    Persistent: allocated once and grown when a larger frame arrives (after the stream is done
    with the old buffer), instead of a stream-ordered allocation per frame (``cudaMallocAsync``
    needs memory pools, which some devices / drivers lack). Freed by :meth:`release` or with its
    :class:`CudaApi`.
    """

    def __init__(self, cuda: CudaApi, stream: Any) -> None:
        self.cuda, self.stream = cuda, stream
        self.address, self.nbytes = 0, 0

    def ensure(self, nbytes: int) -> int:
        """A buffer of at least ``nbytes``; returns its device address."""
        if nbytes > self.nbytes:
            self.release()
            size = max(int(nbytes), 2 * self.nbytes)  # grow geometrically: few reallocations
            self.address, self.nbytes = self.cuda.device_alloc(size), size
        return self.address

    def release(self) -> None:
        """Free the buffer once the stream's queued work (which may read it) is done."""
        if self.address:
            self.cuda.stream_synchronize(self.stream)
            self.cuda.device_free(self.address)
            self.address, self.nbytes = 0, 0


def preprocess_cuda_into(frames: list[np.ndarray], spec: Any, out_device: int, dtype: Any, scratch: CudaScratch, *,
                         color_order: str = "bgr") -> None:
    """Preprocess uint8 frames on the GPU into ``out_device``: (len(frames), 3, H, W) ``dtype`` planes.

    Same semantics as :func:`edge_ad.runtime.preprocess_batch` (same taps, colour handling and
    normalisation; float summation order aside). Asynchronous on ``stream`` (a ``cudaStream_t``
    as int): the frames may be reused when this returns; the output is ready once the stream
    reaches that point (the TensorRT engine runs on the same stream, so it is ordered after it).
    The scratch's device is made current on the calling thread.

    Args:
        frames: validated, ROI-cropped uint8 (H, W) or (H, W, 3) views (as ``Detector`` makes them);
            views whose pixels are not packed within a row are copied first.
        spec: the :class:`~edge_ad.runtime.PreprocessSpec`.
        out_device: device address of the (B, 3, H, W) buffer (B >= len(frames)).
        dtype: ``np.float32`` or ``np.float16`` (the engine input's type).
        scratch: the :class:`CudaScratch` of the stream to queue on (grown here when too small).
        color_order: ``"bgr"``, ``"rgb"`` or ``"gray"``.

    Raises:
        RuntimeError: the extension has no CUDA kernel, no GPU is visible, or a CUDA call failed
            (the TensorRT engine then preprocesses on the CPU).
    """
    from .preprocessing import _ext, cuda_preprocess_available

    if not cuda_preprocess_available():
        raise RuntimeError(
            "CUDA preprocessing is not available: the preprocessing extension was built without the CUDA kernel "
            "(rebuild with nvcc on PATH: `pip install --no-build-isolation -e .`) or no CUDA GPU is visible"
        )
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float16):
        raise TypeError(f"dtype must be float32 or float16, got {dt}")
    packed = [f if _packed_rows(f) else np.ascontiguousarray(f) for f in frames]
    cuda = scratch.cuda
    stream = cuda.stream_handle(scratch.stream)
    for _ in range(2):  # the second pass runs with a scratch grown to what the frames need
        needed = _ext.preprocess_cuda(packed, int(out_device), spec.height, spec.width, dt == np.float16,
                                      color_order == "bgr", spec.resize, spec.mean, spec.std, stream,
                                      scratch.address, scratch.nbytes, cuda.device)
        if not needed:
            return
        scratch.ensure(int(needed))
    raise RuntimeError(f"CUDA preprocessing still needs {needed} scratch bytes after growing to {scratch.nbytes}")
