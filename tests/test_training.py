"""Training entry point: few-shot fit, checkpoint + resume, DDP under torchrun, evaluation, CLI errors."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edge_ad.evaluation import REPORT_METRICS, evaluate
from edge_ad.methods import load_detector
from edge_ad.training import train

# A tiny random-init DINOv3 (the real architecture, LayerScale 1.0 so blocks are not identities).
TINY_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2, "init_values": 1.0}
TINY_FOUNDAD = {"projector_dim": 32, "projector_depth": 2, "projector_heads": 2, "top_k": 3}
CATEGORY = "mvtec_hazelnut_256"


def _tiny_train(real_root: Path, out: Path, steps: int, **kwargs):
    return train("foundad", "dinov3_vits16", real_root, CATEGORY, out, shots=2, pretrained=False, image_size=32,
                 layers=[1], steps=steps, batch_size=2, seed=3, device="cpu", progress=False,
                 backbone_overrides=TINY_VIT, method_options=TINY_FOUNDAD, **kwargs)


def _projector(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(run / "model.safetensors").items() if k.startswith("projector.")}


def test_resume_reproduces_an_uninterrupted_run(real_root, tmp_path):
    straight = _tiny_train(real_root, tmp_path / "straight", steps=6)
    # "Interrupted" run: 3 steps, then resumed to 6 from train_state.pt.
    _tiny_train(real_root, tmp_path / "resumed", steps=3)
    state = torch.load(tmp_path / "resumed" / "train_state.pt", weights_only=True)
    assert state["step"] == 3
    resumed = _tiny_train(real_root, tmp_path / "resumed", steps=6, resume=True)
    a, b = _projector(straight), _projector(resumed)
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    # ...and training really changed the projector (the comparison above is not vacuous).
    fresh = _tiny_train(real_root, tmp_path / "fresh", steps=1)
    assert any(not torch.allclose(a[k], _projector(fresh)[k]) for k in a)
    log = json.loads((straight / "train_log.json").read_text())
    assert log["shots"] == 2 and len(log["images"]) == 2 and log["fit"]["end_step"] == 6
    # feature_norm="channel" (default): token statistics fitted on the two shots before training,
    # saved with the projector and re-fitted identically on resume.
    det = load_detector(straight)
    assert log["feature_norm"]["tokens"] == 2 * det.num_patches
    stats = {k: v for k, v in load_file(straight / "model.safetensors").items() if k.startswith("feature_")}
    assert set(stats) == {"feature_mean", "feature_std"} and stats["feature_mean"].abs().sum() > 0
    for k, v in load_file(resumed / "model.safetensors").items():
        if k in stats:
            torch.testing.assert_close(v, stats[k])


def test_refuses_to_overwrite_and_to_resume_nothing(real_root, tmp_path):
    run = _tiny_train(real_root, tmp_path / "run", steps=1)
    with pytest.raises(FileExistsError, match="already holds a trained run"):
        _tiny_train(real_root, run, steps=1)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        _tiny_train(real_root, tmp_path / "nothing", steps=2, resume=True)


def test_knn_fit_and_evaluate_report(real_root, tmp_path):
    run = train("knn", "dinov3_vits16", real_root, CATEGORY, tmp_path / "knn", shots=2, pretrained=False,
                image_size=32, layers=[1], seed=0, device="cpu", progress=False, backbone_overrides=TINY_VIT)
    detector = load_detector(run)
    assert detector.bank_size > 0
    report = evaluate(run, real_root, CATEGORY, json_path=tmp_path / "r.json", out=tmp_path / "eval", device="cpu",
                      overlays=2, progress=False)
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert set(REPORT_METRICS) <= set(on_disk["metrics"])
    assert all(0.0 <= on_disk["metrics"][k] <= 1.0 for k in REPORT_METRICS)
    assert on_disk["num_images"] == 10 and on_disk["num_anomalous"] == 8
    overlays = sorted((tmp_path / "eval" / "overlays").glob("*.png"))
    assert len(overlays) == 4 and report["overlays"]
    from edge_ad.runtime import read_image

    assert read_image(overlays[0]).shape == (256, 256, 3)  # drawn at the original image size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_under_torchrun_with_two_cpu_processes(real_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "edge_ad", "train", "--method", "foundad",
           "--backbone", "dinov3_vits16", "--random-init", "--image-size", "32", "--layers", "1",
           "--data", str(real_root), "--category", CATEGORY, "--shots", "2", "--steps", "4", "--batch-size", "2",
           "--device", "cpu", "--out", str(out)]
    for k, v in {**TINY_VIT, **TINY_FOUNDAD}.items():
        cmd += (["--backbone-arg"] if k in TINY_VIT else ["--set"]) + [f"{k}={v}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    assert log["world_size"] == 2
    detector = load_detector(out)
    x = torch.zeros(1, 3, 32, 32)
    assert torch.isfinite(detector(x).score).all()


def test_cli_errors_are_clear(real_root, tmp_path, capsys):
    from edge_ad.cli.main import main

    assert main(["train", "--method", "foundad", "--backbone", "efficientnet_lite0", "--data", str(real_root),
                 "--category", "no_such_category", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no_such_category" in err and "mvtec_hazelnut_256" in err  # names the categories that exist
    assert main(["train", "--method", "nope", "--backbone", "efficientnet_lite0", "--data", str(real_root),
                 "--category", CATEGORY, "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "foundad" in err  # lists the registered methods
    assert main(["evaluate", str(tmp_path / "missing_run"), "--data", str(real_root), "--category", CATEGORY]) == 2
    assert "missing_run" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # nothing half-written
