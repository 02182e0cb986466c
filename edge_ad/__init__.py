"""edge_ad: industrial visual anomaly detection with vision foundation models, from training to edge.

Importing ``edge_ad`` is cheap and never imports torch: training-side names (``build_backbone``,
datasets, metrics) load on first access, so runtime-only installs (Jetson images without torch)
can ``import edge_ad.runtime`` and use the CLI's runtime verbs.
"""
from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

# name -> module that defines it; resolved lazily by __getattr__.
_LAZY = {
    "build_backbone": "edge_ad.backbones",
    "list_backbones": "edge_ad.backbones",
    "PreprocessSpec": "edge_ad.runtime",
    "build_detector": "edge_ad.methods",
    "load_detector": "edge_ad.methods",
    "train": "edge_ad.training",
    "evaluate": "edge_ad.evaluation",
    "convert": "edge_ad.converters.convert",
    "distill": "edge_ad.converters.distill",
    "preprocess": "edge_ad.runtime",
    "Detector": "edge_ad.runtime",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return getattr(module, name)
    raise AttributeError(f"module 'edge_ad' has no attribute {name!r}")
