"""The TensorRT runtime engine (edge_ad.runtime.engines.tensorrt_engine) against STUBS.

TensorRT and a GPU are not available here, so stubs stand in:

* ``_FakeCudart``: cuda-python's ``cuda.bindings.runtime`` API subset the engine uses. "Device"
  memory is ordinary host memory (real addresses, so the engine's pointer handling is exercised);
  async copies and kernels are queued per stream and run when an event on that stream is waited
  for, so a result that is read before ``wait`` shows up as wrong data. The current device is
  per thread, as in CUDA, and every call records the device current when it was made.
* ``_FakePycuda``: the pycuda driver subset (fallback, teardown of page-locked arrays).
* ``FakeTensorRT`` (``tests/trt_stub.py``), restricted to a real TensorRT API surface (10.3,
  10.16, 11.4: every engine test runs once per surface), plus a runtime whose deserialized engine
  lists the I/O tensors of the bundle's ONNX (outputs in REVERSED order, to prove outputs are
  picked by the manifest's names) and whose ``execute_async_v3`` runs that ONNX with onnxruntime
  on the bound device addresses.

These tests prove the engine's logic: engine cache / build / rebuild, tensor binding per slot,
page-locked slot buffers, stream ordering, the async slot contract, output order, the GPU
preprocessing hand-off, and the errors. They are NOT a TensorRT or CUDA run: real TensorRT
numerics, speed and the CUDA kernel itself are untested here (that needs the device).
"""
from __future__ import annotations

import ctypes
import enum
import shutil
import sys
import threading
import types

import numpy as np
import pytest

from edge_ad.converters.convert import convert
from edge_ad.runtime import Detector, preprocess_batch, read_image
from edge_ad.runtime.cuda import CUDA_BINDINGS_HINT, CUDA_MISSING, CudaError, load_cuda
from edge_ad.runtime.engines.tensorrt_engine import TENSORRT_RUNTIME_MISSING, TensorRTEngine
from trt_stub import SURFACES, FakeTensorRT  # the TensorRT stub on real API surfaces (not TensorRT)

ort = pytest.importorskip("onnxruntime")
CATEGORY = "mvtec_hazelnut_256"
_CUDA_MODULES = ("cuda.bindings.runtime", "cuda.cudart", "pycuda", "pycuda.driver")


