"""``benchmarks/reproduce.py`` runs each seed method's paper preset end to end (tiny random-init
settings, no weights) and prints the paper's figure beside ours."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO_ROOT
from test_avadino import clip_dir  # noqa: F401  (the tiny offline CLIP text model fixture)


def _script():
    spec = importlib.util.spec_from_file_location("reproduce", REPO_ROOT / "benchmarks" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["foundad", "anomalyvfm", "visualad", "avadino"])
def test_reproduce_runs_tiny_without_weights(method, real_root, tmp_path, capsys, clip_dir):  # noqa: F811
    script = _script()
    argv = [method, "--tiny", "--data", str(real_root), "--out", str(tmp_path / "runs"),
            "--json", str(tmp_path / "r.json"), "--device", "cpu"]
    if method == "avadino":
        argv += ["--text-model", str(clip_dir)]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    expected = script.TINY_TRAIN + script.TINY_EVAL if method == "foundad" else script.TINY_EVAL
    assert sorted(result["categories"]) == sorted(expected)
    for metrics in result["categories"].values():
        assert 0.0 <= metrics["pixel_auroc"] <= 1.0
    log = json.loads((tmp_path / "runs" / method / "train_log.json").read_text())
    assert log["preset"] == "paper" and log["fit"]["end_step"] == 2
    # The paper's figure is printed beside ours.
    paper = script.PAPER[method]["mvtec"]["image_auroc"]
    assert f"| image_auroc | {paper:.1f} | " in out and "TINY" in out
