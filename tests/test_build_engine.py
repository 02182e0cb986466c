"""`edge-ad build-engine BUNDLE` / :func:`edge_ad.converters.engine.build_bundle_engine`.

TensorRT cannot run here: the builder runs against ``FakeTensorRT`` (``tests/trt_stub.py``), a
STUB ``tensorrt`` module put into ``sys.modules`` that records the calls, returns fake engine
bytes and refuses every name the real TensorRT version lacks (surfaces of 10.3, 10.16 and 11.4,
each test once per surface). These tests are NOT a TensorRT run. They prove what the command
does around the builder on a real bundle (``edge_ad.converters.convert`` for jetson-orin INT8 from a
real knn run): verified loading, precision from the manifest, DLA only on DLA targets, the cache
key, reuse of a matching cached engine, rebuilds on ``--force`` or a changed key, refusal of
non-TensorRT bundles, and the no-TensorRT error path of the CLI with torch blocked.
"""
from __future__ import annotations

import json
import shutil
import sys

import pytest

from edge_ad.converters.convert import convert
from edge_ad.converters.engine import build_bundle_engine
from edge_ad.converters.tensorrt import TENSORRT_MISSING, BuildOptions, DeviceInfo, engine_cache_key, find_cached_engine
from edge_ad.runtime import load_bundle
from test_tensorrt import _fake_cudart
from torch_blocker import run_without_torch
from trt_stub import SURFACES, FakeTensorRT  # the TensorRT stub on real API surfaces (not TensorRT)

CATEGORY = "mvtec_hazelnut_256"
ORIN = DeviceInfo("10.3.0", "8.7", "Orin", 16)


@pytest.fixture(scope="module")
def orin_bundle(knn_run, real_root, tmp_path_factory):
    """A real jetson-orin INT8 (Q/DQ) bundle."""
    out = tmp_path_factory.mktemp("bundles") / "orin"
    return convert(knn_run, "jetson-orin", out, precision="int8", calib=real_root / CATEGORY, calib_count=8,
                   progress=False)


@pytest.fixture
def orin(orin_bundle, tmp_path):
    """A fresh copy of the bundle per test: each surface run starts with an empty engines/ folder."""
    return shutil.copytree(orin_bundle, tmp_path / "orin")


@pytest.fixture(params=SURFACES)
def stub(request, monkeypatch):
    fake = FakeTensorRT(request.param, num_dla_cores=2)
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    return fake


def _builds(fake: FakeTensorRT) -> int:
    return fake.names().count("build_serialized_network")


def test_builds_then_reuses_then_force_and_key_changes_rebuild(orin, stub, tmp_path):
    orin_bundle = orin
    bundle = load_bundle(orin_bundle)
    assert (bundle.manifest.engine.name, bundle.manifest.precision) == ("tensorrt", "int8")
    engine = build_bundle_engine(orin_bundle, device=ORIN)
    assert _builds(stub) == 1
    assert engine.parent == bundle.engines_dir and engine.is_file()
    if stub.strongly_typed:  # TensorRT 11: the Q/DQ graph's own types, no precision flags
        assert stub.config._flags == set()
    else:  # precision from the manifest (INT8 Q/DQ, rest FP16)
        assert {"INT8", "FP16"} <= stub.config._flags
    assert stub.config._pools["WORKSPACE"] == 1024 << 20
    key = engine_cache_key(bundle.path("model.onnx"), trt_version="10.3.0", compute_capability="8.7",
                           precision="int8", extra=BuildOptions(precision="int8").key_fields(),
                           device_name="Orin", sm_count=16)
    assert engine.name == f"{key}.engine" and find_cached_engine(bundle.engines_dir, key) == engine
    record = json.loads(engine.with_suffix(".json").read_text())
    assert record["fields"]["precision"] == "int8" and record["fields"]["compute_capability"] == "8.7"
    assert (record["fields"]["device_name"], record["fields"]["sm_count"]) == ("Orin", 16)

    # Second call: the matching cached engine, no build.
    assert build_bundle_engine(orin_bundle, device=ORIN) == engine
    assert _builds(stub) == 1
    # --force: rebuilt in place, record still valid.
    assert build_bundle_engine(orin_bundle, device=ORIN, force=True) == engine
    assert _builds(stub) == 2 and find_cached_engine(bundle.engines_dir, key) == engine
    # A different device (compute capability), TensorRT version or option: a new key, a new build.
    other_cc = build_bundle_engine(orin_bundle, device=DeviceInfo("10.3.0", "8.9", "NVIDIA L4", 58))
    assert _builds(stub) == 3 and other_cc != engine
    other_trt = build_bundle_engine(orin_bundle, device=DeviceInfo("10.4.0", "8.7", "Orin", 16))
    assert _builds(stub) == 4 and other_trt not in (engine, other_cc)
    bigger = build_bundle_engine(orin_bundle, device=ORIN, workspace_mb=2048)
    assert _builds(stub) == 5 and stub.config._pools["WORKSPACE"] == 2048 << 20 and bigger != engine
    # Another Jetson module with the same compute capability (Orin NX vs AGX): its own engine.
    nx = build_bundle_engine(orin_bundle, device=DeviceInfo("10.3.0", "8.7", "Orin", 8))
    assert _builds(stub) == 6 and nx not in (engine, other_cc, other_trt, bigger)
    # DLA with a Q/DQ INT8 bundle: refused before any build (TensorRT 10's DLA takes no Q/DQ).
    with pytest.raises(ValueError, match="Q/DQ.*DLA"):
        build_bundle_engine(orin_bundle, device=ORIN, dla_core=1)
    # The islands preset is part of the key.
    build_bundle_engine(orin_bundle, device=ORIN, fp32_layers="no-softmax")
    assert _builds(stub) == 7
    # A stale engine under our key (e.g. copied in from another device): never loaded, rebuilt.
    engine.write_bytes(b"FAKE-ENGINE from somewhere else")
    assert build_bundle_engine(orin_bundle, device=ORIN) == engine
    assert _builds(stub) == 8 and find_cached_engine(bundle.engines_dir, key) == engine
    # Timing cache: written after the build.
    cache = tmp_path / "timing.cache"
    build_bundle_engine(orin_bundle, device=ORIN, timing_cache=cache, force=True)
    assert cache.read_bytes().startswith(b"timing-cache-v2:")


