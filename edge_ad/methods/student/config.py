"""Configuration of the ``student`` method: a small detector distilled from a trained teacher."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..base import BackboneSpec, MethodConfig

__all__ = ["StudentConfig"]


@dataclass
class StudentConfig(MethodConfig):
    """A cheap backbone + a light convolutional head that regresses a teacher detector's outputs.

    The student is trained by :func:`edge_ad.converters.distill` (it is not trained from good
    images alone: it learns what the teacher flags). Its raw outputs are in the *teacher's* raw
    units, so the teacher's thresholds and the student's own normaliser mean the same thing.

    Attributes:
        backbone: the student's frozen encoder (default EfficientNet-Lite0, stages 2+3, 224 px).
        resize, smoothing_sigma: see :class:`MethodConfig`; ``distill`` copies the teacher's resize
            mode and scales its smoothing (input pixels) to the student's input size.
        map_head: how the z-map is computed.
            ``"bank"`` (default): nearest-neighbour distance to a memory bank of good patch
            features (see ``bank_space``), mapped to z units by a learned gain and offset, plus
            the conv head on the adapter output as a residual correction (``head_depth`` 0 =
            none; it starts at zero). The bank term needs no example of a defect to respond to
            one: a patch unlike every good patch scores high, which is why it holds on real
            defects that look nothing like the synthetic ones. ``"regress"``: the conv head alone
            regresses the teacher's map (learns what the teacher flags from good images and
            synthetic defects; the old default, measured to fail on magnetic tile).
        bank_space: ``map_head="bank"`` only: where distances are measured. ``"student"``
            (default): the student's own aggregated backbone features against its own good
            features; the teacher shapes the gain / offset, the residual head (through the
            adapter, aligned to the teacher's features) and the image score. ``"teacher"``: the
            adapter output (predicted teacher features) against the teacher's good features on
            the student grid. Both are measured in docs/DISTILLATION.md ("Diagnosis").
        bank_size: memory bank entries (k-center greedy coreset of the good patch features of
            ``bank_space``); 0 = ``distill`` picks min(1000, good patches). The size actually
            used is written back, so a checkpoint rebuilds the buffers of the right shape.
        local_aggregation: ``map_head="bank"`` only: side of the square neighbourhood averaged
            around every patch feature that is compared with the bank (and around the adapter
            output and its teacher-feature target), as a knn teacher aggregates its own; odd;
            1 = off.
        adapter_dim: channels of the learned 1x1 projection of the student features into the
            teacher's feature space (= the teacher's fused feature width, so the projection can
            be aligned with the teacher's features); 0 = no adapter, the head reads the student
            features directly.
        head_dim: width of the head's 3x3 convolutions.
        head_depth: number of 3x3 conv + ReLU layers before the final 1x1 conv to one channel;
            None = 2 for ``map_head="regress"``, 0 (no residual head) for ``"bank"``: measured,
            the residual head trained on synthetic defects did not help the bank on real ones
            and costs as much as a third of the student's INT8 time (docs/DISTILLATION.md).
        top_k: the image-score head reads max, mean and the mean of the ``top_k`` largest patch
            values of the predicted map (clamped to the patch count when built).
        feature_weight: weight of the feature-alignment loss (per patch; 0 disables it, and with
            ``map_head="regress"`` ``distill`` then builds no adapter). It applies only where
            something reads the adapter (:meth:`reads_adapter`): a bank in the student's own
            space without a residual head has no adapter and no feature term.
        feature_loss: ``"cosine"`` (1 - cosine: direction only, the teacher's feature scale is
            ignored) or ``"mse"`` (squared error divided by the teacher features' variance:
            what a distance in the teacher's feature space needs, since distances depend on scale).
        score_weight: weight of the image-score regression loss (in teacher score units).
        lr, weight_decay, batch_size, steps: the optimisation ``distill`` uses by default.
        synthetic_fraction: share of training samples that carry a synthetic anomaly (CutPaste
            or Perlin, alternating), so the student sees what the teacher flags.
        synthetic_pool: 0 = a fresh synthetic anomaly (and teacher pass) for every synthetic
            sample of every step (most variety); N > 0 = N synthetic samples made once, their
            teacher targets cached, and steps draw from them (the teacher then runs N times in
            all instead of ~``steps * batch_size * synthetic_fraction``: what makes a slow
            teacher affordable on a CPU).
        teacher: provenance of the teacher: ``{"run_dir", "method", "backbone", "config_sha256",
            "model_sha256", "image_size"}`` (informational; never used to rebuild the module).
    """

    backbone: BackboneSpec = field(
        default_factory=lambda: BackboneSpec("efficientnet_lite0", layers=(2, 3), img_size=(224, 224))
    )
    # Defaults measured with benchmarks/distill_sweep.py (docs/DISTILLATION.md, "Diagnosis"): the
    # regression head alone failed on real defects unlike the synthetic ones; the bank holds.
    map_head: str = "bank"
    bank_space: str = "student"
    bank_size: int = 0
    local_aggregation: int = 3
    adapter_dim: int = 0
    head_dim: int = 64
    head_depth: int | None = None
    top_k: int = 10
    feature_weight: float = 1.0
    feature_loss: str = "mse"
    score_weight: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    steps: int = 300
    synthetic_fraction: float = 0.5
    synthetic_pool: int = 0
    teacher: dict[str, Any] = field(default_factory=dict)

    def reads_adapter(self) -> bool:
        """Whether the map reads the adapter (regression or residual head, or a teacher-space bank)."""
        return self.map_head == "regress" or bool(self.head_depth) or self.bank_space == "teacher"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StudentConfig":
        """Checkpoints written before the bank head existed (no ``map_head`` key) are regression
        students with a cosine feature term: they load as what they were trained as."""
        d = dict(d)
        if "map_head" not in d:
            d.update(map_head="regress", feature_loss="cosine", feature_weight=d.get("feature_weight", 0.5))
        return super().from_dict(d)  # type: ignore[return-value]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.map_head not in ("regress", "bank"):
            raise ValueError(f"map_head must be 'regress' or 'bank', got {self.map_head!r}")
        if self.bank_space not in ("teacher", "student"):
            raise ValueError(f"bank_space must be 'teacher' or 'student', got {self.bank_space!r}")
        if self.feature_loss not in ("cosine", "mse"):
            raise ValueError(f"feature_loss must be 'cosine' or 'mse', got {self.feature_loss!r}")
        if self.head_depth is None:
            self.head_depth = 2 if self.map_head == "regress" else 0
        for name in ("adapter_dim", "synthetic_pool", "bank_size", "head_depth", "local_aggregation"):
            value = getattr(self, name)
            if int(value) != value or int(value) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
            setattr(self, name, int(value))
        if self.local_aggregation < 1 or self.local_aggregation % 2 == 0:
            raise ValueError(f"local_aggregation must be an odd size >= 1, got {self.local_aggregation}")
        if self.map_head == "regress" and self.head_depth == 0:
            raise ValueError("head_depth must be >= 1 with map_head='regress' (the head is the map)")
        for name in ("head_dim", "top_k", "batch_size", "steps"):
            value = getattr(self, name)
            if int(value) != value or int(value) <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            setattr(self, name, int(value))
        for name in ("feature_weight", "score_weight", "weight_decay"):
            value = float(getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(self, name, value)
        self.lr = float(self.lr)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        self.synthetic_fraction = float(self.synthetic_fraction)
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}")
        self.teacher = dict(self.teacher or {})
