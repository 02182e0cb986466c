"""EfficientNet-Lite0: the published TF-port weights, mapped by order onto timm's
``tf_efficientnet_lite0``, reproduce the reference implementation (PyPI ``efficientnet-lite-pytorch``)
on a real image; timm's plain ``efficientnet_lite0`` with the same tensors drifts (the trap).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_ad.backbones.efficientnet import (
    REFERENCE_NUM_TENSORS,
    TF_LITE_MEAN,
    TF_LITE_STD,
    map_reference_lite0_state_dict,
    reference_weights_path,
)
from edge_ad.backbones.registry import build_backbone
from edge_ad.backbones.weights import IncompatibleWeightsError, read_state_dict
from edge_ad.runtime import read_image

REF_SIZE = 224  # the reference builds static TF "same" padding for its 224 px default


@pytest.fixture(scope="module")
def reference_state() -> dict[str, torch.Tensor]:
    return read_state_dict(reference_weights_path())


@pytest.fixture(scope="module")
def reference_model():
    from efficientnet_lite_pytorch import EfficientNet

    weights_path = str(reference_weights_path())
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights_path).eval()


@pytest.fixture(scope="module")
def image(real_root) -> torch.Tensor:
    """A real MVTec hazelnut, centre-cropped to 224 px, normalised as TF EfficientNet-Lite expects."""
    rgb = read_image(real_root / "mvtec_hazelnut_256" / "train" / "good" / "000.png")
    top = (rgb.shape[0] - REF_SIZE) // 2
    left = (rgb.shape[1] - REF_SIZE) // 2
    crop = np.ascontiguousarray(rgb[top:top + REF_SIZE, left:left + REF_SIZE])
    pixels = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 255.0
    mean = torch.tensor(TF_LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TF_LITE_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def _timm_classifier(name: str, reference_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    import timm

    model = timm.create_model(name, pretrained=False)
    model.load_state_dict(map_reference_lite0_state_dict(reference_state, model.state_dict()), strict=True)
    return model.eval()


def test_mean_std_are_tf_edge_normalisation():
    # TF lite builder: (pixel - 127) / 128 on 0..255, i.e. about 0.5 / 0.5 on 0..1.
    info = build_backbone("efficientnet_lite0", img_size=64).info
    assert info.mean == pytest.approx((127 / 255,) * 3) and info.std == pytest.approx((128 / 255,) * 3)
    assert info.mean == pytest.approx((0.5,) * 3, abs=2e-3)
    assert info.std == pytest.approx((0.5,) * 3, abs=2e-3)


def test_reference_tensors_map_by_order_count_and_shape(reference_state):
    import timm

    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    assert len(reference_state) == len(target) == REFERENCE_NUM_TENSORS == 296
    mapped = map_reference_lite0_state_dict(reference_state, target)
    assert list(mapped) == list(target)
    for (ref_key, ref_tensor), (key, tensor) in zip(reference_state.items(), mapped.items()):
        assert tensor is ref_tensor and tensor.shape == target[key].shape, (ref_key, key)


def test_mapping_rejects_wrong_count_or_shape(reference_state):
    import timm

    target = timm.create_model("tf_efficientnet_lite0").state_dict()
    fewer = dict(list(reference_state.items())[:-1])
    with pytest.raises(IncompatibleWeightsError, match="295 tensors but timm tf_efficientnet_lite0 has 296"):
        map_reference_lite0_state_dict(fewer, target)
    reshaped = dict(reference_state)
    reshaped["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    with pytest.raises(IncompatibleWeightsError, match=r"_blocks.3._depthwise_conv.weight \(144, 1, 3, 3\)"):
        map_reference_lite0_state_dict(reshaped, target)


def test_mapped_tf_classifier_matches_reference_logits(reference_state, reference_model, image):
    timm_model = _timm_classifier("tf_efficientnet_lite0", reference_state)
    with torch.no_grad():
        ours, reference = timm_model(image), reference_model(image)
    assert ours.shape == reference.shape == (1, 1000)
    assert (ours - reference).abs().max().item() < 1e-4
    assert ours.argmax().item() == reference.argmax().item()


def test_plain_timm_efficientnet_lite0_drifts(reference_state, reference_model, image):
    """The trap: the non-TF timm model loads the same tensors without complaint but is a different
    network (symmetric padding, BN eps 1e-5), so its logits drift from the reference."""
    plain = _timm_classifier("efficientnet_lite0", reference_state)
    with torch.no_grad():
        drifted, reference = plain(image), reference_model(image)
    cosine = F.cosine_similarity(drifted, reference).item()
    assert cosine < 0.95, cosine
    assert (drifted - reference).abs().max().item() > 0.5


def _reference_block_outputs(reference_model, image: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        x = reference_model._swish(reference_model._bn0(reference_model._conv_stem(image)))
        outputs = []
        for block in reference_model._blocks:
            x = block(x)
            outputs.append(x)
    return outputs


def test_pretrained_backbone_features_match_reference_stages(reference_model, image):
    backbone = build_backbone("efficientnet_lite0", pretrained=True, layers=(0, 1, 2, 3, 4))
    assert backbone.info.img_size == (REF_SIZE, REF_SIZE)
    assert backbone.info.feature_strides == (2, 4, 8, 16, 32)
    with torch.no_grad():
        features, global_token = backbone(image)
    blocks = _reference_block_outputs(reference_model, image)
    for feature, stride in zip(features, backbone.info.feature_strides):
        # A timm stage ends where the reference's last block at that stride ends.
        expected = [b for b in blocks if b.shape[-1] == REF_SIZE // stride][-1]
        assert feature.shape == expected.shape
        torch.testing.assert_close(feature, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(global_token, blocks[-1].mean(dim=(2, 3)), rtol=1e-4, atol=1e-4)


def test_weights_file_in_reference_layout_equals_pretrained(image):
    from_file = build_backbone("efficientnet_lite0", weights=reference_weights_path())
    pretrained = build_backbone("efficientnet_lite0", pretrained=True)
    with torch.no_grad():
        a, b = from_file(image), pretrained(image)
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
