"""FoundAD detector: frozen foundation encoder + manifold projector; anomaly = projection residual.

After "Foundation Visual Encoders Are Secretly Few-Shot Anomaly Detectors" (Zhai et al., 2025).
A projector is trained on a few good images to reproduce the clean features from features of the
clean *or* a synthetically corrupted (CutPaste) image, i.e. to pull any feature back onto the
manifold of normal features. On a test image, features on the manifold pass through almost
unchanged; anomalous ones are pulled towards normality, so ``|f - projector(f)|^2`` is large there.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from edge_ad.backbones.base import Backbone

from ..base import AnomalyDetector, DetectorOutput
from .config import FoundADConfig

__all__ = ["FoundAD", "ManifoldProjector", "ProjectionPair", "ProjectorBlock"]


class ProjectionPair(NamedTuple):
    """Training output of :meth:`FoundAD.forward` with a context.

    Attributes:
        predicted: (B, N, C) projector output for the context features (dropout applied in train mode).
        target: (B, N, C) features of the clean images (no gradient).
    """

    predicted: torch.Tensor
    target: torch.Tensor


class _Attention(nn.Module):
    """Multi-head self-attention written with plain matmuls: it exports to the MatMul / Softmax
    pattern that TensorRT and OpenVINO fuse, on every opset."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, d = x.shape[1], x.shape[2]
        # -1 for the batch: keeps a dynamic batch axis possible in exported graphs.
        qkv = self.qkv(x).reshape(-1, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, head_dim)
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, d)
        return self.proj(out)


class ProjectorBlock(nn.Module):
    """Pre-norm ViT block: ``x + attn(LN(x))`` then ``x + mlp(LN(x))`` (GELU MLP)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(round(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ManifoldProjector(nn.Module):
    """Token-wise projector ``(B, N, C) -> (B, N, C)``.

    ``Linear(C -> D)`` embeds the tokens (``e``); each block's output gets ``e`` added back
    (``x = block(x) + e``), which keeps the input's identity in every layer so the projector only
    has to learn a correction towards normal features; then ``LayerNorm`` and ``Linear(D -> C)``.
    No positional embedding: the projection must be the same wherever a defect sits, and the input
    size stays free.

    Args:
        in_dim: feature channels C.
        dim: width D.
        depth: number of blocks.
        num_heads: attention heads (divide D).
        mlp_ratio: MLP hidden width / D.
    """

    def __init__(self, in_dim: int, dim: int = 384, depth: int = 6, num_heads: int = 12, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList([ProjectorBlock(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, in_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """ViT initialisation: truncated normal (std 0.02) weights, zero biases, unit LayerNorms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embed(tokens)
        x = e
        for block in self.blocks:
            x = block(x) + e
        return self.head(self.norm(x))


