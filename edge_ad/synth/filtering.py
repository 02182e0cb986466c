"""Stage (c) of generator-made anomalies: keep an inpainted sample only where features changed.

An inpainting model asked for "a crack" sometimes paints nothing visible, or repaints the box with
ordinary surface. The filter compares backbone patch features of the normal image and of its
inpainted copy: ``distance = 1 - cosine(f_normal, f_inpainted)`` per patch (0 = unchanged, up to
2), bilinearly upsampled to the image, thresholded at ``threshold`` and intersected with the
inpainted box. A sample whose mask is empty is dropped: the generator did not make a defect a
feature extractor can see.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["FeatureDistanceFilter", "FilterResult", "box_mask", "feature_distance_map"]


@dataclass
class FilterResult:
    """Outcome of :meth:`FeatureDistanceFilter.__call__` for one sample.

    Attributes:
        mask: (H, W) bool, the defect mask (distance > threshold inside the box).
        distance: (H, W) float32 cosine distance in [0, 2] at image resolution.
        kept: True when the mask is not empty.
        max_distance: largest distance inside the box.
        mean_distance_box, mean_distance_outside: mean distance inside / outside the box (the
            outside value measures how much the generator changed the rest of the image).
        mask_pixels: pixels in ``mask``.
    """

    mask: np.ndarray
    distance: np.ndarray
    kept: bool
    max_distance: float
    mean_distance_box: float
    mean_distance_outside: float
    mask_pixels: int

    def summary(self) -> dict[str, Any]:
        """Plain numbers for the manifest."""
        return {"kept": self.kept, "max_distance": round(self.max_distance, 5),
                "mean_distance_box": round(self.mean_distance_box, 5),
                "mean_distance_outside": round(self.mean_distance_outside, 5), "mask_pixels": self.mask_pixels}


def box_mask(shape: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    """(H, W) bool mask of ``box = (x0, y0, x1, y1)`` (pixels, x1 / y1 exclusive), clipped to the image."""
    h, w = shape
    x0, y0, x1, y1 = (int(v) for v in box)
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box must be (x0, y0, x1, y1) with x0 < x1 and y0 < y1, got {box}")
    out = np.zeros((h, w), dtype=bool)
    out[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = True
    return out


def feature_distance_map(a: Any, b: Any, size: tuple[int, int]) -> np.ndarray:
    """``1 - cosine`` of two feature maps, upsampled to ``size``.

    Args:
        a, b: torch tensors (C, h, w) (or (1, C, h, w)) of the same shape.
        size: (H, W) output size in pixels.

    Returns:
        float32 (H, W) in [0, 2].
    """
    import torch
    import torch.nn.functional as F

    a = a if a.ndim == 4 else a[None]
    b = b if b.ndim == 4 else b[None]
    if a.shape != b.shape:
        raise ValueError(f"feature maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    dist = 1.0 - F.cosine_similarity(a.float(), b.float(), dim=1, eps=1e-6)[:, None]
    dist = F.interpolate(dist, size=tuple(size), mode="bilinear", align_corners=False)
    return dist[0, 0].clamp(0.0, 2.0).cpu().numpy().astype(np.float32)


class FeatureDistanceFilter:
    """Feature-distance filter over an edge_ad backbone.

    Args:
        backbone: an :class:`~edge_ad.backbones.base.Backbone` or a registry name (then built with
            ``pretrained``); its first returned feature map is compared. Default
            ``efficientnet_lite0`` (pretrained, offline): cheap and sensitive to local texture. The
            reference uses the detector's foundation ViT; any backbone works.
        threshold: distance T above which a pixel counts as changed.
        img_size: backbone input size (int or (H, W)); images are resized to it for the features
            only, the mask is returned at the image's own size.
        pretrained: for a backbone built by name.
        layers: for a backbone built by name; None = its default, except ``efficientnet_lite0``
            whose stride-4 stage 1 is used (measured on MVTec hazelnut with pasted real defects:
            IoU of the found mask with the pasted one 0.79 / 0.62 / 0.38 for crack / print / cut
            at stride 4 vs 0.67 / 0.50 / 0.23 with its default stride-8 stage).
        device: torch device for the backbone.

    Example::

        filt = FeatureDistanceFilter("efficientnet_lite0", threshold=0.3)
        result = filt(normal_rgb, inpainted_rgb, box=(40, 60, 140, 120))
        if result.kept: save(inpainted_rgb, result.mask)
    """

    def __init__(self, backbone: Any = "efficientnet_lite0", *, threshold: float = 0.3,
                 img_size: int | tuple[int, int] | None = 256, pretrained: bool = True,
                 layers: list[int] | None = None, device: str = "cpu") -> None:
        import torch

        from edge_ad.backbones import build_backbone
        from edge_ad.runtime.preprocess_spec import PreprocessSpec

        if not 0.0 <= float(threshold) < 2.0:
            raise ValueError(f"threshold must be a cosine distance in [0, 2), got {threshold}")
        if isinstance(backbone, str):
            if layers is None and backbone == "efficientnet_lite0":
                layers = [1]
            backbone = build_backbone(backbone, img_size=img_size, pretrained=pretrained, layers=layers)
        self.backbone = backbone.to(device).eval()
        self.threshold = float(threshold)
        self.device = torch.device(device)
        info = backbone.info
        self.spec = PreprocessSpec(height=int(info.img_size[0]), width=int(info.img_size[1]),
                                   mean=tuple(info.mean), std=tuple(info.std))

    def features(self, images: list[np.ndarray]) -> Any:
        """First feature map (B, C, h, w) of uint8 RGB images (any sizes, resized to the backbone's)."""
        import torch

        from edge_ad.runtime.preprocessing import preprocess_batch

        batch = torch.from_numpy(np.ascontiguousarray(preprocess_batch(images, self.spec, color_order="rgb")))
        with torch.no_grad():
            features, _ = self.backbone(batch.to(self.device))
        return features[0]

    def __call__(self, normal: np.ndarray, inpainted: np.ndarray, box: tuple[int, int, int, int]) -> FilterResult:
        """Mask of what changed inside ``box`` between ``normal`` and ``inpainted`` (uint8 RGB, same size)."""
        if normal.shape != inpainted.shape or normal.ndim != 3 or normal.shape[2] != 3:
            raise ValueError(f"normal and inpainted must be uint8 (H, W, 3) of one size, got {normal.shape} "
                             f"and {inpainted.shape}")
        feats = self.features([normal, inpainted])
        dist = feature_distance_map(feats[0], feats[1], normal.shape[:2])
        inside = box_mask(normal.shape[:2], box)
        mask = (dist > self.threshold) & inside
        outside = ~inside
        return FilterResult(
            mask=mask,
            distance=dist,
            kept=bool(mask.any()),
            max_distance=float(dist[inside].max()),
            mean_distance_box=float(dist[inside].mean()),
            mean_distance_outside=float(dist[outside].mean()) if outside.any() else 0.0,
            mask_pixels=int(mask.sum()),
        )
