"""Engine cache keys, FP32-island selection and the TensorRT engine builder.

TensorRT cannot run here (no GPU), so the builder is exercised against ``FakeTensorRT``
(``tests/trt_stub.py``): a STUB module put into ``sys.modules`` that records the calls and refuses
every name the chosen REAL TensorRT version lacks, per the API surfaces extracted from the real
bindings wheels (``scripts/trt_api_surface.py``). Every builder test runs once per surface: 10.3
(JetPack 6), 10.16 (latest 10.x) and 11.4 (latest 11.x, strongly typed only). These tests prove
the call sequence, the flags per version, the FP32 islands (per-layer precision on 10, an FP16
ONNX with FP32 islands on 11), DLA rules, timing cache, Q/DQ-only INT8 and that no call uses a
name the version does not have. They cannot prove that a real builder accepts the network or
what accuracy / speed the engine has: that needs the device (``edge-ad build-engine``).
"""
from __future__ import annotations

import ast
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
    FP32_PRESETS,
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
from trt_stub import SURFACES, FakeTensorRT, load_surface  # noqa: E402

KEY_ARGS = dict(trt_version="10.3.0", compute_capability="8.7", precision="fp16", dla_core=None, extra={"a": 1})


# ============================================================================ without TensorRT
def test_module_imports_and_calls_explain_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail like a missing package
    assert not tensorrt_available()
    for call in (lambda: build_engine(tmp_path / "m.onnx", BuildOptions(), tmp_path / "m.engine"), device_info):
        with pytest.raises(ImportError) as info:
            call()
        assert str(info.value) == TENSORRT_MISSING
    assert "python3-libnvinfer" in TENSORRT_MISSING and "pip install edge-ad[tensorrt]" in TENSORRT_MISSING
    assert "edge-ad build-engine BUNDLE" in TENSORRT_MISSING
    # A package named tensorrt without the API (the PyPI download stub) is "missing" as well.
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(ImportError, match="no Builder"):
        device_info()


def _fake_cudart(major: int | None, minor: int = 7, name: str = "Orin", sms: int = 16) -> types.ModuleType:
    """A cuda-python ``runtime`` stub: device ``name`` with compute capability ``major.minor`` and
    ``sms`` SMs, or no device (None: every call fails as without a driver / GPU)."""
    m = types.ModuleType("cudart")
    m.cudaError_t = enum.Enum("cudaError_t", {"cudaSuccess": 0, "cudaErrorNoDevice": 100})
    ok, none = m.cudaError_t.cudaSuccess, m.cudaError_t.cudaErrorNoDevice

    def props(device):
        if major is None:
            return none, None
        return ok, types.SimpleNamespace(name=name.encode() + b"\x00" * 3, major=major, minor=minor,
                                         multiProcessorCount=sms)

    m.cudaGetDeviceProperties = props
    m.cudaSetDevice = lambda device: (none,) if major is None else (ok,)
    m.cudaGetDevice = lambda: (ok, 0)
    return m


def test_device_info_reads_version_compute_capability_name_and_sms(monkeypatch, fake_trt):
    for name in ("cuda.cudart", "pycuda", "pycuda.driver"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_cudart(None))
    with pytest.raises(RuntimeError, match="device 0.*cuda-python: CudaError.*cudaErrorNoDevice.*cuda-python>=12.6"):
        device_info()
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_cudart(8, 7, "Orin", 16))
    assert device_info() == DeviceInfo(fake_trt.surface.version, "8.7", "Orin", 16)


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
        # Orin Nano, NX and AGX all report 8.7: the module (name, SM count) is part of the key.
        engine_cache_key(data, **{**KEY_ARGS, "device_name": "Orin"}),
        engine_cache_key(data, **{**KEY_ARGS, "device_name": "Orin", "sm_count": 8}),
        engine_cache_key(data, **{**KEY_ARGS, "device_name": "Orin", "sm_count": 16}),
    ]
    assert len(set(changed + [key])) == len(changed) + 1
    # ...and so does the key schema (old caches rebuild when the key's meaning changes).
    k = engine_key(data, **KEY_ARGS)
    assert EngineKey(**{**k.to_dict(), "schema": k.schema + 1}).digest() != key
    for bad in ({"precision": "bf16"}, {"compute_capability": "orin"}, {"dla_core": -1}, {"trt_version": " "},
                {"sm_count": -1}, {"sm_count": 1.5}):
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
    assert BuildOptions().precision == "fp16" and BuildOptions().fp32_layers == "default"
    for bad in ({"precision": "int4"}, {"workspace_mb": 0}, {"dla_core": -1}, {"builder_optimization_level": 9},
                {"dla_core": 0, "precision": "fp32"}, {"fp32_layers": "some"},
                {"fp32_patterns": (("(", "broken regex"),)}):
        with pytest.raises((ValueError, re.error)):
            BuildOptions(**bad)
    a, b = BuildOptions(), BuildOptions(timing_cache="/tmp/x.cache", verbose=True)
    assert a.key_fields() == b.key_fields()  # paths and logging do not change the engine
    assert BuildOptions(workspace_mb=2048).key_fields() != a.key_fields()
    keys = {str(BuildOptions(fp32_layers=p).key_fields()) for p in FP32_PRESETS}
    assert len(keys) == len(FP32_PRESETS) and BuildOptions(fp32_layers=False).fp32_layers == "none"
    assert BuildOptions(fp32_layers=True).key_fields() == a.key_fields()


