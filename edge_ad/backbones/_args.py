"""Validation of the arguments every backbone factory shares (img_size, layers, overrides)."""
from __future__ import annotations

import operator
from typing import Any, Iterable, Sequence, Union

DEFAULT_IMG_SIZE = 224  # a multiple of 14, 16 and 32: valid for every registered backbone


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is integral (int, numpy / torch integer), else None; bools are not."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None

ImgSize = Union[int, Sequence[int]]


def _nearest_multiples(value: int, stride: int) -> str:
    lower = (value // stride) * stride
    upper = lower + stride
    return f"{lower} or {upper}" if lower > 0 else f"{upper}"


def resolve_img_size(img_size: ImgSize | None, stride: int, name: str) -> tuple[int, int]:
    """Normalise ``img_size`` to (H, W) pixels and check both are positive multiples of ``stride``.

    Args:
        img_size: int (square), (H, W), or None for ``DEFAULT_IMG_SIZE``.
        stride: patch size (ViT) or deepest output stride (CNN), in pixels.
        name: backbone name, for messages.

    Raises:
        TypeError: not an int or a pair of ints.
        ValueError: a side is not a positive multiple of ``stride``; names the nearest valid sizes.
    """
    if img_size is None:
        img_size = DEFAULT_IMG_SIZE
    square = _as_int(img_size)
    if square is not None:
        size = (square, square)
    else:
        try:
            sides = tuple(img_size)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(f"{name}: img_size must be an int or (H, W), got {img_size!r}") from None
        as_ints = tuple(_as_int(s) for s in sides)
        if len(as_ints) != 2 or None in as_ints:
            raise TypeError(f"{name}: img_size must be an int or a pair (H, W) of ints, got {img_size!r}")
        size = as_ints  # type: ignore[assignment]
    problems = []
    for label, side in zip(("height", "width"), size):
        if side <= 0 or side % stride:
            problems.append(f"{label} {side} -> nearest valid {_nearest_multiples(max(side, 0), stride)}")
    if problems:
        raise ValueError(
            f"{name}: img_size {size[0]}x{size[1]} (H x W) is not a multiple of the stride {stride} "
            f"px: {'; '.join(problems)}"
        )
    return int(size[0]), int(size[1])


def resolve_layers(
    layers: Iterable[int] | int | None, count: int, default: Sequence[int], name: str, what: str
) -> tuple[int, ...]:
    """Normalise ``layers`` to sorted, unique, non-negative indices in ``[0, count)``.

    Negative indices count from the end (``-1`` is the last ``what``). Features are returned in
    ascending index order, whatever order was passed.

    Raises:
        TypeError: not ints.
        ValueError: empty, out of range, or repeated.
    """
    if layers is None:
        layers = default
    if _as_int(layers) is not None:
        layers = (layers,)  # type: ignore[assignment]
    layers = tuple(layers)  # type: ignore[arg-type]
    if not layers:
        raise ValueError(f"{name}: layers must name at least one {what}")
    resolved = []
    for item in layers:
        index = _as_int(item)
        if index is None:
            raise TypeError(f"{name}: layers must be ints, got {item!r}")
        if not -count <= index < count:
            raise ValueError(
                f"{name}: {what} index {index} out of range; this model has {count} {what}s "
                f"(valid 0..{count - 1}, or -{count}..-1 from the end)"
            )
        resolved.append(index % count)
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"{name}: layers {layers} name the same {what} twice")
    return tuple(sorted(resolved))


def reject_overrides(overrides: dict[str, Any], reserved: dict[str, str], name: str) -> None:
    """Raise if ``overrides`` sets a constructor argument the backbone must control itself."""
    for key, why in reserved.items():
        if key in overrides:
            raise ValueError(f"{name}: model override {key!r} is not allowed: {why}")
