"""Engine cache keys, FP32-island selection and the TensorRT engine builder.

TensorRT cannot be installed here (no GPU; PyPI's ``tensorrt`` is a download stub), so the
builder is exercised against ``_FakeTensorRT``: a STUB module put into ``sys.modules`` that
implements only the TensorRT 10 Python API calls ``build_engine`` makes, and records them.
These tests are NOT a TensorRT run. They prove the call sequence and the flags (network creation
flags per TensorRT version, FP16 / INT8 / OBEY_PRECISION_CONSTRAINTS, per-layer FP32 precision
on the layers the recipe keeps in FP32, DLA + GPU_FALLBACK, workspace, timing cache load / save,
INT8 only from Q/DQ graphs, parser errors surfaced with the node). They cannot prove that a real
TensorRT accepts the network, honours the constraints, or what accuracy / speed the engine has:
that needs the device (``edge-ad build-engine``).
"""
from __future__ import annotations

import enum
import json
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_ad.converters.tensorrt import (  # noqa: E402  (imports without TensorRT)
    TENSORRT_MISSING,
    BuildOptions,
    DeviceInfo,
    EngineKey,
    LayerDesc,
    build_engine,
    device_info,
    engine_cache_key,
    engine_filename,
    engine_key,
    find_cached_engine,
    get_or_build_engine,
    select_fp32_layers,
    tensorrt_available,
    write_engine_record,
)
from edge_ad.converters.trt_check import TENSORRT10_ONNX_OPS  # noqa: E402

KEY_ARGS = dict(trt_version="10.3.0", compute_capability="8.7", precision="fp16", dla_core=None, extra={"a": 1})


# ============================================================================ without TensorRT
def test_module_imports_and_calls_explain_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail like a missing package
    assert not tensorrt_available()
    for call in (lambda: build_engine(tmp_path / "m.onnx", BuildOptions(), tmp_path / "m.engine"), device_info):
        with pytest.raises(ImportError) as info:
            call()
        assert str(info.value) == TENSORRT_MISSING
    assert "python3-libnvinfer" in TENSORRT_MISSING and "pip install tensorrt" in TENSORRT_MISSING
    assert "edge-ad build-engine BUNDLE" in TENSORRT_MISSING
    # A package named tensorrt without the API (the PyPI download stub) is "missing" as well.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(ImportError, match="no Builder"):
        device_info()


def _fake_cudart(major: int | None, minor: int = 7) -> types.ModuleType:
    """A cuda-python ``runtime`` stub: compute capability ``major.minor``, or no device (None)."""
    m = types.ModuleType("cudart")
    m.cudaError_t = enum.Enum("cudaError_t", {"cudaSuccess": 0, "cudaErrorNoDevice": 100})
    m.cudaDeviceAttr = enum.Enum("cudaDeviceAttr", "cudaDevAttrComputeCapabilityMajor cudaDevAttrComputeCapabilityMinor")

    def get(attr, device):
        if major is None:
            return m.cudaError_t.cudaErrorNoDevice, None
        return m.cudaError_t.cudaSuccess, major if attr.name.endswith("Major") else minor

    m.cudaDeviceGetAttribute = get
    return m


def test_device_info_reads_version_and_compute_capability(monkeypatch, fake_trt):
    for name in ("cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_cudart(None))
    with pytest.raises(RuntimeError, match="compute capability.*cudaErrorNoDevice.*cuda-python"):
        device_info()
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_cudart(8, 7))
    assert device_info() == DeviceInfo("10.3.0", "8.7")


