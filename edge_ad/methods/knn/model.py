"""``knn`` detector: PatchCore-style nearest-neighbour distance to a bank of good patch features."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from edge_ad.backbones.base import Backbone

from ..base import AnomalyDetector, DetectorOutput
from ..common import fuse_feature_maps, iterate_image_batches, upsample_to
from .config import KNNConfig
from .coreset import coreset_size, k_center_greedy

__all__ = ["KNNDetector", "bank_neighbors", "nearest_neighbor", "nearest_neighbor_distance", "reweighted_image_score"]


def nearest_neighbor_distance(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq_norm: torch.Tensor | None = None,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euclidean distance of every query to its nearest bank entry, via one matmul.

    ``||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b``: the (B, N, M) similarity is a single MatMul (fast
    on every accelerator, exports as ONNX MatMul) instead of a broadcast subtraction that would
    materialise B x N x M x C values. The minimum is taken on squared distances (monotone), then
    clamped at 0 (rounding can make the expansion slightly negative) and square-rooted once per query.

    The expansion cancels catastrophically when the norms are large next to the distances (foundation
    model features share a big common component), so both sides are first shifted by ``center``
    (distances are translation invariant); with the bank mean as centre the squared norms stay near
    the distance scale, which also keeps them inside float16 range on TensorRT / OpenVINO.

    Args:
        queries: (B, N, C).
        bank: (M, C).
        bank_sq_norm: (M,) precomputed ``||b - center||^2`` (computed here when None).
        center: (C,) shift applied to queries and bank (None = no shift).

    Returns:
        (B, N) distances, in feature units.
    """
    d2 = _squared_distances(queries, bank, bank_sq_norm, center)
    return torch.clamp(d2.min(dim=-1).values, min=0.0).sqrt()


def _squared_distances(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq_norm: torch.Tensor | None, center: torch.Tensor | None
) -> torch.Tensor:
    """(B, N, M) squared distances by the matmul expansion (see :func:`nearest_neighbor_distance`)."""
    if center is not None:
        queries = queries - center
        bank = bank - center  # constant-folded into the initializer at ONNX export
    if bank_sq_norm is None:
        bank_sq_norm = bank.pow(2).sum(dim=1)
    q_sq = queries.pow(2).sum(dim=-1, keepdim=True)  # (B, N, 1)
    return q_sq + bank_sq_norm - 2.0 * torch.matmul(queries, bank.t())


