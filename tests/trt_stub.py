"""A STUB ``tensorrt`` module restricted to the real API surface of one TensorRT version.

TensorRT cannot run here (no GPU, no libnvinfer). ``FakeTensorRT`` implements the Python API
calls edge_ad makes and records them, and refuses - with ``AttributeError``, as the real module
would - every class, method, property and enum member that the chosen version does not have,
according to the surface files written from the real bindings wheels by
``scripts/trt_api_surface.py`` (``tests/data/trt_surface_<label>.json``). A public name the
surface files do not know at all is refused too, so the stub cannot silently grow beyond what
was checked against a real wheel.

This is NOT a TensorRT run: it proves the call sequence and that every name used exists in that
version, not what a real builder accepts or how fast / accurate the engine is.
"""
from __future__ import annotations

import enum
import json
import types
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto

from edge_ad.converters.trt_check import TENSORRT10_ONNX_OPS

DATA = Path(__file__).resolve().parent / "data"
#: JetPack 6 (10.3), the latest 10.x (x86 / JetPack 7 line), the latest 11.x.
SURFACES = ("10.3", "10.16", "11.4")


def load_surface(label: str) -> dict:
    """The surface record of ``tests/data/trt_surface_<label>.json``."""
    path = DATA / f"trt_surface_{label}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python scripts/trt_api_surface.py`")
    return json.loads(path.read_text())


class _SurfaceEnumMeta(enum.EnumMeta):
    """Enum metaclass whose missing members fail with the surface's message (absent in this version?)."""

    def __getattr__(cls, name: str) -> Any:
        if not name.startswith("_") and "_surface_ref" in cls.__dict__:
            cls.__dict__["_surface_ref"].check(f"{cls.__name__}.{name}")
        raise AttributeError(name)


class _SurfaceEnum(enum.Enum, metaclass=_SurfaceEnumMeta):
    pass


class _SurfaceIntEnum(enum.IntEnum, metaclass=_SurfaceEnumMeta):
    pass


class Surface:
    """Which TensorRT names one version has (``Owner.member`` or module-level names)."""

    def __init__(self, record: dict) -> None:
        self.version: str = record["version"]
        self.present = frozenset(record["present"])
        self.absent = frozenset(record["absent"])

    def check(self, qualified: str) -> None:
        """AttributeError unless the version has ``qualified``."""
        if qualified in self.present:
            return
        if qualified in self.absent:
            raise AttributeError(f"TensorRT {self.version} has no {qualified} (real API surface)")
        raise AttributeError(f"{qualified} is not in the checked API surfaces: add it to CANDIDATES in "
                             "scripts/trt_api_surface.py and regenerate tests/data/trt_surface_*.json")

    def has(self, qualified: str) -> bool:
        return qualified in self.present

    def enum(self, name: str, members: dict[str, int] | str, integer: bool = False) -> type | None:
        """An enum with only the members this version has (None when the enum itself is absent)."""
        if not self.has(name):
            return None
        values = members if isinstance(members, dict) else {m: i for i, m in enumerate(members.split())}
        base = _SurfaceIntEnum if integer else _SurfaceEnum
        cls = base(name, {m: v for m, v in values.items() if self.has(f"{name}.{m}")})
        type.__setattr__(cls, "_surface_ref", self)
        return cls


def guarded(surface: Surface) -> type:
    """The base class of one version's stub classes: a public attribute of an instance must exist
    on the TensorRT class named by the subclass's ``_trt_names`` (the class first, then its bases)."""

    def check(owners: tuple[str, ...], name: str) -> None:
        errors = []
        for owner in owners:
            try:
                surface.check(f"{owner}.{name}")
                return
            except AttributeError as exc:
                errors.append(exc)
        raise next((e for e in errors if "has no" in str(e)), errors[0])

    class Guarded:
        _trt_names: tuple[str, ...] = ()

        def __getattribute__(self, name: str) -> Any:
            if not name.startswith("_"):
                check(type(self)._trt_names, name)
            return object.__getattribute__(self, name)

        def __setattr__(self, name: str, value: Any) -> None:
            if not name.startswith("_"):
                check(type(self)._trt_names, name)
            object.__setattr__(self, name, value)

    return Guarded


