"""`edge_ad.converters.distill` / `edge-ad distill`: teacher run -> student run, end to end.

Teacher: knn on the ``dinov3_vitl16`` registry entry (ViT-L/16 patching, DINOv3 prefix tokens and
preprocessing) shrunk to depth 2, width 64, random init, at 64 px, on 4 real hazelnut shots.
Student: ``dinov3_vits16`` shrunk the same way at 48 px (a different, coarser grid: 3x3 vs 4x4).
Also: the ``--min-retained`` gate through the real CLI (exit 3 below the floor, run kept), and
FoundAD / AnomalyVFM teachers on a tiny random ViT (structure only).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_ad.converters.distill import DISTILL_FIDELITY_FILE, distill
from edge_ad.converters.fidelity import FidelityReport
from edge_ad.methods import load_detector
from edge_ad.methods.checkpoint import load_checkpoint_config

CATEGORY = "mvtec_hazelnut_256"
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2, "init_values": 1.0}
STUDENT = {"student_pretrained": False, "student_overrides": TINY, "image_size": 48, "layers": [1],
           "batch_size": 4, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def teacher_run(real_root, tmp_path_factory):
    from edge_ad.training import train

    out = tmp_path_factory.mktemp("distill") / "teacher"
    return train("knn", "dinov3_vitl16", real_root, CATEGORY, out, shots=4, pretrained=False, image_size=64,
                 layers=[1], backbone_overrides=TINY, device="cpu", progress=False)


@pytest.fixture(scope="module")
def student_run(teacher_run, real_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("distill") / "student"
    return distill(teacher_run, "dinov3_vits16", real_root, CATEGORY, out, steps=40, **STUDENT)


def test_student_is_an_ordinary_run_that_learned_the_teacher(student_run, teacher_run, real_root):
    doc = load_checkpoint_config(student_run)
    assert doc["method"] == "student" and doc["backbone"]["name"] == "dinov3_vits16"
    teacher_doc = load_checkpoint_config(teacher_run)
    assert teacher_doc["backbone"]["name"] == "dinov3_vitl16"
    # Provenance: the teacher's path and the hash of its config are recorded with the student.
    import hashlib

    prov = doc["config"]["teacher"]
    assert prov["method"] == "knn" and prov["image_size"] == [64, 64]
    assert prov["config_sha256"] == hashlib.sha256((teacher_run / "config.yaml").read_bytes()).hexdigest()
    log = json.loads((student_run / "train_log.json").read_text())
    assert log["teacher"] == prov and log["kind"] == "distillation"
    losses = [loss for _, loss in log["fit"]["losses"]]
    # The default (bank) student learns its gain / offset and score head: observed 2.08 -> 1.71
    # (z-units MSE, deterministic step-seeded batches) on this tiny random-init pair; the
    # real-weights runs (benchmarks/bench_distill.py) measure fidelity properly.
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0], losses
    assert doc["config"]["map_head"] == "bank" and doc["config"]["head_depth"] == 0
    # distill learns from every good training image (not only the teacher's shots): 3x3 patches
    # each, fewer than the 1000-entry cap, so the bank keeps them all.
    num_good = len(list((real_root / CATEGORY / "train" / "good").iterdir()))
    assert doc["config"]["bank_size"] == num_good * 9

    student = load_detector(student_run)
    teacher = load_detector(teacher_run)
    assert student.image_size == (48, 48) and student.grid_size == (3, 3)
    assert student.normalizer.fitted  # normalised on good images like any run
    # Raw outputs are in the teacher's units (its good-image map spread is the student's z unit).
    assert float(student.target_map_scale) == pytest.approx(float(teacher.normalizer.map_scale))

    # Fidelity report: same schema as the conversion report, teacher = reference.
    report = FidelityReport.load(student_run / DISTILL_FIDELITY_FILE)
    assert report.reference == "teacher-knn-pytorch" and report.format == "student-pytorch"
    assert report.num_images == 10 and report.num_anomalous == 8
    assert {"image_auroc", "pixel_auroc"} <= set(report.metrics)
    pix = report.metrics["pixel_auroc"]
    assert pix["delta"] == pytest.approx(pix["candidate"] - pix["reference"])
    # The student's maps follow the teacher's on unseen test images (observed r = 0.32 with random
    # features and 40 steps; a student that ignored the teacher would sit near 0).
    assert report.map["pearson_r"] > 0.1, report.table()


def test_student_evaluates_converts_to_int8_and_runs_in_detector(student_run, real_root, tmp_path):
    from edge_ad.converters.convert import convert
    from edge_ad.data import MVTecDataset
    from edge_ad.evaluation import evaluate
    from edge_ad.runtime import Detector, load_bundle, preprocess_batch

    rep = evaluate(student_run, real_root, CATEGORY, out=tmp_path / "eval", device="cpu", overlays=0, progress=False)
    assert 0.0 <= rep["metrics"]["pixel_auroc"] <= 1.0 and rep["num_images"] == 10

    bundle_path = convert(student_run, "intel-cpu", tmp_path / "bundle", precision="int8",
                          calib=real_root / CATEGORY, calib_count=8, progress=False)
    bundle = load_bundle(bundle_path)
    assert (bundle.manifest.target, bundle.manifest.precision) == ("intel-cpu", "int8")
    det = Detector.load(bundle_path, regions=False)
    sample = MVTecDataset(real_root, CATEGORY, "test")[0]
    result = det.predict(np.ascontiguousarray(sample.image[..., ::-1]))  # BGR frame, any size
    assert np.isfinite(result.score)
    # INT8 runtime output tracks the PyTorch student on the same frame.
    student = load_detector(student_run)
    x = torch.from_numpy(preprocess_batch([sample.image], student.preprocess_spec, color_order="rgb"))
    with torch.no_grad():
        ref = student(x)
    assert abs(float(result.score) - float(ref.score[0])) < 0.5 * max(1.0, abs(float(ref.score[0])))


def test_resume_reproduces_an_uninterrupted_run(teacher_run, real_root, tmp_path, monkeypatch):
    """Also covers the cached synthetic pool (teacher run once per pool sample, not per step)."""
    import edge_ad.methods.student as student_pkg

    pool = {"student_options": {"synthetic_pool": 8}}
    full = distill(teacher_run, "dinov3_vits16", real_root, CATEGORY, tmp_path / "full", steps=12,
                   fidelity=False, **pool, **STUDENT)

    real_loss = student_pkg.loss_fn
    calls = {"n": 0}

    def interrupted(model, batch):
        calls["n"] += 1
        if calls["n"] > 11:  # crash during step 12, after the step-10 checkpoint
            raise RuntimeError("simulated crash")
        return real_loss(model, batch)

    monkeypatch.setattr(student_pkg, "loss_fn", interrupted)
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(teacher_run, "dinov3_vits16", real_root, CATEGORY, tmp_path / "resumed", steps=12,
                fidelity=False, **pool, **STUDENT)
    monkeypatch.setattr(student_pkg, "loss_fn", real_loss)
    assert (tmp_path / "resumed" / "train_state.pt").is_file()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = distill(teacher_run, "dinov3_vits16", real_root, CATEGORY, tmp_path / "resumed", steps=12,
                      fidelity=False, resume=True, **pool, **STUDENT)
    assert load_checkpoint_config(resumed)["config"]["synthetic_pool"] == 8
    a, b = load_detector(full).state_dict(), load_detector(resumed).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    log = json.loads((resumed / "train_log.json").read_text())
    assert log["fit"]["start_step"] == 10 and log["fit"]["end_step"] == 12


def test_bad_inputs_fail_with_clear_errors(teacher_run, real_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher run directory .* not found"):
        distill(tmp_path / "no_run", "dinov3_vits16", real_root, CATEGORY, tmp_path / "s1")
    with pytest.raises(KeyError, match="unknown student backbone 'resnet_9000'.*efficientnet_lite0"):
        distill(teacher_run, "resnet_9000", real_root, CATEGORY, tmp_path / "s2")
    with pytest.raises(FileNotFoundError, match="category 'no_such_cat' not found.*mvtec_hazelnut_256"):
        distill(teacher_run, "dinov3_vits16", real_root, "no_such_cat", tmp_path / "s3")
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        distill(teacher_run, "dinov3_vits16", real_root, CATEGORY, tmp_path / "s4", resume=True)
    with pytest.raises(ValueError, match="unknown or derived student options .'head_width'.*head_dim"):
        distill(teacher_run, "dinov3_vits16", real_root, CATEGORY, tmp_path / "s5", student_options={"head_width": 3})
    with pytest.raises(ValueError, match="must differ"):
        distill(teacher_run, "dinov3_vits16", real_root, CATEGORY, teacher_run)


def test_cli_reports_errors_without_traceback(tmp_path, real_root, capsys):
    from edge_ad.cli.main import main

    code = main(["distill", str(tmp_path / "missing"), "--student", "efficientnet_lite0", "--data", str(real_root),
                 "--category", CATEGORY, "--out", str(tmp_path / "out")])
    assert code == 2
    assert "teacher run directory" in capsys.readouterr().err


def _cli_distill(teacher_run, real_root, out, floor: str) -> int:
    """A real ``edge-ad distill`` call with the tiny random-init student (4 steps)."""
    from edge_ad.cli.main import main

    tiny = [a for k, v in TINY.items() for a in ("--backbone-arg", f"{k}={v}")]
    return main(["distill", str(teacher_run), "--student", "dinov3_vits16", "--random-init", *tiny,
                 "--image-size", "48", "--layers", "1", "--batch-size", "4", "--steps", "4", "--device", "cpu",
                 "--data", str(real_root), "--category", CATEGORY, "--out", str(out), "--min-retained", floor])


def test_cli_min_retained_gates_the_exit_status_and_keeps_the_run(teacher_run, real_root, tmp_path, capsys):
    # Floor above 1: the student would have to beat its teacher on every AUROC. The teacher's image
    # AUROC is 1.0 here (asserted below), so image retained <= 1 < 1.01 whatever the student does:
    # the gate must refuse, yet the run stays usable.
    code = _cli_distill(teacher_run, real_root, tmp_path / "below", "1.01")
    captured = capsys.readouterr()
    assert code == 3, captured.err
    reason = [line for line in captured.err.splitlines() if "below the floor" in line]
    assert len(reason) == 1 and "image_auroc" in reason[0] and "min_retained 1.01" in reason[0], captured.err
    assert "--steps" in reason[0] and "--image-size 64x64" in reason[0]  # names the fix
    assert "verdict: BELOW FLOOR 1.01" in captured.out
    student = load_detector(tmp_path / "below")  # nothing lost: a loadable student run
    assert student.image_size == (48, 48)
    verdict = FidelityReport.load(tmp_path / "below" / DISTILL_FIDELITY_FILE).extra["retained"]
    log = json.loads((tmp_path / "below" / "train_log.json").read_text())
    assert log["fidelity"]["retained"] == verdict
    img, pix = verdict["image_auroc"], verdict["pixel_auroc"]
    assert img["teacher"] == 1.0 and img["retained"] < 1.01
    assert verdict["ok"] is False and verdict["gated_on"] == ["image_auroc", "pixel_auroc"]
    assert verdict["min_retained"] == 1.01
    assert pix["retained"] == pytest.approx(pix["student"] / pix["teacher"])
    assert verdict["num_good"] == 2 and verdict["num_defective"] == 8

    code = _cli_distill(teacher_run, real_root, tmp_path / "ok", "0.0")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "verdict: ok (>= 0.0)" in captured.out and "student run written to" in captured.out
    assert FidelityReport.load(tmp_path / "ok" / DISTILL_FIDELITY_FILE).extra["retained"]["ok"] is True


def test_min_retained_without_a_report_fails_before_training(teacher_run, real_root, tmp_path):
    from edge_ad.converters.distill import DistillationBelowFloorError

    assert issubclass(DistillationBelowFloorError, RuntimeError)
    with pytest.raises(ValueError, match="min_retained needs the teacher-vs-student report"):
        distill(teacher_run, "dinov3_vits16", real_root, CATEGORY, tmp_path / "s", fidelity=False,
                min_retained=0.97, **STUDENT)
    with pytest.raises(ValueError, match="min_retained must be a fraction >= 0"):
        distill(teacher_run, "dinov3_vits16", real_root, CATEGORY, tmp_path / "s", min_retained=-1.0, **STUDENT)
    assert not (tmp_path / "s").exists()


FOUNDATION_TEACHERS = {
    "foundad": ([1], {"projector_dim": 32, "projector_depth": 2, "projector_heads": 2, "top_k": 3}),
    # AnomalyVFM reads its encoder through timm's forward_intermediates, not Backbone.forward: the
    # teacher-feature hook sees nothing there (this test caught it; distill falls back to one
    # extract_features pass).
    "anomalyvfm": (None, {"adapter_rank": 4, "upsample_channels": 32, "norm_groups": 8}),
}


@pytest.mark.parametrize("method", sorted(FOUNDATION_TEACHERS))
def test_foundation_teacher_on_a_tiny_vit_distils_into_an_exportable_student(method, real_root, tmp_path):
    """Structure only (random weights): a foundation-model method is a teacher like any run.

    Teacher: FoundAD / AnomalyVFM on a tiny random-init ``dinov3_vits16`` (LayerScale 1.0 so the
    blocks are not identities) at 64 px; student: a tiny ``dinov2_vits14`` (another patch size,
    4x4 grid) at 56 px, gated with ``min_retained=0.0`` so the verdict path runs too.
    """
    from edge_ad.converters.export import export_onnx
    from edge_ad.data import MVTecDataset
    from edge_ad.runtime import preprocess_batch
    from edge_ad.training import train

    tiny_vit = {"depth": 2, "embed_dim": 32, "num_heads": 2, "init_values": 1.0}
    layers, options = FOUNDATION_TEACHERS[method]
    teacher_run = train(method, "dinov3_vits16", real_root, CATEGORY, tmp_path / "teacher", shots=2,
                        pretrained=False, image_size=64, layers=layers, steps=4, batch_size=2, device="cpu",
                        progress=False, backbone_overrides=tiny_vit, method_options=options)
    # bank_space="teacher": the bank holds the teacher's features, so the adapter and the teacher's
    # feature capture (a hook, or AnomalyVFM's extra pass) are exercised.
    out = distill(teacher_run, "dinov2_vits14", real_root, CATEGORY, tmp_path / "student", steps=6,
                  student_pretrained=False, student_overrides=tiny_vit, image_size=56, layers=[1], batch_size=4,
                  device="cpu", progress=False, min_retained=0.0, student_options={"bank_space": "teacher"})
    doc = load_checkpoint_config(out)
    assert doc["method"] == "student" and doc["backbone"]["name"] == "dinov2_vits14"
    assert doc["config"]["teacher"]["method"] == method
    teacher = load_detector(teacher_run)
    student = load_detector(out)
    assert student.image_size == (56, 56) and student.grid_size == (4, 4)
    # The feature adapter targets the teacher's fused feature width; the bank holds teacher features.
    assert student.config.adapter_dim == teacher.feature_dim
    assert student.memory_bank.shape[1] == teacher.feature_dim and student.memory_bank.shape[0] > 0
    verdict = FidelityReport.load(out / DISTILL_FIDELITY_FILE).extra["retained"]
    assert verdict["ok"] is True and verdict["gated_on"] == ["image_auroc", "pixel_auroc"]

    images = [s.image for s in list(MVTecDataset(real_root, CATEGORY, "test"))[:2]]
    x = preprocess_batch(images, student.preprocess_spec, color_order="rgb")
    onnx_path = export_onnx(student, tmp_path / "student.onnx", validate_images=x)
    assert onnx_path.is_file() and onnx_path.stat().st_size > 0


def test_retained_verdict_needs_every_measurable_auroc_and_refuses_unmeasurable():
    from pathlib import Path

    from edge_ad.converters.distill import DistillationBelowFloorError, retained_fidelity

    def report(metrics, anomalous):
        return FidelityReport(reference="teacher", format="student-pytorch", precision="fp32", num_images=6,
                              num_anomalous=anomalous, input_size=(64, 64), map={"pearson_r": 0.5}, score={},
                              metrics=metrics)

    both = {"pixel_auroc": {"reference": 0.80, "candidate": 0.78, "delta": -0.02},
            "image_auroc": {"reference": 0.90, "candidate": 0.60, "delta": -0.30}}
    v = retained_fidelity(report(both, 3), 0.97, (448, 448))
    assert v["pixel_auroc"]["retained"] == pytest.approx(0.975) and v["image_auroc"]["retained"] == pytest.approx(2 / 3)
    assert v["ok"] is False  # pixel clears 0.97, image does not
    reason = str(DistillationBelowFloorError(Path("runs/s"), v))
    assert "image_auroc 66.7%" in reason and "pixel_auroc" not in reason and "--image-size 448x448" in reason
    assert retained_fidelity(report(both, 3), 0.6, (448, 448))["ok"] is True
    assert retained_fidelity(report(both, 3), None, (448, 448))["ok"] is None  # report only
    # Only good test images: nothing to measure, so a floor cannot be met (never a silent pass).
    empty = retained_fidelity(report({}, 0), 0.0, (448, 448))
    assert empty["ok"] is False and empty["gated_on"] == []
    assert "not verified" in str(DistillationBelowFloorError(Path("runs/s"), empty))


# ------------------------------------------------------------------ the bank head (default student)
def test_bank_student_computes_the_teacher_knn_when_its_adapter_is_exact(real_root):
    """The bank head *is* the teacher's knn function evaluated on predicted teacher features.

    Student and teacher share a backbone and input size, the adapter is the identity and the bank
    holds every good teacher patch (teacher coreset ratio 1): the student's patch distances must
    then equal the teacher's knn distances exactly (up to float rounding), with the same 3x3
    local aggregation. Breaking the aggregation, the bank or the distance breaks this.
    """
    from edge_ad.converters.distill import _set_student_bank
    from edge_ad.data import MVTecDataset
    from edge_ad.methods import BackboneSpec
    from edge_ad.methods.knn import KNNConfig, KNNDetector
    from edge_ad.methods.student import StudentConfig, StudentDetector
    from edge_ad.runtime import preprocess_batch

    torch.manual_seed(0)
    spec = BackboneSpec("dinov3_vits16", layers=(1,), img_size=(64, 64), pretrained=False, overrides=TINY)
    teacher = KNNDetector(KNNConfig(backbone=spec, coreset_ratio=1.0, smoothing_sigma=0.0)).eval()
    good = list(MVTecDataset(real_root, CATEGORY, "train"))[:3]
    x_good = torch.from_numpy(preprocess_batch([s.image for s in good], teacher.preprocess_spec, color_order="rgb"))
    teacher.fit(x_good, progress=False)

    cfg = StudentConfig(backbone=spec, map_head="bank", bank_space="teacher", head_depth=0, adapter_dim=teacher.feature_dim,
                        bank_size=10_000, smoothing_sigma=0.0)
    student = StudentDetector(cfg, backbone=teacher.backbone).eval()
    with torch.no_grad():
        student.adapter.weight.copy_(torch.eye(teacher.feature_dim)[:, :, None, None])
        student.adapter.bias.zero_()
        feats = student.aggregate(teacher.extract_features(x_good))
    _set_student_bank(student, feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1]), student.config, seed=0)
    assert student.memory_bank.shape[0] == teacher.bank_size == 3 * teacher.num_patches

    test = [s.image for s in list(MVTecDataset(real_root, CATEGORY, "test"))[:3]]
    x = torch.from_numpy(preprocess_batch(test, teacher.preprocess_spec, color_order="rgb"))
    with torch.no_grad():
        expected = teacher.patch_scores(x)
        got = student.bank_distance(student._zmap(x)[1])
    assert float(expected.abs().max()) > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_cached_student_features_give_the_same_loss_as_the_live_backbone(student_run, real_root):
    """distill caches the frozen backbone's features when its inputs are fixed: same loss, same grads."""
    from edge_ad.data import MVTecDataset
    from edge_ad.methods.student.loss import StudentBatch, distillation_loss
    from edge_ad.runtime import preprocess_batch

    student = load_detector(student_run)
    student.train()
    images = [s.image for s in list(MVTecDataset(real_root, CATEGORY, "test"))[:2]]
    x = torch.from_numpy(preprocess_batch(images, student.preprocess_spec, color_order="rgb"))
    with torch.no_grad():
        feats = student.extract_features(x)
        out = student(x, True)
    target_map = out.anomaly_map + 0.3
    kwargs = dict(target_score=out.score - 1.0, target_features=out.aligned.flip(0), map_scale=2.0, score_scale=3.0,
                  feature_loss="mse", feature_norm=5.0)
    losses, grads = [], []
    for cached in (None, feats):
        student.zero_grad()
        loss = distillation_loss(student, StudentBatch(x, target_map, student_features=cached, **kwargs))
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in student.trainable_parameters() if p.grad is not None]))
    assert losses[0] > 0 and losses[0] == pytest.approx(losses[1], rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="features must be"):
        student(x, True, feats[:, :1])


