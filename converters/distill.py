"""Distillation: a trained teacher detector -> a small ``student`` detector that keeps its behaviour.

Integrators train on a workstation with large encoders (ViT-L DINOv3 / RADIO, high resolution);
an edge device cannot run those at line speed. :func:`distill` trains a
:class:`~edge_ad.methods.student.StudentDetector` (a cheap registry backbone + a light conv head)
to reproduce the teacher's raw anomaly maps and image scores, plus, through a learned 1x1
projection, the teacher's fused features, on the good training images of the target category
*and* on synthetic anomalies (CutPaste and Perlin, alternating) made from them, with the frozen
teacher run on the same augmented image as the target. Learning from the teacher's response to
defects, not only from normal appearance, is what lets the student flag what the teacher flags.

The result is an ordinary run directory (``model.safetensors`` + ``config.yaml``, method
``student``): ``evaluate``, ``convert`` and ``Detector`` accept it unchanged. Beside it:

* ``train_log.json``: data, optimisation, loss curve, and the teacher (path + sha256 of its
  ``config.yaml`` / ``model.safetensors``), also recorded in ``config.yaml`` (``config.teacher``);
* ``fidelity.json``: teacher vs student on the category's test split in the format of the
  conversion fidelity report (:class:`~edge_ad.converters.fidelity.FidelityReport`): map
  Pearson / cosine, score correlation, image / pixel AUROC of both and their delta, plus
  ``extra.retained`` (student / teacher AUROC) and the verdict against ``min_retained``.

``min_retained`` turns the report into a gate: below the floor :func:`distill` still writes the
run, then raises :class:`DistillationBelowFloorError` (``edge-ad distill --min-retained`` exits 3).

Training reuses :func:`edge_ad.training.loop.fit` (step-seeded batches, progress bar,
``train_state.pt`` checkpoints and ``resume``, DDP under ``torchrun``, AMP on CUDA).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DISTILL_FIDELITY_FILE", "DistillationBelowFloorError", "distill", "distillation_fidelity",
           "retained_fidelity"]

#: Teacher-vs-student fidelity report written into the student run directory.
DISTILL_FIDELITY_FILE = "fidelity.json"
#: Images per teacher / student forward when caching targets (bounded memory on CPU).
_CHUNK = 8


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_inputs(run_dir: Path, student: str, data: Path, category: str, out: Path, resume: bool) -> None:
    """Fail fast, before any model is built, with errors that name the fix."""
    from edge_ad.backbones import list_backbones
    from edge_ad.methods.checkpoint import CONFIG_FILE, MODEL_FILE
    from edge_ad.training.loop import TRAIN_STATE_FILE

    if not run_dir.is_dir():
        raise FileNotFoundError(f"teacher run directory {run_dir} not found: pass the RUN_DIR written by "
                                "`edge-ad train` (it holds config.yaml and model.safetensors)")
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir} is not a trained run: {name} is missing (train the teacher with "
                                    "`edge-ad train` first)")
    known = list_backbones()
    if student not in known:
        raise KeyError(f"unknown student backbone {student!r}; registered backbones: {', '.join(known)}")
    if not (Path(data) / category / "train" / "good").is_dir():
        from edge_ad.data import MVTecDataset

        MVTecDataset(data, category, split="train")  # raises with the categories that do exist
        raise FileNotFoundError(f"{Path(data) / category / 'train' / 'good'} not found: distillation needs the "
                                "good training images of the category (MVTec layout)")
    if out.resolve() == run_dir.resolve():
        raise ValueError("--out must differ from the teacher RUN_DIR: the student is a new run directory")
    if resume and not (out / TRAIN_STATE_FILE).is_file():
        raise FileNotFoundError(f"cannot resume: {out / TRAIN_STATE_FILE} not found; run without --resume first")
    if not resume and (out / MODEL_FILE).exists():
        raise FileExistsError(f"{out} already holds a trained run ({MODEL_FILE}); choose another --out or pass --resume")


def _check_options(options: dict[str, Any]) -> None:
    """``student_options`` may set :class:`StudentConfig` fields, except those ``distill`` derives."""
    import dataclasses

    from edge_ad.methods.student import StudentConfig

    derived = {"backbone", "resize", "smoothing_sigma", "teacher"}
    allowed = sorted({f.name for f in dataclasses.fields(StudentConfig)} - derived)
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"unknown or derived student options {bad}; allowed: {', '.join(allowed)}")


def _resample(x: Any, size: tuple[int, int]) -> Any:
    """(B, C, h, w) -> (B, C, *size): area averaging when shrinking (no aliasing of thin peaks into
    gaps), bilinear with half-pixel centres when growing."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.interpolate(x, size=size, mode="area")
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class _TeacherTargets:
    """Runs the frozen teacher on uint8 images and returns the student's targets.

    One teacher pass per image gives both the raw map / score (``forward_raw``) and the fused
    backbone features (captured by a forward hook on ``teacher.backbone``, so the encoder does not
    run twice; teachers whose ``forward_raw`` bypasses ``Backbone.forward`` get one extra
    ``extract_features`` pass).
    """

    def __init__(self, teacher: Any, student_size: tuple[int, int], student_grid: tuple[int, int],
                 want_features: bool, feature_transform: Any = None) -> None:
        from edge_ad.methods.common import fuse_feature_maps

        self.teacher = teacher
        self.spec = teacher.preprocess_spec
        self.size = student_size
        self.grid = student_grid
        self.want_features = want_features
        # Applied to the teacher features on the student grid (the bank student's local aggregation).
        self.feature_transform = feature_transform
        self._captured: list[Any] = []
        if want_features:
            teacher.backbone.register_forward_hook(
                lambda _m, _inp, output: self._captured.append(fuse_feature_maps(output[0]))
            )

    def __call__(self, images: list[np.ndarray], device: Any) -> tuple[Any, Any, Any]:
        """(maps (B, 1, Hs, Ws) raw, scores (B,) raw, features (B, C_t, hs, ws) or None) of uint8 RGB images."""
        import torch

        from edge_ad.runtime.preprocessing import preprocess_batch

        x = torch.from_numpy(preprocess_batch(images, self.spec, color_order="rgb")).to(device)
        self._captured.clear()
        with torch.no_grad():
            raw = self.teacher.forward_raw(x)
            if self.want_features and not self._captured:
                # Methods that read their encoder directly (AnomalyVFM calls timm's
                # forward_intermediates for the prefix tokens) bypass Backbone.forward, so the hook
                # saw nothing: one extra encoder pass through the base class's feature path.
                self.teacher.extract_features(x)
        maps = _resample(raw.anomaly_map.float(), self.size)
        feats = _resample(self._captured[-1].float(), self.grid) if self.want_features else None
        if feats is not None and self.feature_transform is not None:
            feats = self.feature_transform(feats)
        self._captured.clear()
        return maps, raw.score.float(), feats


