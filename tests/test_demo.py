"""The demo end to end on the generated fallback dataset (the path a machine without shared/ takes)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge_ad.data import MVTecDataset
from edge_ad.data.synthetic import CATEGORY, make_synthetic_dataset
from edge_ad.demo import demo


def test_synthetic_dataset_is_valid_mvtec_layout(tmp_path):
    root = make_synthetic_dataset(tmp_path, size=64, num_train=4, num_test_per_type=2, seed=1)
    test = MVTecDataset(root, CATEGORY, split="test")
    assert len(MVTecDataset(root, CATEGORY, split="train")) == 4 and len(test) == 6
    for sample in test:
        assert sample.mask.any() == (sample.label == 1)
        if sample.label:  # the mask covers exactly the drawn defect colour
            assert np.abs(sample.image[sample.mask].astype(int) - sample.image[~sample.mask].mean((0))).mean() > 20


def test_demo_writes_report_on_generated_data(tmp_path):
    root = make_synthetic_dataset(tmp_path / "data", size=128, num_train=8, num_test_per_type=3, seed=0)
    result = demo(root, tmp_path / "out", categories=[CATEGORY], image_size=128, shots=4, steps=3, device="cpu",
                  benchmark_iterations=30, progress=False)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["method"] for r in report["runs"]] == ["foundad", "knn"] == [r["method"] for r in result["runs"]]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"{CATEGORY} / foundad" in md and f"{CATEGORY} / knn" in md
    for run in report["runs"]:
        assert set(run["metrics"]) >= {"image_auroc", "pixel_auroc", "aupro", "pixel_f1_max"}
        assert run["overlays"] and all(Path(p).is_file() for p in run["overlays"])
    # The spots and scratches are blatant: even 3 FoundAD steps on real ImageNet weights must rank
    # them above chance with knn (which needs no training).
    knn = next(r for r in report["runs"] if r["method"] == "knn")
    assert knn["metrics"]["pixel_auroc"] > 0.8

    # Deployment: INT8 bundle, every test image streamed through the runtime, benchmark table.
    dep = report["deployment"]
    assert Path(dep["bundle"]).is_dir()
    lines = [json.loads(x) for x in (tmp_path / "out" / "deploy" / "results.jsonl").read_text().splitlines()]
    test = MVTecDataset(root, CATEGORY, split="test")
    assert [r["frame_index"] for r in lines] == list(range(len(test)))
    assert [r["label"] for r in lines] == [int(r.label) for r in test.records]
    assert dep["verdicts"]["correct"] == sum(r["is_anomalous"] == bool(r["label"]) for r in lines)
    bench = json.loads((tmp_path / "out" / "deploy" / "benchmark.json").read_text())
    assert bench["engine"] == "openvino" and bench["precision"] == "int8" and bench["end_to_end_fps"] > 0
    assert "end_to_end_fps" in md and "Deployment" in md
    assert "dtype=uint8" not in md and bench["source"] == "list of 50 frames"  # 20 warm-up + 30 measured: named, not printed
