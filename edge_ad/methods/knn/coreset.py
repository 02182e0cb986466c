"""Greedy k-center coreset selection (PatchCore's memory-bank subsampling).

k-center greedy picks, one at a time, the point farthest from everything picked so far. After k
picks, every feature lies within the *covering radius* of some pick, and that radius is within a
factor 2 of the best possible k-subset's: the subsampled bank still represents every normal
feature, rare ones included, unlike random subsampling. Distances are computed on a random
Gaussian projection to ``projection_dim`` channels (Johnson-Lindenstrauss: pairwise distances are
preserved up to a small factor), which makes each step O(M * d) with small d.
"""
from __future__ import annotations

import math

import torch

__all__ = ["coreset_size", "covering_radius", "k_center_greedy", "random_projection"]

#: Above this many distance evaluations (points x picks) a progress bar is shown by default.
_PROGRESS_WORK = 2e8


def random_projection(features: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """Project (M, C) features to (M, dim) with a seeded Gaussian matrix scaled by 1/sqrt(dim).

    Returns the input (as float32) when ``dim <= 0`` or ``dim >= C`` (nothing to gain).
    """
    x = features.float()
    c = x.shape[1]
    if dim <= 0 or dim >= c:
        return x
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    proj = torch.randn(c, dim, generator=g, dtype=torch.float32) / math.sqrt(dim)
    return x @ proj.to(x.device)


def coreset_size(num_features: int, ratio: float, max_size: int = 0) -> int:
    """How many features a coreset of ``ratio`` keeps: ``round(ratio * M)``, at least 1, at most
    ``max_size`` when that is > 0, never more than M."""
    if num_features <= 0:
        raise ValueError("cannot subsample an empty feature set")
    n = max(1, int(round(ratio * num_features)))
    if max_size > 0:
        n = min(n, int(max_size))
    return min(n, num_features)


@torch.no_grad()
def k_center_greedy(
    features: torch.Tensor,
    num_select: int,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    progress: bool | None = None,
) -> torch.Tensor:
    """Indices of a k-center greedy coreset.

    Args:
        features: (M, C) features (any device; the work runs there).
        num_select: k, 1 <= k <= M.
        projection_dim: random projection width for the distance computations (<= 0: none).
        seed: seeds the projection and the first pick: same inputs + seed = same indices.
        progress: tqdm bar; None = only when the selection is large.

    Returns:
        (k,) int64 indices into ``features`` on the CPU, in pick order (so every prefix is itself a
        greedy coreset: its covering radius never grows as picks are added).
    """
    if features.ndim != 2:
        raise ValueError(f"features must be (M, C), got {tuple(features.shape)}")
    m = features.shape[0]
    if not 1 <= num_select <= m:
        raise ValueError(f"num_select must be in [1, {m}], got {num_select}")
    z = random_projection(features, projection_dim, seed)
    g = torch.Generator(device="cpu").manual_seed(int(seed) + 1)
    first = int(torch.randint(m, (1,), generator=g))
    selected = torch.empty(num_select, dtype=torch.int64)
    selected[0] = first
    # Squared distance to the nearest pick so far; argmax of it is the next pick.
    min_d2 = (z - z[first]).pow(2).sum(dim=1)
    min_d2[first] = 0.0
    steps = range(1, num_select)
    show = progress if progress is not None else m * num_select > _PROGRESS_WORK
    if show:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="coreset", unit="pick", dynamic_ncols=True, mininterval=1.0)
    for i in steps:
        idx = int(torch.argmax(min_d2))
        selected[i] = idx
        min_d2 = torch.minimum(min_d2, (z - z[idx]).pow(2).sum(dim=1))
        min_d2[idx] = 0.0  # exact zero even if rounding left a tiny positive value
    return selected


@torch.no_grad()
def covering_radius(features: torch.Tensor, centers: torch.Tensor, chunk: int = 4096) -> float:
    """``max_i min_j ||features_i - centers_j||``: how far the worst-covered feature is from the bank.

    Args:
        features: (M, C); centers: (K, C); computed in chunks of ``chunk`` rows.
    """
    worst = 0.0
    for part in features.float().split(chunk):
        d = torch.cdist(part, centers.float()).min(dim=1).values
        worst = max(worst, float(d.max()))
    return worst