# ============================================================================ stubs
class _FakeCudart:
    """cuda-python runtime stub: host memory as "device" memory, per-stream queues run on event sync."""

    def __init__(self, cc: tuple[int, int] = (8, 9), name: str = "NVIDIA L4", sms: int = 58,
                 set_device_error: str | None = None) -> None:
        self.blocks: dict[int, tuple[object, str, int]] = {}
        self.current = threading.local()  # cudaSetDevice is per thread
        self.devices: list[tuple[str, int | None]] = []  # (call, device current on the calling thread)
        self.freed: list[object] = []  # keep freed memory alive: a dangling numpy view must not crash the test
        self.queues: dict[int, list] = {}
        self.log: list[tuple] = []
        m = self.module = types.ModuleType("cuda.bindings.runtime")
        m.cudaError_t = enum.Enum("cudaError_t", {"cudaSuccess": 0, "cudaErrorInvalidValue": 1,
                                                  "cudaErrorInsufficientDriver": 35})
        m.cudaMemcpyKind = enum.Enum("cudaMemcpyKind", {"cudaMemcpyHostToDevice": 1, "cudaMemcpyDeviceToHost": 2})
        m.cudaDeviceAttr = enum.Enum("cudaDeviceAttr",
                                     "cudaDevAttrComputeCapabilityMajor cudaDevAttrComputeCapabilityMinor")
        m.cudaHostAllocDefault, m.cudaStreamNonBlocking, m.cudaEventDisableTiming = 0, 1, 2
        ok, bad = m.cudaError_t.cudaSuccess, m.cudaError_t.cudaErrorInvalidValue
        fake = self

        class Handle:
            count = 1000

            def __init__(self) -> None:
                Handle.count += 1
                self.value = Handle.count

            def __int__(self) -> int:
                return self.value

        def alloc(kind: str, size: int):
            buf = ctypes.create_string_buffer(size)
            addr = ctypes.addressof(buf)
            fake.blocks[addr] = (buf, kind, size)
            fake.log.append((f"alloc_{kind}", size))
            return ok, addr

        def free(addr):
            block = fake.blocks.pop(int(addr), None)
            if block is None:
                return (bad,)
            fake.freed.append(block[0])
            return (ok,)

        def memcpy(dst, src, count, kind, stream):
            d_kind, s_kind = ("device", "host") if kind.name.endswith("HostToDevice") else ("host", "device")
            if fake.kind_of(dst, count) != d_kind or fake.kind_of(src, count) != s_kind:
                return (bad,)  # a host pointer where a device one belongs (or out of bounds)
            fake.log.append((kind.name, count, int(stream)))
            fake.queues.setdefault(int(stream), []).append(lambda: ctypes.memmove(dst, src, count))
            return (ok,)

        def stream_create(flags):
            s = Handle()
            fake.queues[int(s)] = []
            return ok, s

        def event_record(event, stream):
            event.stream = int(stream)
            return (ok,)

        def event_sync(event):
            fake.log.append(("sync", event.stream))
            fake.flush(event.stream)
            return (ok,)

        def set_device(device):
            if set_device_error:  # e.g. cuda-python 13 on a CUDA 12 driver: fails at the first call
                return (m.cudaError_t[set_device_error],)
            fake.current.device = device
            return (ok,)

        def stream_sync(stream):
            fake.log.append(("stream_sync", int(stream)))
            fake.flush(int(stream))
            return (ok,)

        def traced(name, fn):
            def call(*args):
                fake.devices.append((name, getattr(fake.current, "device", None)))
                return fn(*args)
            return call

        props = types.SimpleNamespace(name=name.encode() + b"\x00\x00", major=cc[0], minor=cc[1],
                                      multiProcessorCount=sms)
        m.cudaSetDevice = set_device
        m.cudaGetDevice = lambda: (ok, getattr(fake.current, "device", 0))
        m.cudaGetDeviceProperties = lambda device: (ok, props)
        m.cudaHostAlloc = traced("cudaHostAlloc", lambda size, flags: alloc("host", size))
        m.cudaMalloc = traced("cudaMalloc", lambda size: alloc("device", size))
        m.cudaFree = traced("cudaFree", free)
        m.cudaFreeHost = traced("cudaFreeHost", free)
        m.cudaMemcpyAsync = traced("cudaMemcpyAsync", memcpy)
        m.cudaStreamCreateWithFlags = traced("cudaStreamCreateWithFlags", stream_create)
        m.cudaStreamDestroy = lambda s: (ok,)
        m.cudaStreamSynchronize = traced("cudaStreamSynchronize", stream_sync)
        m.cudaEventCreateWithFlags = lambda flags: (ok, Handle())
        m.cudaEventDestroy = lambda e: (ok,)
        m.cudaEventRecord = traced("cudaEventRecord", event_record)
        m.cudaEventSynchronize = traced("cudaEventSynchronize", event_sync)

    def device_now(self) -> int | None:
        return getattr(self.current, "device", None)

    def kind_of(self, addr: int, nbytes: int) -> str | None:
        for start, (_, kind, size) in self.blocks.items():
            if start <= addr and addr + nbytes <= start + size:
                return kind
        return None

    def array(self, addr: int, shape, dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        assert self.kind_of(addr, n) == "device", "not a device buffer"
        return np.frombuffer((ctypes.c_char * n).from_address(addr), dtype).reshape(shape)

    def flush(self, stream: int) -> None:
        queue = self.queues.get(stream, [])
        while queue:
            queue.pop(0)()

    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())