class FoundAD(AnomalyDetector):
    """FoundAD detector.

    Inference (``forward(images)``): features ``f`` (B, N, C) of the frozen encoder, patch score
    ``mean_c (f - projector(f))^2`` on the (h, w) grid, image score = mean of the ``top_k`` largest
    patch scores, map bilinearly upsampled to the input size and Gaussian-smoothed, both
    normalised with good-image statistics.

    Training (``forward(clean, context)``): returns :class:`ProjectionPair` ``(projector(dropout(
    f_context)), f_clean)``; :func:`edge_ad.methods.foundad.loss.loss_fn` takes the MSE. Going
    through ``forward`` lets a ``DistributedDataParallel`` wrapper see the call. ``clean`` and
    ``context`` may be images (B, 3, H, W) or precomputed backbone tokens (B, N, C) (from
    :meth:`features`), e.g. to cache the encoder's output.

    Args:
        config: :class:`FoundADConfig`.
        backbone: a built backbone (default: built from ``config.backbone``).

    Attributes:
        projector: :class:`ManifoldProjector` (the only trainable part).
        top_k: the static K of the image score (``min(config.top_k, num_patches)``).
    """

    method = "foundad"
    config_class = FoundADConfig
    fit_mode = "gradient"
    # Float depthwise convs in OpenVINO INT8: on the four real categories of benchmarks/vs_anomalib.py
    # the test-set INT8 score error fell 24-79 % (transistor image-AUROC delta -12.5 -> -6.2 pt)
    # for +9-18 % INT8 engine time (benchmarks/int8_recipe.py); FoundAD is the accuracy-first method.
    int8_quantize_depthwise = False

    def __init__(self, config: FoundADConfig, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        cfg: FoundADConfig = self.config  # type: ignore[assignment]
        self.top_k: int = min(cfg.top_k, self.num_patches)  # static: TopK needs a constant K
        self.feature_dropout = nn.Dropout(cfg.feature_dropout)
        self.projector = ManifoldProjector(
            self.feature_dim, cfg.projector_dim, cfg.projector_depth, cfg.projector_heads, cfg.projector_mlp_ratio
        )
        if cfg.feature_norm == "channel":
            # Identity until fit_feature_norm; buffers so they travel with checkpoints and exports.
            self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
            self.register_buffer("feature_std", torch.ones(self.feature_dim))

    # ------------------------------------------------------------------ feature standardisation
    @torch.no_grad()
    def fit_feature_norm(self, images: torch.Tensor, batch_size: int = 8) -> dict[str, float]:
        """Fit the per-channel token statistics of ``feature_norm="channel"`` on good images.

        Args:
            images: (B, 3, H, W) normalised good images (the training shots).
            batch_size: encoder batch.

        Returns:
            ``{"tokens": count, "std_min": ..., "std_median": ..., "std_max": ...}`` of the raw
            features (feature units), for the training log. A no-op (empty dict) with
            ``feature_norm="none"``.

        The standard deviation is floored at 10 % of the channels' RMS standard deviation: a
        channel that is (almost) constant on the shots would otherwise turn tiny test-time noise
        into huge residuals.
        """
        if self.config.feature_norm != "channel":  # type: ignore[attr-defined]
            return {}
        self.check_images(images)
        raw = torch.cat([self._raw_features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        flat = raw.reshape(-1, raw.shape[-1]).double()
        mean, var = flat.mean(dim=0), flat.var(dim=0, unbiased=False)
        std = (var + 0.01 * var.mean()).sqrt()
        self.feature_mean.copy_(mean.to(self.feature_mean))
        self.feature_std.copy_(std.to(self.feature_std))
        raw_std = var.sqrt()
        return {"tokens": int(flat.shape[0]), "std_min": float(raw_std.min()), "std_median": float(raw_std.median()),
                "std_max": float(raw_std.max())}

    # ------------------------------------------------------------------ features
    def _raw_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract_features(images).flatten(2).transpose(1, 2)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, N, C) of images (B, 3, H, W); N = h * w in row-major grid order;
        standardised per channel with ``feature_norm="channel"``."""
        f = self._raw_features(images)
        if self.config.feature_norm == "channel":  # type: ignore[attr-defined]
            f = (f - self.feature_mean) / self.feature_std
        return f

    def _training_tokens(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.ndim == 3:
            if tuple(x.shape[1:]) != (self.num_patches, self.feature_dim):
                raise ValueError(
                    f"{what} tokens must be (B, {self.num_patches}, {self.feature_dim}), got {tuple(x.shape)}"
                )
            return x.detach()
        self.check_images(x)
        with torch.no_grad():  # frozen encoder: no activations kept for backward
            return self.features(x)

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, context: torch.Tensor | None = None) -> DetectorOutput | ProjectionPair:  # type: ignore[override]
        """Inference without ``context``; the training pair with it (see the class docstring)."""
        if context is None:
            return super().forward(images)
        return self.training_forward(images, context)

    def training_forward(self, clean: torch.Tensor, context: torch.Tensor) -> ProjectionPair:
        """Projector output for ``context`` and the clean target features (see the class docstring)."""
        if clean.shape[0] != context.shape[0]:
            raise ValueError(f"clean and context batches differ in size: {clean.shape[0]} vs {context.shape[0]}")
        if clean.ndim == 4 and context.ndim == 4 and clean is not context:
            # One encoder pass over both halves: better GPU utilisation than two small ones.
            self.check_images(clean)
            self.check_images(context)
            with torch.no_grad():
                both = self.features(torch.cat([clean, context]))
            target, ctx = both.chunk(2)
        else:
            target = self._training_tokens(clean, "clean")
            ctx = target if context is clean else self._training_tokens(context, "context")
        predicted = self.projector(self.feature_dropout(ctx))
        return ProjectionPair(predicted, target)

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Squared projection residual averaged over channels, (B, 1, h, w), in feature units^2."""
        f = self.features(images)
        residual = (f - self.projector(f)).pow(2).mean(dim=-1)  # (B, N); no dropout at inference
        return residual.reshape(-1, 1, *self.grid_size)

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Mean of the ``top_k`` largest patch scores, (B,)."""
        return torch.topk(patch_scores.flatten(1), self.top_k, dim=1).values.mean(dim=1)

    def extra_repr(self) -> str:
        return (
            f"grid={self.grid_size}, feature_dim={self.feature_dim}, top_k={self.top_k}, "
            f"smoothing_sigma={self.config.smoothing_sigma}"
        )
