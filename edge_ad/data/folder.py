"""A plain folder of good images (e.g. the few reference shots an integrator takes on the line)."""
from __future__ import annotations

from pathlib import Path

from .base import AnomalyDataset, Record, list_image_files

__all__ = ["FolderDataset"]


class FolderDataset(AnomalyDataset):
    """Every image file in ``folder`` as a good sample (label 0, ``defect_type == "good"``, empty mask).

    Order: sorted by path relative to ``folder``; hidden and non-image files are ignored.

    Args:
        folder: the folder of images.
        recursive: also take images from sub-folders (at any depth).

    Raises:
        FileNotFoundError: ``folder`` does not exist or is not a folder.
        ValueError: no image file found.
    """

    def __init__(self, folder: str | Path, recursive: bool = False):
        self.folder = Path(folder).expanduser()
        self.recursive = bool(recursive)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder {self.folder} does not exist or is not a folder")
        files = list_image_files(self.folder, recursive=self.recursive)
        if not files:
            hint = ""
            if not self.recursive and list_image_files(self.folder, recursive=True):
                hint = "; its sub-folders hold images: pass recursive=True"
            raise ValueError(f"no images (.png, .jpg, ...) in {self.folder}{hint}")
        self._records = [Record(path=p, label=0, defect_type="good") for p in files]

    def _describe(self) -> str:
        return f"folder={str(self.folder)!r}, recursive={self.recursive}"