# ============================================================================ cache keys
def test_engine_key_is_stable_and_every_field_changes_it(tmp_path):
    data = b"onnx model bytes"
    key = engine_cache_key(data, **KEY_ARGS)
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    assert engine_cache_key(data, **KEY_ARGS) == key  # same inputs, same key
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    assert engine_cache_key(path, **KEY_ARGS) == engine_cache_key(str(path), **KEY_ARGS) == key  # by content
    # Equivalent spellings are one key.
    for cc in ((8, 7), "sm_87", "sm87", " 8.7"):
        assert engine_cache_key(data, **{**KEY_ARGS, "compute_capability": cc}) == key
    assert engine_cache_key(data, **{**KEY_ARGS, "extra": {"a": 1}}) == key
    two = {"x": 1, "y": [1, 2]}
    assert engine_cache_key(data, **{**KEY_ARGS, "extra": two}) == engine_cache_key(
        data, **{**KEY_ARGS, "extra": dict(reversed(list(two.items())))})
    # Every field changes the key.
    changed = [
        engine_cache_key(data + b" ", **KEY_ARGS),
        engine_cache_key(data, **{**KEY_ARGS, "trt_version": "10.3.1"}),
        engine_cache_key(data, **{**KEY_ARGS, "compute_capability": "8.6"}),
        engine_cache_key(data, **{**KEY_ARGS, "precision": "int8"}),
        engine_cache_key(data, **{**KEY_ARGS, "precision": "fp32"}),
        engine_cache_key(data, **{**KEY_ARGS, "dla_core": 0}),
        engine_cache_key(data, **{**KEY_ARGS, "dla_core": 1}),
        engine_cache_key(data, **{**KEY_ARGS, "extra": {"a": 2}}),
        engine_cache_key(data, **{**KEY_ARGS, "extra": None}),
    ]
    assert len(set(changed + [key])) == len(changed) + 1
    # ...and so does the key schema (old caches rebuild when the key's meaning changes).
    k = engine_key(data, **KEY_ARGS)
    assert EngineKey(**{**k.to_dict(), "schema": k.schema + 1}).digest() != key
    for bad in ({"precision": "bf16"}, {"compute_capability": "orin"}, {"dla_core": -1}, {"trt_version": " "}):
        with pytest.raises(ValueError):
            engine_cache_key(data, **{**KEY_ARGS, **bad})
    assert engine_filename(key) == f"{key}.engine"
    with pytest.raises(ValueError, match="64"):
        engine_filename("../../etc/passwd")


def test_find_cached_engine_never_loads_a_stale_or_foreign_engine(tmp_path):
    engines = tmp_path / "engines"
    engines.mkdir()
    mine = engine_key(b"model", **KEY_ARGS)
    other = engine_key(b"model", **{**KEY_ARGS, "trt_version": "8.6.2"})  # e.g. copied from an older JetPack
    assert find_cached_engine(engines, mine.digest()) is None  # nothing built yet

    path = engines / engine_filename(mine.digest())
    path.write_bytes(b"engine for mine")
    assert find_cached_engine(engines, mine.digest()) is None  # no record: unknown origin
    write_engine_record(path, mine)
    assert find_cached_engine(engines, mine.digest()) == path
    assert find_cached_engine(engines, other.digest()) is None  # a different key never picks it up

    # A foreign engine renamed to our file name (its record says what it really is).
    foreign = engines / engine_filename(other.digest())
    foreign.write_bytes(b"engine for other")
    write_engine_record(foreign, other)
    path.write_bytes(foreign.read_bytes())
    (engines / f"{mine.digest()}.json").write_text(foreign.with_suffix(".json").read_text())
    assert find_cached_engine(engines, mine.digest()) is None
    # A record edited to claim our key without matching fields.
    record = json.loads(foreign.with_suffix(".json").read_text())
    record["key"] = mine.digest()
    (engines / f"{mine.digest()}.json").write_text(json.dumps(record))
    assert find_cached_engine(engines, mine.digest()) is None
    # Our own engine, truncated after the record was written (interrupted copy).
    path.write_bytes(b"engine for mine")
    write_engine_record(path, mine)
    path.write_bytes(b"engine for")
    assert find_cached_engine(engines, mine.digest()) is None


def test_build_options_validate():
    assert BuildOptions().precision == "fp16"
    for bad in ({"precision": "int4"}, {"workspace_mb": 0}, {"dla_core": -1}, {"builder_optimization_level": 9},
                {"dla_core": 0, "precision": "fp32"}, {"dla_core": 0, "gpu_fallback": False},
                {"fp32_patterns": (("(", "broken regex"),)}):
        with pytest.raises((ValueError, re.error)):
            BuildOptions(**bad)
    a, b = BuildOptions(), BuildOptions(timing_cache="/tmp/x.cache", verbose=True)
    assert a.key_fields() == b.key_fields()  # paths and logging do not change the engine
    assert BuildOptions(workspace_mb=2048).key_fields() != a.key_fields()
    assert BuildOptions(fp32_layers=False).key_fields() != a.key_fields()