def test_bank_student_options_are_validated():
    from edge_ad.methods.student import StudentConfig

    with pytest.raises(ValueError, match="map_head"):
        StudentConfig(map_head="mlp")
    with pytest.raises(ValueError, match="feature_loss"):
        StudentConfig(feature_loss="l1")
    with pytest.raises(ValueError, match="local_aggregation"):
        StudentConfig(local_aggregation=2)
    with pytest.raises(ValueError, match="head_depth"):
        StudentConfig(map_head="regress", head_depth=0)


def test_student_runs_written_before_the_bank_head_load_as_regression_students(student_run, tmp_path):
    """A student run from before ``map_head`` existed: config without the new keys, tensors without
    the bank. It must load as the regression student it was trained as, not as an empty bank."""
    import shutil

    import yaml

    from edge_ad.methods import BackboneSpec
    from edge_ad.methods.checkpoint import save_checkpoint
    from edge_ad.methods.student import StudentConfig, StudentDetector

    doc = load_checkpoint_config(student_run)
    spec = BackboneSpec(**doc["backbone"])
    old = StudentDetector(StudentConfig(backbone=spec, map_head="regress", feature_loss="cosine",
                                        feature_weight=0.5, adapter_dim=8))
    assert not hasattr(old, "memory_bank")  # the tensors an old run has, no more
    run = save_checkpoint(old, tmp_path / "old_student")
    cfg_path = run / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    for key in ("map_head", "bank_space", "bank_size", "local_aggregation", "feature_loss"):
        cfg["config"].pop(key)
    cfg["config"]["feature_weight"] = 0.5
    cfg_path.write_text(yaml.safe_dump(cfg))
    loaded = load_detector(run)
    assert loaded.config.map_head == "regress" and loaded.config.feature_loss == "cosine"
    assert loaded.config.head_depth == 2 and loaded.bank_gain is None
    shutil.rmtree(run)
