"""The backbone contract every registry entry fulfils.

A backbone turns a batch of normalised images into patch-feature maps of the requested layers and
one global (CLS / pooled) token. It is a pure ``nn.Module`` that exports to ONNX at a fixed size.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts a method needs about a built backbone.

    Attributes:
        name: registry name (e.g. ``"dinov3_vitb16"``).
        patch_size: stride in input pixels between neighbouring feature-map cells (ViT patch size,
            or the CNN's output stride of the deepest requested layer).
        img_size: (H, W) the backbone was built for, in pixels; both multiples of ``patch_size``.
        layers: the block / stage indices whose features ``forward`` returns (0-based).
        feature_dims: channel count C of each returned feature map, same order as ``layers``.
        global_dim: channel count of the global token.
        mean, std: per-channel RGB normalisation the weights expect, applied to pixels in 0..1.
        num_prefix_tokens: CLS + register tokens in front of the patch tokens (0 for CNNs).
        feature_strides: stride of each returned feature map (all equal for ViTs).
    """

    name: str
    patch_size: int
    img_size: tuple[int, int]
    layers: tuple[int, ...]
    feature_dims: tuple[int, ...]
    global_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_prefix_tokens: int = 0
    feature_strides: tuple[int, ...] = field(default=())

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the feature map of the deepest stride, in cells."""
        stride = max(self.feature_strides) if self.feature_strides else self.patch_size
        return self.img_size[0] // stride, self.img_size[1] // stride


class Backbone(nn.Module):
    """Base class: ``forward(images) -> (features, global_token)``.

    Args of ``forward``:
        images: float tensor (B, 3, H, W), normalised with ``info.mean`` / ``info.std``; (H, W) must
            equal ``info.img_size``.

    Returns:
        features: list with one tensor (B, C_i, H / s_i, W / s_i) per requested layer.
        global_token: tensor (B, C_g): the CLS token after the final norm for ViTs, the pooled last
            feature map for CNNs.
    """

    info: BackboneInfo

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:  # pragma: no cover
        raise NotImplementedError
