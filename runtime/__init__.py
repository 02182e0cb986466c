"""edge_ad.runtime: the torch-free runtime (preprocessing, engines, detector, streaming, calibration).

Nothing in this package imports torch, directly or indirectly; a test enforces it.
"""
from __future__ import annotations

from ._cv import cv2_available, require_cv2
from .detector import Detector, NonFiniteOutputError
from .result import Region, Result
from .bundle import Bundle, BundleError, Manifest, load_bundle, update_manifest, write_bundle
from .image_io import IMAGE_SUFFIXES, is_image_file, read_image, read_mask
from .preprocessing import extension_available, preprocess, preprocess_batch
from .preprocess_spec import PreprocessSpec
from .targets import Target, get_target, list_targets, register_target
from .calibrate import CalibrationReport, calibrate_bundle
from .overlay import draw_overlay
from .preprocessing import cuda_preprocess_available
from .sources import FrameSource, SourceError, open_source
from .stream import ReconnectPolicy, Stream, StreamError, StreamStats, run_stream
from .cpu_budget import CpuBudget, plan_cpu_budget

__all__ = [
    "IMAGE_SUFFIXES",
    "Bundle",
    "Detector",
    "NonFiniteOutputError",
    "Region",
    "Result",
    "BundleError",
    "Manifest",
    "PreprocessSpec",
    "Target",
    "get_target",
    "list_targets",
    "load_bundle",
    "register_target",
    "update_manifest",
    "write_bundle",
    "cv2_available",
    "extension_available",
    "is_image_file",
    "preprocess",
    "preprocess_batch",
    "read_image",
    "read_mask",
    "require_cv2",
    "CalibrationReport",
    "calibrate_bundle",
    "cuda_preprocess_available",
    "draw_overlay",
    "FrameSource",
    "ReconnectPolicy",
    "SourceError",
    "Stream",
    "StreamError",
    "StreamStats",
    "open_source",
    "run_stream",
    "CpuBudget",
    "plan_cpu_budget",
]
