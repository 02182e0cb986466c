"""Reading images from disk as the uint8 arrays cameras deliver."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._cv import require_cv2

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: str | Path) -> bool:
    """True when ``path`` has an image suffix edge_ad reads (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


#: Decode-time reduction factors OpenCV offers (``cv2.IMREAD_REDUCED_*``); JPEGs use libjpeg's DCT
#: scaling, so a factor-4 decode skips most of the inverse-DCT work instead of resizing afterwards.
REDUCTION_FACTORS = (1, 2, 4, 8)


def reduction_factor(frame_hw: tuple[int, int], model_hw: tuple[int, int]) -> int:
    """The largest factor in :data:`REDUCTION_FACTORS` that keeps the decoded frame >= the model input.

    Args:
        frame_hw: (height, width) of the full-size image, pixels.
        model_hw: (height, width) of the model input, pixels.

    Returns:
        1, 2, 4 or 8; 1 when the frame is not at least twice the model input on both axes.
        Sizes are compared after floor division, so the reduced frame never undersamples the model.
    """
    (fh, fw), (mh, mw) = frame_hw, model_hw
    if min(fh, fw, mh, mw) <= 0:
        raise ValueError(f"sizes must be positive (height, width), got frame {frame_hw} and model {model_hw}")
    return max(f for f in REDUCTION_FACTORS if fh // f >= mh and fw // f >= mw)


def read_image(path: str | Path, mode: str = "rgb", reduce: int = 1) -> np.ndarray:
    """Read an image file into a uint8 array.

    Args:
        path: image file.
        mode: ``"rgb"`` -> (H, W, 3) RGB (grey files are replicated to three channels);
            ``"bgr"`` -> (H, W, 3) BGR, as OpenCV cameras deliver; ``"gray"`` -> (H, W).
        reduce: decode at 1/``reduce`` of the size on each axis (1, 2, 4 or 8; OpenCV's
            ``IMREAD_REDUCED_*``; JPEGs are scaled in the DCT, other formats decoded then resized),
            giving (ceil(H / reduce), ceil(W / reduce)) pixels.

    Returns:
        uint8 array, C-contiguous.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file exists but cannot be decoded (corrupt or not an image), or bad mode.
    """
    if mode not in ("rgb", "bgr", "gray"):
        raise ValueError(f"mode must be 'rgb', 'bgr' or 'gray', got {mode!r}")
    if isinstance(reduce, bool) or reduce not in REDUCTION_FACTORS:
        raise ValueError(f"reduce must be one of {REDUCTION_FACTORS}, got {reduce!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    cv2 = require_cv2("read image files")
    # imdecode from bytes handles non-ASCII paths on every platform, unlike cv2.imread.
    data = np.fromfile(str(path), dtype=np.uint8)
    kind = "GRAYSCALE" if mode == "gray" else "COLOR"
    flag = getattr(cv2, f"IMREAD_{kind}" if reduce == 1 else f"IMREAD_REDUCED_{kind}_{reduce}")
    image = cv2.imdecode(data, flag) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode image {path}: the file is corrupt or not an image")
    if mode == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask file as a bool array (H, W): any non-zero pixel is defective."""
    return read_image(path, mode="gray") > 0
