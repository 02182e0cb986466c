"""``knn``: PatchCore-style memory bank of good patch features, nearest-neighbour distance."""
from __future__ import annotations

from ..registry import MethodEntry
from .config import KNNConfig
from .coreset import coreset_size, covering_radius, k_center_greedy, random_projection
from .model import KNNDetector, nearest_neighbor_distance

METHOD = MethodEntry(
    name="knn",
    config_class=KNNConfig,
    detector_class=KNNDetector,
    description="memory bank (k-center greedy coreset) of good patch features; anomaly = nearest-neighbour distance",
)

__all__ = [
    "METHOD",
    "KNNConfig",
    "KNNDetector",
    "coreset_size",
    "covering_radius",
    "k_center_greedy",
    "nearest_neighbor_distance",
    "random_projection",
]