class _FakePycuda:
    """pycuda.driver stub: one device ("Orin", 8.7, 8 SMs); records frees and synchronisations."""

    def __init__(self) -> None:
        self.log: list[str] = []
        fake = self
        m = self.module = types.ModuleType("pycuda.driver")

        class Allocation:
            def __init__(self, kind: str) -> None:
                self.kind, self.freed = kind, False

            def free(self) -> None:
                fake.log.append(f"{self.kind}.free")
                self.freed = True

        class DeviceAllocation(Allocation):
            def __int__(self) -> int:
                return id(self)

        class Stream:
            handle = 7

            def synchronize(self) -> None:
                fake.log.append("stream.synchronize")

        class Context:
            push = staticmethod(lambda: None)
            pop = staticmethod(lambda: None)
            synchronize = staticmethod(lambda: None)

        class Device:
            def __init__(self, i: int) -> None:
                self.i = i

            def retain_primary_context(self):
                return Context()

            compute_capability = lambda self: (8, 7)  # noqa: E731
            name = lambda self: "Orin"  # noqa: E731
            get_attribute = lambda self, attr: 8  # noqa: E731

        def pagelocked_empty(shape, dtype):
            # Like pycuda: the array's .base is the allocation object, which has .free().
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            owner = type("HostAllocation", (ctypes.Array,), {"_type_": ctypes.c_char, "_length_": max(n, 1)})()
            alloc = Allocation("host")
            owner.free, owner.allocation = alloc.free, alloc
            arr = np.frombuffer(owner, dtype, count=n // np.dtype(dtype).itemsize)
            arr.shape = tuple(shape)
            return arr

        m.init = lambda: None
        m.Device, m.Context, m.Stream, m.DeviceAllocation = Device, Context, Stream, DeviceAllocation
        m.device_attribute = types.SimpleNamespace(MULTIPROCESSOR_COUNT="MULTIPROCESSOR_COUNT")
        m.pagelocked_empty = pagelocked_empty
        m.mem_alloc = lambda n: DeviceAllocation("device")
        m.Event = lambda: object()


class _Stubs:
    """TensorRT builder stub + a runtime whose engine runs the bundle's ONNX with onnxruntime."""

    def __init__(self, monkeypatch, onnx_path, cuda: _FakeCudart, surface: str = "10.3",
                 version: str | None = None) -> None:
        self.cuda = cuda
        self.trt = FakeTensorRT(surface, version=version)
        self.contexts: list = []
        self.fail_deserialize = 0  # make the next N deserializations fail (engine from another driver...)
        trt = self.trt.module
        object.__setattr__(trt, "nptype", lambda dt: {"FLOAT": np.float32, "HALF": np.float16}[dt.name])
        G = trt._Guarded  # public attributes must exist on the real class of this TensorRT version
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        stubs = self

        class Context(G):
            _trt_names = ("IExecutionContext",)

            def __init__(self) -> None:
                self._addresses: dict[str, int] = {}
                self._streams: list[int] = []
                self._devices: list[int | None] = []  # current CUDA device of the enqueuing thread
                stubs.contexts.append(self)

            def set_tensor_address(self, name: str, address: int) -> bool:
                self._addresses[name] = int(address)
                return True

            def execute_async_v3(self, stream_handle: int) -> bool:
                assert isinstance(stream_handle, int)
                self._streams.append(stream_handle)
                self._devices.append(cuda.device_now())
                inp = session.get_inputs()[0]

                def kernel() -> None:
                    x = cuda.array(self._addresses[inp.name], inp.shape).copy()
                    for o, value in zip(session.get_outputs(), session.run(None, {inp.name: x})):
                        cuda.array(self._addresses[o.name], o.shape)[...] = value

                cuda.queues[stream_handle].append(kernel)
                return True

        class Engine(G):
            _trt_names = ("ICudaEngine",)

            def __init__(self) -> None:
                outs = session.get_outputs()[::-1]  # reversed: the engine must pick outputs by name
                self._tensors = [(session.get_inputs()[0], trt.TensorIOMode.INPUT)] + [
                    (o, trt.TensorIOMode.OUTPUT) for o in outs]

            num_io_tensors = property(lambda self: len(self._tensors))

            def get_tensor_name(self, i: int) -> str:
                return self._tensors[i][0].name

            def _get(self, name):
                return next(t for t in self._tensors if t[0].name == name)

            def get_tensor_mode(self, name):
                return self._get(name)[1]

            def get_tensor_shape(self, name):
                return tuple(self._get(name)[0].shape)

            def get_tensor_dtype(self, name):
                return trt.float32

            def create_execution_context(self):
                return Context()

        BuilderRuntime = trt.Runtime  # the builder's own check: DLA engines need runtime.DLA_core

        class Runtime(BuilderRuntime):
            def deserialize_cuda_engine(self, data: bytes):
                if stubs.fail_deserialize:
                    stubs.trt.calls.append(("deserialize_cuda_engine", len(data), self._dla()))
                    stubs.fail_deserialize -= 1
                    return None
                return Engine() if BuilderRuntime.deserialize_cuda_engine(self, data) is not None else None

        object.__setattr__(trt, "Runtime", Runtime)
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cuda.module)

    def builds(self) -> int:
        return self.trt.names().count("build_serialized_network")


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def base_bundle(knn_run, real_root, tmp_path_factory):
    """A real x86-tensorrt FP16 bundle (FP32 ONNX + manifest; the engine is built on the device)."""
    out = tmp_path_factory.mktemp("trt_rt") / "x86"
    return convert(knn_run, "x86-tensorrt", out, precision="fp16", calib_count=8, val_data=real_root, progress=False)


