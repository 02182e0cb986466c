"""Small argument parsers shared by CLI verbs (torch-free)."""
from __future__ import annotations

import argparse
from typing import Any

import yaml


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with VALUE parsed as YAML (``3`` -> int, ``0.5`` -> float, ``[1,2]`` -> list)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def image_size(text: str) -> int | tuple[int, int] | str:
    """``N`` or ``HxW`` (pixels), or ``auto:N`` (kept as text: resolved from the data's frames)."""
    if text.lower().startswith("auto:"):
        from edge_ad.data.frame_size import parse_auto_size

        try:
            parse_auto_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text.lower()
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            return int(h), int(w)
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N, HxW or auto:N, got {text!r}") from None


def int_list(text: str) -> list[int]:
    """``9`` or ``2,3``."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def roi(text: str) -> tuple[int, int, int, int]:
    """``X,Y,W,H`` in pixels (four integers): a region of interest for the runtime verbs."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--roi must be X,Y,W,H in pixels (four integers), got {text!r}")
    return values  # type: ignore[return-value]