def test_dla_rules_no_qdq_int8_and_no_forced_fp32_islands():
    """Defect 3: TensorRT 10's DLA takes no Q/DQ, and FP32 islands cut a ViT into too many DLA loadables."""
    with pytest.raises(ValueError, match="Q/DQ.*DLA does not take.*--dla-core"):
        BuildOptions(precision="int8", dla_core=0)
    dla = BuildOptions(precision="fp16", dla_core=0)
    assert dla.fp32_layers == "none"  # DLA default: no islands
    with pytest.raises(ValueError, match="16 loadables"):
        BuildOptions(precision="fp16", dla_core=0, fp32_layers="default")
    assert BuildOptions(precision="fp16", dla_core=0, gpu_fallback=False).gpu_fallback is False


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
    # Presets (--fp32-layers) drop whole rules; "no-softmax" only the Softmax.
    assert select_fp32_layers(layers, preset="no-softmax") == {
        k: v for k, v in chosen.items() if v != "softmax"}
    assert set(select_fp32_layers(layers, preset="head").values()) == {"score head"}
    assert select_fp32_layers(layers, preset="none") == {}
    with pytest.raises(ValueError, match="preset"):
        select_fp32_layers(layers, preset="all")


def test_select_fp32_layers_skips_integer_layers():
    """Defect 4: INT32 / INT64 shape arithmetic matches the residual-add and top-level rules by
    shape, but has no FP32 precision: only layers with all-float I/O are constrained."""
    layers = [
        LayerDesc("/Add", "ELEMENTWISE", "SUM", 0, float_io=False),      # shape + shape at the top level
        LayerDesc("/Mul_2", "ELEMENTWISE", "PROD", 0, float_io=False),
        LayerDesc("/backbone/blocks.0/Add", "ELEMENTWISE", "SUM", 0, float_io=True),
        LayerDesc("/Sub", "ELEMENTWISE", "SUB", 0),
    ]
    assert select_fp32_layers(layers) == {"/backbone/blocks.0/Add": "residual add", "/Sub": "score head"}


# ============================================================================ the stub
# FakeTensorRT (tests/trt_stub.py) refuses every name the chosen real TensorRT version lacks; the
# builder tests run once per surface: 10.3 (JetPack 6), 10.16 (latest 10.x), 11.4 (latest 11.x).
_FakeTensorRT = FakeTensorRT


@pytest.fixture(params=SURFACES)
def fake_trt(request, monkeypatch):
    """A fresh stub of one real TensorRT surface as ``tensorrt``; ``install`` swaps in another one."""
    label = request.param
    stub = FakeTensorRT(label)
    monkeypatch.setitem(sys.modules, "tensorrt", stub.module)

    def install(surface: str = label, num_dla_cores: int = 2, version: str | None = None) -> FakeTensorRT:
        s = FakeTensorRT(surface, num_dla_cores, version)
        monkeypatch.setitem(sys.modules, "tensorrt", s.module)
        return s

    stub.install = install
    return stub


# ---------------------------------------------------------------------------- graphs for the stub
def _vit_block_onnx(path: Path, *, qdq: bool = False, extra_nodes=(), extra_inits=(), batch: int | str = 1) -> Path:
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
    nodes += list(extra_nodes)
    inits += list(extra_inits)
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, 8])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [batch, 3])], inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _precisions(stub: FakeTensorRT) -> dict[str, object]:
    return {c[1]: c[2] for c in stub.calls if c[0] == "layer.precision"}


