"""Optional OpenCV access.

edge_ad never depends on a pip OpenCV wheel: on Jetson, JetPack ships its own ``cv2`` (built with
GStreamer and CUDA) and a pip ``opencv-python`` would shadow it. We use whatever ``cv2`` imports.
"""
from __future__ import annotations

from types import ModuleType

_CV2: ModuleType | None = None
_CV2_ERROR: str | None = None

try:  # pragma: no branch - depends on the environment
    import cv2 as _imported_cv2

    _CV2 = _imported_cv2
except Exception as exc:  # ImportError, or a broken system build raising something else
    _CV2_ERROR = f"{type(exc).__name__}: {exc}"


def cv2_available() -> bool:
    """True when an OpenCV ``cv2`` module can be imported."""
    return _CV2 is not None


def require_cv2(purpose: str) -> ModuleType:
    """Return the ``cv2`` module or raise a clear error saying how to get one.

    Args:
        purpose: what the caller needs OpenCV for, quoted in the error.
    """
    if _CV2 is None:
        raise ImportError(
            f"OpenCV (cv2) is needed to {purpose} but could not be imported ({_CV2_ERROR}). "
            "Install it with `pip install edge-ad[opencv]` (or `pip install opencv-python-headless`); "
            "on Jetson use JetPack's own OpenCV (python3-opencv), which has GStreamer and CUDA."
        )
    return _CV2