class _StudentOnTeacherInput:
    """A fidelity runner for the student that takes images preprocessed with the *teacher's* spec.

    ``fidelity_report`` feeds both models the same tensors. The teacher gets its true input; the
    student gets that input turned back into uint8 frames (teacher size) and run through the
    student's own preprocessing (the production path), then its maps are resampled to the
    teacher's size. Only the extra resize teacher size -> student size differs from deployment.
    """

    format = "student-pytorch"
    precision = "fp32"

    def __init__(self, student: Any, teacher_spec: Any) -> None:
        self.student = student.eval()
        self.teacher_spec = teacher_spec

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from edge_ad.runtime.preprocessing import preprocess_batch

        mean = np.asarray(self.teacher_spec.mean, np.float32)[:, None, None]
        std = np.asarray(self.teacher_spec.std, np.float32)[:, None, None]
        frames = [np.clip(np.rint((img * std + mean) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
                  for img in np.asarray(images, np.float32)]
        x = torch.from_numpy(preprocess_batch(frames, self.student.preprocess_spec, color_order="rgb"))
        with torch.no_grad():
            out = self.student(x.to(self.student.device))
        maps = _resample(out.anomaly_map.float(), self.teacher_spec.size)
        return maps.cpu().numpy(), out.score.float().cpu().numpy()


def _synthetic_pool(size: int, images: list[np.ndarray], foregrounds: list[np.ndarray], synthesizers: tuple,
                    targets: _TeacherTargets, s_spec: Any, seed: int, device: Any, progress: bool) -> tuple | None:
    """``size`` synthetic anomalies made once (image ``i % N``, CutPaste / Perlin alternating) with
    their student inputs and teacher targets: (x, maps, scores, features or None); None if size is 0."""
    import torch

    from edge_ad.runtime.preprocessing import preprocess_batch

    if size <= 0:
        return None
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5EED]))
    chunks = range(0, size, _CHUNK)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="teacher on synthetic pool", unit="batch", dynamic_ncols=True)
    parts = []
    for start in chunks:
        aug = [synthesizers[i % 2](images[i % len(images)], rng, foreground=foregrounds[i % len(images)])[0]
               for i in range(start, min(size, start + _CHUNK))]
        x = torch.from_numpy(preprocess_batch(aug, s_spec, color_order="rgb")).to(device)
        parts.append((x, *targets(aug, device)))
    feats = torch.cat([p[3] for p in parts]) if parts[0][3] is not None else None
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts]),
            feats)