def _parsed_dtypes(stub: FakeTensorRT) -> dict[str, set[int]]:
    """ONNX element types of the float I/O of each node of the ONNX the stub parsed last."""
    from edge_ad.converters.fp16 import island_dtypes

    return island_dtypes(stub.parsed, [n.name for n in stub.parsed.graph.node])


ISLANDS = {  # the FP32 islands of _vit_block_onnx under the default preset
    "/backbone/blocks.0/norm1/LayerNormalization", "/backbone/blocks.0/attn/Softmax", "/backbone/blocks.0/Add",
    "/Sub", "/ReduceSumSquare", "/TopK",
}


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
    order = ["Builder", "create_network", "parse_from_file", "create_builder_config", "create_timing_cache",
             "set_timing_cache", "build_serialized_network", "deserialize_cuda_engine", "timing_cache.serialize"]
    assert fake_trt.config._pools == {"WORKSPACE": 512 << 20}
    assert ("create_timing_cache", b"previous timings") in fake_trt.calls
    assert cache.read_bytes() == b"timing-cache-v2:previous timings"  # saved back after the build
    assert fake_trt.config.default_device_type == trt.DeviceType.GPU
    if not fake_trt.strongly_typed:
        # TensorRT 10: explicit batch (flags 0) -> parse -> FP16 flag + per-layer FP32 under OBEY.
        assert [n for n in names if n in order] == order
        assert ("create_network", 0) in fake_trt.calls
        assert fake_trt.config._flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}  # no INT8 without Q/DQ
        # FP32 islands: LayerNorm, Softmax, residual Add, the score head; not the GEMM nor its bias Add.
        assert _precisions(fake_trt) == {name: trt.float32 for name in ISLANDS}
        out_types = [(c[1], c[2], c[3]) for c in fake_trt.calls if c[0] == "layer.set_output_type"]
        assert ("/TopK", 0, trt.float32) in out_types and not any(n == "/TopK" and j == 1 for n, j, _ in out_types)
    else:
        # TensorRT 11: strongly typed; the FP32 ONNX is parsed, converted to FP16 with FP32 islands, parsed again.
        strongly = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        assert [c[1] for c in fake_trt.calls if c[0] == "create_network"] == [strongly, strongly]
        parsed = [Path(c[1]).name for c in fake_trt.calls if c[0] == "parse_from_file"]
        assert parsed == ["block.onnx", "model_fp16.onnx"]
        assert fake_trt.config._flags == set() and not _precisions(fake_trt)
        dtypes = _parsed_dtypes(fake_trt)
        assert all(dtypes[n] == {TensorProto.FLOAT} for n in ISLANDS)  # the islands stay FP32
        for gemm in ("/backbone/blocks.0/attn/qkv/MatMul", "/backbone/blocks.0/attn/qkv/Add"):
            assert dtypes[gemm] == {TensorProto.FLOAT16}  # the rest runs FP16
        assert any(n.op_type == "Cast" for n in fake_trt.parsed.graph.node)


def test_fp32_presets_change_the_islands(fake_trt, tmp_path):
    """Defect 11: the islands are a documented choice; 'no-softmax' frees the attention Softmax."""
    onnx_path = _vit_block_onnx(tmp_path / "block.onnx")
    softmax = "/backbone/blocks.0/attn/Softmax"
    build_engine(onnx_path, BuildOptions(fp32_layers="no-softmax"), tmp_path / "a.engine")
    if fake_trt.strongly_typed:
        dtypes = _parsed_dtypes(fake_trt)
        assert dtypes[softmax] == {TensorProto.FLOAT16} and dtypes["/backbone/blocks.0/Add"] == {TensorProto.FLOAT}
    else:
        assert set(_precisions(fake_trt)) == ISLANDS - {softmax}
    stub = fake_trt.install()
    build_engine(onnx_path, BuildOptions(fp32_layers="none"), tmp_path / "b.engine")
    if stub.strongly_typed:
        assert all(d == {TensorProto.FLOAT16} for n, d in _parsed_dtypes(stub).items() if n in ISLANDS - {"/TopK"})
    else:
        assert not _precisions(stub) and stub.config._flags == {"FP16"}  # nothing to obey


