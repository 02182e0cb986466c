"""The zero-shot training protocol: supervised training on auxiliary categories, use on unseen ones.

Zero-shot methods (``fit_mode == "supervised"``: AnomalyVFM, VisualAD, AVA-DINO) learn what "a
defect" looks like from categories other than the deployment's, as their reference protocols do
(e.g. train on VisA, test on MVTec):

* **real annotated samples**: the test splits of the auxiliary MVTec-layout categories (anomalous
  images with their masks and good test images with empty masks);
* **cheap synthetic anomalies**: a fraction ``synthetic_fraction`` of every batch is drawn from
  the categories' ``train/good`` images, each (or a share ``synthetic_anomaly_prob``; the rest
  stay clean, as negatives) with an on-the-fly :class:`~edge_ad.synth.CutPaste` or
  :class:`~edge_ad.synth.PerlinAnomaly` anomaly (50 / 50), so a CPU box trains without a generator;
  generator-made triplets (``edge-ad synth``) are written in MVTec layout and come in as real
  annotated categories.

``holdout_fraction`` of each category's annotated samples and of its good images is held back; at
the end the detector is scored on those held-back real samples and on the held-back good images
together with a fixed, seeded set of synthetic anomalies built on them (pixel / image AUROC in
``train_log.json["holdout"]``). Categories the run never saw are evaluated with ``edge-ad evaluate``.

Batches are addressed by step (``make_batch(step, rank)`` seeded from ``(seed, step, rank)``), so
resume and DDP behave as in :mod:`edge_ad.training.loop`. Images are decoded lazily and resized once
to the detector's input size (the same single resize the runtime applies to a frame); a bounded
cache keeps the decoded ones.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_ad.data.base import Record, load_sample
from edge_ad.data.masks import resize_mask
from edge_ad.methods.base import AnomalyDetector
from edge_ad.runtime.preprocess_spec import effective_resize
from edge_ad.runtime.preprocessing import preprocess_batch

from .distributed import DistContext
from .loop import FitConfig, fit, step_seed

__all__ = [
    "AuxiliaryData",
    "SupervisedBatch",
    "evaluate_holdout",
    "fit_supervised",
    "good_image_batches",
    "load_auxiliary",
    "resolve_categories",
]

#: Fixed synthetic hold-out anomalies per held-back good image (seeded independently of training).
SYNTHETIC_HOLDOUT_PER_IMAGE = 2
#: Default share of the synthetic part of a batch that receives an anomaly (the rest are clean
#: negatives). 1.0: the real part (test splits) already brings good images as negatives, and on
#: tiny CPU runs halving the anomalous pixels cut the held-back pixel AUROC of AnomalyVFM / VisualAD
#: from 0.70 / 0.62 to 0.51 / 0.51 (benchmarks/zero_shot_tiny.py). Synthetic-only recipes
#: (``synthetic_fraction=1``) that need an image head should lower it.
SYNTHETIC_ANOMALY_PROB = 1.0
#: Decoded, resized samples kept in memory (a full MVTec run at 768 px would not fit otherwise).
CACHE_SIZE = 512


@dataclass
class SupervisedBatch:
    """One batch of the zero-shot protocol.

    Attributes:
        images: (B, 3, H, W) float32, normalised with the detector's ``preprocess_spec``.
        masks: (B, 1, H, W) float32 in {0, 1} at input size (1 = defective pixel).
        labels: (B,) float32 in {0, 1} (1 = the image has a defect).
        categories: the category of each sample.
    """

    images: torch.Tensor
    masks: torch.Tensor
    labels: torch.Tensor
    categories: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "SupervisedBatch":
        return SupervisedBatch(self.images.to(device), self.masks.to(device), self.labels.to(device),
                               list(self.categories))


@dataclass(frozen=True)
class _Item:
    record: Record
    category: str


@dataclass
class AuxiliaryData:
    """The auxiliary categories split into training and held-back parts (records, decoded lazily).

    Attributes:
        annotated: real annotated training samples (test splits: anomalous + good).
        good: good training images (``train/good``), the bases of synthetic anomalies.
        holdout_annotated: held-back real annotated samples.
        holdout_good: held-back good images (bases of the fixed synthetic hold-out set).
        categories: the category names, in order.
    """

    annotated: list[_Item]
    good: list[_Item]
    holdout_annotated: list[_Item]
    holdout_good: list[_Item]
    categories: list[str]

    def summary(self) -> dict[str, Any]:
        return {"categories": list(self.categories), "annotated": len(self.annotated), "good": len(self.good),
                "holdout_annotated": len(self.holdout_annotated), "holdout_good": len(self.holdout_good)}


def resolve_categories(data: str | Path | Sequence[str | Path], categories: Sequence[str] | None) -> list[tuple[Path, str]]:
    """``(root, category)`` pairs: each category in the first root holding it (all categories when None)."""
    from edge_ad.data.mvtec import list_categories

    roots = [Path(data)] if isinstance(data, (str, Path)) else [Path(d) for d in data]
    if not roots:
        raise ValueError("data must name at least one dataset root")
    available = {root: list_categories(root) for root in roots}
    if not categories:
        pairs = [(root, c) for root in roots for c in available[root]]
        if not pairs:
            raise FileNotFoundError(f"no MVTec-layout categories (folders with train/ or test/) in {', '.join(map(str, roots))}")
        return pairs
    pairs = []
    for c in categories:
        root = next((r for r in roots if c in available[r]), None)
        if root is None:
            known = sorted({x for v in available.values() for x in v})
            raise FileNotFoundError(f"category {c!r} is in none of {', '.join(map(str, roots))}; available: {known}")
        pairs.append((root, c))
    return pairs


def _split(items: list[_Item], fraction: float, rng: np.random.Generator) -> tuple[list[_Item], list[_Item]]:
    """(train, holdout); the holdout gets round(fraction * n) items but leaves at least one for training."""
    if fraction <= 0 or len(items) < 2:
        return list(items), []
    order = rng.permutation(len(items))
    n_hold = min(len(items) - 1, max(1, round(fraction * len(items))))
    hold = sorted(order[:n_hold].tolist())
    keep = sorted(order[n_hold:].tolist())
    return [items[i] for i in keep], [items[i] for i in hold]


def load_auxiliary(
    data: str | Path | Sequence[str | Path],
    categories: Sequence[str] | None = None,
    *,
    holdout_fraction: float = 0.2,
    seed: int = 0,
) -> AuxiliaryData:
    """Index the auxiliary categories and split them (deterministically in ``seed``).

    Anomalous and good test samples are split separately so both classes are held back.

    Raises:
        FileNotFoundError: a root or category is missing.
        ValueError: there is nothing to train on (no annotated sample and no good image).
    """
    from edge_ad.data import MVTecDataset

    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    rng = np.random.default_rng(seed)
    out = AuxiliaryData([], [], [], [], [])
    for root, category in resolve_categories(data, categories):
        out.categories.append(category)
        split_dirs = {s: (root / category / s).is_dir() for s in ("train", "test")}
        test = [_Item(r, category) for r in MVTecDataset(root, category, split="test").records] if split_dirs["test"] else []
        good = [_Item(r, category) for r in MVTecDataset(root, category, split="train").records] if split_dirs["train"] else []
        for part in ([t for t in test if t.record.label == 1], [t for t in test if t.record.label == 0]):
            train_part, hold_part = _split(part, holdout_fraction, rng)
            out.annotated += train_part
            out.holdout_annotated += hold_part
        train_good, hold_good = _split(good, holdout_fraction, rng)
        out.good += train_good
        out.holdout_good += hold_good
    if not out.annotated and not out.good:
        raise ValueError(f"categories {out.categories} hold no test samples and no train/good images: nothing to train on")
    return out


class _SampleCache:
    """Decoded samples resized to the input size: (image uint8 (H, W, 3) RGB, mask bool (H, W)), LRU."""

    def __init__(self, size: tuple[int, int], resize: str, capacity: int = CACHE_SIZE) -> None:
        self.size = size
        self.interp = resize
        self.capacity = capacity
        self._items: OrderedDict[Path, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, record: Record) -> tuple[np.ndarray, np.ndarray]:
        hit = self._items.get(record.path)
        if hit is not None:
            self._items.move_to_end(record.path)
            return hit
        from edge_ad.runtime._cv import require_cv2

        cv2 = require_cv2("resize training images")
        sample = load_sample(record)
        h, w = self.size
        mode = effective_resize(self.interp, sample.image.shape[:2], (h, w))
        interp = cv2.INTER_AREA if mode == "area" else cv2.INTER_LINEAR
        image = sample.image if sample.image.shape[:2] == (h, w) else cv2.resize(sample.image, (w, h), interpolation=interp)
        mask = resize_mask(sample.mask, (h, w))
        self._items[record.path] = (np.ascontiguousarray(image), mask)
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return image, mask


class _BatchMaker:
    """``make_batch(step, rank)`` of the protocol (deterministic in ``(seed, step, rank)``)."""

    def __init__(self, detector: AnomalyDetector, data: AuxiliaryData, *, batch_size: int,
                 synthetic_fraction: float, seed: int, device: torch.device,
                 anomaly_prob: float = SYNTHETIC_ANOMALY_PROB) -> None:
        from edge_ad.synth import CutPaste, PerlinAnomaly

        if not 0.0 <= synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {synthetic_fraction}")
        if not 0.0 < anomaly_prob <= 1.0:
            raise ValueError(f"synthetic_anomaly_prob must be in (0, 1], got {anomaly_prob}")
        self.anomaly_prob = float(anomaly_prob)
        if synthetic_fraction > 0 and not data.good:
            raise ValueError("synthetic_fraction > 0 needs train/good images in the auxiliary categories")
        if synthetic_fraction < 1 and not data.annotated:
            raise ValueError("the auxiliary categories have no test split with masks; pass --synthetic-fraction 1 "
                             "to train on synthetic anomalies only")
        self.spec = detector.preprocess_spec
        self.cache = _SampleCache((self.spec.height, self.spec.width), self.spec.resize)
        self.data = data
        self.batch_size = batch_size
        self.synthetic_fraction = synthetic_fraction
        self.seed = seed
        self.device = device
        self.synthesizers = (CutPaste(), PerlinAnomaly())

    def synthetic(self, item: _Item, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, _ = self.cache.get(item.record)
        synth = self.synthesizers[int(rng.integers(len(self.synthesizers)))]
        return synth(image, rng)

    def collate(self, pairs: list[tuple[np.ndarray, np.ndarray]], categories: list[str]) -> SupervisedBatch:
        images = torch.from_numpy(preprocess_batch([p[0] for p in pairs], self.spec, color_order="rgb"))
        masks = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.float32))[:, None]
        labels = (masks.flatten(1).amax(1) > 0).float()
        return SupervisedBatch(images, masks, labels, categories).to(self.device)

    def __call__(self, step: int, rank: int) -> SupervisedBatch:
        rng = np.random.default_rng(step_seed(self.seed, step, rank))
        pairs, cats = [], []
        for _ in range(self.batch_size):
            if rng.random() < self.synthetic_fraction:
                item = self.data.good[int(rng.integers(len(self.data.good)))]
                # (no coin drawn at probability 1: the random stream then equals an all-anomalous recipe's)
                if self.anomaly_prob >= 1.0 or rng.random() < self.anomaly_prob:
                    pairs.append(self.synthetic(item, rng))
                else:  # the clean image: without negatives the image head learns "always defective"
                    pairs.append(self.cache.get(item.record))
            else:
                item = self.data.annotated[int(rng.integers(len(self.data.annotated)))]
                pairs.append(self.cache.get(item.record))
            cats.append(item.category)
        return self.collate(pairs, cats)


@torch.no_grad()
def evaluate_holdout(detector: AnomalyDetector, data: AuxiliaryData, *, seed: int, batch_size: int = 8,
                     progress: bool = False) -> dict[str, Any]:
    """Pixel / image AUROC of ``detector`` on the held-back real samples and fixed synthetic anomalies.

    Returns:
        ``{"real": {...}, "synthetic": {...}}``; each holds ``n``, ``pixel_auroc`` and ``image_auroc``
        (None where one class is missing, with the reason in ``note``).
    """
    from edge_ad.metrics import image_auroc, pixel_auroc

    # Only the maker's cache and synthesizers are used here (load_auxiliary guarantees good images
    # or annotated samples, so one of the two fractions is valid).
    maker = _BatchMaker(detector, data, batch_size=batch_size, synthetic_fraction=1.0 if data.good else 0.0,
                        seed=seed, device=detector.device)
    sets: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"real": [], "synthetic": []}
    for item in data.holdout_annotated:
        sets["real"].append(maker.cache.get(item.record))
    rng = np.random.default_rng(step_seed(seed, 10**9))  # a stream training never uses
    for item in data.holdout_good:
        sets["synthetic"].append(maker.cache.get(item.record))  # the clean image: the negatives
        for _ in range(SYNTHETIC_HOLDOUT_PER_IMAGE):
            sets["synthetic"].append(maker.synthetic(item, rng))
    was_training = detector.training
    detector.eval()
    report: dict[str, Any] = {}
    try:
        for name, pairs in sets.items():
            if not pairs:
                report[name] = {"n": 0, "pixel_auroc": None, "image_auroc": None, "note": "no held-back samples"}
                continue
            maps, scores = [], []
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                batch = maker.collate(chunk, [""] * len(chunk))
                out = detector(batch.images)
                maps.append(out.anomaly_map[:, 0].float().cpu().numpy())
                scores.append(out.score.float().cpu().numpy())
            masks = np.stack([p[1] for p in pairs])
            labels = masks.reshape(len(masks), -1).any(1).astype(int)
            entry: dict[str, Any] = {"n": len(pairs), "anomalous": int(labels.sum())}
            all_maps = np.concatenate(maps)
            entry["pixel_auroc"] = float(pixel_auroc(masks, all_maps)) if 0 < masks.sum() < masks.size else None
            entry["image_auroc"] = float(image_auroc(labels, np.concatenate(scores))) if 0 < labels.sum() < len(labels) else None
            if entry["pixel_auroc"] is None or entry["image_auroc"] is None:
                entry["note"] = "one class (good / anomalous) missing: AUROC undefined"
            report[name] = entry
    finally:
        detector.train(was_training)
    return report


def _training_fields(detector: AnomalyDetector) -> dict[str, Any]:
    cfg = detector.config
    needed = ("steps", "batch_size", "accumulate", "lr", "weight_decay", "grad_clip", "warmup_steps", "min_lr_ratio")
    missing = [n for n in needed if not hasattr(cfg, n)]
    if missing:
        raise TypeError(f"{type(cfg).__name__} must define the supervised training fields {missing} "
                        "(see edge_ad.training.supervised)")
    return {n: getattr(cfg, n) for n in needed}


def fit_supervised(
    detector: AnomalyDetector,
    data: AuxiliaryData,
    out: Path,
    *,
    loss_fn: Any,
    param_groups: Any = None,
    steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    synthetic_fraction: float = 0.5,
    synthetic_anomaly_prob: float = SYNTHETIC_ANOMALY_PROB,
    seed: int = 0,
    device: torch.device,
    resume: bool = False,
    amp: bool = True,
    dist_ctx: DistContext | None = None,
    progress: bool = True,
    max_minutes: float | None = None,
    eta_hint: str = "",
) -> dict[str, Any]:
    """Train a supervised detector on ``data`` with the generic loop; returns the training record.

    Args:
        loss_fn: the method's ``(model, SupervisedBatch) -> loss``.
        param_groups: the method's ``(detector, lr) -> groups`` or None.
        steps, batch_size, lr: overrides of the config's values (batch_size = micro-batch).
        synthetic_fraction: share of each batch drawn from good images (synthetic part).
        synthetic_anomaly_prob: share of the synthetic part that gets an anomaly (the rest are
            clean negatives); 1.0 = every synthetic sample is anomalous.
        max_minutes: wall-clock budget (see :attr:`edge_ad.training.loop.FitConfig.max_seconds`).
        eta_hint: printed with the time estimate of a long CPU run (the cheaper preset).
    """
    t = _training_fields(detector)
    steps = int(steps or t["steps"])
    batch_size = int(batch_size or t["batch_size"])
    lr = float(lr or t["lr"])
    fit_cfg = FitConfig(steps=steps, lr=lr, weight_decay=float(t["weight_decay"]), grad_clip=float(t["grad_clip"]),
                        warmup_steps=int(t["warmup_steps"]), min_lr_ratio=float(t["min_lr_ratio"]), seed=seed,
                        amp=amp, accumulate=int(t["accumulate"]), checkpoint_every=max(10, steps // 5),
                        max_seconds=60.0 * (max_minutes or 0.0))
    make_batch = _BatchMaker(detector, data, batch_size=batch_size, synthetic_fraction=synthetic_fraction,
                             seed=seed, device=device, anomaly_prob=synthetic_anomaly_prob)
    groups = (lambda model: param_groups(model, lr)) if param_groups is not None else None
    result = fit(detector, make_batch, loss_fn, fit_cfg, out, device=device, resume=resume, dist_ctx=dist_ctx,
                 progress=progress, description=f"train {detector.method} (zero-shot)", param_groups=groups,
                 eta_hint=eta_hint)
    effective = batch_size * fit_cfg.accumulate * (dist_ctx.world_size if dist_ctx is not None else 1)
    return {
        "fit": result.to_dict(),
        "optimizer": {"name": "AdamW", "lr": lr, "weight_decay": fit_cfg.weight_decay, "micro_batch": batch_size,
                      "accumulate": fit_cfg.accumulate, "effective_batch": effective, "steps": steps,
                      "grad_clip": fit_cfg.grad_clip, "warmup_steps": fit_cfg.warmup_steps,
                      "min_lr_ratio": fit_cfg.min_lr_ratio},
        "synthetic_fraction": synthetic_fraction,
        "synthetic_anomaly_prob": synthetic_anomaly_prob,
        "epochs_equivalent": round(steps * effective / max(1, len(data.annotated) + len(data.good)), 2),
    }


def good_image_batches(detector: AnomalyDetector, data: AuxiliaryData, *, limit_per_category: int = 32,
                       batch_size: int = 8) -> list[torch.Tensor]:
    """Normalised batches of good training images (at most ``limit_per_category`` each) for the normaliser."""
    maker_cache = _SampleCache((detector.preprocess_spec.height, detector.preprocess_spec.width),
                               detector.preprocess_spec.resize)
    per_cat: dict[str, int] = {}
    chosen = []
    pool = data.good or [i for i in data.annotated if i.record.label == 0]
    for item in pool:
        if per_cat.get(item.category, 0) < limit_per_category:
            per_cat[item.category] = per_cat.get(item.category, 0) + 1
            chosen.append(item)
    if not chosen:
        raise ValueError("no good images to fit the normalisation on")
    images = [maker_cache.get(i.record)[0] for i in chosen]
    tensor = torch.from_numpy(preprocess_batch(images, detector.preprocess_spec, color_order="rgb"))
    return list(tensor.split(batch_size))