#: Bank entries when ``StudentConfig.bank_size`` is 0 (the knn teachers' usual cap).
DEFAULT_BANK_SIZE = 1000


def _set_student_bank(model: Any, features: Any, cfg: Any, seed: int) -> None:
    """Give a ``map_head="bank"`` student its memory bank: a k-center greedy coreset of the good
    patch features (P, C) of its ``bank_space`` (the teacher's on the student grid, or the student's
    own), and the bank term's starting units (those features' own distances to that bank: mean
    and spread over every good patch)."""
    import torch

    from edge_ad.methods.knn.coreset import k_center_greedy
    from edge_ad.methods.knn.model import bank_neighbors, nearest_neighbor_distance

    size = min(cfg.bank_size or DEFAULT_BANK_SIZE, features.shape[0])
    bank = features[k_center_greedy(features, size, seed=seed).to(features.device)]
    center = bank.double().mean(dim=0).float()
    dist = torch.cat([nearest_neighbor_distance(chunk[None], bank, None, center)[0]
                      for chunk in features.split(4096)]).double()
    # Bank members are at distance 0 from themselves: when the bank holds (nearly) every good patch
    # the spread of ``dist`` collapses, so the unit is at least the typical spacing between bank
    # entries (median distance of an entry to its nearest other entry).
    spacing = 0.0
    if bank.shape[0] > 1:
        nearest_other = bank_neighbors(bank, 2)[:, 1]  # column 0 is the entry itself
        spacing = float((bank - bank[nearest_other]).double().norm(dim=1).median())
    model.set_memory_bank(bank, float(dist.mean()), max(float(dist.std()), spacing, 1e-6), 0.1 * spacing)