# ============================================================================ FP32 islands (pure)
def test_select_fp32_layers():
    layers = [
        ("/backbone/blocks.0/norm1/LayerNormalization", "NORMALIZATION"),
        ("/backbone/blocks.0/attn/qkv/MatMul", "MATRIX_MULTIPLY"),
        LayerDesc("/backbone/blocks.0/attn/qkv/Add", "ELEMENTWISE", "SUM", constant_inputs=1),  # bias
        ("/backbone/blocks.0/attn/Softmax", "SOFTMAX"),
        LayerDesc("/backbone/blocks.0/Add", "ELEMENTWISE", "SUM", 0),  # residual
        LayerDesc("/backbone/blocks.0/ls1/Mul", "ELEMENTWISE", "PROD", 1),
        ("/backbone/norm/ReduceMean", "REDUCE"),  # a decomposed norm
        ("/backbone/blocks.0/ln_2/Pow", "ELEMENTWISE", "POW"),
        ("/Sub", "ELEMENTWISE", "SUB"),  # FoundAD's f - P(f): score head
        ("/TopK", "TOPK"),
        ("/smoother/Conv", "CONVOLUTION"),
        ("/normalizer/Div", "ELEMENTWISE", "DIV", 1),
        ("/Reshape", "SHUFFLE"),  # data movement: never
        ("/backbone/blocks.0/norm1/QuantizeLinear", "QUANTIZE"),  # Q/DQ: never
        ("/backbone/blocks.0/attn/qkv/DequantizeLinear", "DEQUANTIZE"),
        ("/backbone/blocks.0/mlp/fc1/MatMul", "MATRIX_MULTIPLY"),
    ]
    chosen = select_fp32_layers(layers)
    assert chosen == {
        "/backbone/blocks.0/norm1/LayerNormalization": "normalisation",
        "/backbone/blocks.0/attn/Softmax": "softmax",
        "/backbone/blocks.0/Add": "residual add",
        "/backbone/norm/ReduceMean": "normalisation",
        "/backbone/blocks.0/ln_2/Pow": "normalisation",
        "/Sub": "score head",
        "/TopK": "score head",
        "/smoother/Conv": "score head",
        "/normalizer/Div": "score head",
    }
    assert select_fp32_layers(layers, patterns=()) == {
        "/backbone/blocks.0/norm1/LayerNormalization": "normalisation",
        "/backbone/blocks.0/attn/Softmax": "softmax",
        "/backbone/blocks.0/Add": "residual add",
    }


