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


def jpeg_size(data: bytes | np.ndarray) -> tuple[int, int] | None:
    """(height, width) of an encoded JPEG from its header (no decoding); None for anything else.

    Read from the first start-of-frame marker (SOF0-SOF15 but DHT / JPG / DAC). The size is as
    stored: an EXIF orientation that rotates the decoded image is not applied.
    """
    b = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None  # not at a marker: a corrupt or unusual stream; let the decoder decide
        marker = b[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(b[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and i + 9 <= len(b):
            return int.from_bytes(b[i + 5 : i + 7], "big"), int.from_bytes(b[i + 7 : i + 9], "big")
        i += 2 + length
    return None


def read_image_reduced(path: str | Path, min_size: tuple[int, int],
                       mode: str = "bgr") -> tuple[np.ndarray, int, tuple[int, int]]:
    """Read a JPEG at the smallest size libjpeg can decode it that keeps ``min_size`` on both axes.

    Args:
        path: image file.
        min_size: (height, width) pixels the decoded image must keep (a model's input size).
        mode: as :func:`read_image`.

    Returns:
        ``(image, factor, (H, W))``: the image decoded at 1/``factor`` per axis
        (:func:`reduction_factor` of its stored size; ``(ceil(H / factor), ceil(W / factor))``
        pixels, scaled in libjpeg's DCT: most of the inverse-DCT work is skipped), and the image's
        full size (H, W) in pixels, i.e. the size :func:`read_image` would return. Factor 1 (a
        full decode) for other formats (PNG, BMP, ...: OpenCV would decode them in full and then
        resize, no cheaper than preprocessing's own resize, while the model input would change),
        and when the reduced decode is not the size the header implies.

    Raises:
        as :func:`read_image`.
    """
    _check_mode(mode)
    data = _read_bytes(path)
    hw = jpeg_size(data)
    factor = reduction_factor(hw, min_size) if hw is not None and min(hw) > 0 else 1
    if factor > 1:
        image = _decode(data, path, mode, factor)
        h, w = image.shape[:2]
        expect = (-(-hw[0] // factor), -(-hw[1] // factor))
        if (h, w) == expect:
            return image, factor, hw
        if (w, h) == expect:  # EXIF orientation rotated it by 90 degrees: so is the full image
            return image, factor, (hw[1], hw[0])
    image = _decode(data, path, mode, 1)
    return image, 1, (int(image.shape[0]), int(image.shape[1]))


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
    _check_mode(mode)
    if isinstance(reduce, bool) or reduce not in REDUCTION_FACTORS:
        raise ValueError(f"reduce must be one of {REDUCTION_FACTORS}, got {reduce!r}")
    return _decode(_read_bytes(path), path, mode, reduce)


def _check_mode(mode: str) -> None:
    if mode not in ("rgb", "bgr", "gray"):
        raise ValueError(f"mode must be 'rgb', 'bgr' or 'gray', got {mode!r}")


def _read_bytes(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    # imdecode from bytes handles non-ASCII paths on every platform, unlike cv2.imread.
    return np.fromfile(str(path), dtype=np.uint8)


def _decode(data: np.ndarray, path: str | Path, mode: str, reduce: int) -> np.ndarray:
    """Encoded bytes -> uint8 array in ``mode``, decoded at 1/``reduce`` per axis (read_image's contract)."""
    cv2 = require_cv2("read image files")
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