def distillation_fidelity(teacher: Any, student: Any, data: str | Path, category: str, *,
                          batch_size: int = 8) -> Any:
    """Teacher vs student on ``data/category``'s test split, as a :class:`FidelityReport`.

    The teacher is the reference (its own preprocessing); the student runs through
    :class:`_StudentOnTeacherInput`. Map statistics compare the *normalised* maps (each model's
    own good-image units); AUROC values are those of each model on the same images.
    """
    from edge_ad.data import MVTecDataset

    from .fidelity import fidelity_report, torch_runner

    dataset = MVTecDataset(data, category, split="test")
    return fidelity_report(
        torch_runner(teacher), _StudentOnTeacherInput(student, teacher.preprocess_spec), dataset,
        spec=teacher.preprocess_spec, batch_size=batch_size, reference_name=f"teacher-{teacher.method}-pytorch",
        metrics=("image_auroc", "pixel_auroc", "aupro"), description=f"{Path(data).name}/{category} test",
        extra={"teacher": dict(getattr(student.config, "teacher", {}) or {}), "student_backbone": student.config.backbone.name,
               "student_input_size": list(student.image_size)},
    )


class DistillationBelowFloorError(RuntimeError):
    """The student keeps less of its teacher's AUROC than ``min_retained`` (or it cannot be measured).

    The student run is fully written (checkpoint, ``train_log.json``, ``fidelity.json``) before
    this is raised, so nothing is lost: inspect it, or retrain with the fix the message names.

    Attributes:
        out: the student run directory.
        verdict: :func:`retained_fidelity`'s dict (teacher / student AUROC, ``retained``,
            ``gated_on``, ``min_retained``, ``ok``).
    """

    def __init__(self, out: Path, verdict: dict[str, Any]) -> None:
        self.out = Path(out)
        self.verdict = verdict
        super().__init__(_floor_reason(out, verdict))


def _floor_reason(out: Path, v: dict[str, Any]) -> str:
    """One line: what missed the floor, by how much, and what to change."""
    fix = ("more --steps, a bigger student (--student / --set head_depth=N), or the teacher's "
           f"--image-size {v['teacher_image_size'][0]}x{v['teacher_image_size'][1]}")
    if not v["gated_on"]:
        return (f"student {out} not verified: the test split has no defective images with labels/masks, so the "
                f"retained AUROC (floor {v['min_retained']:g}) cannot be measured; add defective test images "
                "or drop --min-retained")
    missed = [f"{name} {v[name]['retained']:.1%} ({v[name]['teacher']:.4f} -> {v[name]['student']:.4f})"
              for name in v["gated_on"] if not v[name]["retained"] >= v["min_retained"]]
    return (f"student {out} below the floor: keeps {', '.join(missed)} of the teacher's AUROC "
            f"< min_retained {v['min_retained']:g}; try {fix}")


def retained_fidelity(report: Any, min_retained: float | None, teacher_image_size: tuple[int, int]) -> dict[str, Any]:
    """Teacher vs student AUROC ratios from a :func:`distillation_fidelity` report, and the verdict.

    ``retained = student AUROC / teacher AUROC`` (a fraction, 1.0 = as good as the teacher). The
    gate requires *every* measurable ratio (pixel AUROC when the test split has masks, image AUROC
    when it has good and defective images) to reach the floor: the student's image score comes
    from its own head and can collapse while its maps hold (the tiny test pair: pixel 1.02, image
    0.25), and a deployed detector decides on both. ``ok`` is None when no floor was asked for,
    False when the floor is missed or nothing could be measured (no defective test images).

    Returns:
        ``{"image_auroc"|"pixel_auroc": {"teacher", "student", "retained"}, "map_pearson_r",
        "num_good", "num_defective", "gated_on" (list of metric names), "min_retained", "ok",
        "teacher_image_size"}``.
    """
    out: dict[str, Any] = {}
    for name in ("image_auroc", "pixel_auroc"):
        m = report.metrics.get(name)
        if m is not None:
            t, s = float(m["reference"]), float(m["candidate"])
            out[name] = {"teacher": t, "student": s, "retained": s / t if t > 0 else float("nan")}
    gated_on = list(out)
    defective = report.num_anomalous
    ok = None
    if min_retained is not None:
        ok = bool(gated_on) and all(bool(out[name]["retained"] >= min_retained) for name in gated_on)
    out.update({"map_pearson_r": float(report.map["pearson_r"]),
                "num_good": report.num_images - (defective or 0), "num_defective": defective,
                "gated_on": gated_on, "min_retained": min_retained, "ok": ok,
                "teacher_image_size": [int(v) for v in teacher_image_size]})
    return out