def test_integer_shape_arithmetic_gets_no_fp32_constraint(fake_trt, tmp_path):
    """Defect 4: a top-level Add of two INT64 shape values matches the residual-add and score-head
    rules by name and shape; constraining it would fail (the stub raises like TensorRT)."""
    shape_nodes = [
        helper.make_node("Shape", ["x"], ["shp"], name="/Shape"),
        helper.make_node("Add", ["shp", "shp"], ["shp2"], name="/Add"),
        helper.make_node("Reshape", ["score", "shp_c"], ["score_r"], name="/Reshape"),
    ]
    onnx_path = _vit_block_onnx(tmp_path / "b.onnx", extra_nodes=shape_nodes,
                                extra_inits=[numpy_helper.from_array(np.array([1, 3], np.int64), "shp_c")])
    build_engine(onnx_path, BuildOptions(), tmp_path / "b.engine")
    if not fake_trt.strongly_typed:
        chosen = _precisions(fake_trt)
        assert "/Add" not in chosen and ISLANDS <= set(chosen)
    else:
        dtypes = _parsed_dtypes(fake_trt)
        assert dtypes["/Add"] == set()  # integer I/O: untouched by the FP16 conversion


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
    if stub.strongly_typed:  # the Q/DQ ONNX as it is: types from the graph, no flags
        assert stub.config._flags == set() and not _precisions(stub)
        assert [Path(c[1]).name for c in stub.calls if c[0] == "parse_from_file"] == ["qdq.onnx"]
        return
    assert stub.config._flags == {"INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"}
    chosen = _precisions(stub)
    assert not any("Quantize" in name or "Dequantize" in name for name in chosen)  # Q/DQ untouched
    assert "/backbone/blocks.0/attn/qkv/MatMul" not in chosen
    assert "/backbone/blocks.0/norm1/LayerNormalization" in chosen and "/backbone/blocks.0/Add" in chosen


def test_dla_fp16_with_gpu_fallback_and_dla_runtime(fake_trt, tmp_path):
    onnx_path = _vit_block_onnx(tmp_path / "block.onnx")
    build_engine(onnx_path, BuildOptions(precision="fp16", dla_core=1), tmp_path / "dla.engine")
    trt = fake_trt.module
    assert fake_trt.config.default_device_type == trt.DeviceType.DLA and fake_trt.config.DLA_core == 1
    assert "GPU_FALLBACK" in fake_trt.config._flags
    assert "OBEY_PRECISION_CONSTRAINTS" not in fake_trt.config._flags and not _precisions(fake_trt)  # no islands
    # Defect 8: the check-deserialisation ran on a runtime set to the engine's DLA core.
    assert [c for c in fake_trt.calls if c[0] == "deserialize_cuda_engine"][-1][2] == 1
    if fake_trt.strongly_typed:  # FP16 graph: FP32 only where onnxruntime has no FP16 kernel (TopK)
        fp32 = {n for n, d in _parsed_dtypes(fake_trt).items() if d == {TensorProto.FLOAT}}
        assert fp32 == {"/TopK"}
    stub = fake_trt.install(num_dla_cores=0)  # e.g. Orin Nano: no DLA
    with pytest.raises(ValueError, match="0 DLA core"):
        build_engine(onnx_path, BuildOptions(precision="fp16", dla_core=0), tmp_path / "dla.engine")
    assert "build_serialized_network" not in stub.names()
    with pytest.raises(ValueError, match="Q/DQ"):
        build_engine(_vit_block_onnx(tmp_path / "q.onnx", qdq=True), BuildOptions(precision="int8", dla_core=0),
                     tmp_path / "q.engine")


def test_parser_errors_name_the_node(fake_trt, tmp_path):
    bad = helper.make_node("FancyOp", ["score"], ["fancy"], name="/head/FancyOp", domain="")
    onnx_path = _vit_block_onnx(tmp_path / "bad.onnx", extra_nodes=[bad])
    with pytest.raises(RuntimeError) as info:
        build_engine(onnx_path, BuildOptions(precision="fp32"), tmp_path / "bad.engine")
    msg = str(info.value)
    assert "node 8 /head/FancyOp FancyOp: No importer registered for op: FancyOp" in msg
    assert "check_tensorrt_compatible" in msg
    assert not (tmp_path / "bad.engine").exists()


