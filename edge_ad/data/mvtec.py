"""MVTec AD layout: ``<root>/<category>/{train/good, test/<defect>, ground_truth/<defect>}``."""
from __future__ import annotations

from pathlib import Path

from .base import AnomalyDataset, Record, list_image_files

__all__ = ["MVTecDataset", "list_categories", "SPLITS"]

SPLITS = ("train", "test")
GOOD = "good"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _check_root(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} does not exist or is not a folder")
    return root


def list_categories(root: str | Path) -> list[str]:
    """Names of the MVTec-layout categories in ``root``: sub-folders holding ``train/`` or ``test/``.

    Files (e.g. a manifest.csv) and hidden folders are skipped; the result is sorted.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = _check_root(root)
    return [p.name for p in _visible_dirs(root) if (p / "train").is_dir() or (p / "test").is_dir()]


def _find_mask(gt_dir: Path, stem: str) -> Path | None:
    for name in (f"{stem}_mask.png", f"{stem}.png"):
        candidate = gt_dir / name
        if candidate.is_file():
            return candidate
    return None


class MVTecDataset(AnomalyDataset):
    """One category of an MVTec-AD-style dataset, loaded lazily.

    Layout::

        <root>/<category>/train/good/*.png             training images (good only)
        <root>/<category>/test/<defect>/*.png          test images; <defect> == "good" is normal
        <root>/<category>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png) defect masks

    Any image suffix edge_ad reads is accepted (PNG, JPEG, ...); non-image and hidden files are
    ignored. Order: sorted by defect folder name, then by file name. ``train`` reads only
    ``train/good`` (other folders there are ignored). Masks are resolved when the dataset is built
    (a defect image without a mask fails here, not mid-evaluation) and are checked to be the
    image's size when a sample is read.

    Args:
        root: the dataset root (the folder that holds the category folders).
        category: a category folder in ``root``, e.g. ``"hazelnut"``.
        split: ``"train"`` or ``"test"``.

    Raises:
        FileNotFoundError: missing root, category (the message lists the categories found), split
            folder, ``train/good`` folder, or a defect image's mask (the expected path is named).
        ValueError: bad ``split``; no good images in ``train/good``; no images in ``test``.
    """

    def __init__(self, root: str | Path, category: str, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = _check_root(root)
        self.category = str(category)
        self.split = split
        self.category_dir = self.root / self.category
        if not self.category or not self.category_dir.is_dir():
            raise FileNotFoundError(self._missing_category_message())
        split_dir = self.category_dir / split
        if not split_dir.is_dir():
            raise FileNotFoundError(
                f"no '{split}' folder in {self.category_dir}: expected the MVTec layout "
                f"{self.category_dir}/{split}/{'good' if split == 'train' else '<defect>'}/<image>"
            )
        self._records = self._scan_train(split_dir) if split == "train" else self._scan_test(split_dir)

    def _describe(self) -> str:
        return f"root={str(self.root)!r}, category={self.category!r}, split={self.split!r}"

    def _missing_category_message(self) -> str:
        found = list_categories(self.root)
        msg = f"category {self.category!r} not found in {self.root}; "
        msg += f"categories there: {', '.join(found)}" if found else "no MVTec-layout categories (folders holding train/ or test/) there"
        if (self.root / "train").is_dir() or (self.root / "test").is_dir():
            msg += (
                f". {self.root} itself looks like a category folder: pass root={str(self.root.parent)!r}, "
                f"category={self.root.name!r}"
            )
        return msg

    def _scan_train(self, split_dir: Path) -> list[Record]:
        good_dir = split_dir / GOOD
        if not good_dir.is_dir():
            raise FileNotFoundError(f"no good images in {split_dir}: the folder {good_dir} does not exist")
        files = list_image_files(good_dir)
        if not files:
            raise ValueError(
                f"no good images in {good_dir}: the folder holds no image files (.png, .jpg, ...); "
                "training needs at least one defect-free image"
            )
        return [Record(path=p, label=0, defect_type=GOOD) for p in files]

    def _scan_test(self, split_dir: Path) -> list[Record]:
        gt_root = self.category_dir / "ground_truth"
        records: list[Record] = []
        missing: list[Path] = []
        for defect_dir in _visible_dirs(split_dir):
            defect = defect_dir.name
            for path in list_image_files(defect_dir):
                if defect == GOOD:
                    records.append(Record(path=path, label=0, defect_type=GOOD))
                    continue
                mask_path = _find_mask(gt_root / defect, path.stem)
                if mask_path is None:
                    missing.append(gt_root / defect / f"{path.stem}_mask.png")
                records.append(Record(path=path, label=1, defect_type=defect, mask_path=mask_path))
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} defect image(s) in {split_dir} have no mask; expected {missing[0]} "
                f"(or {missing[0].with_name(missing[0].name.replace('_mask.png', '.png'))})"
                + (f", and {len(missing) - 1} more" if len(missing) > 1 else "")
                + ". Add the masks, or move images without ground truth out of test/"
            )
        if not records:
            raise ValueError(f"no images in {split_dir}: expected {split_dir}/<defect or good>/<image>")
        return records