@pytest.fixture
def bundle(base_bundle, tmp_path):
    return shutil.copytree(base_bundle, tmp_path / "bundle")  # engines/ is written into it


@pytest.fixture(params=SURFACES)
def stubs(request, monkeypatch, bundle):
    return _Stubs(monkeypatch, bundle / "model.onnx", _FakeCudart(), surface=request.param)


@pytest.fixture(scope="module")
def frames(real_root):
    files = sorted((real_root / CATEGORY / "test").glob("*/*.png"))[::4][:3]  # good and defective parts
    assert len(files) == 3
    return [read_image(p, "bgr") for p in files]


def _reference(bundle_path, frames):
    """What the bundle's ONNX gives on the CPU for these frames (same preprocessing)."""
    from edge_ad.runtime import load_bundle

    b = load_bundle(bundle_path)
    sess = ort.InferenceSession(str(b.path("model.onnx")), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    maps, scores = [], []
    for f in frames:
        x = preprocess_batch([f], b.preprocess_spec)
        out = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: x})))
        maps.append(out[b.manifest.outputs[0].name].reshape(out[b.manifest.outputs[0].name].shape[-2:]))
        scores.append(float(out[b.manifest.outputs[1].name].ravel()[0]))
    return np.stack(maps), np.array(scores, np.float32)


# ============================================================================ tests
def test_missing_tensorrt_or_cuda_bindings_say_what_to_install(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(ImportError) as info:
        Detector.load(bundle)  # create_engine's "tensorrt" branch
    assert "pip install edge-ad[tensorrt]" in str(info.value) and "JetPack" in str(info.value)
    assert str(info.value).startswith(TENSORRT_RUNTIME_MISSING)
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT().module)
    for name in _CUDA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError) as info:
        TensorRTEngine(load_b(bundle))
    assert str(info.value).startswith(CUDA_MISSING) and "pip install edge-ad[tensorrt]" in str(info.value)


def test_real_cuda_python_without_a_gpu_is_a_clear_error(bundle, monkeypatch):
    try:
        import cuda.bindings.runtime  # noqa: F401  (the real package, when installed)
    except ImportError:
        pytest.skip("cuda-python is not installed here")
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT().module)
    with pytest.raises(CudaError, match="cudaSetDevice failed: cudaError"):
        TensorRTEngine(load_b(bundle))


def load_b(path):
    from edge_ad.runtime import load_bundle

    return load_bundle(path)