def test_dynamic_input_and_failed_build_are_errors(fake_trt, tmp_path):
    dyn = _vit_block_onnx(tmp_path / "dyn.onnx", batch="batch")
    with pytest.raises(ValueError, match="dynamic shape"):
        build_engine(dyn, BuildOptions(precision="fp32"), tmp_path / "dyn.engine")
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


def test_version_guards_are_what_keeps_calls_inside_each_surface(fake_trt, tmp_path):
    """Weak-typing calls exist only in 10.x and EXPLICIT_BATCH only before 11: the code picks them
    by version. Lying about the version proves the stub would catch an unguarded call."""
    onnx_path = _vit_block_onnx(tmp_path / "b.onnx")
    if fake_trt.label == "11.4":
        fake_trt.install(version="10.99.0")  # 11.4's surface, but the code takes the TensorRT 10 branch
        with pytest.raises(AttributeError, match=r"TensorRT 11\.4\.0\.106 has no BuilderFlag\.FP16"):
            build_engine(onnx_path, BuildOptions(), tmp_path / "x.engine")
        fake_trt.install(version="8.6.1")
        with pytest.raises(AttributeError, match="has no NetworkDefinitionCreationFlag.EXPLICIT_BATCH"):
            build_engine(onnx_path, BuildOptions(precision="fp32"), tmp_path / "x.engine")
    else:
        old = fake_trt.install(version="8.6.1")  # JetPack 6.0: explicit batch must be requested
        build_engine(onnx_path, BuildOptions(), tmp_path / "a.engine")
        assert ("create_network", 1 << 0) in old.calls
        assert old.config._flags == {"FP16", "OBEY_PRECISION_CONSTRAINTS"}
        with pytest.raises(AttributeError, match="ILayer.bogus is not in the checked API surfaces"):
            old.network.get_layer(0).bogus  # noqa: B018 - a name outside the surface is refused
    # Every TensorRT name the code references exists in at least one real surface.
    known = set().union(*(load_surface(label)["present"] for label in SURFACES))
    for path in ("converters/tensorrt.py", "runtime/engines/tensorrt_engine.py"):
        for name in _trt_names_in(Path(__file__).resolve().parents[1] / path):
            assert name in known, f"{path} uses trt.{name}, which no checked TensorRT surface has"


def _trt_names_in(path: Path) -> set[str]:
    """``X`` / ``X.Y`` of every ``trt.X[.Y]`` attribute chain in a source file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) \
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "trt":
            names.add(f"{node.value.attr}.{node.attr}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "trt":
            if not node.attr.startswith("__"):
                names.add(node.attr)
    return names


def test_get_or_build_engine_uses_the_cache_by_key(fake_trt, tmp_path):
    onnx_path = _vit_block_onnx(tmp_path / "b.onnx")
    engines = tmp_path / "engines"
    nano = DeviceInfo("10.3.0", "8.7", "Orin", 8)
    first = get_or_build_engine(onnx_path, BuildOptions(), engines, device=nano)
    assert fake_trt.names().count("build_serialized_network") == 1
    assert first.name == engine_filename(first.stem) and first.with_suffix(".json").is_file()
    assert get_or_build_engine(onnx_path, BuildOptions(), engines, device=nano) == first
    assert fake_trt.names().count("build_serialized_network") == 1  # cached
    # Another precision, TensorRT version, GPU or Jetson module (same 8.7) is another engine.
    for device, options in ((nano, BuildOptions(precision="fp32")), (DeviceInfo("10.7.0", "8.7", "Orin", 8),
                            BuildOptions()), (DeviceInfo("10.3.0", "8.9", "NVIDIA L4", 58), BuildOptions()),
                            (DeviceInfo("10.3.0", "8.7", "Orin", 16), BuildOptions())):
        assert get_or_build_engine(onnx_path, options, engines, device=device) != first
    assert fake_trt.names().count("build_serialized_network") == 5
    assert len(list(engines.glob("*.engine"))) == 5


@pytest.fixture(scope="module")
def foundad_qdq(real_root, tmp_path_factory):
    """An actual exported + quantised FoundAD graph (tiny random-init DINOv3) and its FP32 ONNX.

    Made before any stub is installed: torch's exporter probes ``find_spec("tensorrt")``.
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
    tmp_path = tmp_path_factory.mktemp("foundad_trt")
    fp32 = tmp_path / "det.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(det, (torch.from_numpy(images[:1]),), str(fp32), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["anomaly_map", "score"])
    return quantize_qdq(fp32, tmp_path / "det_q.onnx", images)


