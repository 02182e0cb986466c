"""``knn`` (PatchCore-style) configuration."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..base import BackboneSpec, MethodConfig

__all__ = ["KNNConfig"]


@dataclass
class KNNConfig(MethodConfig):
    """Nearest-neighbour distance to a memory bank of good patch features.

    Attributes:
        backbone: frozen encoder (several layers are fused on the finest grid). The default uses
            the same encoder and layer as FoundAD, so the two compare like for like.
        resize, smoothing_sigma: see :class:`MethodConfig` (smoothing in input pixels; 0 = off).
        local_aggregation: side of the square neighbourhood averaged around each patch feature
            (PatchCore's local patch aggregation; odd; 1 = off).
        coreset_ratio: fraction of the good patch features kept in the bank (0 < r <= 1).
        max_bank_size: hard cap on the bank size (0 = none); latency and memory grow with it.
        coreset_projection_dim: random projection width for the coreset distances (0 = none).
        coreset_seed: seed of the projection and the first pick (the bank is reproducible).
        score_neighbors: PatchCore's image-score re-weighting: the largest patch distance ``s*``
            is scaled by ``1 - softmax(d)[0]``, ``d`` the distances of that patch to its nearest
            bank entry ``m*`` and to ``m*``'s ``score_neighbors - 1`` nearest bank neighbours, so
            a patch whose nearest good patch sits in a sparse region of the bank counts less.
            1 = off (image score = the largest patch distance).
        pool_per_layer: apply ``local_aggregation`` to every backbone layer before upsampling
            and concatenating them (PatchCore's order) instead of to the fused features.
        bank_size: number of bank entries; written by ``fit`` so a checkpoint rebuilds buffers of
            the right shape (0 = not fitted).
    """

    backbone: BackboneSpec = field(
        default_factory=lambda: BackboneSpec("dinov3_vitb16", layers=(9,), img_size=(512, 512))
    )
    local_aggregation: int = 3
    coreset_ratio: float = 0.1
    max_bank_size: int = 0
    coreset_projection_dim: int = 128
    coreset_seed: int = 0
    # Both off by default: measured with benchmarks/vs_anomalib.py (docs/VS_ANOMALIB.md), neither
    # wins on the shared categories; off is also what checkpoints written before them do.
    score_neighbors: int = 1
    pool_per_layer: bool = False
    bank_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("local_aggregation", "max_bank_size", "coreset_projection_dim", "coreset_seed", "bank_size",
                     "score_neighbors"):
            value = getattr(self, name)
            if int(value) != value or int(value) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            setattr(self, name, int(value))
        if self.local_aggregation < 1 or self.local_aggregation % 2 == 0:
            raise ValueError(f"local_aggregation must be an odd size >= 1, got {self.local_aggregation}")
        if self.score_neighbors < 1:
            raise ValueError(f"score_neighbors must be >= 1 (1 = no re-weighting), got {self.score_neighbors}")
        if not isinstance(self.pool_per_layer, bool):
            raise TypeError(f"pool_per_layer must be true or false, got {self.pool_per_layer!r}")
        self.coreset_ratio = float(self.coreset_ratio)
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