def test_detector_on_tensorrt_builds_once_and_matches_the_onnx(bundle, stubs, frames):
    det = Detector.load(bundle)  # engine built into bundle/engines (no engine yet)
    assert det.engine.name == "tensorrt" and stubs.builds() == 1
    eng = det.engine
    assert eng.engine_path.parent == bundle / "engines" and eng.engine_path.is_file()
    assert eng.version == stubs.trt.surface.version and eng.device == "GPU:0" and eng.batch == 1
    # Outputs are picked by the manifest's names although the engine lists them reversed.
    manifest_names = [o.name for o in det.bundle.manifest.outputs]
    assert eng.output_names == manifest_names[::-1]
    ref_maps, ref_scores = _reference(bundle, frames)
    results = det.predict_batch(frames)
    np.testing.assert_allclose([r.score for r in results], ref_scores, rtol=1e-6)
    np.testing.assert_allclose(np.stack([r.model_map for r in results]), ref_maps, rtol=1e-6, atol=1e-7)
    assert results[0].is_anomalous is not None  # the bundle's thresholds apply as with any engine
    # Loading again reuses the cached engine: no second build.
    Detector.load(bundle)
    assert stubs.builds() == 1


def test_slots_buffers_bindings_and_async_contract(bundle, stubs, frames):
    eng = TensorRTEngine(load_b(bundle), slots=3)
    cuda = stubs.cuda
    assert eng.num_slots == 3 and len(stubs.contexts) == 3  # one execution context per slot
    spec = load_b(bundle).preprocess_spec
    bufs = [eng.slot_buffer(s, 1) for s in range(3)]
    for b in bufs:
        assert b.shape == (1, 3, *spec.size) and b.dtype == np.float32 and b.flags.c_contiguous
        assert cuda.kind_of(b.ctypes.data, b.nbytes) == "host"  # page-locked (cudaHostAlloc), not numpy memory
    assert len({b.ctypes.data for b in bufs}) == 3
    # Every context has every I/O tensor bound to its own device buffers.
    names = set(eng.input_names + eng.output_names)
    addresses = [a for c in stubs.contexts for a in c._addresses.values()]
    assert all(set(c._addresses) == names for c in stubs.contexts)
    assert len(set(addresses)) == 3 * len(names) and all(cuda.kind_of(a, 4) == "device" for a in addresses)
    assert eng.input_buffer(1).ctypes.data == bufs[0].ctypes.data  # the sync API is slot 0

    ref_maps, ref_scores = _reference(bundle, frames)
    # Double buffering: slot 1 in flight while slot 2 is filled and launched; wait out of order.
    preprocess_batch(frames[:1], spec, out=eng.slot_buffer(1, 1))
    eng.start(1, 1)
    assert cuda.pending() == 4  # H2D, kernel, 2 x D2H queued on slot 1's stream, nothing run yet
    assert stubs.contexts[1]._streams == [eng._cuda.stream_handle(eng._slots[1].stream)]
    preprocess_batch(frames[1:2], spec, out=eng.slot_buffer(2, 1))
    eng.start(2, 1)
    m2, s2 = eng.wait(2)
    m1, s1 = eng.wait(1)
    for (m, s), i in (((m1, s1), 0), ((m2, s2), 1)):
        assert m.shape == ref_maps[i][None].shape and m.dtype == np.float32 and s.dtype == np.float32
        np.testing.assert_allclose(m[0], ref_maps[i], rtol=1e-6, atol=1e-7)
        assert s[0] == pytest.approx(ref_scores[i], rel=1e-6)
    # run(n) == start(0, n) + wait(0); the copy in is n frames' bytes on the slot's stream.
    preprocess_batch(frames[2:3], spec, out=eng.input_buffer(1))
    cuda.log.clear()
    m0, s0 = eng.run(1)
    assert s0[0] == pytest.approx(ref_scores[2], rel=1e-6)
    h2d = [e for e in cuda.log if e[0] == "cudaMemcpyHostToDevice"]
    assert len(h2d) == 1 and h2d[0][1] == bufs[0].nbytes

    with pytest.raises(RuntimeError, match="nothing in flight"):
        eng.wait(0)
    eng.start(0, 1)
    with pytest.raises(RuntimeError, match="already in flight"):
        eng.start(0, 1)
    with pytest.raises(RuntimeError, match="in flight"):
        eng.slot_buffer(0, 1)
    eng.wait(0)
    for bad_n in (0, 2, True):
        with pytest.raises(ValueError, match="n must be 1..1"):
            eng.start(0, bad_n)
    with pytest.raises(ValueError, match="slot"):
        eng.slot_buffer(3, 1)
    eng.close()
    assert not cuda.blocks  # every host and device buffer freed