def _verdict_line(v: dict[str, Any]) -> str:
    """The end-of-run summary: held-out counts, AUROC teacher -> student (retained), verdict."""
    parts = [f"teacher vs student on {v['num_good']} held-out good"
             + (f" + {v['num_defective']} defective" if v["num_defective"] else "") + " test images:",
             f"map r {v['map_pearson_r']:.3f}"]
    for name in ("pixel_auroc", "image_auroc"):
        if name in v:
            m = v[name]
            parts.append(f"{name} {m['teacher']:.4f} -> {m['student']:.4f} (retained {m['retained']:.1%})")
    verdict = {None: "report only (no --min-retained)", True: f"ok (>= {v['min_retained']})",
               False: f"BELOW FLOOR {v['min_retained']}"}[v["ok"]]
    return " ".join(parts[:1]) + " " + ", ".join(parts[1:]) + f"; verdict: {verdict}"


def distill(
    run_dir: str | Path,
    student: str,
    data: str | Path,
    category: str,
    out: str | Path,
    *,
    image_size: int | tuple[int, int] | None = None,
    layers: tuple[int, ...] | list[int] | None = None,
    synthetic_fraction: float | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    amp: bool = True,
    progress: bool = True,
    student_weights: str | Path | None = None,
    student_pretrained: bool = True,
    student_overrides: dict[str, Any] | None = None,
    student_options: dict[str, Any] | None = None,
    fidelity: bool = True,
    min_retained: float | None = None,
) -> Path:
    """Distil the detector in ``run_dir`` (the teacher) into a ``student`` run in ``out``.

    Args:
        run_dir: the teacher's run directory (any registered method).
        student: student backbone registry name (``"efficientnet_lite0"``, ``"dinov3_vits16"``,
            ``"dinov2_vits14"``, ...).
        data: dataset root (MVTec layout); the good images of ``data/category/train/good`` are the
            training set (all of them: the teacher labels them, more is better).
        out: student run directory to write.
        image_size: student input size in pixels (int or (H, W)); None = the backbone default.
        layers: student backbone layers; None = the backbone default.
        synthetic_fraction: share of training samples with a synthetic anomaly (0..1; default
            ``StudentConfig.synthetic_fraction`` = 0.5).
        steps, batch_size, lr: optimisation (defaults from :class:`StudentConfig`: 300, 8, 1e-3).
        seed: seeds batches, synthesis and the head initialisation.
        device: ``"auto" | "cpu" | "cuda" | "cuda:N"``.
        resume: continue an interrupted distillation from ``out/train_state.pt``.
        amp: mixed precision on CUDA.
        progress: tqdm bars.
        student_weights: local weights file for the student backbone (overrides ``student_pretrained``).
        student_pretrained: the backbone's offline pretrained weights (False = random init, tests).
        student_overrides: backbone constructor arguments (tiny test models: ``depth``, ``embed_dim``...).
        student_options: other :class:`StudentConfig` fields (``head_dim``, ``feature_weight``, ...).
        fidelity: write ``fidelity.json`` (teacher vs student on the test split) when the category
            has one.
        min_retained: floor on ``student / teacher`` pixel AND image AUROC (each that the test
            split can measure) on the held-out test split, e.g. ``0.97``. None (default) = report only:
            the ratio is printed and recorded but never fails the run, because on a small test
            split (10 images here, tens in most categories) it is a noisy estimate and what is
            acceptable is the integrator's call; scripts and CI that gate on it pass the floor.

    Returns:
        The student run directory.

    Raises:
        FileNotFoundError: teacher run / category / resume state missing.
        KeyError: unknown student backbone.
        FileExistsError: ``out`` already holds a run and ``resume`` is False.
        ValueError: ``min_retained`` negative, or set without a fidelity report to judge it by
            (``fidelity=False`` or no ``data/category/test``).
        DistillationBelowFloorError: the student misses ``min_retained`` (the run is written first).
    """
    import torch

    from edge_ad.methods import BackboneSpec, load_detector, save_checkpoint
    from edge_ad.methods.checkpoint import CONFIG_FILE, MODEL_FILE
    from edge_ad.methods.student import StudentConfig, StudentDetector, loss_fn
    from edge_ad.methods.student.loss import StudentBatch
    from edge_ad.runtime.preprocessing import preprocess_batch
    from edge_ad.synth import CutPaste, PerlinAnomaly, foreground_mask
    from edge_ad.training.api import TRAIN_LOG_FILE, _load_good_images
    from edge_ad.training.device import resolve_device
    from edge_ad.training.distributed import barrier, init_distributed, shutdown_distributed
    from edge_ad.training.loop import FitConfig, fit, step_seed

    run_dir, out, data = Path(run_dir), Path(out), Path(data)
    _check_inputs(run_dir, student, data, category, out, resume)
    if min_retained is not None:  # fail before training, not after
        if not min_retained >= 0:
            raise ValueError(f"min_retained must be a fraction >= 0 (e.g. 0.97), got {min_retained}")
        if not fidelity or not (data / category / "test").is_dir():
            raise ValueError(f"min_retained needs the teacher-vs-student report on {data / category / 'test'}: "
                             "keep fidelity on and provide the category's test split, or drop min_retained")
    options = dict(student_options or {})
    _check_options(options)
    if synthetic_fraction is not None:
        options["synthetic_fraction"] = synthetic_fraction
    for key, value in (("steps", steps), ("batch_size", batch_size), ("lr", lr)):
        if value is not None:
            options[key] = value

    torch.manual_seed(seed)
    dev = resolve_device(device)
    dist_ctx = init_distributed(dev)
    verdict: dict[str, Any] | None = None
    try:
        teacher = load_detector(run_dir, device=dev).eval()
        teacher.requires_grad_(False)
        feature_weight = float(options.get("feature_weight", StudentConfig.feature_weight))
        # Teacher features are needed for the feature term and for a bank in the teacher's space.
        probe = StudentConfig(**{k: v for k, v in options.items() if k != "adapter_dim"})
        needs_teacher_features = (feature_weight > 0 and probe.reads_adapter()) or (
            probe.map_head == "bank" and probe.bank_space == "teacher")
        provenance = {
            "run_dir": str(run_dir.resolve()),
            "method": teacher.method,
            "backbone": teacher.config.backbone.name,
            "image_size": list(teacher.image_size),
            "config_sha256": _sha256(run_dir / CONFIG_FILE),
            "model_sha256": _sha256(run_dir / MODEL_FILE),
        }
        spec = BackboneSpec(
            name=student, layers=tuple(layers) if layers is not None else None, img_size=image_size,
            weights=str(student_weights) if student_weights is not None else None,
            pretrained=bool(student_pretrained and student_weights is None), overrides=dict(student_overrides or {}),
        )
        backbone = spec.build()
        s_size = tuple(int(v) for v in backbone.info.img_size)
        # Smoothing is in input pixels: scale the teacher's so it covers the same object area.
        sigma = teacher.config.smoothing_sigma * s_size[0] / teacher.image_size[0]
        options.setdefault("adapter_dim", teacher.feature_dim if needs_teacher_features else 0)
        cfg = StudentConfig(backbone=spec, resize=teacher.config.resize, smoothing_sigma=round(sigma, 4),
                            teacher=provenance, **options)
        model = StudentDetector(cfg, backbone=backbone).to(dev)
        cfg = model.config  # type: ignore[assignment]
        want_features = needs_teacher_features and cfg.adapter_dim == teacher.feature_dim
        if needs_teacher_features and not want_features:
            raise ValueError(f"feature_weight > 0 and bank_space='teacher' need adapter_dim == the teacher's feature "
                             f"width ({teacher.feature_dim}), got {cfg.adapter_dim}; leave adapter_dim unset")
        targets = _TeacherTargets(teacher, model.image_size, model.grid_size, want_features,
                                  model.aggregate if cfg.map_head == "bank" else None)

        images, image_paths = _load_good_images(data, category, None, seed)
        t0 = time.perf_counter()
        # Clean images never change: their student inputs and teacher targets are computed once.
        s_spec = model.preprocess_spec
        clean_x = torch.from_numpy(preprocess_batch(images, s_spec, color_order="rgb")).to(dev)
        parts = [targets(images[i:i + _CHUNK], dev) for i in range(0, len(images), _CHUNK)]
        clean_maps = torch.cat([p[0] for p in parts])
        clean_scores = torch.cat([p[1] for p in parts])
        clean_feats = torch.cat([p[2] for p in parts]) if want_features else None
        if teacher.normalizer.fitted:
            stats = teacher.normalizer.stats()
        else:  # an unnormalised teacher: its spread on the good images defines the units
            m = clean_maps.double()
            s = clean_scores.double()
            stats = {"map_loc": float(m.mean()), "map_scale": float(m.std()), "score_loc": float(s.mean()),
                     "score_scale": float(s.std()) if len(s) > 1 else float(m.std())}
        map_scale = max(stats["map_scale"], 1e-12)
        score_scale = max(stats["score_scale"], 1e-12)
        model.set_target_units(stats["map_loc"], map_scale, stats["score_loc"], score_scale)

        feature_norm = 1.0
        if clean_feats is not None:
            flat = clean_feats.permute(0, 2, 3, 1).reshape(-1, clean_feats.shape[1])
            feature_norm = max(float((flat.double() - flat.double().mean(dim=0)).pow(2).sum(dim=1).mean()), 1e-12)
            if cfg.map_head == "bank" and cfg.bank_space == "teacher":
                _set_student_bank(model, flat, cfg, seed)
        # The frozen student backbone's features of the clean images: computed once, for the
        # own-space bank and for the training cache below.
        clean_sf = None
        if (cfg.map_head == "bank" and cfg.bank_space == "student") or cfg.synthetic_pool > 0 \
                or cfg.synthetic_fraction == 0.0:
            with torch.no_grad():
                model.eval()
                clean_sf = torch.cat([model.extract_features(c) for c in clean_x.split(_CHUNK)])
        if cfg.map_head == "bank" and cfg.bank_space == "student":
            with torch.no_grad():
                own = model.aggregate(clean_sf)
            _set_student_bank(model, own.permute(0, 2, 3, 1).reshape(-1, own.shape[1]), cfg, seed)
        cfg = model.config  # type: ignore[assignment]  (bank_size written back)

        foregrounds = [foreground_mask(img) for img in images]
        synthesizers = (CutPaste(), PerlinAnomaly())
        pool = _synthetic_pool(cfg.synthetic_pool, images, foregrounds, synthesizers, targets, s_spec, seed, dev,
                               progress and dist_ctx.is_main)

        # With fixed inputs (clean images + a synthetic pool, or no synthetic samples) the frozen
        # student backbone's features are fixed too: computed once, a step costs only the head.
        cache_features = pool is not None or cfg.synthetic_fraction == 0.0
        pool_sf = None
        if not cache_features:
            clean_sf = None  # inputs change every step: the model runs its backbone itself
        elif pool is not None:
            with torch.no_grad():
                pool_sf = torch.cat([model.extract_features(c) for c in pool[0].split(_CHUNK)])

        def make_batch(step: int, rank: int) -> StudentBatch:
            rng = np.random.default_rng(step_seed(seed, step, rank))
            pick = rng.integers(0, len(images), size=cfg.batch_size)
            synthetic = [j for j in range(cfg.batch_size) if rng.random() < cfg.synthetic_fraction]
            idx = torch.from_numpy(pick).to(dev)
            x, tmap, tscore = clean_x[idx].clone(), clean_maps[idx].clone(), clean_scores[idx].clone()
            tfeat = clean_feats[idx].clone() if clean_feats is not None else None
            sfeat = clean_sf[idx].clone() if clean_sf is not None else None
            if synthetic and pool is not None:
                sel = torch.tensor(synthetic, device=dev)
                src = torch.from_numpy(rng.integers(0, len(pool[0]), size=len(synthetic))).to(dev)
                x[sel], tmap[sel], tscore[sel] = pool[0][src], pool[1][src], pool[2][src]
                if sfeat is not None:
                    sfeat[sel] = pool_sf[src]  # type: ignore[index]
                if tfeat is not None:
                    tfeat[sel] = pool[3][src]
            elif synthetic:
                augmented = []
                for j in synthetic:
                    make = synthesizers[int(rng.random() < 0.5)]
                    augmented.append(make(images[pick[j]], rng, foreground=foregrounds[pick[j]])[0])
                sel = torch.tensor(synthetic, device=dev)
                x[sel] = torch.from_numpy(preprocess_batch(augmented, s_spec, color_order="rgb")).to(dev)
                m_, s_, f_ = targets(augmented, dev)
                tmap[sel], tscore[sel] = m_, s_
                if tfeat is not None:
                    tfeat[sel] = f_
            return StudentBatch(x, tmap, tscore, tfeat, map_scale, score_scale, cfg.feature_weight, cfg.score_weight,
                                cfg.feature_loss, feature_norm, sfeat)

        fit_cfg = FitConfig(steps=cfg.steps, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=seed, amp=amp,
                            warmup_steps=min(20, cfg.steps // 10), min_lr_ratio=0.05,
                            checkpoint_every=max(10, cfg.steps // 5))
        result = fit(model, make_batch, loss_fn, fit_cfg, out, device=dev, resume=resume, dist_ctx=dist_ctx,
                     progress=progress, description=f"distill {teacher.method}->{student}")
        normalization = model.fit_normalization(clean_x.split(_CHUNK))
        training: dict[str, Any] = {
            "kind": "distillation", "teacher": provenance, "data": str(data), "category": category, "seed": seed,
            "images": image_paths, "device": str(dev), "world_size": dist_ctx.world_size,
            "synthetic_fraction": cfg.synthetic_fraction, "target_units": stats,
            "fit": result.to_dict(),
            "optimizer": {"name": "AdamW", "lr": cfg.lr, "weight_decay": cfg.weight_decay,
                          "batch_size": cfg.batch_size, "steps": cfg.steps, "schedule": "warmup+cosine"},
            "normalization": normalization, "seconds": round(time.perf_counter() - t0, 2),
        }
        if dist_ctx.is_main:
            save_checkpoint(model, out, training=training)
            if fidelity and (data / category / "test").is_dir():
                report = distillation_fidelity(teacher, model, data, category)
                verdict = retained_fidelity(report, min_retained, teacher.image_size)
                report.extra["retained"] = verdict
                report.save(out / DISTILL_FIDELITY_FILE)
                training["fidelity"] = {"map_pearson_r": report.map["pearson_r"], "metrics": report.metrics,
                                        "retained": verdict}
                if progress:
                    print(report.table())
                print(_verdict_line(verdict))
            (out / TRAIN_LOG_FILE).write_text(json.dumps(training, indent=2))
        barrier(dist_ctx)
    finally:
        shutdown_distributed(dist_ctx)
    if verdict is not None and verdict["ok"] is False:
        raise DistillationBelowFloorError(out, verdict)
    return out