@pytest.mark.parametrize("label", SURFACES)
def test_real_foundad_qdq_graph_on_the_stub(monkeypatch, tmp_path, foundad_qdq, label):
    """The islands on the real FoundAD Q/DQ graph: per-layer FP32 on 10.x; as-is strongly typed on 11."""
    result = foundad_qdq
    fake_trt = FakeTensorRT(label)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt.module)
    build_engine(result.onnx_path, BuildOptions(precision="int8"), tmp_path / "det.engine")
    if fake_trt.strongly_typed:
        assert fake_trt.config._flags == set() and not _precisions(fake_trt)
        return
    assert fake_trt.config._flags == {"INT8", "FP16", "OBEY_PRECISION_CONSTRAINTS"}

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


def test_real_foundad_fp16_onnx_keeps_vit_islands(foundad_qdq, tmp_path):
    """TensorRT 11 FP16 path on the real FoundAD (ViT) export: LayerNorm, Softmax and the residual
    adds stay FP32 in the converted ONNX; the GEMMs are FP16; 'no-softmax' frees the Softmax."""
    from edge_ad.converters.fp16 import convert_fp16, island_dtypes, onnx_layers

    fp32 = foundad_qdq.onnx_path.parent / "det.onnx"
    conv = convert_fp16(fp32, tmp_path / "det16.onnx")
    model = onnx.load(str(conv.path))
    types = island_dtypes(model, [n.name for n in model.graph.node])
    by_type: dict[str, list[str]] = {}
    for n in model.graph.node:
        by_type.setdefault(n.op_type, []).append(n.name)
    for op in ("LayerNormalization", "Softmax"):
        assert by_type[op] and all(types[n] == {TensorProto.FLOAT} for n in by_type[op]), op
    residual = [d.name for d in onnx_layers(onnx.load(str(fp32))) if d.type == "ELEMENTWISE" and d.op == "SUM"
                and d.constant_inputs == 0 and d.float_io]
    assert len(residual) >= 5 and all(types[n] == {TensorProto.FLOAT} for n in residual)
    assert sum(types[n] == {TensorProto.FLOAT16} for n in by_type["MatMul"]) >= len(by_type["MatMul"]) - 2
    free = island_dtypes(onnx.load(str(convert_fp16(fp32, tmp_path / "ns.onnx", fp32_layers="no-softmax").path)),
                         by_type["Softmax"])
    assert all(t == {TensorProto.FLOAT16} for t in free.values())


def test_surface_extraction_rules(tmp_path):
    """scripts/trt_api_surface.py on a synthetic wheel: merged tails count, ambiguous enum members
    need their docstring, helpers come from __init__.py; the committed surfaces say what the issue found."""
    import importlib.util
    import zipfile

    spec = importlib.util.spec_from_file_location("trt_api_surface", Path(__file__).resolve().parents[1]
                                                  / "scripts" / "trt_api_surface.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def wheel(strings: list[str], name: str) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("tensorrt_bindings/tensorrt.so", b"\x7fELF\x00" + b"\x00".join(s.encode() for s in strings))
            z.writestr("tensorrt_bindings/__init__.py", '__version__ = "10.99.0"\ndef nptype(t):\n    pass\n')
        return path

    base = ["ILayer", "reset_output_type", "BuilderFlag", "UINT8", "see the enum DataType"]
    s = mod.surface_of(wheel(base, "a.whl"), "x")
    assert s["version"] == "10.99.0" and "nptype" in s["python_helpers"] and "nptype" in s["present"]
    assert "ILayer.set_output_type" in s["present"]  # merged into reset_output_type
    assert "DataType" in s["present"]  # merged into a docstring's last word
    assert "BuilderFlag.INT8" in s["absent"]  # only the tail of UINT8: not evidence for the flag
    s2 = mod.surface_of(wheel(base + ["Enable Int8 layer selection"], "b.whl"), "x")
    assert "BuilderFlag.INT8" in s2["present"]
    # The real surfaces (tests/data, from the real wheels) agree with the hand check.
    weak = {"BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "NetworkDefinitionCreationFlag.EXPLICIT_BATCH",
            "ILayer.set_output_type", "ILayer.precision", "BuilderFlag.FP16", "BuilderFlag.INT8"}
    assert weak <= set(load_surface("10.3")["present"]) and weak <= set(load_surface("10.16")["present"])
    assert weak == set(load_surface("11.4")["absent"])