def test_engine_cache_rebuild_and_errors(bundle, stubs, monkeypatch):
    b = load_b(bundle)
    with pytest.raises(FileNotFoundError, match=r"no TensorRT engine for this device .*edge-ad build-engine"):
        TensorRTEngine(b, build=False)
    assert stubs.builds() == 0
    first = TensorRTEngine(b).engine_path
    assert stubs.builds() == 1 and TensorRTEngine(b, build=False).engine_path == first
    # Another GPU (compute capability 8.6): the cached 8.9 engine is never loaded, a new one is built.
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _FakeCudart(cc=(8, 6)).module)
    other = TensorRTEngine(b).engine_path
    assert stubs.builds() == 2 and other != first and first.is_file()
    # A matching key whose engine this TensorRT / driver cannot deserialize: rebuilt once in place.
    stubs.fail_deserialize = 1
    assert TensorRTEngine(b).engine_path == other and stubs.builds() == 3
    stubs.fail_deserialize = 2  # the rebuilt one fails too (the builder's own check reports it)
    with pytest.raises(RuntimeError, match="does not deserialize on this device"):
        TensorRTEngine(b)
    stubs.fail_deserialize = 1
    with pytest.raises(RuntimeError, match="cannot deserialize .*edge-ad build-engine .* --force"):
        TensorRTEngine(b, build=False)
    # Another TensorRT version: another key, another build.
    stubs2 = _Stubs(monkeypatch, bundle / "model.onnx", _FakeCudart(), surface=stubs.trt.label,
                    version=stubs.trt.surface.version + ".1")
    TensorRTEngine(b)
    assert stubs2.builds() == 1
    with pytest.raises(ValueError, match="has no DLA cores"):
        TensorRTEngine(b, device="DLA:0")  # x86-tensorrt has no DLA
    with pytest.raises(ValueError, match="'GPU:<index>'"):
        TensorRTEngine(b, device="CPU")
    with pytest.raises(ValueError, match="slots must be an int >= 1"):
        TensorRTEngine(b, slots=0)


