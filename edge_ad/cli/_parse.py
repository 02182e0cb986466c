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


def pixel_size(text: str) -> int | tuple[int, int]:
    """``N`` or ``HxW`` (positive pixels): a frame or input size."""
    try:
        if "x" in text.lower():
            h, w = text.lower().split("x")
            size: int | tuple[int, int] = (int(h), int(w))
        else:
            size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be N or HxW in pixels (e.g. 480x640), got {text!r}") from None
    if min(size if isinstance(size, tuple) else (size,)) < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive (e.g. 480x640), got {text!r}")
    return size


def image_size(text: str) -> int | tuple[int, int] | str:
    """A training input size: :func:`pixel_size`, or ``auto:N`` (kept as text: resolved from the data's frames)."""
    if text.lower().startswith("auto:"):
        from edge_ad.data.frame_size import parse_auto_size

        try:
            parse_auto_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text.lower()
    try:
        return pixel_size(text)
    except argparse.ArgumentTypeError as exc:
        if "positive" in str(exc):
            raise
        raise argparse.ArgumentTypeError(f"image size must be N or HxW in pixels (e.g. 480x640), or auto:N, "
                                         f"got {text!r}") from None


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


_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def named_sources(specs: list[str]) -> Any:
    """``--source`` values -> what :meth:`edge_ad.runtime.Detector.stream` takes.

    One value without a name is that source (``0`` -> camera 0). ``NAME=SPEC`` values (NAME of
    letters, digits, ``_ - .``; an URL's ``?a=b`` or a GStreamer ``key=value`` is never taken for
    a name, because the text before its first ``=`` holds ``:``, ``/`` or a space) make a
    ``{NAME: SPEC}`` mapping, one camera each; unnamed ones among several are named ``cam<i>``.
    """
    out: dict[str, Any] = {}
    named = False
    for i, text in enumerate(specs):
        name, sep, spec = text.partition("=")
        if sep and name and spec and set(name) <= _NAME_CHARS:
            named = True
        else:
            name, spec = f"cam{i}", text
        if name in out:
            raise argparse.ArgumentTypeError(f"--source name {name!r} is given twice; camera names must be unique")
        out[name] = int(spec) if spec.strip().isdigit() else spec
    if len(out) == 1 and not named:
        return next(iter(out.values()))
    return out


def engine_threads(text: str) -> int | None:
    """``--engine-threads``: ``auto`` (None: the default CPU budget) or an int >= 1 (checked against the
    usable cores by :func:`edge_ad.runtime.cpu_budget.check_engine_threads`)."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of threads >= 1, got {text!r}") from None
    from edge_ad.runtime.cpu_budget import check_engine_threads

    try:
        return check_engine_threads(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_decode_arguments(parser: argparse.ArgumentParser, reduced_help: str, full_help: str) -> None:
    """``--reduced-decode`` (default) / ``--full-decode`` -> ``args.reduced_decode`` (bool): how image folders are
    decoded (``run``, ``benchmark``, ``calibrate``: docs/MULTI_CAMERA.md)."""
    decode = parser.add_mutually_exclusive_group()
    decode.add_argument("--reduced-decode", dest="reduced_decode", action="store_true", default=True,
                        help=reduced_help)
    decode.add_argument("--full-decode", dest="reduced_decode", action="store_false", help=full_help)