class GuardedModule(types.ModuleType):
    """``tensorrt`` itself: module-level public names must be in the surface."""

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_"):
            object.__getattribute__(self, "_surface").check(name)
        return object.__getattribute__(self, name)


_ONNX_TO_TRT = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.INT8: "int8",
                TensorProto.INT32: "int32", TensorProto.INT64: "int64", TensorProto.BOOL: "bool"}


class FakeTensorRT:
    """STUB of the TensorRT builder API ``build_engine`` uses, on one version's surface; records every call.

    The ONNX "parser" maps each ONNX node to one layer named after the node (like TensorRT's
    parser does for the main layer of a node) and each initializer to a CONSTANT layer, with
    the element types from ONNX shape inference (so INT64 shape arithmetic is integer here too);
    ops outside ``TENSORRT10_ONNX_OPS`` are parse errors. Recorded state for the tests lives in
    underscore attributes (``config._flags``, ``config._pools``) so the guard does not apply.
    """

    TYPES = {
        "LayerNormalization": "NORMALIZATION", "Softmax": "SOFTMAX", "MatMul": "MATRIX_MULTIPLY",
        "Gemm": "MATRIX_MULTIPLY", "Conv": "CONVOLUTION", "QuantizeLinear": "QUANTIZE",
        "DequantizeLinear": "DEQUANTIZE", "Constant": "CONSTANT", "Reshape": "SHUFFLE", "Transpose": "SHUFFLE",
        "Flatten": "SHUFFLE", "Squeeze": "SHUFFLE", "Unsqueeze": "SHUFFLE", "Shape": "SHAPE", "Gather": "GATHER",
        "Slice": "SLICE", "Split": "SLICE", "Concat": "CONCATENATION", "Cast": "CAST", "Identity": "IDENTITY",
        "TopK": "TOPK", "ReduceMean": "REDUCE", "ReduceSum": "REDUCE", "Resize": "RESIZE", "Pad": "PADDING",
        "Erf": "UNARY", "Sqrt": "UNARY", "Neg": "UNARY", "Where": "SELECT", "Expand": "SLICE",
        "ConstantOfShape": "FILL", "Clip": "ACTIVATION", "Relu": "ACTIVATION",
    }
    ELEMENTWISE = {"Add": "SUM", "Sub": "SUB", "Mul": "PROD", "Div": "DIV", "Pow": "POW", "Max": "MAX",
                   "Min": "MIN", "Equal": "EQUAL"}

    def __init__(self, surface: str = "10.3", num_dla_cores: int = 2, version: str | None = None) -> None:
        self.surface = Surface(load_surface(surface))
        self.label = surface
        self.calls: list[tuple] = []
        self.network: Any = None
        self.config: Any = None
        self.runtimes: list[Any] = []
        self.module = self._make(version or self.surface.version, num_dla_cores)

    @property
    def strongly_typed(self) -> bool:
        return not self.surface.has("BuilderFlag.FP16")

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def _make(self, version: str, num_dla_cores: int) -> types.ModuleType:  # noqa: C901 - one stub
        calls, fake, sf = self.calls, self, self.surface
        G = guarded(sf)
        trt = GuardedModule("tensorrt")
        object.__setattr__(trt, "_surface", sf)
        trt.__version__ = version
        module: dict[str, Any] = {}

        DataType = sf.enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "INT64": 8})
        module["DataType"] = DataType
        for name, member in (("float32", "FLOAT"), ("float16", "HALF"), ("int8", "INT8"), ("int32", "INT32"),
                             ("int64", "INT64"), ("bool", "BOOL")):
            module[name] = DataType[member]
        kinds = sorted(set(self.TYPES.values()) | {"ELEMENTWISE"})
        module["LayerType"] = sf.enum("LayerType", " ".join(kinds))
        module["ElementWiseOperation"] = sf.enum("ElementWiseOperation",
                                                 " ".join(sorted(set(self.ELEMENTWISE.values()))))
        module["BuilderFlag"] = sf.enum("BuilderFlag", "FP16 INT8 OBEY_PRECISION_CONSTRAINTS GPU_FALLBACK",
                                        integer=True)
        module["NetworkDefinitionCreationFlag"] = sf.enum(
            "NetworkDefinitionCreationFlag", {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1}, integer=True)
        module["MemoryPoolType"] = sf.enum("MemoryPoolType", "WORKSPACE")
        module["DeviceType"] = sf.enum("DeviceType", "GPU DLA")
        module["TensorIOMode"] = sf.enum("TensorIOMode", "INPUT OUTPUT")

        class Logger(G):
            _trt_names = ("Logger",)
            VERBOSE, WARNING = "VERBOSE", "WARNING"

            def __init__(self, severity: str) -> None:
                calls.append(("Logger", severity))

        class ITensor(G):
            _trt_names = ("ITensor",)
            def __init__(self, name: str, dtype: Any, shape=(), const: bool = False) -> None:
                self.name, self.dtype, self.shape = name, dtype, tuple(shape)
                self._const = const  # an initializer (the parser folds constant K of TopK etc.)

        class ILayer(G):
            _trt_names = ("ILayer",)
            def __init__(self, name: str, kind: str, inputs: list, outputs: list, op: str | None = None) -> None:
                self._name, self._type, self._inputs, self._outputs = name, trt.LayerType[kind], inputs, outputs
                self._op = op
                self._precision = None
                self._output_types: dict[int, Any] = {}

            name = property(lambda self: self._name)
            type = property(lambda self: self._type)
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
                calls.append(("layer.precision", self._name, value))
                data = [t for t in self._inputs if t is not None and not t._const] + self._outputs[:1]
                if any(t.dtype not in (trt.float32, trt.float16) for t in data):
                    # TensorRT rejects (or warns about) a float precision on integer arithmetic.
                    raise TypeError(f"layer {self._name} has integer I/O: FP32 precision does not apply")
                self._precision = value

            def set_output_type(self, j: int, dtype) -> None:
                calls.append(("layer.set_output_type", self._name, j, dtype))
                self._output_types[j] = dtype

        class IElementWiseLayer(ILayer):
            _trt_names = ("IElementWiseLayer", "ILayer")

            @property
            def op(self):
                return trt.ElementWiseOperation[self._op]

        class INetworkDefinition(G):
            _trt_names = ("INetworkDefinition",)
            def __init__(self, flags: int) -> None:
                self._flags, self._layers, self._inputs = flags, [], []

            num_layers = property(lambda self: len(self._layers))
            num_inputs = property(lambda self: len(self._inputs))

            def get_layer(self, i: int):
                return self._layers[i]

            def get_input(self, i: int):
                return self._inputs[i]

        class ParserError(G):
            _trt_names = ("ParserError",)
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

        def dtype_of(elem: int):
            return getattr(trt, _ONNX_TO_TRT.get(elem, "float32"))

        class OnnxParser(G):
            _trt_names = ("OnnxParser",)
            def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
                self._network, self._errors = network, []

            @property
            def num_errors(self) -> int:
                return len(self._errors)

            def get_error(self, i: int):
                return self._errors[i]

            def parse_from_file(self, path: str) -> bool:
                calls.append(("parse_from_file", path))
                model = onnx.load(path)
                types_ = {}
                try:
                    inferred = onnx.shape_inference.infer_shapes(model)
                    for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
                        types_[vi.name] = vi.type.tensor_type.elem_type
                except Exception:  # noqa: BLE001 - keep the declared types
                    pass
                net = self._network
                fake.parsed = model
                tensors: dict[str, ITensor] = {}
                init_names = {t.name for t in model.graph.initializer}
                for vi in model.graph.input:
                    if vi.name in init_names:
                        continue
                    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim]
                    tensors[vi.name] = ITensor(vi.name, dtype_of(vi.type.tensor_type.elem_type), dims)
                    net._inputs.append(tensors[vi.name])
                for init in model.graph.initializer:
                    out = tensors[init.name] = ITensor(init.name, dtype_of(init.data_type), const=True)
                    net._layers.append(ILayer(init.name, "CONSTANT", [], [out]))
                for index, node in enumerate(model.graph.node):
                    if node.op_type not in TENSORRT10_ONNX_OPS:
                        self._errors.append(ParserError(index, node))
                        return False
                    outs = []
                    for j, name in enumerate(node.output):
                        int_out = (node.op_type == "TopK" and j == 1) or node.op_type == "Shape"
                        elem = types_.get(name, TensorProto.INT64 if int_out else TensorProto.FLOAT)
                        outs.append(ITensor(name, dtype_of(elem), const=node.op_type == "Constant"))
                        tensors[name] = outs[-1]
                    ins = [tensors.get(i) for i in node.input if i]
                    if node.op_type in fake.ELEMENTWISE:
                        layer = IElementWiseLayer(node.name, "ELEMENTWISE", ins, outs, fake.ELEMENTWISE[node.op_type])
                    else:
                        layer = ILayer(node.name, fake.TYPES.get(node.op_type, "SELECT"), ins, outs)
                    net._layers.append(layer)
                return True

        class ITimingCache(G):
            _trt_names = ("ITimingCache",)
            def __init__(self, data: bytes) -> None:
                self._data = data

            def serialize(self) -> bytes:
                calls.append(("timing_cache.serialize",))
                return b"timing-cache-v2:" + self._data

        class IBuilderConfig(G):
            _trt_names = ("IBuilderConfig",)
            def __init__(self) -> None:
                self._flags: set = set()
                self._pools: dict = {}
                self.default_device_type = trt.DeviceType.GPU
                self.DLA_core = -1
                self.builder_optimization_level = 3
                self._cache = None

            def set_flag(self, flag) -> None:
                calls.append(("set_flag", flag.name))
                self._flags.add(flag.name)

            def set_memory_pool_limit(self, pool, size: int) -> None:
                calls.append(("set_memory_pool_limit", pool.name, size))
                self._pools[pool.name] = size

            def create_timing_cache(self, data: bytes):
                calls.append(("create_timing_cache", bytes(data)))
                return ITimingCache(bytes(data))

            def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
                calls.append(("set_timing_cache", cache._data, ignore_mismatch))
                if cache._data.startswith(b"foreign"):
                    return False
                self._cache = cache
                return True

            def get_timing_cache(self):
                return self._cache

        class Builder(G):
            _trt_names = ("Builder",)
            num_DLA_cores = num_dla_cores

            def __init__(self, logger: Logger) -> None:
                calls.append(("Builder",))

            def create_network(self, flags: int):
                calls.append(("create_network", flags))
                fake.network = INetworkDefinition(flags)
                return fake.network

            def create_builder_config(self):
                calls.append(("create_builder_config",))
                fake.config = IBuilderConfig()
                return fake.config

            def build_serialized_network(self, network, config):
                calls.append(("build_serialized_network",))
                state = {"flags": sorted(config._flags), "device": config.default_device_type.name,
                         "dla": config.DLA_core}
                return b"FAKE-ENGINE" + json.dumps(state).encode()

        class Runtime(G):
            _trt_names = ("Runtime",)
            def __init__(self, logger: Logger) -> None:
                self.DLA_core = -1  # TensorRT's default: none
                fake.runtimes.append(self)

            def deserialize_cuda_engine(self, data: bytes):
                calls.append(("deserialize_cuda_engine", len(data), self._dla()))
                if not bytes(data).startswith(b"FAKE-ENGINE"):
                    return None
                state = json.loads(bytes(data)[len(b"FAKE-ENGINE"):] or b"{}")
                if state.get("device") == "DLA" and state.get("dla") != self._dla():
                    return None  # a DLA engine on a runtime without (or with another) DLA core
                return object()

            def _dla(self) -> int:
                return object.__getattribute__(self, "DLA_core")

        module.update(Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, Runtime=Runtime, ILayer=ILayer,
                      IElementWiseLayer=IElementWiseLayer)
        for name, value in module.items():
            if value is not None and sf.has(name):
                object.__setattr__(trt, name, value)
        # ICudaEngine / IExecutionContext / nptype: added by the runtime tests' stub (test_tensorrt_engine).
        object.__setattr__(trt, "_Guarded", G)
        return trt
