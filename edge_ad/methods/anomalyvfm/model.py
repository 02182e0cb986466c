"""AnomalyVFM detector: adapted foundation ViT + convolutional decoder + image head.

After "AnomalyVFM" (zero-shot anomaly detection by supervised training of a vision foundation
model on synthetic / auxiliary anomalies). The encoder's attention is adapted with DoRA / LoRA
(:mod:`.lora`), the final block's patch tokens go through :class:`~.decoder.AnomalyDecoder`, and
a linear image head reads the global (summary) token. Trained once on auxiliary data, it runs on
categories it never saw.

Inference graph (``forward(images)``, what ONNX export traces): sigmoid of the mask logit,
bilinear resize to the input size, ``k x k`` mean filter, sigmoid of the image logit, then the
good-image :class:`~edge_ad.methods.common.ScoreNormalizer` like every method.

Checkpoints hold the merged encoder: :meth:`AnomalyVFM.state_dict` returns the adapters folded
into plain timm weights and :meth:`AnomalyVFM.config_dict` records ``adapters_merged: true``, so a
run directory reloads (and converts) as a plain ViT, without peft and with no adapter op in the
exported graph. Training resume is unaffected: the trainer saves the live trainable parameters
(adapter tensors by name) in ``train_state.pt``.
"""
from __future__ import annotations

import copy
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from edge_ad.backbones.base import Backbone

from ..base import AnomalyDetector, DetectorOutput
from ..common import upsample_to
from .config import AnomalyVFMConfig, default_summary_tokens
from .decoder import AnomalyDecoder
from .lora import add_adapters, adapter_parameters, has_adapters, merge_adapters

__all__ = ["AnomalyVFM", "AnomalyVFMOutputs"]


class AnomalyVFMOutputs(NamedTuple):
    """Training outputs of ``forward(images, train_outputs=True)`` (logits, before any sigmoid).

    Attributes:
        mask_logit: (B, 1, h', w') anomaly logit at the decoder resolution (grid x 2**n).
        conf_logit: (B, 1, h', w') confidence logit (confidence C = 1 + exp(conf_logit)).
        image_logit: (B,) image anomaly logit.
    """

    mask_logit: torch.Tensor
    conf_logit: torch.Tensor
    image_logit: torch.Tensor


