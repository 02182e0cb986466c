"""`edge-ad run` / `edge-ad benchmark` on a tiny real bundle (JSONL / JSON keys, torch-free), device facts
from fake Jetson files, and the video_to_jsonl example on a tiny video."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from edge_ad.cli.main import main
from edge_ad.runtime import Detector, read_image
from edge_ad.runtime.benchmark import device_facts, format_report
from torch_blocker import run_without_torch

CATEGORY = "mvtec_hazelnut_256"
RECORD_KEYS = {"frame_index", "capture_time", "capture_wall_time", "source", "score", "is_anomalous", "regions", "roi",
               "decode_scale", "timings"}
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(onnx_bundle):
    return onnx_bundle


@pytest.fixture(scope="module")
def video(real_root, tmp_path_factory):
    """8 real test images (good and defective) as an MJPG video."""
    paths = sorted((real_root / CATEGORY / "test").glob("*/*.png"))[:8]
    frames = [read_image(p, "bgr") for p in paths]
    path = tmp_path_factory.mktemp("cli_v") / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, frames[0].shape[1::-1])
    for f in frames:
        writer.write(f)
    writer.release()
    return path


def _decoded(video):
    cap = cv2.VideoCapture(str(video))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    return frames


def _check_jsonl(path, n, source):
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    records, final = lines[:-1], lines[-1]
    assert len(records) == n
    for i, r in enumerate(records):
        assert set(r) == RECORD_KEYS and r["frame_index"] == i and r["source"] == source
        assert set(r["timings"]) == {"capture", "preprocess", "infer", "postprocess", "capture_to_decision"}
        assert isinstance(r["is_anomalous"], bool) and isinstance(r["regions"], list)
        for reg in r["regions"]:
            assert set(reg) == {"x", "y", "w", "h", "area_px", "peak"}
    stats = final["stats"]
    assert stats["captured"] == stats["delivered"] == n and stats["dropped_total"] == 0
    return records


def test_run_writes_jsonl_and_overlay_video(bundle, video, tmp_path):
    out, saved = tmp_path / "r.jsonl", tmp_path / "overlay.avi"
    rc = main(["run", str(bundle), "--source", str(video), "--jsonl", str(out), "--save", str(saved),
               "--no-progress"])
    assert rc == 0
    records = _check_jsonl(out, 8, str(video))
    det = Detector.load(bundle)
    for r, f in zip(records, _decoded(video)):  # the JSONL scores are the detector's on the decoded frames
        ref = det.predict(f)
        assert r["score"] == pytest.approx(ref.score, abs=1e-6) and r["is_anomalous"] == ref.is_anomalous
        assert len(r["regions"]) == len(ref.regions)
    assert any(r["is_anomalous"] for r in records)
    overlay = _decoded(saved)
    assert len(overlay) == 8 and overlay[0].shape == (256, 256, 3)
    assert np.abs(overlay[0].astype(int) - _decoded(video)[0].astype(int)).mean() > 1  # something was drawn
    # --max-frames and a bad source
    rc = main(["run", str(bundle), "--source", str(video), "--jsonl", str(out), "--max-frames", "3", "--no-progress"])
    assert rc == 0 and len(out.read_text().splitlines()) == 4
    assert main(["run", str(bundle), "--source", str(tmp_path / "nope.mp4"), "--no-progress"]) == 2


def test_run_is_torch_free(bundle, video, tmp_path):
    out = tmp_path / "t.jsonl"
    proc = run_without_torch(
        f"""
        from edge_ad.cli.main import main
        assert main(["run", {str(bundle)!r}, "--source", {str(video)!r}, "--jsonl", {str(out)!r},
                     "--no-progress"]) == 0
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    _check_jsonl(out, 8, str(video))