# ============================================================================ the stub
class _FakeTensorRT:
    """STUB of the TensorRT 10 Python API subset ``build_engine`` uses; records every call.

    The ONNX "parser" maps each ONNX node to one layer named after the node (like TensorRT's
    parser does for the main layer of a node) and each initializer to a CONSTANT layer; ops
    outside ``TENSORRT10_ONNX_OPS`` are parse errors.
    """

    _TYPES = {
        "LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY",
        "Gemm": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION", "QuantizeLinear": "QUANTIZE",
        "DequantizeLinear": "DEQUANTIZE", "Constant": "CONSTANT", "Reshape": "SHUFFLE", "Transpose": "SHUFFLE",
        "Flatten": "SHUFFLE", "Squeeze": "SHUFFLE", "Unsqueeze": "SHUFFLE", "Shape": "SHAPE", "Gather": "GATHER",
        "Slice": "SLICE", "Split": "SLICE", "Concat": "CONCATENATION", "Cast": "CAST", "Identity": "IDENTITY",
        "TopK": "TOPK", "ReduceMean": "REDUCE", "ReduceSum": "REDUCE", "Resize": "RESIZE", "Pad": "PADDING",
        "Erf": "UNARY", "Sqrt": "UNARY", "Neg": "UNARY", "Where": "SELECT", "Expand": "SLICE",
        "ConstantOfShape": "FILL", "Clip": "ACTIVATION", "Relu": "ACTIVATION",
    }
    _ELEMENTWISE = {"Add": "SUM", "Sub": "SUB", "Mul": "PROD", "Div": "DIV", "Pow": "POW", "Max": "MAX",
                    "Min": "MIN", "Equal": "EQUAL"}

    def __init__(self, version: str = "10.3.0", num_dla_cores: int = 2) -> None:
        self.calls: list[tuple] = []
        self.module = self._make(version, num_dla_cores)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def _make(self, version: str, num_dla_cores: int) -> types.ModuleType:  # noqa: C901 - one stub
        calls = self.calls
        fake = self
        trt = types.ModuleType("tensorrt")
        trt.__version__ = version

        class DataType(enum.Enum):
            FLOAT = 0
            HALF = 1
            INT8 = 2
            INT32 = 3
            INT64 = 4

        trt.DataType = DataType
        trt.float32, trt.float16, trt.int8, trt.int32, trt.int64 = (
            DataType.FLOAT, DataType.HALF, DataType.INT8, DataType.INT32, DataType.INT64)
        trt.LayerType = enum.Enum("LayerType", sorted(set(self._TYPES.values()) | {"ELEMENTWISE"}))
        trt.ElementWiseOperation = enum.Enum("ElementWiseOperation", sorted(set(self._ELEMENTWISE.values())))
        trt.BuilderFlag = enum.IntEnum("BuilderFlag", "FP16 INT8 OBEY_PRECISION_CONSTRAINTS GPU_FALLBACK")
        trt.NetworkDefinitionCreationFlag = enum.IntEnum(
            "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        trt.MemoryPoolType = enum.Enum("MemoryPoolType", "WORKSPACE")
        trt.DeviceType = enum.Enum("DeviceType", "GPU DLA")

        class Logger:
            VERBOSE, WARNING = "VERBOSE", "WARNING"

            def __init__(self, severity: str) -> None:
                calls.append(("Logger", severity))

        class Tensor:
            def __init__(self, name: str, dtype: DataType, shape=()) -> None:
                self.name, self.dtype, self.shape = name, dtype, tuple(shape)

        class ILayer:
            def __init__(self, name: str, kind: str, inputs: list, outputs: list, op: str | None = None) -> None:
                self.name, self.type, self._inputs, self._outputs = name, trt.LayerType[kind], inputs, outputs
                self._op = op
                self._precision = None
                self.output_types: dict[int, DataType] = {}

            num_inputs = property(lambda self: len(self._inputs))
            num_outputs = property(lambda self: len(self._outputs))

            def get_input(self, i: int):
                return self._inputs[i]

            def get_output(self, j: int):
                return self._outputs[j]

            @property
            def precision(self):
                return self._precision

            @precision.setter
            def precision(self, value) -> None:
                calls.append(("layer.precision", self.name, value))
                self._precision = value

            def set_output_type(self, j: int, dtype) -> None:
                calls.append(("layer.set_output_type", self.name, j, dtype))
                self.output_types[j] = dtype

        class IElementWiseLayer(ILayer):
            @property
            def op(self):
                return trt.ElementWiseOperation[self._op]

        trt.ILayer, trt.IElementWiseLayer = ILayer, IElementWiseLayer

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags, self.layers, self.inputs = flags, [], []

            num_layers = property(lambda self: len(self.layers))
            num_inputs = property(lambda self: len(self.inputs))

            def get_layer(self, i: int):
                return self.layers[i]

            def get_input(self, i: int):
                return self.inputs[i]

        class ParserError:
            def __init__(self, index: int, node) -> None:
                self._index, self._node = index, node

            def node(self) -> int:
                return self._index

            def node_name(self) -> str:
                return self._node.name

            def node_operator(self) -> str:
                return self._node.op_type

            def desc(self) -> str:
                return f"No importer registered for op: {self._node.op_type}"

        class OnnxParser:
            def __init__(self, network: Network, logger: Logger) -> None:
                self.network, self.errors = network, []

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int):
                return self.errors[i]

            def parse_from_file(self, path: str) -> bool:
                calls.append(("parse_from_file", path))
                model = onnx.load(path)
                tensors: dict[str, Tensor] = {}
                init_names = {t.name for t in model.graph.initializer}
                for vi in model.graph.input:
                    if vi.name in init_names:
                        continue
                    dtype = trt.float16 if vi.type.tensor_type.elem_type == TensorProto.FLOAT16 else trt.float32
                    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                    tensors[vi.name] = Tensor(vi.name, dtype, dims)
                    self.network.inputs.append(tensors[vi.name])
                for init in model.graph.initializer:
                    out = tensors[init.name] = Tensor(init.name, trt.float32)
                    self.network.layers.append(ILayer(init.name, "CONSTANT", [], [out]))
                for index, node in enumerate(model.graph.node):
                    if node.op_type not in TENSORRT10_ONNX_OPS:
                        self.errors.append(ParserError(index, node))
                        return False
                    outs = []
                    for j, name in enumerate(node.output):
                        int_out = (node.op_type == "TopK" and j == 1) or node.op_type == "Shape"
                        outs.append(Tensor(name, trt.int32 if int_out else trt.float32))
                        tensors[name] = outs[-1]
                    ins = [tensors.get(i) for i in node.input if i]
                    if node.op_type in fake._ELEMENTWISE:
                        layer = ILayer(node.name, "ELEMENTWISE", ins, outs, fake._ELEMENTWISE[node.op_type])
                    else:
                        layer = ILayer(node.name, fake._TYPES.get(node.op_type, "SELECT"), ins, outs)
                    self.network.layers.append(layer)
                return True

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                calls.append(("timing_cache.serialize",))
                return b"timing-cache-v2:" + self.data

        class BuilderConfig:
            def __init__(self) -> None:
                self.flags: set = set()
                self.pools: dict = {}
                self.default_device_type = trt.DeviceType.GPU
                self.DLA_core = -1
                self.builder_optimization_level = 3
                self._cache = None

            def set_flag(self, flag) -> None:
                calls.append(("set_flag", flag.name))
                self.flags.add(flag.name)

            def set_memory_pool_limit(self, pool, size: int) -> None:
                calls.append(("set_memory_pool_limit", pool.name, size))
                self.pools[pool.name] = size

            def create_timing_cache(self, data: bytes):
                calls.append(("create_timing_cache", bytes(data)))
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
                calls.append(("set_timing_cache", cache.data, ignore_mismatch))
                if cache.data.startswith(b"foreign"):
                    return False
                self._cache = cache
                return True

            def get_timing_cache(self):
                return self._cache

        class Builder:
            num_DLA_cores = num_dla_cores

            def __init__(self, logger: Logger) -> None:
                calls.append(("Builder",))

            def create_network(self, flags: int):
                calls.append(("create_network", flags))
                fake.network = Network(flags)
                return fake.network

            def create_builder_config(self):
                calls.append(("create_builder_config",))
                fake.config = BuilderConfig()
                return fake.config

            def build_serialized_network(self, network, config):
                calls.append(("build_serialized_network",))
                state = {"flags": sorted(config.flags), "device": config.default_device_type.name,
                         "dla": config.DLA_core}
                return b"FAKE-ENGINE" + json.dumps(state).encode()

        class Runtime:
            def __init__(self, logger: Logger) -> None:
                pass

            def deserialize_cuda_engine(self, data: bytes):
                calls.append(("deserialize_cuda_engine", len(data)))
                return object() if data.startswith(b"FAKE-ENGINE") else None

        trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, OnnxParser, Runtime
        return trt


