"""The one backbone registry: ``register_backbone`` / ``build_backbone`` / ``list_backbones``.

Adding a backbone is one file and one registry line: write a module whose factories are decorated
with ``@register_backbone("name")`` and add the module to ``_BACKBONE_MODULES`` below. Modules are
imported on first use, so ``import edge_ad.backbones`` stays cheap (no timm import).
"""
from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, Union

from .base import Backbone

# Modules whose import registers backbones (the registry line to extend).
_BACKBONE_MODULES: tuple[str, ...] = (
    "edge_ad.backbones.vit",
    "edge_ad.backbones.efficientnet",
)

ImgSize = Union[int, Sequence[int]]
WeightsPath = Union[str, Path]


class BackboneFactory(Protocol):
    """What ``@register_backbone`` decorates: keyword-only, returns a built ``Backbone``."""

    def __call__(
        self,
        *,
        weights: WeightsPath | None = None,
        layers: Sequence[int] | None = None,
        img_size: ImgSize | None = None,
        pretrained: bool = False,
        **model_overrides: Any,
    ) -> Backbone: ...


class UnknownBackboneError(KeyError):
    """``build_backbone`` got a name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


_REGISTRY: dict[str, BackboneFactory] = {}
_modules_loaded = False


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator registering ``factory`` under ``name``; a name can be registered once only."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"backbone {name!r} is already registered by {_REGISTRY[name]!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_modules() -> None:
    global _modules_loaded
    if not _modules_loaded:
        for module in _BACKBONE_MODULES:
            importlib.import_module(module)
        _modules_loaded = True


def list_backbones() -> list[str]:
    """Sorted names of every registered backbone."""
    _load_modules()
    return sorted(_REGISTRY)


def build_backbone(
    name: str,
    weights: WeightsPath | None = None,
    layers: Sequence[int] | None = None,
    img_size: ImgSize | None = None,
    pretrained: bool = False,
    **model_overrides: Any,
) -> Backbone:
    """Build a registered backbone in eval mode.

    Args:
        name: registry name, see ``list_backbones()``.
        weights: local ``.safetensors`` / ``.pth`` / ``.pt`` file, official or timm key layout,
            loaded strictly. Exclusive with ``pretrained``.
        layers: 0-based indices of the blocks (ViT) / feature stages (CNN) to return; the
            backbone's own default when None (last block for ViTs).
        img_size: input size in pixels, int (square) or (H, W); each side a multiple of the
            backbone's stride. Default 224.
        pretrained: load the published weights from local storage only (nothing is downloaded).
        **model_overrides: passed to the underlying timm model constructor (e.g. ``depth=2,
            embed_dim=64, num_heads=2`` for tiny random-init test models).

    Returns:
        the ``Backbone``; its ``info`` holds sizes, strides, dims and normalisation.

    Raises:
        UnknownBackboneError (a KeyError): unknown name; the message lists close matches.
        ValueError: bad img_size / layers / overrides, or weights that do not fit.
        FileNotFoundError: ``weights`` or the pretrained file is missing.
    """
    _load_modules()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownBackboneError(
            f"unknown backbone {name!r}{hint} Registered: {', '.join(sorted(_REGISTRY))}"
        )
    if weights is not None and pretrained:
        raise ValueError("pass either weights=<file> or pretrained=True, not both")
    backbone = _REGISTRY[name](
        weights=weights, layers=layers, img_size=img_size, pretrained=pretrained, **model_overrides
    )
    return backbone.eval()
