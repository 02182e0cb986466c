"""The targets registry, as the converters see it.

The data lives in the torch-free runtime (:mod:`edge_ad.runtime.targets`): the runtime validates a
bundle's target / precision / engine against it when loading, and the runtime may not import the
converters. This module re-exports it so converter code reads ``from edge_ad.converters.targets
import get_target``; there is one registry, so a target registered here is seen by the runtime.
"""
from __future__ import annotations

from edge_ad.runtime.targets import (
    ENGINES,
    OPENVINO_PRECISION_HINTS,
    PRECISIONS,
    Target,
    UnknownTargetError,
    get_target,
    list_targets,
    register_target,
)

__all__ = [
    "ENGINES",
    "OPENVINO_PRECISION_HINTS",
    "PRECISIONS",
    "Target",
    "UnknownTargetError",
    "get_target",
    "list_targets",
    "register_target",
]
