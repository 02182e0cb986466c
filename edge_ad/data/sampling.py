"""Deterministic k-shot selection of training images."""
from __future__ import annotations

import hashlib
from collections.abc import Sized

from .base import AnomalyDataset, Subset

__all__ = ["sample_k_shot", "k_shot_subset"]


def _rank_key(seed: int, index: int) -> bytes:
    return hashlib.sha256(f"edge_ad.k_shot:{seed}:{index}".encode()).digest()[:8]


def sample_k_shot(n_or_dataset: int | Sized, k: int, seed: int = 0) -> list[int]:
    """Pick ``k`` distinct indices out of ``n`` for a k-shot experiment.

    The choice depends only on ``(n, k, seed)``: every index is ranked by a SHA-256 hash of
    ``(seed, index)`` and the ``k`` best-ranked are taken, so the result is identical across
    machines, Python and numpy versions, and nested in ``k`` (the 1-shot pick is part of the 2-shot
    pick, and so on, for the same ``n`` and ``seed``).

    Args:
        n_or_dataset: the number of candidates, or anything with ``len()`` (e.g. a dataset).
        k: how many to pick, ``1 <= k <= n``.
        seed: any integer; different seeds give (almost always) different picks.

    Returns:
        ``k`` distinct indices in ``0..n-1``, ascending.

    Raises:
        ValueError: ``k`` out of range, ``n`` negative; TypeError: non-integer ``k`` / ``seed`` / ``n``.
    """
    if isinstance(n_or_dataset, bool):
        raise TypeError("n_or_dataset must be an int or a sized collection, got a bool")
    if isinstance(n_or_dataset, int):
        n = n_or_dataset
    elif hasattr(n_or_dataset, "__len__"):
        n = len(n_or_dataset)
    else:
        try:
            n = int(n_or_dataset.__index__())  # numpy integers
        except AttributeError:
            raise TypeError(f"n_or_dataset must be an int or a sized collection, got {type(n_or_dataset).__name__}") from None
    for name, value in (("k", k), ("seed", seed)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    k, seed = int(k.__index__()), int(seed.__index__())
    if n < 0:
        raise ValueError(f"the number of candidates must be >= 0, got {n}")
    if not 1 <= k <= n:
        raise ValueError(
            f"k must be between 1 and the {n} available images, got k={k}"
            + ("; use fewer shots or add training images" if k > n else "")
        )
    ranked = sorted(range(n), key=lambda i: _rank_key(seed, i))
    return sorted(ranked[:k])


def k_shot_subset(dataset: AnomalyDataset, k: int, seed: int = 0) -> Subset:
    """The k-shot training subset of ``dataset``: ``dataset.subset(sample_k_shot(dataset, k, seed))``."""
    return dataset.subset(sample_k_shot(dataset, k, seed))