def test_gpu_preprocessing_writes_the_device_input(bundle, stubs, frames, monkeypatch):
    """With a CUDA-built extension, preprocess goes to the device buffer and start skips the copy in.

    The kernel is replaced by the CPU preprocessing writing into the fake device memory: this
    tests the hand-off (pointer, dtype, stream, device, persistent scratch, no H2D copy, CPU
    fallback), not the CUDA kernel.
    """
    import edge_ad.runtime.preprocessing as pre

    eng = TensorRTEngine(load_b(bundle), slots=2)
    spec = load_b(bundle).preprocess_spec
    cpu_path = eng.preprocess(1, frames[:1], spec)
    assert cpu_path == "cpu"  # this extension has no CUDA kernel
    eng.start(1, 1)
    ref_m, ref_s = eng.wait(1)

    calls = []
    real_ext = pre._ext
    fail = []

    class CudaExt:  # the built extension plus a stand-in for its CUDA entry points
        def __getattr__(self, name):
            return getattr(real_ext, name)

        def cuda_device_count(self) -> int:
            return 1

        def preprocess_cuda(self, fr, out_ptr, h, w, half, bgr, mode, mean, std, stream, scratch, scratch_bytes,
                            device):
            if fail:
                raise RuntimeError("CUDA cudaMemcpy2DAsync failed: cudaErrorInvalidValue")
            needed = max(f.nbytes for f in fr) + 4096  # pixels + taps, like the kernel's plan
            calls.append((out_ptr, h, w, half, bgr, stream, [f.flags.c_contiguous for f in fr], scratch,
                          scratch_bytes, device))
            if scratch_bytes < needed:
                return needed  # nothing queued: grow the scratch and call again
            assert stubs.cuda.kind_of(scratch, needed) == "device"
            out = stubs.cuda.array(out_ptr, (len(fr), 3, h, w), np.float16 if half else np.float32)
            preprocess_batch(fr, spec, color_order="bgr" if bgr else "rgb", out=out, backend="reference")
            return 0

    monkeypatch.setattr(pre, "_ext", CudaExt())
    assert pre.cuda_preprocess_available()
    strided = frames[0][:, ::1]  # same pixels; a packed view
    stubs.cuda.log.clear()
    assert eng.preprocess(1, [strided], spec) == "gpu"
    eng.start(1, 1)
    m, s = eng.wait(1)
    assert not [e for e in stubs.cuda.log if e[0] == "cudaMemcpyHostToDevice"]  # no host copy of the input
    slot = eng._slots[1]
    assert calls[0][0] == slot.device[eng.input_names[0]] and calls[0][5] == eng._cuda.stream_handle(slot.stream)
    assert calls[0][7:9] == (0, 0) and calls[1][7] == slot.scratch.address and calls[1][9] == 0  # grown, device 0
    np.testing.assert_allclose(m, ref_m, rtol=1e-6, atol=1e-7)
    assert s[0] == pytest.approx(ref_s[0], rel=1e-6)
    # The scratch persists: the next frames of that size allocate nothing (no cudaMallocAsync per frame).
    allocs = [e for e in stubs.cuda.log if e[0] == "alloc_device"]
    eng.preprocess(1, [frames[1]], spec)
    assert [e for e in stubs.cuda.log if e[0] == "alloc_device"] == allocs and calls[-1][7] == calls[1][7]
    # A view with unpacked pixels (every other column) is made contiguous before the upload.
    eng.preprocess(1, [frames[0][:, ::2]], spec)
    assert calls[-1][6] == [True]
    # After a CPU write into the slot's host buffer the next start copies it in again.
    eng.slot_buffer(1, 1)
    stubs.cuda.log.clear()
    eng.start(1, 1)
    eng.wait(1)
    assert [e for e in stubs.cuda.log if e[0] == "cudaMemcpyHostToDevice"]
    # A CUDA failure in the preprocessing path (no memory pools, a driver error...): CPU from then on.
    fail.append(True)
    assert eng.preprocess(1, [frames[0]], spec) == "cpu"
    eng.start(1, 1)
    m2, s2 = eng.wait(1)
    np.testing.assert_allclose(m2, ref_m, rtol=1e-6, atol=1e-7)
    fail.clear()
    assert eng.preprocess(1, [frames[0]], spec) == "cpu"  # stays on the CPU
    eng.close()


def test_multi_gpu_device_is_current_for_every_call_on_every_thread(bundle, stubs, frames):
    """Defect 5: cudaSetDevice is per thread; GPU:1 must be current for allocations, copies,
    execute_async_v3 and the kernel on whichever thread drives the engine."""
    eng = TensorRTEngine(load_b(bundle), device="GPU:1", slots=2)
    spec = load_b(bundle).preprocess_spec
    cuda = stubs.cuda

    def drive() -> None:
        preprocess_batch(frames[:1], spec, out=eng.slot_buffer(1, 1))
        eng.start(1, 1)
        eng.wait(1)

    worker = threading.Thread(target=drive)  # a fresh thread: CUDA's current device there is unset
    worker.start()
    worker.join()
    drive()
    assert cuda.devices and {d for _, d in cuda.devices} == {1}, sorted(set(cuda.devices))
    assert [d for c in stubs.contexts for d in c._devices] == [1, 1]
    eng.close()


