"""Run a torch detector over a dataset through the runtime's own preprocessing."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_ad.data.masks import resize_mask
from edge_ad.runtime.preprocessing import preprocess_batch
from edge_ad.runtime.preprocess_spec import PreprocessSpec


@dataclass
class Predictions:
    """Detector outputs over a dataset, at the model's input resolution.

    Attributes:
        scores: (N,) float32 image scores.
        maps: (N, H, W) float32 anomaly maps (H, W = model input size).
        masks: (N, H, W) bool ground truth, resized to the input size (nearest neighbour).
        labels: (N,) int 0 good / 1 anomalous.
        paths: N image paths (str).
        defect_types: N defect type names.
    """

    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    paths: list[str]
    defect_types: list[str]


@torch.no_grad()
def predict_dataset(
    detector: nn.Module,
    dataset: Sequence,
    spec: PreprocessSpec,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    progress: bool = True,
    description: str = "predict",
) -> Predictions:
    """Score every sample of ``dataset`` (items with ``image`` uint8 RGB, ``mask``, ``label``, ...).

    Images go through :func:`edge_ad.runtime.preprocessing.preprocess_batch`, the exact function the
    deployed runtime uses, so these numbers are the numbers the device gives.
    """
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: nothing to evaluate")
    detector = detector.eval().to(device)
    n = len(dataset)
    scores = np.empty(n, np.float32)
    maps = np.empty((n, spec.height, spec.width), np.float32)
    masks = np.empty((n, spec.height, spec.width), bool)
    labels = np.empty(n, np.int64)
    paths: list[str] = []
    defect_types: list[str] = []
    iterator = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=description, unit="batch", dynamic_ncols=True)
    for start in iterator:
        samples = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = preprocess_batch([s.image for s in samples], spec, color_order="rgb")
        anomaly_map, score = detector(torch.from_numpy(images).to(device))
        stop = start + len(samples)
        maps[start:stop] = anomaly_map[:, 0].float().cpu().numpy()
        scores[start:stop] = score.float().cpu().numpy()
        for j, s in enumerate(samples):
            masks[start + j] = resize_mask(np.asarray(s.mask, bool), spec.size)
            labels[start + j] = int(s.label)
            paths.append(str(s.path))
            defect_types.append(str(s.defect_type))
    return Predictions(scores, maps, masks, labels, paths, defect_types)
