"""AnomalyVFM's convolutional decoder: patch features -> anomaly logit + confidence logit maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AnomalyDecoder", "ConvGNReLU", "UpsampleBlock"]


class ConvGNReLU(nn.Sequential):
    """``Conv2d(k x k, same padding) -> GroupNorm(groups) -> ReLU``; shape (B, in, h, w) -> (B, out, h, w)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, groups: int = 32) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            nn.GroupNorm(groups, out_channels),
            nn.ReLU(inplace=True),
        )


class UpsampleBlock(nn.Module):
    """x2 bilinear upsampling then two :class:`ConvGNReLU` (in -> out -> out).

    (B, in, h, w) -> (B, out, 2h, 2w). Bilinear with half-pixel centres exports to one ONNX
    ``Resize`` that OpenVINO and TensorRT both run natively.
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32) -> None:
        super().__init__()
        self.conv1 = ConvGNReLU(in_channels, out_channels, 3, groups)
        self.conv2 = ConvGNReLU(out_channels, out_channels, 3, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.conv2(self.conv1(x))


class AnomalyDecoder(nn.Module):
    """Bottleneck + upsampling + two 1x1 heads.

    ``(B, C, h, w)`` encoder patch tokens -> ``(mask_logit, conf_logit)``, each
    ``(B, 1, h * 2**n, w * 2**n)`` with ``n = upsample_blocks``:

    * bottleneck: 2 x [3x3 conv C -> D, GroupNorm, ReLU] (D = ``channels``, default C);
    * ``upsample_blocks`` x [x2 upsample, 3x3 conv -> U, GN, ReLU, 3x3 conv U -> U, GN, ReLU]
      (U = ``upsample_channels``, 512);
    * heads: 1x1 conv U -> 1 (anomaly logit) and 1x1 conv U -> 1 (confidence logit).

    At ViT-L width (C = D = 1024, one upsampling block) this is 25.97 M parameters, the reference
    decoder's ~26 M.

    Args:
        in_channels: encoder width C.
        channels: bottleneck width D (None = C).
        upsample_channels: U.
        upsample_blocks: n >= 0.
        groups: GroupNorm groups (must divide D and U).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int | None = None,
        upsample_channels: int = 512,
        upsample_blocks: int = 1,
        groups: int = 32,
    ) -> None:
        super().__init__()
        channels = int(channels or in_channels)
        self.bottleneck = nn.Sequential(
            ConvGNReLU(in_channels, channels, 3, groups),
            ConvGNReLU(channels, channels, 3, groups),
        )
        ups: list[nn.Module] = []
        width = channels
        for _ in range(upsample_blocks):
            ups.append(UpsampleBlock(width, upsample_channels, groups))
            width = upsample_channels
        self.upsample = nn.Sequential(*ups)
        self.mask_head = nn.Conv2d(width, 1, 1)
        self.conf_head = nn.Conv2d(width, 1, 1)
        self.scale = 2**upsample_blocks

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.upsample(self.bottleneck(features))
        return self.mask_head(x), self.conf_head(x)
