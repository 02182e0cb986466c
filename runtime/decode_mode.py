"""Which decode a source's frames get, and whether it is the one the thresholds were fitted on.

An image-folder stream decodes its JPEGs at reduced size by default (DCT scaling, the factor
chosen per file by :func:`edge_ad.runtime.image_io.reduction_factor`), so the model sees a
differently resampled input than after a full decode and scores move by a few per cent. The
thresholds must therefore be fitted on the decode the stream will use: on-site calibration
(:mod:`edge_ad.runtime.calibrate`) opens its source through the same
:func:`apply_decode_mode` as a stream lane, records the mode in ``thresholds.details["decode"]``,
and a stream warns once per camera when its decode mode differs from the recorded one.

Modes (:data:`DECODE_MODES`):

* ``"reduced"``: image-folder JPEGs decoded at 1/2, 1/4 or 1/8 size (at least the model input);
  other formats in the folder decode in full either way;
* ``"full"``: the source decodes every frame at its stored size (``reduced_decode=False``,
  ``--full-decode``, a ROI, cameras, network streams, video files);
* ``"given"``: frames handed over as arrays / iterables: edge_ad decoded nothing, so there is no
  mode to compare (never warned about).

Torch-free.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from .sources import FrameSource, IterableSource

__all__ = ["DECODE_MODES", "apply_decode_mode", "decode_mismatch", "thresholds_decode_mode"]

DECODE_MODES = ("reduced", "full", "given")


def apply_decode_mode(source: FrameSource, reduced_decode: bool, roi: Any, min_size: tuple[int, int]) -> str:
    """Set up ``source``'s decode as a stream lane does and return its mode (:data:`DECODE_MODES`).

    Args:
        source: an unopened :class:`~edge_ad.runtime.sources.FrameSource`.
        reduced_decode: reduced decode requested (the default of streams and calibration).
        roi: the lane's ``(x, y, w, h)`` or None: a ROI is in full-frame pixels, so it is never
            decoded reduced.
        min_size: (height, width) pixels the decoded frames must keep (the model input).
    """
    if isinstance(source, IterableSource):
        return "given"
    if reduced_decode and roi is None and source.reduce_decode(min_size):
        return "reduced"
    return "full"


def thresholds_decode_mode(thresholds: Any) -> str | None:
    """The decode mode recorded with ``thresholds`` (a bundle ``Thresholds``) by on-site calibration, else None
    (conversion-time thresholds, older calibrations, none at all)."""
    details = getattr(thresholds, "details", None)
    record = details.get("decode") if isinstance(details, Mapping) else None
    mode = record.get("mode") if isinstance(record, Mapping) else None
    return mode if mode in DECODE_MODES else None


def decode_mismatch(thresholds: Any, mode: str, camera: str, warned: set[tuple[str, str, str]]) -> bool:
    """Warn (UserWarning) when ``camera`` streams with decode ``mode`` but its ``thresholds`` were calibrated on
    another; once per (camera, calibrated mode, stream mode) in ``warned`` (the detector's set). Returns whether the
    modes differ."""
    fitted = thresholds_decode_mode(thresholds)
    if fitted is None or "given" in (fitted, mode) or fitted == mode:
        return False
    key = (camera, fitted, mode)
    if key not in warned:
        warned.add(key)
        how = {"reduced": "JPEGs decoded at reduced size", "full": "frames decoded at full size"}
        flag = {"reduced": "reduced_decode=True, no --full-decode", "full": "reduced_decode=False / --full-decode"}
        warnings.warn(
            f"{camera}: its thresholds were calibrated on {how[fitted]} ({fitted} decode) but this stream gets "
            f"{how[mode]} ({mode} decode); scores move by a few per cent between the two, so the false-alarm rate is "
            f"not the calibrated one. Stream as calibrated ({flag[fitted]}) or calibrate again as this stream "
            f"decodes (edge-ad calibrate / det.calibrate with {flag[mode]}, on this kind of source)",
            UserWarning, stacklevel=5)
    return True
