"""Reading images from disk as the uint8 arrays cameras deliver."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ._cv import require_cv2

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def is_image_file(path: str | Path) -> bool:
    """True when ``path`` has an image suffix edge_ad reads (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | Path, mode: str = "rgb") -> np.ndarray:
    """Read an image file into a uint8 array.

    Args:
        path: image file.
        mode: ``"rgb"`` -> (H, W, 3) RGB (grey files are replicated to three channels);
            ``"bgr"`` -> (H, W, 3) BGR, as OpenCV cameras deliver; ``"gray"`` -> (H, W).

    Returns:
        uint8 array, C-contiguous.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file exists but cannot be decoded (corrupt or not an image), or bad mode.
    """
    if mode not in ("rgb", "bgr", "gray"):
        raise ValueError(f"mode must be 'rgb', 'bgr' or 'gray', got {mode!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    cv2 = require_cv2("read image files")
    # imdecode from bytes handles non-ASCII paths on every platform, unlike cv2.imread.
    data = np.fromfile(str(path), dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if mode == "gray" else cv2.IMREAD_COLOR
    image = cv2.imdecode(data, flag) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode image {path}: the file is corrupt or not an image")
    if mode == "rgb":
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(image)


def read_mask(path: str | Path) -> np.ndarray:
    """Read a ground-truth mask file as a bool array (H, W): any non-zero pixel is defective."""
    return read_image(path, mode="gray") > 0
