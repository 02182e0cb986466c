"""``edge_ad.train``: fit a detector on the good images of one category (few-shot or full-shot), or
train a zero-shot detector on auxiliary categories (:mod:`edge_ad.training.supervised`).

The CLI verb ``edge-ad train`` is a thin wrapper over :func:`train`; both take the same arguments.
Under ``torchrun --nproc_per_node N`` the same call trains with DDP (rank 0 writes the run).
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_ad.backbones.inspection import weights_provenance
from edge_ad.data.frame_size import auto_image_size, is_auto_size, parse_auto_size
from edge_ad.methods import AnomalyDetector, BackboneSpec, build_detector, get_method, save_checkpoint
from edge_ad.methods.checkpoint import CONFIG_FILE, MODEL_FILE
from edge_ad.runtime.preprocessing import preprocess_batch

from .device import resolve_device
from .distributed import DistContext, barrier, init_distributed, shutdown_distributed
from .loop import TRAIN_STATE_FILE, FitConfig, fit, step_seed

TRAIN_LOG_FILE = "train_log.json"


def _load_good_images(data: str | Path, category: str, shots: int | None, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """The uint8 RGB training images of ``data/category/train/good`` (k of them when ``shots``)."""
    from edge_ad.data import MVTecDataset, sample_k_shot

    dataset = MVTecDataset(data, category, split="train")
    indices = sample_k_shot(len(dataset), shots, seed) if shots else list(range(len(dataset)))
    samples = [dataset[i] for i in indices]
    return [s.image for s in samples], [str(s.path) for s in samples]


def _load_categories(data: str | Path, categories: Sequence[str], shots: int | None,
                     seed: int) -> tuple[list[np.ndarray], list[str], list[str]]:
    """:func:`_load_good_images` of each category (k of each, each sampled with ``seed``): images,
    paths and the category of each image."""
    images: list[np.ndarray] = []
    paths: list[str] = []
    owners: list[str] = []
    for category in categories:
        imgs, ps = _load_good_images(data, category, shots, seed)
        images += imgs
        paths += ps
        owners += [category] * len(imgs)
    return images, paths, owners


def _fit_gradient(
    detector: AnomalyDetector,
    images: list[np.ndarray],
    categories: list[str],
    out: Path,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    resume: bool,
    amp: bool,
    dist_ctx: DistContext,
    progress: bool,
    max_minutes: float | None = None,
    eta_hint: str = "",
) -> dict[str, Any]:
    """Train a ``fit_mode == "gradient"`` method (FoundAD) with the generic loop."""
    from edge_ad.methods.foundad.loss import loss_fn
    from edge_ad.synth import CutPaste
    from edge_ad.synth.class_foreground import class_foreground
    from edge_ad.synth.foreground import foreground_mask

    from .augment import ReferenceAugment

    cfg = detector.config
    spec = detector.preprocess_spec
    cutpaste = CutPaste(hue_jitter=cfg.cutpaste_hue_jitter, scar_side=cfg.cutpaste_scar_side)
    augment = ReferenceAugment() if cfg.augment else None
    # Per image, computed once: the foreground mask CutPaste pastes into (the reference's rule for
    # its category's class name when asked and known, else the generic estimate), and the clean
    # target tokens (the encoder is frozen, so f(clean) never changes: caching it halves encoder work).
    by_class = [class_foreground(img, cat) if cfg.class_foreground else None for img, cat in zip(images, categories)]
    foregrounds = [fg if fg is not None else foreground_mask(img) for fg, img in zip(by_class, images)]
    with torch.no_grad():
        clean_all = torch.from_numpy(preprocess_batch(images, spec, color_order="rgb")).to(device)
        # Token statistics first (feature_norm="channel"): every token below is standardised with them.
        feature_norm = detector.fit_feature_norm(clean_all)
        clean_tokens = torch.cat([detector.features(clean_all[i : i + 8]) for i in range(0, len(images), 8)])

    def make_batch(step: int, rank: int):
        # Same sampling as foundad.loss.build_training_batch (per-sample coin, CutPaste inside the
        # foreground), but only images that differ from the cached clean ones are preprocessed and
        # encoded: un-augmented clean samples reuse the cached tokens (most of the work on a CPU).
        # With augmentation the target is the augmented image and the context its CutPaste copy,
        # as in the reference (target and context come from the same augmented batch).
        rng = np.random.default_rng(step_seed(seed, step, rank))
        pick = rng.integers(0, len(images), size=batch_size)
        target = clean_tokens[torch.from_numpy(pick).to(device)]
        context = target.clone()
        encode: list[np.ndarray] = []
        slots: list[tuple[str, int]] = []  # ("target" | "context", sample index) per encoded image
        for j in range(batch_size):
            image, fg = images[pick[j]], foregrounds[pick[j]]
            if augment is not None:
                image, fg, applied = augment(image, rng, fg)
                if applied:
                    encode.append(image)
                    slots.append(("target", j))
            if rng.random() < cfg.synthetic_prob:
                encode.append(cutpaste(image, rng, foreground=fg)[0])
                slots.append(("context", j))
        if encode:
            pixels = torch.from_numpy(preprocess_batch(encode, spec, color_order="rgb")).to(device)
            with torch.no_grad():
                tokens = torch.cat([detector.features(pixels[i : i + 8]) for i in range(0, len(encode), 8)])
            for (kind, j), tok in zip(slots, tokens):
                if kind == "target":
                    target[j] = tok
                    context[j] = tok  # the clean context of an augmented image, unless CutPaste follows
                else:
                    context[j] = tok
        return target, context

    fit_cfg = FitConfig(steps=steps, lr=lr, weight_decay=cfg.weight_decay, seed=seed, amp=amp,
                        checkpoint_every=max(10, steps // 5), max_seconds=60.0 * (max_minutes or 0.0))
    result = fit(detector, make_batch, loss_fn, fit_cfg, out, device=device, resume=resume, dist_ctx=dist_ctx,
                 progress=progress, description=f"train {detector.method}", eta_hint=eta_hint)
    return {"fit": result.to_dict(), "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": cfg.weight_decay,
                                                   "batch_size": batch_size, "steps": steps},
            "augment": cfg.augment, "feature_norm": feature_norm, "class_foreground_images": sum(fg is not None for fg in by_class)}


def _train_supervised(
    detector: AnomalyDetector,
    entry: Any,
    data: str | Path | Sequence[str | Path],
    categories: list[str],
    out: Path,
    *,
    synthetic_fraction: float,
    synthetic_anomaly_prob: float,
    holdout_fraction: float,
    seed: int,
    device: torch.device,
    progress: bool,
    **fit_kwargs: Any,
) -> dict[str, Any]:
    """The zero-shot protocol: train on auxiliary categories, score the held-back part, fit the normaliser."""
    from .supervised import evaluate_holdout, fit_supervised, good_image_batches, load_auxiliary

    t0 = time.perf_counter()
    aux = load_auxiliary(data, categories or None, holdout_fraction=holdout_fraction, seed=seed)
    roots = [str(data)] if isinstance(data, (str, Path)) else [str(d) for d in data]
    training: dict[str, Any] = {"protocol": "zero-shot (supervised on auxiliary categories)", "data": roots,
                                "split": aux.summary(), "seed": seed, "device": str(device)}
    training.update(fit_supervised(detector, aux, out, loss_fn=entry.loss_fn, param_groups=entry.param_groups,
                                   synthetic_fraction=synthetic_fraction,
                                   synthetic_anomaly_prob=synthetic_anomaly_prob, seed=seed, device=device,
                                   progress=progress, **fit_kwargs))
    # Normalise with good images the loss never saw as targets: train/good were only synthesis bases.
    training["normalization"] = detector.fit_normalization(
        [b.to(device) for b in good_image_batches(detector, aux)], progress=progress)
    training["holdout"] = evaluate_holdout(detector, aux, seed=seed)
    training["seconds"] = round(time.perf_counter() - t0, 2)
    return training


def train(
    method: str,
    backbone: str | None,
    data: str | Path | Sequence[str | Path],
    category: str | None,
    out: str | Path,
    *,
    preset: str | None = None,
    categories: Sequence[str] | None = None,
    synthetic_fraction: float | None = None,
    synthetic_anomaly_prob: float | None = None,
    holdout_fraction: float | None = None,
    shots: int | None = None,
    weights: str | Path | None = None,
    pretrained: bool = True,
    image_size: int | tuple[int, int] | str | None = None,
    layers: tuple[int, ...] | list[int] | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    amp: bool = True,
    progress: bool = True,
    backbone_overrides: dict[str, Any] | None = None,
    method_options: dict[str, Any] | None = None,
    max_minutes: float | None = None,
) -> Path:
    """Train (or fit) a detector on the good training images of ``data/category`` and save the run.

    Args:
        method: registry name (``"foundad"``, ``"knn"``; see ``edge_ad.methods.list_methods()``).
        backbone: backbone registry name (``"efficientnet_lite0"``, ``"dinov3_vitb16"``, ...);
            None = the preset's (or, without a preset, the method config's default backbone).
        data: dataset root (MVTec layout); ``category`` is a folder in it. Zero-shot
            (``fit_mode == "supervised"``) methods accept several roots.
        category: the category to fit (few-shot / memory methods); zero-shot methods take
            ``categories`` instead (``category`` alone counts as a one-element list).
        preset: ``"paper"`` (the reference code's recipe) or ``"edge"`` (CPU-friendly); fills
            every argument left None (see :mod:`edge_ad.training.presets`, docs/REPRODUCE.md).
            Explicit arguments win.
        categories: auxiliary categories of a zero-shot method (None = every category in ``data``);
            for FoundAD, several categories train one category-agnostic model (each category
            contributes ``shots`` images; evaluate each with ``edge_ad.evaluate``).
        synthetic_fraction: zero-shot methods: share of each batch drawn from good images and given
            an on-the-fly CutPaste / Perlin anomaly (default 0.5; 1.0 = no real annotated samples).
        synthetic_anomaly_prob: zero-shot methods: share of those good images that get an
            anomaly (the rest are clean negatives; default 1.0 = all anomalous).
        holdout_fraction: zero-shot methods: share of each category's samples held back and
            scored at the end (``train_log.json["holdout"]``; default 0.2).
        out: run directory to write (``model.safetensors``, ``config.yaml``, ``train_log.json``).
        shots: good images per category (k-shot, sampled with ``seed``); 0 = all of them;
            None = the preset's, else 8.
        weights: local backbone weights file (``.safetensors`` / ``.pth``); overrides ``pretrained``.
        pretrained: load the backbone's default weights offline (hub cache / bundled package);
            False = random init (only useful for tests).
        image_size: input size in pixels (int or (H, W)); None = the method / backbone default;
            ``"auto:N"`` = about N*N pixels with the median aspect ratio of the category's
            ``train/good`` frames, sides multiples of 32 (:func:`edge_ad.data.auto_image_size`).
        layers: backbone layers to use; None = the method's default.
        steps, batch_size, lr: optimisation overrides for gradient-trained methods (defaults from
            the method config).
        seed: seeds shot sampling, synthesis and initialisation.
        device: ``"auto" | "cpu" | "cuda" | "cuda:N"``.
        resume: continue an interrupted run from ``out/train_state.pt``.
        amp: mixed precision on CUDA.
        backbone_overrides: extra backbone constructor arguments (tiny test models).
        method_options: extra method config fields (e.g. ``{"top_k": 5}``); they override the
            preset's.
        max_minutes: wall-clock budget of the optimisation (gradient / supervised methods): the
            run stops cleanly after the step that reaches it and is saved usable (normalised and
            checkpointed); ``resume=True`` continues it. None = no budget.

    Returns:
        The run directory.
    """
    out = Path(out)
    entry = get_method(method)
    from .presets import apply_preset, cpu_hint

    eta_hint = cpu_hint(method, preset)
    all_categories = False
    if preset is not None:
        given = {"image_size": image_size, "layers": layers, "steps": steps, "batch_size": batch_size, "lr": lr,
                 "shots": shots, "synthetic_fraction": synthetic_fraction,
                 "synthetic_anomaly_prob": synthetic_anomaly_prob, "holdout_fraction": holdout_fraction}
        filled, backbone, method_options, all_categories = apply_preset(method, preset, backbone, given,
                                                                        method_options)
        image_size, layers, steps, batch_size, lr = (filled[k] for k in ("image_size", "layers", "steps",
                                                                         "batch_size", "lr"))
        shots, synthetic_fraction = filled["shots"], filled["synthetic_fraction"]
        synthetic_anomaly_prob, holdout_fraction = filled["synthetic_anomaly_prob"], filled["holdout_fraction"]
    backbone = backbone or entry.config_class().backbone.name
    shots = 8 if shots is None else (int(shots) or None)  # 0 = every good image
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"max_minutes must be > 0 (a budget in minutes), got {max_minutes}")
    fit_categories: list[str] = []
    if entry.fit_mode != "supervised":
        if not isinstance(data, (str, Path)):
            raise ValueError(f"method {method!r} takes one dataset root, got {len(data)}")
        if categories and entry.fit_mode != "gradient":
            raise ValueError(f"method {method!r} fits one category; --categories is for zero-shot methods "
                             "and FoundAD's multi-category model")
        if categories and category is not None:
            raise ValueError("pass either category (one model for one category) or categories (one model "
                             "for several), not both")
        if category is not None:
            fit_categories = [category]
        elif categories:
            fit_categories = list(categories)
        elif all_categories:
            from edge_ad.data.mvtec import list_categories

            fit_categories = list_categories(data)
        if not fit_categories:
            raise ValueError(f"method {method!r} fits one category: pass category (--category)"
                             + (" or categories (--categories)" if entry.fit_mode == "gradient" else ""))
    elif entry.loss_fn is None:
        raise RuntimeError(f"method {method!r} is supervised but its METHOD entry has no loss_fn")
    options = dict(method_options or {})
    if is_auto_size(image_size):
        if category is None or not isinstance(data, (str, Path)):
            raise ValueError(f"image_size={image_size!r} reads the frames of one category: pass data and category")
        from edge_ad.data import MVTecDataset

        image_size = auto_image_size(MVTecDataset(data, category, split="train").paths, parse_auto_size(image_size))
    spec_fields: dict[str, Any] = {"name": backbone, "pretrained": bool(pretrained and weights is None),
                                   "weights": str(weights) if weights is not None else None,
                                   "overrides": dict(backbone_overrides or {})}
    default_spec = entry.config_class().backbone
    same_family = default_spec.name == backbone
    spec_fields["layers"] = tuple(layers) if layers is not None else (default_spec.layers if same_family else None)
    spec_fields["img_size"] = image_size if image_size is not None else (default_spec.img_size if same_family else None)
    if resume and not (out / TRAIN_STATE_FILE).is_file() and entry.fit_mode in ("gradient", "supervised"):
        raise FileNotFoundError(f"cannot resume: {out / TRAIN_STATE_FILE} not found; run without --resume first")
    if not resume and (out / MODEL_FILE).exists():
        raise FileExistsError(f"{out} already holds a trained run ({MODEL_FILE}); choose another --out or pass --resume")

    torch.manual_seed(seed)
    dev = resolve_device(device)
    dist_ctx = init_distributed(dev)
    try:
        detector = build_detector(method, backbone=BackboneSpec(**spec_fields), **options).to(dev)
        cfg = detector.config
        # Which weights the run was trained on: sha256 + detected layout (config.yaml, train_log.json).
        provenance = {"backbone_weights": weights_provenance(weights)} if weights is not None else {}
        if entry.fit_mode == "supervised":
            training = _train_supervised(
                detector, entry, data, list(categories or ([category] if category else [])), out,
                synthetic_fraction=0.5 if synthetic_fraction is None else float(synthetic_fraction),
                synthetic_anomaly_prob=1.0 if synthetic_anomaly_prob is None else float(synthetic_anomaly_prob),
                holdout_fraction=0.2 if holdout_fraction is None else float(holdout_fraction),
                steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=dev, resume=resume, amp=amp,
                dist_ctx=dist_ctx, progress=progress, max_minutes=max_minutes, eta_hint=eta_hint)
            training["preset"] = preset
            training.update(provenance)
            if dist_ctx.is_main:
                save_checkpoint(detector, out, training=training)
                (out / TRAIN_LOG_FILE).write_text(json.dumps(training, indent=2))
            barrier(dist_ctx)
            return out
        images, image_paths, image_categories = _load_categories(data, fit_categories, shots, seed)
        t0 = time.perf_counter()
        training: dict[str, Any] = {"data": str(data), "category": fit_categories[0] if len(fit_categories) == 1
                                    else None, "categories": fit_categories, "shots": shots, "seed": seed,
                                    "preset": preset, "images": image_paths, "device": str(dev),
                                    "world_size": dist_ctx.world_size,
                                    **provenance}
        if entry.fit_mode == "gradient":
            training.update(_fit_gradient(
                detector, images, image_categories, out, steps=steps or cfg.steps, batch_size=batch_size or cfg.batch_size,
                lr=lr or cfg.lr, seed=seed, device=dev, resume=resume, amp=amp, dist_ctx=dist_ctx,
                progress=progress, max_minutes=max_minutes, eta_hint=eta_hint))
        elif entry.fit_mode == "memory":
            good = torch.from_numpy(preprocess_batch(images, detector.preprocess_spec, color_order="rgb"))
            detector.fit(good.split(8), progress=progress)
        # Normalisation statistics come from the good images the run saw: few-shot has no others.
        # Threshold calibration on held-out good images is a separate, later step.
        good = torch.from_numpy(preprocess_batch(images, detector.preprocess_spec, color_order="rgb"))
        training["normalization"] = detector.fit_normalization(good.split(8))
        training["seconds"] = round(time.perf_counter() - t0, 2)
        if dist_ctx.is_main:
            save_checkpoint(detector, out, training=training)
            (out / TRAIN_LOG_FILE).write_text(json.dumps(training, indent=2))
        barrier(dist_ctx)
    finally:
        shutdown_distributed(dist_ctx)
    return out


__all__ = ["train", "TRAIN_LOG_FILE", "CONFIG_FILE", "MODEL_FILE"]
