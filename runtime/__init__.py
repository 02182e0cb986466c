"""edge_ad.runtime: the torch-free runtime (preprocessing, engines, detector).

Nothing in this package imports torch, directly or indirectly; a test enforces it.
"""
from __future__ import annotations

from ._cv import cv2_available, require_cv2
from .image_io import IMAGE_SUFFIXES, is_image_file, read_image, read_mask
from .preprocess import extension_available, preprocess_batch
# The submodule itself (callable: edge_ad.runtime.preprocess(frame, spec) runs preprocess()), so
# that both `import edge_ad.runtime.preprocess as p` and `from edge_ad.runtime import preprocess`
# work; binding the function here would shadow the submodule.
from . import preprocess
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
