"""The CPU budget: the engine's threads (read back from OpenVINO / onnxruntime), the stream's
preprocessing threads, the default policy, the numbers in stream stats / benchmark output, and bad
values refused (Python and CLI)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edge_ad.cli.main import main
from edge_ad.data import MVTecDataset
from edge_ad.runtime import Detector, read_image
from edge_ad.runtime import detector as detector_module
from edge_ad.runtime.benchmark import benchmark, format_report
from edge_ad.runtime.cpu_budget import plan_cpu_budget, usable_cores

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def frames(real_root):
    return [read_image(s.path, "bgr") for s in list(MVTecDataset(real_root, CATEGORY, "test"))[:6]]


def test_default_policy_and_explicit_budgets():
    # auto: a quarter of the cores (rounded down) is kept for the stream; the engine never gets < 1
    got = {c: (b.engine_threads, b.preprocess_threads, b.policy)
           for c in (1, 2, 3, 4, 8, 16) for b in [plan_cpu_budget(cores=c)]}
    assert got == {1: (1, 1, "auto"), 2: (2, 1, "auto"), 3: (3, 1, "auto"), 4: (3, 1, "auto"), 8: (6, 2, "auto"),
                   16: (12, 4, "auto")}
    b = plan_cpu_budget(3, cores=8)
    assert (b.engine_threads, b.preprocess_threads, b.policy) == (3, 5, "explicit")
    b = plan_cpu_budget(cpu_engine=False, cores=4)  # TensorRT / GPU: the engine keeps its own threads
    assert (b.engine_threads, b.policy) == (None, "engine")
    assert "4 cores" in plan_cpu_budget(cores=4).describe()


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_bad_engine_threads_are_refused(onnx_bundle, bad):
    with pytest.raises(ValueError, match="engine_threads must be None"):
        Detector.load(onnx_bundle, engine_threads=bad)


def test_more_threads_than_cores_and_off_cpu_engines_are_refused(onnx_bundle):
    with pytest.raises(ValueError, match=f"more than the {usable_cores()} cores"):
        Detector.load(onnx_bundle, engine_threads=usable_cores() + 1)
    with pytest.raises(ValueError, match="only applies to inference on the CPU"):
        plan_cpu_budget(1, cpu_engine=False, cores=4)
    # an onnxruntime bundle on CUDA: refused before any engine is built (this box has no CUDA)
    with pytest.raises(ValueError, match="only applies to inference on the CPU"):
        Detector.load(onnx_bundle, device="CUDA", engine_threads=1)


def test_openvino_compiled_model_gets_the_budget(ov_bundle):
    for n in sorted({1, usable_cores()}):
        det = Detector.load(ov_bundle, engine_threads=n)
        assert det.engine.compiled.get_property("INFERENCE_NUM_THREADS") == n
        assert str(det.engine.compiled.get_property("PERFORMANCE_HINT")) in ("LATENCY", "PerformanceMode.LATENCY")
        assert det.engine.threads == n and det.cpu_budget.engine_threads == n
    auto = Detector.load(ov_bundle)
    assert auto.engine.compiled.get_property("INFERENCE_NUM_THREADS") == plan_cpu_budget().engine_threads


def test_onnxruntime_session_gets_the_budget_and_results_are_unchanged(onnx_bundle, frames):
    one = Detector.load(onnx_bundle, engine_threads=1)
    assert one.engine.session.get_session_options().intra_op_num_threads == 1 and one.engine.threads == 1
    auto = Detector.load(onnx_bundle)
    assert auto.engine.session.get_session_options().intra_op_num_threads == plan_cpu_budget().engine_threads
    # one intra-op thread: onnxruntime has no worker for run_async, slots run inline; same results
    with one.stream(frames) as s:
        got = list(s)
    want = auto.predict_batch(frames)
    assert len(got) == len(frames)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.model_map, w.model_map, atol=1e-5)
        assert abs(g.score - w.score) < 1e-5
    assert s.stats.cpu_budget == {"cores": usable_cores(), "engine_threads": 1,
                                  "preprocess_threads": max(1, usable_cores() - 1), "policy": "explicit",
                                  "engine_reported": 1}


def test_stream_preprocessing_uses_the_budget_threads(onnx_bundle, frames, monkeypatch):
    det = Detector.load(onnx_bundle, engine_threads=1)
    seen = []
    real = detector_module.preprocess_batch

    def spy(*args, **kwargs):
        seen.append(kwargs.get("num_threads"))
        return real(*args, **kwargs)

    monkeypatch.setattr(detector_module, "preprocess_batch", spy)
    with det.stream(frames[:3]) as s:
        assert len(list(s)) == 3
    assert seen == [det.cpu_budget.preprocess_threads] * 3
    seen.clear()
    det.predict(frames[0])  # predict's preprocessing never overlaps inference: automatic threads
    assert seen == [0]


def test_benchmark_reports_the_budget_and_cli_checks_it(onnx_bundle, tmp_path, capsys):
    rep = benchmark(onnx_bundle, warmup=1, iterations=30, frame_size=(96, 128), progress=False, engine_threads=1)
    assert rep["cpu_budget"]["engine_threads"] == 1 and rep["cpu_budget"]["engine_reported"] == 1
    assert "cpu budget" in format_report(rep) and "engine 1 thread," in format_report(rep)
    assert rep["decode_scales"] == [1] and "decoded at" not in format_report(rep)  # synthetic frames
    with pytest.raises(ValueError, match="engine_threads is set when a detector is loaded"):
        benchmark(Detector.load(onnx_bundle), warmup=1, iterations=30, progress=False, engine_threads=1)
    path = tmp_path / "b.json"
    assert main(["benchmark", str(onnx_bundle), "--warmup", "1", "--iterations", "30", "--frame-size", "96x128",
                 "--engine-threads", "auto", "--json", str(path)]) == 0
    assert json.loads(path.read_text())["cpu_budget"]["policy"] == "auto"
    assert "cpu budget" in capsys.readouterr().out
    for bad, why in (("0", "engine_threads must be None"), ("two", "expected 'auto' or a number"),
                     (str(usable_cores() + 1), "more than the")):
        with pytest.raises(SystemExit):
            main(["benchmark", str(onnx_bundle), "--engine-threads", bad])
        assert why in capsys.readouterr().err
        with pytest.raises(SystemExit):
            main(["run", str(onnx_bundle), "--source", str(tmp_path), "--engine-threads", bad])
        assert why in capsys.readouterr().err