def test_cli_reuses_and_force_rebuilds(orin, stub, monkeypatch, capsys):
    orin_bundle = orin
    from edge_ad.cli.main import main

    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_cudart(8, 7))  # stub CUDA: Orin, sm_87
    assert main(["build-engine", str(orin_bundle)]) == 0
    first = capsys.readouterr().out
    builds = _builds(stub)
    assert main(["build-engine", str(orin_bundle)]) == 0
    assert "reused cached engine" in capsys.readouterr().out and _builds(stub) == builds
    assert main(["build-engine", str(orin_bundle), "--force", "--workspace-mb", "1024"]) == 0
    assert capsys.readouterr().out.startswith("built engine") and _builds(stub) == builds + 1
    assert first.split(": ", 1)[1] == f"{load_bundle(orin_bundle).engines_dir}/{first.split('/')[-1]}"
    # A compute capability change (another GPU) -> a different key -> built.
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_cudart(8, 6))
    assert main(["build-engine", str(orin_bundle)]) == 0
    assert capsys.readouterr().out.startswith("built engine") and _builds(stub) == builds + 2
    # Same 8.7, another module (SM count): built, not reused.
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", _fake_cudart(8, 7, "Orin", 8))
    assert main(["build-engine", str(orin_bundle)]) == 0
    assert capsys.readouterr().out.startswith("built engine") and _builds(stub) == builds + 3
    assert main(["build-engine", str(orin_bundle), "--fp32-layers", "no-softmax"]) == 0
    assert capsys.readouterr().out.startswith("built engine") and _builds(stub) == builds + 4
    assert main(["build-engine", str(orin_bundle), "--dla-core", "0"]) == 2
    assert "Q/DQ" in capsys.readouterr().err


def test_refuses_non_tensorrt_bundles_and_dla_without_dla(knn_run, orin_bundle, monkeypatch, tmp_path, capsys):
    """The refusals come before TensorRT is used: one surface is enough."""
    from edge_ad.cli.main import main

    stub = FakeTensorRT("10.3")
    monkeypatch.setitem(sys.modules, "tensorrt", stub.module)

    onnx_cpu = convert(knn_run, "onnx-cpu", tmp_path / "cpu", precision="fp32", calib_count=8, progress=False)
    with pytest.raises(ValueError, match=r"engine 'onnxruntime' \(target 'onnx-cpu'\), not TensorRT"):
        build_bundle_engine(onnx_cpu, device=ORIN)
    assert main(["build-engine", str(onnx_cpu)]) == 2
    assert "onnx-cpu" in capsys.readouterr().err
    assert _builds(stub) == 0 and not (onnx_cpu / "engines").exists()
    x86 = convert(knn_run, "x86-tensorrt", tmp_path / "x86", precision="fp16", calib_count=8, progress=False)
    with pytest.raises(ValueError, match="target 'x86-tensorrt' has no DLA"):
        build_bundle_engine(x86, device=ORIN, dla_core=0)
    with pytest.raises(FileNotFoundError):
        build_bundle_engine(tmp_path / "nope", device=ORIN)


def test_cli_without_tensorrt_and_without_torch(orin_bundle):
    """On a Jetson without TensorRT (and without torch): exit 2 and the install hint on stderr."""
    result = run_without_torch(f"""
        import sys
        sys.modules["tensorrt"] = None  # `import tensorrt` fails, as when it is not installed
        from edge_ad.cli.main import main
        code = main(["build-engine", {str(orin_bundle)!r}])
        assert "torch" not in sys.modules, "build-engine imported torch"
        sys.exit(code)
    """)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"edge-ad build-engine: error: {TENSORRT_MISSING}"
