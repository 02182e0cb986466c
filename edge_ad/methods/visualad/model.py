"""VisualAD detector: learnable anomaly / normal tokens inside a frozen ViT.

After "VisualAD" (language-free zero-shot anomaly detection; public reference code read, not
copied). Two learnable tokens, the *anomaly* and the *normal* token, are put in front of the CLS
token of a frozen ViT (CLIP ViT-L/14-336 in the reference, any DINOv2 / DINOv3 registry ViT in the
language-free variant) with their own positional embeddings, so self-attention lets them gather
what the image contains. At each tapped block the sequence goes through a trainable copy of the
final norm; per tap, a :class:`SpatialCrossAttention` refines both tokens against that layer's
patches and a :class:`SelfAlignmentMLP` maps the patches into the tokens' space. A patch's score at
that layer is ``cos(patch, t_a) - cos(patch, t_n)``; the layers' maps are upsampled to the input
size and summed, smoothed with a Gaussian (sigma 4 px, symmetric borders as scipy), and the image
score is the mean of the top 1 % pixels.

The backbone stays frozen and in eval mode; its timm blocks are run here (``patch_embed``,
``_pos_embed``, ``norm_pre``, ``blocks``) because the tokens enter its sequence. No Python branch
depends on tensor values, so the fixed-size module exports to ONNX as it runs.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn

from edge_ad.backbones.base import Backbone

from ..base import AnomalyDetector, DetectorOutput
from ..common import upsample_to
from .attention import SelfAlignmentMLP, SpatialCrossAttention, cosine_to
from .config import VisualADConfig
from .scoring import SymmetricGaussianBlur, TopFractionMean

__all__ = ["TrainOutputs", "VisualAD", "VisualADHead"]

#: The two learnable tokens sit at sequence positions 0 (anomaly) and 1 (normal), before CLS.
NUM_SPECIAL_TOKENS = 2


class TrainOutputs(NamedTuple):
    """What ``VisualAD.forward(images, train_outputs=True)`` returns for the losses.

    Attributes:
        layer_maps: (B, L, H, W) per-tapped-layer scores ``cos(p, t_a) - cos(p, t_n)`` bilinearly
            upsampled to the input size, not smoothed (values in [-2, 2]).
        score: (B,) image logit: top-``fraction`` mean of ``layer_maps.sum(1)`` (unsmoothed, as the
            reference's classification loss).
        anomaly_token: (B, C) anomaly token of the deepest tap after its cross-attention.
        normal_token: (B, C) the same for the normal token.
    """

    layer_maps: torch.Tensor
    score: torch.Tensor
    anomaly_token: torch.Tensor
    normal_token: torch.Tensor


class VisualADHead(nn.Module):
    """The per-layer trainable heads: one cross-attention and one alignment MLP per tapped layer.

    Kept apart from the backbone so full-size parameter counts can be checked on the meta device
    without building a ViT-L.

    Args:
        dim: ViT width C.
        num_layers: tapped layers L.
        num_patches: patches per image N.
        config: supplies anchors, key positional rows, residual scale, dropout and MLP width.
    """

    def __init__(self, dim: int, num_layers: int, num_patches: int, config: VisualADConfig) -> None:
        super().__init__()
        hidden = max(1, int(round(dim * config.alignment_hidden_ratio)))
        self.cross_attention = nn.ModuleList(
            SpatialCrossAttention(
                dim, num_patches, config.num_anchors, config.key_pos_tokens, config.res_scale_init, config.dropout
            )
            for _ in range(num_layers)
        )
        self.alignment = nn.ModuleList(SelfAlignmentMLP(dim, hidden, config.dropout) for _ in range(num_layers))

    def forward(
        self, anomaly: torch.Tensor, normal: torch.Tensor, patches: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-layer patch scores (B, L, N) and the deepest layer's enhanced tokens (B, C) x 2.

        Args:
            anomaly, normal: (B, C) tokens of the deepest tap (after the final norm).
            patches: L tensors (B, N, C), patch tokens of each tap after the final norm.
        """
        scores = []
        enhanced_a = enhanced_n = anomaly
        for attend, align, p in zip(self.cross_attention, self.alignment, patches):
            enhanced_a = attend(anomaly, p)
            enhanced_n = attend(normal, p)
            aligned = align(p)
            scores.append(cosine_to(aligned, enhanced_a) - cosine_to(aligned, enhanced_n))
        return torch.stack(scores, dim=1), enhanced_a, enhanced_n


class VisualAD(AnomalyDetector):
    """VisualAD zero-shot detector (see the module docstring).

    ``forward(images)`` follows the contract (normalised map (B, 1, H, W) and score (B,));
    ``forward(images, train_outputs=True)`` returns :class:`TrainOutputs` for the losses.
    ``forward_raw`` units: summed cosine differences (range [-2L, 2L], positive = closer to the
    anomaly token), smoothed; the score is the top-1 % mean of that map.

    Attributes:
        anomaly_token, normal_token: (C,) learnable tokens (init ``N(0, (0.1 / sqrt(C))^2)``).
        token_pos: (2, C) their positional embeddings, initialised from the CLS position (zeros
            where the ViT has none, e.g. DINOv3's RoPE); trained only with ``train_token_pos``.
        final_norm: trainable copy of the ViT's final norm, applied to every tap.
        head: :class:`VisualADHead`.
        smoother: :class:`SymmetricGaussianBlur` (or identity with ``smoothing_sigma=0``).
        scorer: :class:`TopFractionMean`.
    """

    method = "visualad"
    config_class = VisualADConfig
    fit_mode = "supervised"

    def __init__(self, config: VisualADConfig, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        model = getattr(self.backbone, "model", None)
        if model is None or not hasattr(model, "blocks") or not hasattr(model, "_pos_embed"):
            raise ValueError(
                f"VisualAD needs a ViT backbone whose token sequence it can extend (clip_vitl14_336, "
                f"dinov2_*, dinov3_*), got {self.backbone.info.name!r}"
            )
        info = self.backbone.info
        self.taps: tuple[int, ...] = tuple(int(i) for i in info.layers)
        if list(self.taps) != sorted(set(self.taps)):
            raise ValueError(f"VisualAD taps must be distinct and ascending, got backbone layers {self.taps}")
        self.num_prefix_tokens = int(info.num_prefix_tokens)
        self.uses_rope = getattr(model, "rope", None) is not None
        if self.uses_rope and getattr(model, "rope_mixed", False):
            raise ValueError(f"{info.name}: per-depth (mixed) RoPE is not supported by VisualAD")
        dim = int(model.embed_dim)
        self.embed_dim = dim

        scale = dim**-0.5
        # Small init (x0.1) as the reference: the tokens start near the origin of the embedding.
        self.anomaly_token = nn.Parameter(torch.randn(dim) * scale * 0.1)
        self.normal_token = nn.Parameter(torch.randn(dim) * scale * 0.1)
        pos = torch.zeros(NUM_SPECIAL_TOKENS, dim)
        pos_embed = getattr(model, "pos_embed", None)
        if pos_embed is not None and not getattr(model, "no_embed_class", True) and self.num_prefix_tokens > 0:
            pos = pos_embed.detach()[0, 0].expand(NUM_SPECIAL_TOKENS, dim).clone()  # the CLS position
        self.token_pos = nn.Parameter(pos, requires_grad=config.train_token_pos)
        self.final_norm = copy.deepcopy(model.norm).requires_grad_(True)
        self.head = VisualADHead(dim, len(self.taps), self.num_patches, config)

        if config.smoothing_sigma > 0:
            self.smoother = SymmetricGaussianBlur(config.smoothing_sigma, self.image_size)
        self.scorer = TopFractionMean(self.image_size, config.top_fraction, config.max_topk)

    # ------------------------------------------------------------------ token sequence
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Run the frozen ViT with the two tokens in its sequence.

        Args:
            images: (B, 3, H, W) normalised with ``preprocess_spec``.

        Returns:
            anomaly, normal: (B, C) the tokens after the deepest tap and the final norm.
            patches: one (B, N, C) per tap, patch tokens after the final norm (prefix tokens and
            the two special tokens removed).
        """
        model = self.backbone.model
        x = model.patch_embed(images)
        rope = None
        if self.uses_rope:
            x, rope = model._pos_embed(x)  # timm Eva: (tokens, RoPE table (N, 2 * head_dim))
            rope = self._pad_rope(rope)
        else:
            x = model._pos_embed(x)
        special = torch.stack([self.anomaly_token, self.normal_token]) + self.token_pos  # (2, C)
        special = special.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = model.norm_pre(torch.cat([special, x], dim=1))
        taps = []
        for index in range(self.taps[-1] + 1):  # blocks after the deepest tap are never run
            block = model.blocks[index]
            x = block(x, rope=rope) if rope is not None else block(x)
            if index in self.taps:
                taps.append(self.final_norm(x))
        start = NUM_SPECIAL_TOKENS + self.num_prefix_tokens
        patches = [t[:, start:] for t in taps]
        return taps[-1][:, 0], taps[-1][:, 1], patches

    def _pad_rope(self, rope: torch.Tensor) -> torch.Tensor:
        """Identity rotations for the two inserted tokens.

        timm's Eva attention leaves its first ``num_prefix_tokens`` positions unrotated and rotates
        the rest with the table's rows in order. With two tokens in front, the last two prefix
        tokens shift into the rotated range, so the table gets two leading rows of
        ``sin = 0, cos = 1``: they rotate nothing, and every patch keeps its own row.
        """
        half = rope.shape[-1] // 2
        lead = rope.shape[:-2]
        ident = torch.cat(
            [rope.new_zeros(*lead, NUM_SPECIAL_TOKENS, half), rope.new_ones(*lead, NUM_SPECIAL_TOKENS, half)], dim=-1
        )
        return torch.cat([ident, rope], dim=-2)

    def grid_scores(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-layer patch scores (B, L, h, w) on :attr:`grid_size` and the final tokens (B, C) x 2."""
        anomaly, normal, patches = self.encode(images)
        scores, enh_a, enh_n = self.head(anomaly, normal, patches)
        return scores.reshape(scores.shape[0], scores.shape[1], *self.grid_size), enh_a, enh_n

    # ------------------------------------------------------------------ contract
    def forward(  # type: ignore[override]
        self, images: torch.Tensor, train_outputs: bool = False
    ) -> DetectorOutput | TrainOutputs:
        """Contract outputs, or :class:`TrainOutputs` when ``train_outputs`` (the loss path)."""
        if train_outputs:
            self.check_images(images)
            grid, enh_a, enh_n = self.grid_scores(images)
            layer_maps = upsample_to(grid, self.image_size)
            score = self.scorer(layer_maps.sum(dim=1, keepdim=True))
            return TrainOutputs(layer_maps, score, enh_a, enh_n)
        return super().forward(images)

    def forward_raw(self, images: torch.Tensor) -> DetectorOutput:
        self.check_images(images)
        patches = self.patch_scores(images)
        # Bilinear upsampling is linear, so upsampling the layer sum equals summing the
        # upsampled layers (the reference's order) at 1/L of the cost.
        anomaly_map = self.smoother(upsample_to(patches, self.image_size))
        return DetectorOutput(anomaly_map, self.scorer(anomaly_map))

    def patch_scores(self, images: torch.Tensor) -> torch.Tensor:
        """Layer-summed patch scores (B, 1, h, w)."""
        grid, _, _ = self.grid_scores(images)
        return grid.sum(dim=1, keepdim=True)

    def image_score(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """Top-fraction mean (B,) of the upsampled, smoothed map of ``patch_scores`` (B, 1, h, w)."""
        return self.scorer(self.smoother(upsample_to(patch_scores, self.image_size)))

    # ------------------------------------------------------------------ parameter groups
    def token_parameters(self) -> list[nn.Parameter]:
        """The two tokens (lr ``config.lr``, each clipped separately)."""
        return [self.anomaly_token, self.normal_token]

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable non-token parameters: final norm, cross-attentions, alignment MLPs (and the
        token positions when ``train_token_pos``)."""
        token_ids = {id(p) for p in self.token_parameters()}
        return [p for p in self.trainable_parameters() if id(p) not in token_ids]