def test_cuda_binding_fallback_and_version_advice(monkeypatch):
    """Defect 2: cuda-python 13 imports on JetPack 6 but its first call fails; pycuda is tried next."""
    for name in _CUDA_MODULES:
        monkeypatch.setitem(sys.modules, name, None)
    broken = _FakeCudart(set_device_error="cudaErrorInsufficientDriver")
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", broken.module)
    with pytest.raises(CudaError) as info:
        load_cuda(0)
    msg = str(info.value)
    assert "cuda-python: CudaError" in msg and "cudaErrorInsufficientDriver" in msg and "pycuda.driver" in msg
    assert CUDA_BINDINGS_HINT in msg and "cuda-python>=12.6,<13" in msg
    pycuda = _FakePycuda()
    monkeypatch.setitem(sys.modules, "pycuda", types.ModuleType("pycuda"))
    monkeypatch.setitem(sys.modules, "pycuda.driver", pycuda.module)
    api = load_cuda(0)
    assert api.name == "pycuda" and api.device_properties() == ("Orin", "8.7", 8)
    # Teardown (defect 10): streams synchronised before anything is freed; page-locked arrays freed too.
    host = api.host_empty((2, 3), np.float32)
    api.device_alloc(64)
    api.stream()
    api.close()
    assert pycuda.log[0] == "stream.synchronize" and "host.free" in pycuda.log and "device.free" in pycuda.log
    assert host.base.allocation.freed


def test_close_waits_for_work_in_flight(bundle, stubs, frames):
    """Defect 10: a slot started and never waited for is synchronised before buffers are freed."""
    eng = TensorRTEngine(load_b(bundle), slots=2)
    preprocess_batch(frames[:1], load_b(bundle).preprocess_spec, out=eng.slot_buffer(1, 1))
    eng.start(1, 1)
    cuda = stubs.cuda
    assert cuda.pending() == 4
    cuda.log.clear()
    eng.close()
    first_free = next(i for i, e in enumerate(cuda.log) if e[0] == "stream_sync")
    assert cuda.pending() == 0 and first_free == 0 and not cuda.blocks


@pytest.fixture(scope="module")
def orin_fp16_bundle(knn_run, real_root, tmp_path_factory):
    """A real jetson-orin FP16 bundle (DLA-capable target)."""
    out = tmp_path_factory.mktemp("trt_rt") / "orin16"
    return convert(knn_run, "jetson-orin", out, precision="fp16", calib_count=8, val_data=real_root, progress=False)


def test_dla_engine_is_deserialised_on_a_dla_runtime(orin_fp16_bundle, tmp_path, monkeypatch):
    """Defect 8: ``runtime.DLA_core`` is set before a DLA engine is deserialised (the stub's runtime
    refuses a DLA engine otherwise, like TensorRT)."""
    bundle = shutil.copytree(orin_fp16_bundle, tmp_path / "bundle")
    stubs = _Stubs(monkeypatch, bundle / "model.onnx", _FakeCudart(cc=(8, 7), name="Orin", sms=16))
    eng = TensorRTEngine(load_b(bundle), device="DLA:1")
    assert eng.device == "DLA:1" and stubs.builds() == 1
    deser = [c for c in stubs.trt.calls if c[0] == "deserialize_cuda_engine"]
    assert deser and all(c[2] == 1 for c in deser)  # the builder's check and the engine's load
    assert [r.DLA_core for r in stubs.trt.runtimes] == [1, 1]
    eng.close()
    # INT8 on DLA is refused (Q/DQ): build for the GPU instead.
    with pytest.raises(ValueError, match="Q/DQ"):
        from edge_ad.converters.tensorrt import BuildOptions

        BuildOptions(precision="int8", dla_core=0)


def test_manifest_that_does_not_describe_the_engine_is_refused_at_load(bundle, stubs):
    """issue 12: the engine's real I/O (io_specs) is checked against the manifest, naming both."""
    from edge_ad.runtime import BundleError, update_manifest

    update_manifest(bundle, {"outputs": [{"name": "heatmap", "shape": [1, 1, 64, 64], "dtype": "float32"},
                                         {"name": "score", "shape": [1], "dtype": "float32"}]})
    with pytest.raises(BundleError, match=r"the tensorrt model has no output 'heatmap' \(it has .*'anomaly_map' "
                                          r"\(1, 1, 64, 64\) float32.*the manifest says 'heatmap' \(1, 1, 64, 64\)"):
        Detector.load(bundle)
