"""edge_ad.runtime: the torch-free runtime (preprocessing, engines, detector).

Nothing in this package imports torch, directly or indirectly; a test enforces it.
"""
from __future__ import annotations

from ._cv import cv2_available, require_cv2
from .image_io import IMAGE_SUFFIXES, is_image_file, read_image, read_mask
from .preprocessing import extension_available, preprocess, preprocess_batch
from .preprocess_spec import PreprocessSpec

__all__ = [
    "IMAGE_SUFFIXES",
    "PreprocessSpec",
    "cv2_available",
    "extension_available",
    "is_image_file",
    "preprocess",
    "preprocess_batch",
    "read_image",
    "read_mask",
    "require_cv2",
]
