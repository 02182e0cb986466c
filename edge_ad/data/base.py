"""The sample type and the lazily-loading dataset base every layout (MVTec, VisA, folder) shares."""
from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_ad.runtime.image_io import is_image_file, read_image, read_mask

__all__ = ["Sample", "Record", "AnomalyDataset", "Subset", "list_image_files", "source_channels"]


@dataclass
class Sample:
    """One decoded image with its ground truth.

    Attributes:
        image: uint8 (H, W, 3) RGB; grey source files are replicated to three equal channels.
        mask: bool (H, W) defect mask, pixel-aligned with ``image``; all False for good images.
        label: 0 good / 1 anomalous.
        defect_type: ``"good"`` for normal images, else the defect name (folder name in MVTec).
        path: the image file.
        mask_path: the mask file, or None (good images).
        source_channels: colour channels stored in the file: 1 (grey) or 3 (colour; an alpha
            channel is not counted and is dropped).
    """

    image: np.ndarray
    mask: np.ndarray
    label: int
    defect_type: str
    path: Path
    mask_path: Path | None
    source_channels: int = 3


@dataclass(frozen=True)
class Record:
    """Metadata of one sample, known without decoding anything."""

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None = None


def list_image_files(folder: Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` sorted by their path relative to it; hidden files (``.x``) skipped.

    Non-image files (by suffix, see :func:`edge_ad.runtime.image_io.is_image_file`) are ignored.
    """
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    files = []
    for p in candidates:
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue  # .DS_Store, macOS '._x.png' resource forks, hidden folders
        if p.is_file() and is_image_file(p):
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


# ---------------------------------------------------------------------------------------------
# Source channel count from the file header (no second decode for PNG / JPEG)
# ---------------------------------------------------------------------------------------------

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour types: 0 grey, 2 RGB, 3 palette, 4 grey + alpha, 6 RGBA.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 1, 6: 3}
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic); not DHT/JPG/DAC.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _png_channels(f) -> int | None:
    head = f.read(26)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return _PNG_CHANNELS.get(head[25])


def _jpeg_channels(f) -> int | None:
    if f.read(2) != b"\xff\xd8":
        return None
    while True:
        byte = f.read(1)
        if not byte:
            return None
        if byte != b"\xff":
            continue  # not at a marker: tolerate junk between segments
        marker = f.read(1)
        while marker == b"\xff":  # fill bytes
            marker = f.read(1)
        if not marker:
            return None
        code = marker[0]
        if code in (0x01, 0xD8) or 0xD0 <= code <= 0xD7:
            continue  # stand-alone markers, no length
        if code in (0xD9, 0xDA):
            return None  # end of image / start of scan before any frame header
        raw = f.read(2)
        if len(raw) < 2:
            return None
        length = struct.unpack(">H", raw)[0]
        if code in _JPEG_SOF:
            frame = f.read(6)  # precision, height (2), width (2), component count
            if len(frame) < 6:
                return None
            return 1 if frame[5] == 1 else 3
        f.seek(length - 2, 1)


def source_channels(path: Path) -> int:
    """Colour channels stored in an image file: 1 (grey, grey + alpha) or 3 (colour, with or without
    alpha; palette PNGs count as colour).

    PNG and JPEG are read from the header; other formats are decoded once more unchanged.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        f.seek(0)
        if head.startswith(_PNG_SIGNATURE):
            found = _png_channels(f)
        elif head.startswith(b"\xff\xd8"):
            found = _jpeg_channels(f)
        else:
            found = None
    if found is not None:
        return found
    from edge_ad.runtime._cv import require_cv2

    cv2 = require_cv2("read image files")
    raw = cv2.imdecode(np.fromfile(str(path), dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise ValueError(f"cannot decode image {path}: the file is corrupt or not an image")
    return 1 if raw.ndim == 2 or raw.shape[2] <= 2 else 3


def load_sample(record: Record) -> Sample:
    """Decode ``record``'s image (and mask); checks the mask is pixel-aligned with the image.

    Raises:
        FileNotFoundError / ValueError: from :func:`edge_ad.runtime.image_io.read_image`, naming the
            file that is missing or cannot be decoded.
        ValueError: the mask's size differs from the image's (both files named).
    """
    image = read_image(record.path, mode="rgb")
    channels = source_channels(record.path)
    h, w = image.shape[:2]
    if record.mask_path is None:
        mask = np.zeros((h, w), dtype=bool)
    else:
        mask = read_mask(record.mask_path)
        if mask.shape != (h, w):
            raise ValueError(
                f"mask {record.mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"{record.path} is {w}x{h}: masks must be pixel-aligned with their image; fix the mask "
                "file (edge_ad never resizes ground truth silently)"
            )
    return Sample(
        image=image,
        mask=mask,
        label=int(record.label),
        defect_type=record.defect_type,
        path=record.path,
        mask_path=record.mask_path,
        source_channels=channels,
    )


# ---------------------------------------------------------------------------------------------
# Dataset base
# ---------------------------------------------------------------------------------------------


class AnomalyDataset(Sequence):
    """A fixed, ordered list of samples, decoded on access.

    ``len(ds)`` and the metadata (``paths``, ``labels``, ``defect_types``, ``mask_paths``) never
    decode an image; ``ds[i]`` reads image ``i`` (and its mask) from disk and returns a
    :class:`Sample`. Subclasses set ``self._records`` in ``__init__``.
    """

    _records: list[Record]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> Sample:  # type: ignore[override]
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(
                f"dataset indices must be integers, got {type(index).__name__}; use .subset(indices) "
                "for a selection"
            )
        n = len(self._records)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        return load_sample(self._records[i])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    @property
    def records(self) -> list[Record]:
        """(N,) sample metadata, in dataset order (a copy)."""
        return list(self._records)

    @property
    def paths(self) -> list[Path]:
        """(N,) image paths, in dataset order."""
        return [r.path for r in self._records]

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels: 0 good / 1 anomalous."""
        return np.fromiter((r.label for r in self._records), dtype=np.int64, count=len(self._records))

    @property
    def defect_types(self) -> list[str]:
        """(N,) defect type names (``"good"`` for normal images)."""
        return [r.defect_type for r in self._records]

    @property
    def mask_paths(self) -> list[Path | None]:
        """(N,) mask paths (None for good images)."""
        return [r.mask_path for r in self._records]

    def subset(self, indices: Iterable[int]) -> "Subset":
        """A dataset of the samples at ``indices`` (in that order), sharing this one's files."""
        return Subset(self, indices)

    def __repr__(self) -> str:
        n_bad = int(self.labels.sum()) if self._records else 0
        return f"{type(self).__name__}({self._describe()}, {len(self)} samples, {n_bad} anomalous)"

    def _describe(self) -> str:
        return ""


class Subset(AnomalyDataset):
    """Selected samples of another dataset.

    Attributes:
        parent: the dataset the samples come from.
        indices: (K,) positions in ``parent``, in this subset's order.
    """

    def __init__(self, parent: AnomalyDataset, indices: Iterable[int]):
        n = len(parent)
        chosen = []
        for i in indices:
            if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
                raise TypeError(f"subset indices must be integers, got {i!r}")
            if not 0 <= int(i) < n:
                raise IndexError(f"subset index {int(i)} out of range for a dataset of {n} samples")
            chosen.append(int(i))
        self.parent = parent
        self.indices = chosen
        self._records = [parent._records[i] for i in chosen]

    def _describe(self) -> str:
        return f"of {self.parent!r}"