class AnomalyVFM(AnomalyDetector):
    """AnomalyVFM detector (``fit_mode = "supervised"``).

    Args:
        config: :class:`AnomalyVFMConfig`.
        backbone: a built ViT backbone (``TimmViTBackbone``; default built from ``config.backbone``).
            Its final requested block feeds the decoder (configure ``layers`` = the last block).

    Attributes:
        decoder: :class:`AnomalyDecoder`.
        image_head: ``Linear(summary_tokens * C, 1)``.
        summary_tokens: prefix tokens concatenated for the image head.
        decoder_size: (h', w') of the logit maps.
    """

    method = "anomalyvfm"
    config_class = AnomalyVFMConfig
    fit_mode = "supervised"

    def __init__(self, config: AnomalyVFMConfig, backbone: Backbone | None = None) -> None:
        super().__init__(config, backbone)
        vit = getattr(self.backbone, "model", None)
        if vit is None or not hasattr(vit, "forward_intermediates") or not hasattr(vit, "blocks"):
            raise TypeError(
                f"AnomalyVFM needs a timm ViT backbone (dinov2_*, dinov3_*, radio_*), got {self.backbone.info.name!r}"
            )
        if len(self.backbone.info.layers) != 1:
            raise ValueError(
                f"AnomalyVFM reads one block's patch tokens; set backbone layers to one block (the last), "
                f"got {self.backbone.info.layers}"
            )
        width = int(self.backbone.info.feature_dims[0])
        num_prefix = int(self.backbone.info.num_prefix_tokens)
        summary = config.summary_tokens or default_summary_tokens(self.backbone.info.name)
        if not 1 <= summary <= num_prefix:
            raise ValueError(
                f"summary_tokens={summary} but backbone {self.backbone.info.name!r} has {num_prefix} prefix tokens"
            )
        self.summary_tokens = int(summary)
        if config.adapter != "none" and not config.adapters_merged:
            add_adapters(vit, config.adapter, config.adapter_rank, config.adapter_alpha, config.adapter_dropout)
        # Adapters train, the rest of the encoder stays frozen (peft already marks only lora_* trainable).
        for name, p in self.backbone.named_parameters():
            p.requires_grad_("lora_" in name)
        self.decoder = AnomalyDecoder(width, config.decoder_channels, config.upsample_channels,
                                      config.upsample_blocks, config.norm_groups)
        self.image_head = nn.Linear(self.summary_tokens * width, 1)
        self.decoder_size = (self.grid_size[0] * self.decoder.scale, self.grid_size[1] * self.decoder.scale)

    # ------------------------------------------------------------------ encoder
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens (B, C, h, w) of the requested block and the summary (B, S * C).

        Calls timm's ``forward_intermediates`` directly (not ``Backbone.forward``) because the image
        head needs several prefix tokens, and the backbone returns the first only.
        """
        self.backbone.check_images(images)
        [(patches, prefix)] = self.backbone.model.forward_intermediates(
            images,
            indices=list(self.backbone.info.layers),
            return_prefix_tokens=True,
            norm=True,
            stop_early=True,
            output_fmt="NCHW",
            intermediates_only=True,
        )
        summary = prefix[:, : self.summary_tokens].flatten(1)
        return patches, summary

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, train_outputs: bool = False) -> DetectorOutput | AnomalyVFMOutputs:
        """Normalised (map (B, 1, H, W), score (B,)); with ``train_outputs`` the raw logits instead."""
        if train_outputs:
            return self.logits(images)
        raw = self.forward_raw(images)
        anomaly_map, score = self.normalizer(raw.anomaly_map, raw.score)
        return DetectorOutput(anomaly_map, score)

    def logits(self, images: torch.Tensor) -> AnomalyVFMOutputs:
        """Mask / confidence logits (B, 1, h', w') and image logit (B,) of normalised images."""
        self.check_images(images)
        if torch.onnx.is_in_onnx_export() and has_adapters(self.backbone.model):
            # peft layers would trace as extra MatMuls (and DoRA norms); export the merged ViT.
            raise RuntimeError("AnomalyVFM: call detector.merge_adapters() before export "
                               "(run directories already hold merged weights)")
        patches, summary = self.encode(images)
        mask_logit, conf_logit = self.decoder(patches)
        image_logit = self.image_head(summary).squeeze(1)
        return AnomalyVFMOutputs(mask_logit, conf_logit, image_logit)

    def forward_raw(self, images: torch.Tensor) -> DetectorOutput:
        """sigma(mask logit) mean-filtered on the decoder grid, then resized to the input (B, 1, H, W);
        sigma(image logit) (B,).

        Both are probabilities in [0, 1] before normalisation. The k x k mean filter runs on the
        decoder's logit grid (``decoder_size``, 96 x 96 at 768 px) as the reference's test.py does
        (``AvgPool2d(5, 1, 2)`` on the 96 x 96 map); filtering after upsampling to 768 px would
        smooth 8x less.
        """
        out = self.logits(images)
        prob = torch.sigmoid(out.mask_logit)
        k = self.config.mean_filter_size
        if k > 1:
            # A fixed mean filter; count_include_pad=False keeps the border unbiased (no zero padding).
            prob = F.avg_pool2d(prob, k, stride=1, padding=k // 2, count_include_pad=False)
        prob = upsample_to(prob, self.image_size)
        prob = self.smoother(prob)  # identity unless smoothing_sigma > 0
        return DetectorOutput(prob, torch.sigmoid(out.image_logit))

    # ------------------------------------------------------------------ adapters
    @property
    def has_adapters(self) -> bool:
        """True while the encoder carries live (unmerged) adapters."""
        return has_adapters(self.backbone.model)

    def adapter_parameter_count(self) -> int:
        """Parameters of the live adapters (0 once merged)."""
        return adapter_parameters(self.backbone.model)

    def merge_adapters(self) -> "AnomalyVFM":
        """Fold the adapters into the encoder weights in place (irreversible); returns self.

        Afterwards the encoder is a plain timm ViT, frozen, and ``config.adapters_merged`` is True.
        """
        if self.has_adapters:
            merge_adapters(self.backbone.model)
        self.backbone.requires_grad_(False)
        self.config = self.config.replace(adapters_merged=True)
        return self

    def merged_copy(self) -> "AnomalyVFM":
        """A deep copy with the adapters merged (this module is left as it is)."""
        return copy.deepcopy(self).merge_adapters()

    # ------------------------------------------------------------------ checkpoint support
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The checkpoint layout: always the merged encoder (plain timm keys), see the module doc.

        With live adapters this merges a deep copy (memory: one extra copy of the model, at save
        time only). To read the live adapter tensors use ``named_parameters()``.
        """
        if self.has_adapters:
            return self.merged_copy().state_dict(*args, **kwargs)
        return super().state_dict(*args, **kwargs)

    def config_dict(self) -> dict[str, Any]:
        """The config of what :meth:`state_dict` holds (``adapters_merged`` True when adapters exist)."""
        config = self.config
        if config.adapter != "none":
            config = config.replace(adapters_merged=True)
        return config.to_dict()