@pytest.fixture
def fake_trt(monkeypatch):
    """Install a fresh TensorRT 10 stub as ``tensorrt``; the test may swap it for another version."""
    stub = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", stub.module)

    def install(version: str = "10.3.0", num_dla_cores: int = 2) -> _FakeTensorRT:
        s = _FakeTensorRT(version, num_dla_cores)
        monkeypatch.setitem(sys.modules, "tensorrt", s.module)
        return s

    stub.install = install
    return stub


# ---------------------------------------------------------------------------- graphs for the stub
def _vit_block_onnx(path: Path, *, qdq: bool = False, extra_node=None, batch: int | str = 1) -> Path:
    """A ViT block named like a torch export: LN -> Linear (+bias) -> Softmax, residual Add, score head."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(np.zeros(8, np.float32), "bias"),
        numpy_helper.from_array(np.ones(8, np.float32), "ln_w"),
        numpy_helper.from_array(np.array([3], np.int64), "k"),
    ]
    nodes = [helper.make_node("LayerNormalization", ["x", "ln_w"], ["ln"], axis=-1,
                              name="/backbone/blocks.0/norm1/LayerNormalization")]
    mm_in, mm_w = "ln", "W"
    if qdq:
        inits += [numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                  numpy_helper.from_array(np.array(0, np.int8), "zp"),
                  numpy_helper.from_array(rng.integers(-127, 128, size=(8, 8)).astype(np.int8), "W_q"),
                  numpy_helper.from_array(np.full(8, 0.01, np.float32), "W_s"),
                  numpy_helper.from_array(np.zeros(8, np.int8), "W_zp")]
        nodes += [
            helper.make_node("QuantizeLinear", ["ln", "s", "zp"], ["ln_q"], name="/backbone/blocks.0/norm1/ln_QuantizeLinear"),
            helper.make_node("DequantizeLinear", ["ln_q", "s", "zp"], ["ln_dq"], name="/backbone/blocks.0/ln_DequantizeLinear"),
            helper.make_node("DequantizeLinear", ["W_q", "W_s", "W_zp"], ["W_dq"], axis=1, name="W_DequantizeLinear"),
        ]
        mm_in, mm_w = "ln_dq", "W_dq"
    nodes += [
        helper.make_node("MatMul", [mm_in, mm_w], ["mm"], name="/backbone/blocks.0/attn/qkv/MatMul"),
        helper.make_node("Add", ["bias", "mm"], ["lin"], name="/backbone/blocks.0/attn/qkv/Add"),
        helper.make_node("Softmax", ["lin"], ["sm"], axis=-1, name="/backbone/blocks.0/attn/Softmax"),
        helper.make_node("Add", ["x", "sm"], ["res"], name="/backbone/blocks.0/Add"),
        helper.make_node("Sub", ["x", "res"], ["d"], name="/Sub"),
        helper.make_node("ReduceSumSquare", ["d"], ["r"], axes=[2], keepdims=0, name="/ReduceSumSquare"),
        helper.make_node("TopK", ["r", "k"], ["score", "idx"], name="/TopK"),
    ]
    if extra_node is not None:
        nodes.append(extra_node)
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [batch, 3])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _precisions(stub: _FakeTensorRT) -> dict[str, object]:
    return {c[1]: c[2] for c in stub.calls if c[0] == "layer.precision"}


# ============================================================================ builder on the stub
def test_fp16_build_sequence_flags_and_fp32_islands(fake_trt, tmp_path):
    onnx_path = _vit_block_onnx(tmp_path / "block.onnx")
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"previous timings")
    out = build_engine(onnx_path, BuildOptions(precision="fp16", workspace_mb=512, timing_cache=cache),
                       tmp_path / "engines" / "block.engine")
    assert out.read_bytes().startswith(b"FAKE-ENGINE")
    trt = fake_trt.module
    names = fake_trt.names()
    # Order: builder -> network (explicit batch: flags 0 on TensorRT 10) -> parse -> config -> build -> verify.
    order = ["Builder", "create_network", "parse_from_file", "create_builder_config", "create_timing_cache",
             "set_timing_cache", "build_serialized_network", "deserialize_cuda_engine", "timing_cache.serialize"]
    assert [n for n in names if n in order] == order
    assert ("create_network", 0) in fake_trt.calls
    assert fake_trt.config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}  # no INT8 without Q/DQ
    assert fake_trt.config.pools == {"WORKSPACE": 512 << 20}
    assert ("create_timing_cache", b"previous timings") in fake_trt.calls
    assert cache.read_bytes() == b"timing-cache-v2:previous timings"  # saved back after the build
    # FP32 islands: LayerNorm, Softmax, residual Add, the score head; not the GEMM nor its bias Add.
    assert _precisions(fake_trt) == {
        "/backbone/blocks.0/norm1/LayerNormalization": trt.float32,
        "/backbone/blocks.0/attn/Softmax": trt.float32,
        "/backbone/blocks.0/Add": trt.float32,
        "/Sub": trt.float32,
        "/ReduceSumSquare": trt.float32,
        "/TopK": trt.float32,
    }
    out_types = [(c[1], c[2], c[3]) for c in fake_trt.calls if c[0] == "layer.set_output_type"]
    assert ("/TopK", 0, trt.float32) in out_types and not any(n == "/TopK" and j == 1 for n, j, _ in out_types)
    assert fake_trt.config.default_device_type == trt.DeviceType.GPU


def test_int8_only_from_qdq_graphs(fake_trt, tmp_path):
    plain = _vit_block_onnx(tmp_path / "plain.onnx")
    with pytest.raises(ValueError, match="quantize_qdq"):
        build_engine(plain, BuildOptions(precision="int8"), tmp_path / "x.engine")
    assert "build_serialized_network" not in fake_trt.names()
    qdq = _vit_block_onnx(tmp_path / "qdq.onnx", qdq=True)
    with pytest.raises(ValueError, match="precision='int8'"):
        build_engine(qdq, BuildOptions(precision="fp16"), tmp_path / "x.engine")

    stub = fake_trt.install()
    build_engine(qdq, BuildOptions(precision="int8"), tmp_path / "q.engine")
    assert stub.config.flags == {"INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"}
    chosen = _precisions(stub)
    assert not any("Quantize" in name or "Dequantize" in name for name in chosen)  # Q/DQ untouched
    assert "/backbone/blocks.0/attn/qkv/MatMul" not in chosen
    assert "/backbone/blocks.0/norm1/LayerNormalization" in chosen and "/backbone/blocks.0/Add" in chosen


def test_dla_with_gpu_fallback(fake_trt, tmp_path):
    onnx_path = _vit_block_onnx(tmp_path / "block.onnx")
    build_engine(onnx_path, BuildOptions(precision="fp16", dla_core=1), tmp_path / "dla.engine")
    trt = fake_trt.module
    assert fake_trt.config.default_device_type == trt.DeviceType.DLA and fake_trt.config.DLA_core == 1
    assert "GPU_FALLBACK" in fake_trt.config.flags
    stub = fake_trt.install(num_dla_cores=0)  # e.g. Orin Nano: no DLA
    with pytest.raises(ValueError, match="0 DLA core"):
        build_engine(onnx_path, BuildOptions(precision="fp16", dla_core=0), tmp_path / "dla.engine")
    assert "build_serialized_network" not in stub.names()


def test_parser_errors_name_the_node(fake_trt, tmp_path):
    bad = helper.make_node("FancyOp", ["score"], ["fancy"], name="/head/FancyOp", domain="")
    onnx_path = _vit_block_onnx(tmp_path / "bad.onnx", extra_node=bad)
    with pytest.raises(RuntimeError) as info:
        build_engine(onnx_path, BuildOptions(), tmp_path / "bad.engine")
    msg = str(info.value)
    assert "node 8 /head/FancyOp FancyOp: No importer registered for op: FancyOp" in msg
    assert "check_tensorrt_compatible" in msg
    assert not (tmp_path / "bad.engine").exists()


def test_dynamic_input_and_failed_build_are_errors(fake_trt, tmp_path):
    dyn = _vit_block_onnx(tmp_path / "dyn.onnx", batch="batch")
    with pytest.raises(ValueError, match="dynamic shape"):
        build_engine(dyn, BuildOptions(), tmp_path / "dyn.engine")
    fake_trt.module.Builder.build_serialized_network = lambda self, network, config: None
    with pytest.raises(RuntimeError, match="failed to build"):
        build_engine(_vit_block_onnx(tmp_path / "ok.onnx"), BuildOptions(), tmp_path / "ok.engine")
    assert not (tmp_path / "ok.engine").exists()


def test_foreign_timing_cache_is_replaced(fake_trt, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"foreign device timings")
    build_engine(_vit_block_onnx(tmp_path / "b.onnx"), BuildOptions(timing_cache=cache), tmp_path / "b.engine")
    created = [c[1] for c in fake_trt.calls if c[0] == "create_timing_cache"]
    assert created == [b"foreign device timings", b""]
    assert cache.read_bytes() == b"timing-cache-v2:"


def test_tensorrt_version_branches(fake_trt, tmp_path):
    onnx_path = _vit_block_onnx(tmp_path / "b.onnx")
    old = fake_trt.install("8.6.1")  # JetPack 6.0: explicit batch must be requested
    build_engine(onnx_path, BuildOptions(), tmp_path / "a.engine")
    assert ("create_network", 1 << 0) in old.calls and old.config.flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}

    new = fake_trt.install("11.0.0")  # strongly typed: no precision flags, no layer precisions
    build_engine(onnx_path, BuildOptions(precision="fp32"), tmp_path / "b.engine")
    assert ("create_network", 1 << 1) in new.calls
    assert new.config.flags == set() and not _precisions(new)
    with pytest.raises(ValueError, match="strongly typed"):
        build_engine(onnx_path, BuildOptions(precision="fp16"), tmp_path / "c.engine")


def test_get_or_build_engine_uses_the_cache_by_key(fake_trt, tmp_path):
    onnx_path = _vit_block_onnx(tmp_path / "b.onnx")
    engines = tmp_path / "engines"
    orin = DeviceInfo("10.3.0", "8.7")
    first = get_or_build_engine(onnx_path, BuildOptions(), engines, device=orin)
    assert fake_trt.names().count("build_serialized_network") == 1
    assert first.name == engine_filename(first.stem) and first.with_suffix(".json").is_file()
    assert get_or_build_engine(onnx_path, BuildOptions(), engines, device=orin) == first
    assert fake_trt.names().count("build_serialized_network") == 1  # cached
    # Another precision, TensorRT version or GPU is another engine.
    for device, options in ((orin, BuildOptions(precision="fp32")), (DeviceInfo("10.7.0", "8.7"), BuildOptions()),
                            (DeviceInfo("10.3.0", "8.9"), BuildOptions())):
        assert get_or_build_engine(onnx_path, options, engines, device=device) != first
    assert fake_trt.names().count("build_serialized_network") == 4
    assert len(list(engines.glob("*.engine"))) == 4


def test_real_foundad_qdq_graph_on_the_stub(monkeypatch, tmp_path, real_root):
    """The islands on an actual exported + quantised FoundAD graph (tiny random-init DINOv3).

    The stub is installed only after the export: torch's exporter probes ``find_spec("tensorrt")``.
    """
    from edge_ad.converters.qdq import quantize_qdq
    from edge_ad.methods import build_detector
    from edge_ad.runtime import preprocess_batch, read_image

    torch.manual_seed(0)
    det = build_detector("foundad", backbone=dict(
        name="dinov3_vits16", img_size=32, layers=(1,),
        overrides={"depth": 2, "embed_dim": 32, "num_heads": 2, "init_values": 1.0}),
        projector_dim=32, projector_depth=1, projector_heads=2, top_k=3, smoothing_sigma=1.0).eval()
    good = sorted((real_root / "mvtec_hazelnut_256" / "train" / "good").glob("*.png"))[:4]
    images = preprocess_batch([read_image(p) for p in good], det.preprocess_spec, color_order="rgb")
    fp32 = tmp_path / "det.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(det, (torch.from_numpy(images[:1]),), str(fp32), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["anomaly_map", "score"])
    result = quantize_qdq(fp32, tmp_path / "det_q.onnx", images)
    fake_trt = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.module)
    build_engine(result.onnx_path, BuildOptions(precision="int8"), tmp_path / "det.engine")
    assert fake_trt.config.flags == {"INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"}

    model = onnx.load(str(result.onnx_path))
    inits = {t.name for t in model.graph.initializer}
    by_type: dict[str, list] = {}
    for n in model.graph.node:
        by_type.setdefault(n.op_type, []).append(n)
    chosen = _precisions(fake_trt)
    assert all(n.name in chosen for n in by_type["LayerNormalization"] + by_type["Softmax"])
    consts = inits | {o for n in by_type["Constant"] for o in n.output}
    # torch dedups equal initializers (the zero biases of a fresh model) behind Identity nodes.
    consts |= {n.output[0] for n in by_type.get("Identity", []) if n.input[0] in consts}
    # Adds of two activations: the residual stream (and, in DINOv3, the RoPE rotation sum).
    residual = [n.name for n in by_type["Add"] if not set(n.input) & consts]
    bias = [n.name for n in by_type["Add"] if n.name.endswith(("qkv/Add", "proj/Add", "fc1/Add", "fc2/Add"))]
    assert len(residual) >= 2 * 2 + 1 and all(n in chosen for n in residual)  # 2 per block (+ projector)
    assert bias and not any(n in chosen for n in bias)  # fused into the INT8 GEMMs
    assert not any(n in chosen for n in result.quantized_nodes)
    assert not any(n.name in chosen for n in by_type["QuantizeLinear"] + by_type["DequantizeLinear"])
    assert all(n.name in chosen for n in by_type["TopK"] + [m for m in model.graph.node if m.name == "/Sub"])
