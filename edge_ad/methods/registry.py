"""The method registry: method name -> the package that implements it.

Adding a method = one folder ``edge_ad/methods/<name>/`` whose ``__init__`` exports ``METHOD`` (a
:class:`MethodEntry`) + one line in :data:`_METHOD_MODULES`. Packages are imported on first use,
so listing methods or reading a config never imports every method's dependencies.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import AnomalyDetector, BackboneSpec, MethodConfig

__all__ = ["MethodEntry", "build_detector", "get_method", "list_methods", "make_config"]

#: name -> module exporting ``METHOD``. One line per method.
_METHOD_MODULES: dict[str, str] = {
    "anomalyvfm": "edge_ad.methods.anomalyvfm",
    "avadino": "edge_ad.methods.avadino",
    "foundad": "edge_ad.methods.foundad",
    "knn": "edge_ad.methods.knn",
    "student": "edge_ad.methods.student",
    "visualad": "edge_ad.methods.visualad",
}


@dataclass(frozen=True)
class MethodEntry:
    """What the registry knows about a method.

    Attributes:
        name: registry name (also ``detector_class.method``).
        config_class: its :class:`MethodConfig` subclass.
        detector_class: its :class:`AnomalyDetector` subclass.
        description: one line for ``edge-ad info`` / docs.
        loss_fn: ``(model, SupervisedBatch) -> scalar loss`` of a ``"supervised"`` method (the
            zero-shot protocol of :mod:`edge_ad.training.supervised`); None for the others.
        param_groups: ``(detector, base_lr) -> [{"params", "lr", optional "grad_clip"}, ...]``
            optimiser groups of a supervised method; None = one group at the config's lr.
    """

    name: str
    config_class: type[MethodConfig]
    detector_class: type[AnomalyDetector]
    description: str = ""
    loss_fn: Callable[..., Any] | None = None
    param_groups: Callable[..., list[dict[str, Any]]] | None = None

    @property
    def fit_mode(self) -> str:
        """``"gradient"``, ``"memory"``, ``"supervised"`` or ``"none"`` (see :mod:`edge_ad.methods.base`)."""
        return self.detector_class.fit_mode


def list_methods() -> list[str]:
    """Registered method names, sorted."""
    return sorted(_METHOD_MODULES)


def get_method(name: str) -> MethodEntry:
    """The registry entry of ``name``; a clear error lists the known names."""
    if name not in _METHOD_MODULES:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(list_methods())}")
    module = importlib.import_module(_METHOD_MODULES[name])
    entry = getattr(module, "METHOD", None)
    if not isinstance(entry, MethodEntry) or entry.name != name:
        raise RuntimeError(f"{_METHOD_MODULES[name]} must export METHOD = MethodEntry(name={name!r}, ...)")
    return entry


def make_config(name: str, **fields: Any) -> MethodConfig:
    """The method's config with ``fields`` set (``backbone`` may be a dict, name or BackboneSpec)."""
    return get_method(name).config_class(**fields)


def build_detector(
    method: str | MethodConfig, *, backbone: Any = None, **fields: Any
) -> AnomalyDetector:
    """Build a detector.

    Args:
        method: a registry name (then ``fields`` build its config) or a ready config instance.
        backbone: an already built :class:`~edge_ad.backbones.base.Backbone` to use instead of
            building ``config.backbone`` (it must agree with it), or, when ``method`` is a name,
            a backbone spec (:class:`BackboneSpec`, dict or registry name) for the config. A built
            backbone with no ``backbone`` spec in ``fields`` is described by its ``info``.
        **fields: config fields when ``method`` is a name.

    Examples:
        >>> det = build_detector("foundad", backbone={"name": "dinov3_vitb16", "layers": [9], "img_size": 512})
    """
    if isinstance(method, MethodConfig):
        if fields:
            method = method.replace(**fields)
        entry = _entry_for_config(method)
        return entry.detector_class(method, backbone=backbone)
    entry = get_method(method)
    if isinstance(backbone, (dict, str, BackboneSpec)):
        if "backbone" in fields:
            raise TypeError("pass the backbone spec once (backbone=...), not twice")
        fields["backbone"], backbone = backbone, None  # a spec, not a built module
    elif backbone is not None and "backbone" not in fields:
        # A built module without a spec: describe it by its info (name, layers, size).
        fields["backbone"] = BackboneSpec.from_info(backbone.info)
    return entry.detector_class(entry.config_class(**fields), backbone=backbone)


def _entry_for_config(config: MethodConfig) -> MethodEntry:
    for name in list_methods():
        entry = get_method(name)
        if type(config) is entry.config_class:
            return entry
    raise KeyError(f"{type(config).__name__} belongs to no registered method")
