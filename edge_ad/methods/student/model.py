"""``student`` detector: small frozen backbone + light conv head regressing a teacher's anomaly map.

Why this shape: a teacher (FoundAD, knn, ... on a large backbone) is too slow for an edge device,
but what it computes per patch is a smooth function of local image content. A cheap encoder's
features, optionally projected into the teacher's feature space (the *adapter*, trained to match
the teacher's features), carry most of that content; a few 3x3 convolutions map them to the
teacher's per-patch anomaly. Everything is plain Conv / ReLU / Resize / TopK, so the student
exports and quantises like any detector: ``evaluate``, ``convert`` and ``Detector`` take its run
directory unchanged.

Units: the head predicts the teacher's map in the teacher's *normalised* units (z: standard
deviations of good-image pixels), which keeps the regression well conditioned whatever the
teacher's raw scale (knn distances ~10, FoundAD residuals ~1e-2); fixed buffers map z back to the
teacher's raw units, so :meth:`forward_raw` of the student approximates ``teacher.forward_raw``.
The student's own :class:`~edge_ad.methods.common.ScoreNormalizer` is then fitted on good images
like any run.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from edge_ad.backbones.base import Backbone

from ..base import AnomalyDetector, DetectorOutput
from ..common import upsample_to
from .config import StudentConfig

__all__ = ["StudentDetector", "StudentTrainingOutput"]


class StudentTrainingOutput(NamedTuple):
    """What :meth:`StudentDetector.forward` returns with ``training_outputs=True``.

    Attributes:
        anomaly_map: (B, 1, H, W) raw map at the student's input size, upsampled and smoothed
            exactly as at inference, in the teacher's raw units.
        score: (B,) raw image score, teacher's raw score units.
        aligned: (B, A, h, w) adapter output on the student grid (A = ``adapter_dim``, or the
            student's feature width without an adapter), for the feature-alignment loss.
    """

    anomaly_map: torch.Tensor
    score: torch.Tensor
    aligned: torch.Tensor


class StudentDetector(AnomalyDetector):
    """Distilled detector (see the module docstring).

    Args:
        config: :class:`StudentConfig`.
        backbone: a built backbone (default: built from ``config.backbone``).

    Submodules:
        adapter: 1x1 conv ``C_student -> adapter_dim`` (identity when ``adapter_dim == 0``).
        head: ``head_depth`` x (3x3 conv + ReLU) then 1x1 conv to one channel: z-map (B, 1, h, w).
        score_head: ``Linear(3 -> 1)`` over (max, top-k mean, mean) of the z-map: z-score (B,).

    Buffers (persistent, set by :meth:`set_target_units` before training):
        target_map_loc, target_map_scale: raw teacher map = loc + scale * z.
        target_score_loc, target_score_scale: the same for the image score.
    """

    method = "student"
    config_class = StudentConfig
    fit_mode = "gradient"

    def __init__(self, config: StudentConfig, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        cfg: StudentConfig = self.config  # type: ignore[assignment]
        width = cfg.adapter_dim or self.feature_dim
        self.adapter: nn.Module = nn.Conv2d(self.feature_dim, cfg.adapter_dim, 1) if cfg.adapter_dim else nn.Identity()
        layers: list[nn.Module] = []
        for i in range(cfg.head_depth):
            layers += [nn.Conv2d(width if i == 0 else cfg.head_dim, cfg.head_dim, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(cfg.head_dim, 1, 1))
        self.head = nn.Sequential(*layers)
        self.top_k: int = min(cfg.top_k, self.num_patches)  # static K for TopK at export
        self.score_head = nn.Linear(3, 1)
        with torch.no_grad():  # start as "score = top-k mean of the map": a sensible prior
            self.score_head.weight.copy_(torch.tensor([[0.0, 1.0, 0.0]]))
            self.score_head.bias.zero_()
        for name in ("target_map_loc", "target_score_loc"):
            self.register_buffer(name, torch.tensor(0.0))
        for name in ("target_map_scale", "target_score_scale"):
            self.register_buffer(name, torch.tensor(1.0))

    # ------------------------------------------------------------------ units
    @torch.no_grad()
    def set_target_units(self, map_loc: float, map_scale: float, score_loc: float, score_scale: float) -> None:
        """Fix the teacher's raw units: raw = loc + scale * z (scales must be > 0)."""
        if not (map_scale > 0 and score_scale > 0):
            raise ValueError(f"target scales must be positive, got map {map_scale}, score {score_scale}")
        self.target_map_loc.fill_(float(map_loc))
        self.target_map_scale.fill_(float(map_scale))
        self.target_score_loc.fill_(float(score_loc))
        self.target_score_scale.fill_(float(score_scale))

    # ------------------------------------------------------------------ network
    def _zmap(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z-map (B, 1, h, w), adapter output (B, A, h, w)) of normalised images (B, 3, H, W)."""
        aligned = self.adapter(self.extract_features(images))
        return self.head(aligned), aligned

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted teacher patch anomaly (B, 1, h, w) in the teacher's raw map units."""
        z, _ = self._zmap(images)
        return self.target_map_loc + self.target_map_scale * z

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Predicted teacher image score (B,) in its raw units, from (max, top-k mean, mean) of the z-map."""
        z = ((patch_scores - self.target_map_loc) / self.target_map_scale).flatten(1)
        stats = torch.stack(
            [z.max(dim=1).values, torch.topk(z, self.top_k, dim=1).values.mean(dim=1), z.mean(dim=1)], dim=1
        )
        return self.target_score_loc + self.target_score_scale * self.score_head(stats).squeeze(1)

    def forward(self, images: torch.Tensor, training_outputs: bool = False) -> DetectorOutput | StudentTrainingOutput:  # type: ignore[override]
        """Inference (normalised map and score) by default; with ``training_outputs`` the raw
        outputs plus the adapter features (:class:`StudentTrainingOutput`). The loss calls the
        module itself so a ``DistributedDataParallel`` wrapper sees the call."""
        if not training_outputs:
            return super().forward(images)
        self.check_images(images)
        z, aligned = self._zmap(images)
        patches = self.target_map_loc + self.target_map_scale * z
        score = self.image_score(patches)
        anomaly_map = self.smoother(upsample_to(patches, self.image_size))
        return StudentTrainingOutput(anomaly_map, score, aligned)

    def extra_repr(self) -> str:
        cfg: StudentConfig = self.config  # type: ignore[assignment]
        return (f"grid={self.grid_size}, feature_dim={self.feature_dim}, adapter_dim={cfg.adapter_dim}, "
                f"head={cfg.head_depth}x{cfg.head_dim}, teacher={cfg.teacher.get('method')}")
