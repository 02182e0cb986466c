"""The targets registry and ``edge-ad targets``."""
from __future__ import annotations

import json

import pytest

from edge_ad.converters import targets as converter_targets
from edge_ad.runtime import targets as rt_targets
from edge_ad.runtime.targets import Target, UnknownTargetError, get_target, list_targets, register_target

from torch_blocker import run_without_torch

BUILTIN = ["jetson-orin", "jetson-xavier", "x86-tensorrt", "intel-cpu", "intel-gpu", "intel-npu", "onnx-cpu"]


@pytest.fixture()
def clean_registry(monkeypatch):
    monkeypatch.setattr(rt_targets, "_REGISTRY", dict(rt_targets._REGISTRY))


def test_builtin_targets():
    assert list_targets() == BUILTIN
    orin, xavier, x86 = get_target("jetson-orin"), get_target("jetson-xavier"), get_target("x86-tensorrt")
    for t in (orin, xavier, x86):
        assert t.engine == "tensorrt" and t.default_precision == "fp16" and "int8" in t.precisions
        assert t.engine_hints("fp16") == {}
    assert orin.dla and xavier.dla and not x86.dla
    assert orin.compute_capability == (8, 7)
    for name, device, hint in (("intel-cpu", "CPU", "f32"), ("intel-gpu", "GPU", "f16"), ("intel-npu", "NPU", "f16")):
        t = get_target(name)
        assert (t.engine, t.device, t.openvino_hint) == ("openvino", device, hint)
        assert t.engine_hints("int8") == {"INFERENCE_PRECISION_HINT": hint}
    # fp32 always computes in f32; fp16 / int8 use the device's float type: f32 on CPU (an FP16 IR
    # only compresses weights there, and the pinned hint stops silent bf16), f16 on GPU / NPU.
    assert get_target("intel-gpu").engine_hints("fp32") == {"INFERENCE_PRECISION_HINT": "f32"}
    assert get_target("intel-gpu").engine_hints("fp16") == {"INFERENCE_PRECISION_HINT": "f16"}
    assert get_target("intel-cpu").engine_hints("fp16") == {"INFERENCE_PRECISION_HINT": "f32"}
    assert "fp32" not in get_target("intel-npu").precisions
    assert get_target("onnx-cpu").engine == "onnxruntime" and get_target("onnx-cpu").default_precision == "fp32"
    # converters see the very same registry
    assert converter_targets.get_target is get_target and converter_targets.Target is Target


def test_unknown_target_lists_names():
    with pytest.raises(KeyError) as info:
        get_target("jetson-nano")
    assert isinstance(info.value, UnknownTargetError) and isinstance(info.value, ValueError)
    assert str(info.value).startswith("unknown target 'jetson-nano'; registered targets: jetson-orin, jetson-xavier")


def test_precision_checks():
    with pytest.raises(ValueError, match=r"'fp32' is not available on target 'intel-npu' \(allowed: fp16, int8"):
        get_target("intel-npu").engine_hints("fp32")


def test_target_validation():
    with pytest.raises(ValueError, match="engine must be one of"):
        Target("x", "tflite", "CPU", ("fp32",), "fp32", "d")
    with pytest.raises(ValueError, match="default_precision 'fp16' is not in its precisions"):
        Target("x", "onnxruntime", "CPU", ("fp32",), "fp16", "d")
    with pytest.raises(ValueError, match="must pin openvino_hint"):
        Target("x", "openvino", "CPU", ("fp32",), "fp32", "d")
    with pytest.raises(ValueError, match="bf16"):  # the allowed hints are listed, bf16 is not among them
        Target("x", "openvino", "CPU", ("fp32",), "fp32", "d", openvino_hint="bf16")
    with pytest.raises(ValueError, match="dla=True needs the tensorrt engine"):
        Target("x", "onnxruntime", "CPU", ("fp32",), "fp32", "d", dla=True)
    with pytest.raises(ValueError, match="lower-case"):
        Target("Jetson Orin", "tensorrt", "GPU", ("fp16",), "fp16", "d")
    t = get_target("intel-cpu")
    with pytest.raises(AttributeError):
        t.engine = "tensorrt"  # frozen


def test_register_target_is_one_entry_and_bundles_accept_it(clean_registry):
    from edge_ad.runtime.bundle import BackboneInfo, EngineSpec, InputSpec, Manifest, OutputSpec

    custom = Target("rockchip-npu", "onnxruntime", "CPU", ("fp32", "int8"), "fp32", "RK3588 through onnxruntime")
    register_target(custom)
    assert list_targets()[-1] == "rockchip-npu" and get_target("rockchip-npu") is custom
    with pytest.raises(ValueError, match="already registered.*replace=True"):
        register_target(custom)
    register_target(custom, replace=True)
    m = Manifest(
        method="knn", backbone=BackboneInfo("efficientnet_lite0", (3,)), input=InputSpec(8, 8, (0, 0, 0), (1, 1, 1)),
        outputs=(OutputSpec("score", (1,)),), precision="fp32", target="rockchip-npu", engine=EngineSpec("onnxruntime"),
    )
    assert m.target_info is custom


def test_cli_targets_table_and_json(capsys):
    from edge_ad.cli.main import main

    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["target", "engine", "device"]
    for name in BUILTIN:
        assert any(line.startswith(name + " ") for line in lines), name
    orin = next(line for line in lines if line.startswith("jetson-orin "))
    assert "fp32,fp16*,int8" in orin and " yes " in orin
    cpu = next(line for line in lines if line.startswith("intel-cpu "))
    assert "fp32*,fp16,int8" in cpu and " f32 " in cpu
    assert "* = default precision" in out

    assert main(["targets", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == BUILTIN
    assert rows[3] == get_target("intel-cpu").to_dict()
    assert rows[0]["compute_capability"] == [8, 7]


def test_cli_targets_runs_without_torch():
    proc = run_without_torch(
        """
        from edge_ad.cli.main import main
        assert main(["targets"]) == 0
        import edge_ad.converters.targets
        assert "torch" not in sys.modules
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "intel-npu" in proc.stdout
