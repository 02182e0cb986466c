"""``student`` detector: small frozen backbone + a memory bank and a light conv head, distilled from a teacher.

Why this shape: a teacher (FoundAD, knn, ... on a large backbone or at high resolution) is too
slow for an edge device. The student's map has two parts:

* a **bank term** (``map_head="bank"``, the default): the nearest-neighbour distance of each
  (3x3-aggregated) patch feature to a coreset of good patch features, either the student's own
  (``bank_space="student"``, default) or its adapter's prediction of the teacher's features
  against the teacher's own (``"teacher"``), mapped to the teacher's units by a learned gain and
  offset. It needs no example of a defect to respond to one;
* a **residual conv head** on the adapter output (a 1x1 projection trained to match the teacher's
  features), trained to regress what the bank term misses of the teacher's map, from good images
  and synthetic defects. With ``map_head="regress"`` this head alone is the map (the old default:
  measured to fail on real defects unlike the synthetic ones, docs/DISTILLATION.md).

Everything is Conv / ReLU / AvgPool / MatMul / ReduceMin / Resize / TopK, so the student exports
and quantises like any detector: ``evaluate``, ``convert`` and ``Detector`` take its run directory
unchanged.

Units: the map is predicted in the teacher's *normalised* units (z: standard deviations of
good-image pixels), which keeps the regression well conditioned whatever the teacher's raw scale
(knn distances ~10, FoundAD residuals ~1e-2); fixed buffers map z back to the teacher's raw units,
so :meth:`forward_raw` of the student approximates ``teacher.forward_raw``. The student's own
:class:`~edge_ad.methods.common.ScoreNormalizer` is then fitted on good images like any run.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from edge_ad.backbones.base import Backbone

from ..base import AnomalyDetector, DetectorOutput
from ..common import upsample_to
from ..knn.model import _squared_distances
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
        aggregate: ``local_aggregation`` average pooling of the adapter output (bank head only).
        head: ``head_depth`` x (3x3 conv + ReLU) then 1x1 conv to one channel: z-map (B, 1, h, w)
            (``map_head="bank"``: a residual added to the bank term, zero at initialisation;
            None when ``head_depth == 0``).
        score_head: ``Linear(3 -> 1)`` over (max, top-k mean, mean) of the z-map: z-score (B,).
        bank_gain, bank_offset (``map_head="bank"``): learned scalars, z = gain * distance + offset.

    Buffers (persistent, set by :meth:`set_target_units` / :meth:`set_memory_bank` before training):
        target_map_loc, target_map_scale: raw teacher map = loc + scale * z.
        target_score_loc, target_score_scale: the same for the image score.
        memory_bank (M, A), memory_bank_center (A,), memory_bank_sq_norm (M,), memory_bank_floor
            (): the bank (``map_head="bank"``; M = ``bank_size``, 0 rows otherwise) and the
            distance floor.
    """

    method = "student"
    config_class = StudentConfig
    fit_mode = "gradient"

    def __init__(self, config: StudentConfig, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        cfg: StudentConfig = self.config  # type: ignore[assignment]
        if cfg.map_head == "bank" and cfg.bank_space == "teacher" and not cfg.adapter_dim:
            raise ValueError("map_head='bank' needs an adapter into the teacher's feature space: set adapter_dim "
                             "to the teacher's feature width (distill does this)")
        width = cfg.adapter_dim or self.feature_dim
        self.adapter: nn.Module = (nn.Conv2d(self.feature_dim, cfg.adapter_dim, 1)
                                   if cfg.adapter_dim and cfg.reads_adapter() else nn.Identity())
        self.head: nn.Module | None = None
        if cfg.head_depth:
            layers: list[nn.Module] = []
            for i in range(cfg.head_depth):
                layers += [nn.Conv2d(width if i == 0 else cfg.head_dim, cfg.head_dim, 3, padding=1),
                           nn.ReLU(inplace=True)]
            layers.append(nn.Conv2d(cfg.head_dim, 1, 1))
            if cfg.map_head == "bank":  # the residual starts at zero: the student starts as the bank
                nn.init.zeros_(layers[-1].weight)
                nn.init.zeros_(layers[-1].bias)
            self.head = nn.Sequential(*layers)
        k = cfg.local_aggregation if cfg.map_head == "bank" else 1
        # Same pooling as the knn teacher's (padding excluded, so border patches are not shrunk).
        self.aggregate: nn.Module = (
            nn.AvgPool2d(k, stride=1, padding=k // 2, count_include_pad=False) if k > 1 else nn.Identity()
        )
        self.bank_gain: nn.Parameter | None = None
        self.bank_offset: nn.Parameter | None = None
        if cfg.map_head == "bank":  # regression students keep the tensors they always had
            bank_width = width if cfg.bank_space == "teacher" else self.feature_dim
            self.register_buffer("memory_bank", torch.zeros(cfg.bank_size, bank_width))
            self.register_buffer("memory_bank_center", torch.zeros(bank_width))
            self.register_buffer("memory_bank_sq_norm", torch.zeros(cfg.bank_size))
            self.register_buffer("memory_bank_floor", torch.tensor(0.0))
            self.bank_gain = nn.Parameter(torch.tensor(1.0))
            self.bank_offset = nn.Parameter(torch.tensor(0.0))
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

    @torch.no_grad()
    def set_memory_bank(self, bank: torch.Tensor, distance_loc: float, distance_scale: float,
                        distance_floor: float = 0.0) -> None:
        """Store the bank (M, A): good features in ``bank_space`` (the teacher's, or the student's
        own aggregated ones), and start the bank term at
        z = (distance - distance_loc) / distance_scale (the gain and offset are then learned);
        distances below ``distance_floor`` (feature units) count as the floor (see :meth:`bank_distance`)."""
        cfg: StudentConfig = self.config  # type: ignore[assignment]
        if cfg.map_head != "bank":
            raise RuntimeError("set_memory_bank is for map_head='bank' students")
        if bank.ndim != 2 or bank.shape[1] != self.memory_bank.shape[1] or bank.shape[0] < 1:
            raise ValueError(f"bank must be (M >= 1, {self.memory_bank.shape[1]}), got {tuple(bank.shape)}")
        if not distance_scale > 0:
            raise ValueError(f"distance_scale must be > 0, got {distance_scale}")
        bank = bank.detach().float().to(self.memory_bank_center.device)
        center = bank.double().mean(dim=0)
        self.memory_bank = bank
        self.memory_bank_center = center.float()
        self.memory_bank_sq_norm = (bank.double() - center).pow(2).sum(dim=1).float()
        self.memory_bank_floor.fill_(max(float(distance_floor), 0.0))
        self.bank_gain.fill_(1.0 / float(distance_scale))  # type: ignore[union-attr]
        self.bank_offset.fill_(-float(distance_loc) / float(distance_scale))  # type: ignore[union-attr]
        self.config = cfg.replace(bank_size=int(bank.shape[0]))

    def bank_distance(self, aligned: torch.Tensor) -> torch.Tensor:
        """Distance (B, 1, h, w) of features (B, A, h, w) to their nearest bank entry (feature units):
        adapter outputs (``bank_space="teacher"``) or the student's aggregated features ("student")."""
        if self.memory_bank.shape[0] == 0:  # static shape: export-safe
            raise RuntimeError("the student's memory bank is empty: it is set by edge_ad.distill")
        queries = aligned.flatten(2).transpose(1, 2)  # (B, N, A)
        # ReduceMin over the matmul expansion, as the knn detector does (not ArgMin + a gathered
        # exact difference: OpenVINO runs that ArgMin as a TopK that cost half the student's INT8
        # time, 6.7 of 13.5 ms at 224 px with bank 1000, and erased its speed-up over the teacher).
        # The expansion's rounding, square-rooted next to a bank entry, differs between runtimes
        # by more than the export check allows once the gain scales it up, so distances below a
        # floor (a tenth of the bank's typical entry spacing: well inside "normal") are clamped.
        d2 = _squared_distances(queries, self.memory_bank, self.memory_bank_sq_norm, self.memory_bank_center)
        dist = torch.clamp(d2.min(dim=-1).values, min=self.memory_bank_floor.square()).sqrt()
        return dist.reshape(aligned.shape[0], 1, *aligned.shape[2:])

    # ------------------------------------------------------------------ network
    def _zmap(self, images: torch.Tensor, features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(z-map (B, 1, h, w), adapter output (B, A, h, w)) of normalised images (B, 3, H, W), or of
        their precomputed backbone features (B, C_s, h, w) when given (the backbone is frozen)."""
        cfg: StudentConfig = self.config  # type: ignore[assignment]
        feats = self.extract_features(images) if features is None else features
        if not cfg.reads_adapter():  # own-space bank alone: the adapter is not in the graph
            aligned = self.aggregate(feats)
            return self.bank_gain * self.bank_distance(aligned) + self.bank_offset, aligned  # type: ignore[operator]
        aligned = self.aggregate(self.adapter(feats))
        if self.bank_gain is None:
            return self.head(aligned), aligned  # type: ignore[misc]
        own = cfg.bank_space == "student"
        z = self.bank_gain * self.bank_distance(self.aggregate(feats) if own else aligned) + self.bank_offset
        if self.head is not None:
            z = z + self.head(aligned)
        return z, aligned

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

    def forward(self, images: torch.Tensor, training_outputs: bool = False,  # type: ignore[override]
                features: torch.Tensor | None = None) -> DetectorOutput | StudentTrainingOutput:
        """Inference (normalised map and score) by default; with ``training_outputs`` the raw
        outputs plus the adapter features (:class:`StudentTrainingOutput`), optionally from the
        images' precomputed frozen-backbone ``features`` (B, C_s, h, w) (``distill`` caches them
        when its training images are fixed). The loss calls the module itself so a
        ``DistributedDataParallel`` wrapper sees the call."""
        if not training_outputs:
            return super().forward(images)
        self.check_images(images)
        if features is not None and tuple(features.shape[1:]) != (self.feature_dim, *self.grid_size):
            raise ValueError(f"features must be (B, {self.feature_dim}, {self.grid_size[0]}, {self.grid_size[1]}), "
                             f"got {tuple(features.shape)}")
        z, aligned = self._zmap(images, features)
        patches = self.target_map_loc + self.target_map_scale * z
        score = self.image_score(patches)
        anomaly_map = self.smoother(upsample_to(patches, self.image_size))
        return StudentTrainingOutput(anomaly_map, score, aligned)

    def extra_repr(self) -> str:
        cfg: StudentConfig = self.config  # type: ignore[assignment]
        return (f"grid={self.grid_size}, feature_dim={self.feature_dim}, adapter_dim={cfg.adapter_dim}, "
                f"map_head={cfg.map_head}, bank_size={cfg.bank_size if cfg.map_head == 'bank' else 0}, "
                f"head={cfg.head_depth}x{cfg.head_dim}, teacher={cfg.teacher.get('method')}")
