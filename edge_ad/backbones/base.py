"""The backbone contract every registry entry fulfils.

A backbone turns a batch of normalised images into patch-feature maps of the requested layers and
one global (CLS / pooled) token. It is a pure ``nn.Module`` that exports to ONNX at a fixed size.
"""
from __future__ import annotations

import warnings
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

    def check_images(self, images: torch.Tensor, expected_dtype: torch.dtype | None = None) -> None:
        """Raise a clear error unless ``images`` is a (B, 3, H, W) float batch of ``info.img_size``.

        Only Python checks on ``images.shape`` / ``images.dtype``: an export traces them as
        constants of the fixed-size graph, so they add no nodes to it.

        Args:
            images: the tensor handed to ``forward``.
            expected_dtype: dtype of the backbone's weights; a floating batch of another dtype is
                rejected here instead of failing deep inside a conv / matmul (not under autocast,
                which casts per op).

        Raises:
            TypeError: not a tensor, or not a floating dtype matching the weights.
            ValueError: wrong rank, channel count or spatial size.
        """
        if torch.jit.is_tracing():
            # The legacy ONNX exporter traces shapes as tensors and warns that comparing them is
            # baked in as a constant: exactly what a fixed-size backbone wants, so stay quiet.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                self._check_images(images, expected_dtype)
        else:
            self._check_images(images, expected_dtype)

    def _check_images(self, images: torch.Tensor, expected_dtype: torch.dtype | None) -> None:
        name = self.info.name
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{name}: images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(
                f"{name}: images must be (B, 3, H, W), got {images.ndim}-D shape {tuple(images.shape)}"
            )
        if images.shape[1] != 3:
            raise ValueError(
                f"{name}: images must have 3 (RGB) channels in dim 1 (NCHW), got shape "
                f"{tuple(images.shape)}; is the batch channels-last (B, H, W, C)?"
            )
        height, width = self.info.img_size
        if (images.shape[2], images.shape[3]) != (height, width):
            raise ValueError(
                f"{name}: was built for img_size (H, W) = ({height}, {width}) but got images of "
                f"{images.shape[2]}x{images.shape[3]}; resize the input or rebuild the backbone "
                f"with img_size=({images.shape[2]}, {images.shape[3]}) (a multiple of {self.info.patch_size})"
            )
        if not images.is_floating_point():
            raise TypeError(
                f"{name}: images must be a float tensor normalised with info.mean / info.std "
                f"(pixels / 255 - mean) / std, got dtype {images.dtype}"
            )
        if (
            expected_dtype is not None
            and images.dtype != expected_dtype
            and not torch.is_autocast_enabled(images.device.type)
        ):
            raise TypeError(
                f"{name}: images dtype {images.dtype} does not match the weights' dtype "
                f"{expected_dtype}; cast with images.to({expected_dtype}) or run under torch.autocast"
            )