def test_benchmark_json_and_table(bundle, video, tmp_path, capsys):
    path = tmp_path / "b.json"
    rc = main(["benchmark", str(bundle), "--warmup", "2", "--iterations", "40", "--json", str(path),
               "--frame-size", "120x160"])
    assert rc == 0
    rep = json.loads(path.read_text())
    for key in ("engine_fps", "end_to_end_fps", "stream_vs_engine", "capture_to_decision_p99_ms", "peak_rss_mb",
                "dropped", "skipped", "engine", "engine_version", "precision", "target", "device_facts", "stages"):
        assert key in rep, key
    assert set(rep["stages"]) == {"capture", "preprocess", "infer", "postprocess", "capture_to_decision"}
    assert all(set(v) == {"p50", "p95", "p99"} and v["p50"] <= v["p95"] <= v["p99"] for v in rep["stages"].values())
    assert rep["engine_fps"] > 0 and rep["end_to_end_fps"] > 0 and rep["peak_rss_mb"] > 10
    assert rep["frames"] == 40 and rep["captured"] == 42 and rep["engine"] == "onnxruntime"
    table = capsys.readouterr().out
    assert "end_to_end_fps" in table and "engine_fps" in table and "p99 ms" in table
    # a real source: the 8-frame video is cycled to reach warmup + iterations, lossless
    rep = json.loads(json.dumps(__import__("edge_ad.runtime.benchmark", fromlist=["x"]).benchmark(
        bundle, str(video), warmup=2, iterations=20, progress=False)))
    assert rep["captured"] == 22 and rep["frames"] == 20 and rep["mode"] == "lossless"
    # ... and 20 measured frames are below the floor: no FPS figure from them
    assert rep["end_to_end_fps"] is None and rep["stream_vs_engine"] is None
    assert "only 20 measured frames" in format_report(rep)


def _write(root, rel, text):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_device_facts_from_fake_jetson_files(tmp_path):
    root = tmp_path / "orin"
    _write(root, "proc/cpuinfo", "processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nFeatures\t: asimd\n")
    _write(root, "proc/device-tree/model", "NVIDIA Jetson AGX Orin Developer Kit\x00")
    _write(root, "var/lib/nvpmodel/status", "pmode:0002 fmode:fanNull\n")
    _write(root, "etc/nvpmodel.conf", "< POWER_MODEL ID=0 NAME=MAXN >\nCPU_ONLINE CORE_0 1\n"
                                      "< POWER_MODEL ID=2 NAME=30W >\nCPU_ONLINE CORE_0 1\n")
    for cpu in (0, 1):
        _write(root, f"sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_min_freq", "2201600\n")
        _write(root, f"sys/devices/system/cpu/cpu{cpu}/cpufreq/scaling_max_freq", "2201600\n")
    facts = device_facts(root)
    assert facts["cpu"] == "ARMv8 Processor rev 1 (v8l)"
    assert facts["jetson_model"] == "NVIDIA Jetson AGX Orin Developer Kit"
    assert facts["nvpmodel"] == "mode 2 (30W)" and facts["clocks"] == "pinned" and facts["gpu"] is None
    _write(root, "sys/devices/system/cpu/cpu1/cpufreq/scaling_min_freq", "115200\n")
    assert device_facts(root)["clocks"] == "dynamic"
    _write(root, "proc/driver/nvidia/gpus/0000:01:00.0/information", "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ: 1\n")
    assert device_facts(root)["gpu"] == "NVIDIA H100 80GB HBM3"
    empty = device_facts(tmp_path / "nothing")
    assert empty["jetson_model"] is None and empty["nvpmodel"] is None and empty["clocks"] is None
    report = {"bundle": "b", "engine": "tensorrt", "engine_version": "10.3", "device": "GPU", "precision": "fp16",
              "target": "jetson-orin", "input": "256x256", "device_facts": device_facts(root),
              "source": "s", "mode": "line-speed",
              "frames": 1, "stages": {"infer": {"p50": 1.0, "p95": 2.0, "p99": 3.0}}, "engine_fps": 100.0,
              "end_to_end_fps": 95.0, "stream_vs_engine": 0.95, "capture_to_decision_p99_ms": 9.0, "captured": 1,
              "delivered": 1, "dropped": {}, "skipped": {}, "peak_rss_mb": 50.0}
    text = format_report(report)
    assert "NVIDIA Jetson AGX Orin Developer Kit, power mode 2 (30W), clocks dynamic" in text
    assert "95 % of engine" in text


def test_video_to_jsonl_example(bundle, video, tmp_path):
    out = tmp_path / "ex.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "video_to_jsonl.py"), str(bundle), str(video),
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    _check_jsonl(out, 8, str(video))
    assert "8 frames" in proc.stderr
    for name in ("camera_loop.py", "jetson_gstreamer.py", "video_to_jsonl.py"):
        help_ = subprocess.run([sys.executable, str(REPO / "examples" / name), "--help"], capture_output=True,
                               text=True, timeout=60)
        assert help_.returncode == 0 and "usage" in help_.stdout
