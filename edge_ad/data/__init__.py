"""Datasets for anomaly detection: MVTec AD layout, VisA split CSVs, plain image folders.

Every dataset is an ordered, lazily-decoded sequence of :class:`Sample` (uint8 RGB image, bool mask,
label, defect type, paths). Metadata (``paths``, ``labels``, ``defect_types``, ``mask_paths``) is
available without decoding. Importing this package never imports torch.
"""
from __future__ import annotations

from .base import AnomalyDataset, Record, Sample, Subset, list_image_files, source_channels
from .folder import FolderDataset
from .frame_size import auto_image_size, is_auto_size, parse_auto_size, typical_aspect
from .mvtec import MVTecDataset, list_categories
from .sampling import k_shot_subset, sample_k_shot
from .visa import VisADataset, list_visa_categories

__all__ = [
    "Sample",
    "Record",
    "AnomalyDataset",
    "Subset",
    "MVTecDataset",
    "VisADataset",
    "FolderDataset",
    "list_categories",
    "list_visa_categories",
    "list_image_files",
    "source_channels",
    "sample_k_shot",
    "k_shot_subset",
    "auto_image_size",
    "is_auto_size",
    "parse_auto_size",
    "typical_aspect",
]