def nearest_neighbor(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_sq_norm: torch.Tensor,
    center: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest_neighbor_distance` plus the index of the nearest bank entry.

    Args: as :func:`nearest_neighbor_distance` (``bank_sq_norm`` and ``center`` precomputed).

    Returns:
        ((B, N) distances in feature units, (B, N) int64 indices into ``bank``).
    """
    best = _squared_distances(queries, bank, bank_sq_norm, center).min(dim=-1)
    return torch.clamp(best.values, min=0.0).sqrt(), best.indices


@torch.no_grad()
def bank_neighbors(bank: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Indices (M, k) of every bank entry's ``k`` nearest bank entries, itself first.

    Precomputed at fit time so the image-score re-weighting costs one gather at inference instead
    of a second search over the bank. Rows are processed ``chunk`` at a time (memory O(chunk x M)).
    """
    k = min(int(k), bank.shape[0])
    center = bank.double().mean(dim=0).float()
    b = bank - center
    sq = b.pow(2).sum(dim=1)
    out = []
    for start in range(0, b.shape[0], chunk):
        rows = b[start : start + chunk]
        d2 = sq[start : start + chunk, None] + sq[None, :] - 2.0 * rows @ b.t()
        # Exact self match first, whatever the rounding of the expansion.
        d2[torch.arange(rows.shape[0]), torch.arange(start, start + rows.shape[0])] = -1.0
        out.append(d2.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def reweighted_image_score(
    distances: torch.Tensor,
    indices: torch.Tensor,
    queries: torch.Tensor,
    bank: torch.Tensor,
    neighbors: torch.Tensor,
) -> torch.Tensor:
    """PatchCore's image score (Roth et al. 2022, eq. 7): ``s = (1 - softmax(d)[0]) * s*``.

    ``s*`` is the largest patch distance of the image, ``m*`` that patch's nearest bank entry and
    ``d`` the distances of the patch to ``m*`` and to ``m*``'s nearest bank neighbours
    (``neighbors[m*]``, itself first). Only static-shape ops (ArgMax, Gather, MatMul, Softmax):
    it exports to ONNX and quantises like the rest of the graph.

    Args:
        distances: (B, N) nearest-neighbour distance per patch.
        indices: (B, N) int64 nearest bank entry per patch.
        queries: (B, N, C) patch features.
        bank: (M, C) memory bank.
        neighbors: (M, K) int64 from :func:`bank_neighbors`.

    Returns:
        (B,) image scores, in feature units (<= the largest patch distance).
    """
    top = distances.argmax(dim=1, keepdim=True)  # (B, 1)
    s_star = torch.gather(distances, 1, top).squeeze(1)  # (B,)
    m_star = torch.gather(indices, 1, top).squeeze(1)  # (B,)
    feat = torch.gather(queries, 1, top.unsqueeze(-1).expand(-1, 1, queries.shape[-1]))  # (B, 1, C)
    support = bank[neighbors[m_star]]  # (B, K, C)
    d = (support - feat).pow(2).sum(dim=-1).clamp_min(0.0).sqrt()  # (B, K)
    weight = 1.0 - torch.softmax(d, dim=1)[:, 0]
    return weight * s_star


class KNNDetector(AnomalyDetector):
    """PatchCore-style detector.

    Patch features (layers averaged over a ``local_aggregation`` neighbourhood, each layer before
    fusing with ``pool_per_layer``, else the fused map) of good images form a memory bank,
    subsampled by k-center greedy; a test patch's score is the distance to its nearest bank entry,
    the image score the largest patch score, re-weighted as PatchCore does when
    ``score_neighbors > 1`` (:func:`reweighted_image_score`).

    Fitting (``fit_mode = "memory"``)::

        detector.fit(good_image_batches)          # builds the bank (buffers + config.bank_size)
        detector.fit_normalization(other_good)    # optional but recommended
        save_checkpoint(detector, run_dir)

    Args:
        config: :class:`KNNConfig`; ``config.bank_size`` sizes the (empty) bank buffers so a
            checkpoint can be loaded into them.
        backbone: a built backbone (default: built from ``config.backbone``).

    Buffers:
        memory_bank: (M, C) float32 bank.
        memory_bank_center: (C,) mean of the bank; queries and bank are shifted by it before the
            matmul distance (precision, see :func:`nearest_neighbor_distance`).
        memory_bank_sq_norm: (M,) ``||b - center||^2`` of every entry, precomputed.
        memory_bank_neighbors: (M, K) int64, every entry's K = min(score_neighbors, M) nearest
            entries, itself first (only used when ``score_neighbors > 1``).
    """

    method = "knn"
    config_class = KNNConfig
    fit_mode = "memory"

    def __init__(self, config: KNNConfig, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        cfg: KNNConfig = self.config  # type: ignore[assignment]
        k = cfg.local_aggregation
        # count_include_pad=False: border patches average their real neighbours only, instead of
        # being shrunk towards zero by padding (which would make every border patch look odd).
        self.aggregate: nn.Module = (
            nn.AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=False) if k > 1 else nn.Identity()
        )
        self.register_buffer("memory_bank", torch.zeros(cfg.bank_size, self.feature_dim))
        self.register_buffer("memory_bank_center", torch.zeros(self.feature_dim))
        self.register_buffer("memory_bank_sq_norm", torch.zeros(cfg.bank_size))
        k = min(cfg.score_neighbors, cfg.bank_size) if cfg.score_neighbors > 1 else 0
        self.register_buffer("memory_bank_neighbors", torch.zeros(cfg.bank_size, k, dtype=torch.int64))

    @property
    def bank_size(self) -> int:
        return int(self.memory_bank.shape[0])

    # ------------------------------------------------------------------ features
    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated patch features (B, N, C) of images (B, 3, H, W), N = h * w row-major."""
        cfg: KNNConfig = self.config  # type: ignore[assignment]
        if cfg.pool_per_layer:
            features, _ = self.backbone(images)
            fused = fuse_feature_maps([self.aggregate(f) for f in features])
        else:
            fused = self.aggregate(self.extract_features(images))
        return fused.flatten(2).transpose(1, 2)

    # ------------------------------------------------------------------ fitting
    @torch.no_grad()
    def fit(self, good_images: torch.Tensor | Iterable[torch.Tensor], *, progress: bool | None = None) -> "KNNDetector":
        """Build the memory bank from good images (or from their patch features).

        Args:
            good_images: normalised images (N, 3, H, W) or an iterable of such batches (also
                ``(images, ...)`` tuples). Batches of precomputed patch features, (B, N, C) from
                :meth:`patch_features` or (M, C), are accepted too and used as they are.
            progress: tqdm bars (feature extraction and coreset); None = automatic.

        Returns:
            self (bank filled, ``config.bank_size`` updated).
        """
        was_training = self.training
        self.eval()
        chunks = []
        batches = iterate_image_batches(good_images, feature_dim=self.feature_dim)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="knn features", unit="batch", dynamic_ncols=True)
        try:
            for batch in batches:
                batch = batch.to(self.device)
                if batch.ndim in (2, 3) and batch.shape[-1] == self.feature_dim:
                    chunks.append(batch.reshape(-1, self.feature_dim).float())  # already features
                    continue
                self.check_images(batch)
                chunks.append(self.patch_features(batch).reshape(-1, self.feature_dim).float())
        finally:
            self.train(was_training)
        if not chunks:
            raise ValueError("knn fit got no images: pass at least one good image")
        return self.fit_features(torch.cat(chunks), progress=progress)

    @torch.no_grad()
    def fit_features(self, features: torch.Tensor, *, progress: bool | None = None) -> "KNNDetector":
        """Build the bank from precomputed patch features (M, C) (from :meth:`patch_features`)."""
        if features.ndim != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must be (M, {self.feature_dim}), got {tuple(features.shape)}")
        if not torch.isfinite(features).all():
            raise ValueError("non-finite patch features: check the input normalisation")
        cfg: KNNConfig = self.config  # type: ignore[assignment]
        n = coreset_size(features.shape[0], cfg.coreset_ratio, cfg.max_bank_size)
        if n < features.shape[0]:
            idx = k_center_greedy(
                features, n, projection_dim=cfg.coreset_projection_dim, seed=cfg.coreset_seed, progress=progress
            )
            features = features[idx.to(features.device)]
        self.set_memory_bank(features)
        return self

    def set_memory_bank(self, bank: torch.Tensor) -> None:
        """Install a bank (M, C) as-is (no subsampling); updates ``config.bank_size``."""
        if bank.ndim != 2 or bank.shape[1] != self.feature_dim or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be (M >= 1, {self.feature_dim}), got {tuple(bank.shape)}")
        bank = bank.detach().to(device=self.memory_bank.device, dtype=torch.float32).contiguous()
        # Re-assigning registered buffers keeps them buffers (with the new shape).
        center = bank.double().mean(dim=0)
        self.memory_bank = bank
        self.memory_bank_center = center.float()
        self.memory_bank_sq_norm = (bank.double() - center).pow(2).sum(dim=1).float()
        k = self.config.score_neighbors  # type: ignore[attr-defined]
        self.memory_bank_neighbors = (
            bank_neighbors(bank, k) if k > 1 else torch.zeros(bank.shape[0], 0, dtype=torch.int64, device=bank.device)
        )
        self.config = self.config.replace(bank_size=int(bank.shape[0]))

    # ------------------------------------------------------------------ inference
    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour distance of every patch, (B, 1, h, w), in feature units."""
        self._check_fitted()
        queries = self.patch_features(images)
        dist = nearest_neighbor_distance(queries, self.memory_bank, self.memory_bank_sq_norm, self.memory_bank_center)
        return dist.reshape(-1, 1, *self.grid_size)

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Largest patch score, (B,) (the score without re-weighting; :meth:`forward_raw` applies it)."""
        return patch_scores.flatten(1).max(dim=1).values

    def forward_raw(self, images: torch.Tensor) -> DetectorOutput:
        """Map from the patch distances; image score re-weighted when ``score_neighbors > 1``."""
        cfg: KNNConfig = self.config  # type: ignore[assignment]
        if cfg.score_neighbors <= 1:
            return super().forward_raw(images)
        self.check_images(images)
        self._check_fitted()
        queries = self.patch_features(images)
        dist, idx = nearest_neighbor(queries, self.memory_bank, self.memory_bank_sq_norm, self.memory_bank_center)
        score = reweighted_image_score(dist, idx, queries, self.memory_bank, self.memory_bank_neighbors)
        patches = dist.reshape(-1, 1, *self.grid_size)
        return DetectorOutput(self.smoother(upsample_to(patches, self.image_size)), score)

    def _check_fitted(self) -> None:
        if self.memory_bank.shape[0] == 0:  # static shape, not data: export-safe
            raise RuntimeError("the knn memory bank is empty: call detector.fit(good_images) first")

    def extra_repr(self) -> str:
        return f"grid={self.grid_size}, feature_dim={self.feature_dim}, bank_size={self.bank_size}"
