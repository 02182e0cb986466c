"""VisA layout: images and masks listed in a split CSV (``split_csv/1cls.csv``)."""
from __future__ import annotations

import csv
from pathlib import Path

from .base import AnomalyDataset, Record
from .mvtec import SPLITS

__all__ = ["VisADataset", "list_visa_categories", "VISA_COLUMNS"]

#: Columns of VisA's split CSVs (``object,split,label,image,mask``); extra columns are ignored.
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}
#: defect_type of anomalous VisA samples: the split CSV names no defect kind.
VISA_ANOMALY = "anomaly"


def _default_csv(root: Path) -> Path:
    return root / "split_csv" / "1cls.csv"


def _read_rows(csv_path: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) pairs of ``csv_path`` with stripped keys and values."""
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"VisA split CSV {csv_path} not found: pass split_csv= or place VisA's split_csv/1cls.csv "
            "in the dataset root"
        )
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in VISA_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{csv_path} lacks column(s) {missing}; found {header}; a VisA split CSV has the header "
                f"{','.join(VISA_COLUMNS)}"
            )
        rows = []
        for row in reader:
            clean = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
            rows.append((reader.line_num, clean))
    return rows


def list_visa_categories(root: str | Path, split_csv: str | Path | None = None) -> list[str]:
    """Sorted object names in a VisA split CSV (default ``<root>/split_csv/1cls.csv``)."""
    root = Path(root).expanduser()
    csv_path = Path(split_csv).expanduser() if split_csv is not None else _default_csv(root)
    return sorted({row["object"] for _, row in _read_rows(csv_path) if row["object"]})


class VisADataset(AnomalyDataset):
    """One object of a VisA-style dataset, loaded lazily.

    The split CSV has the columns ``object,split,label,image,mask`` (as VisA's
    ``split_csv/1cls.csv``): ``label`` is ``normal`` or ``anomaly``; ``image`` and ``mask`` are paths
    relative to ``root``; ``mask`` is empty for normal images. VisA masks are 0/255 or 0/1 PNGs
    (any non-zero pixel is a defect). Normal rows get no mask even if one is listed. Order: sorted by
    the image path as written in the CSV. Anomalous samples get ``defect_type == "anomaly"``.

    Args:
        root: dataset root the CSV's paths are relative to.
        category: the ``object`` value, e.g. ``"candle"``.
        split: ``"train"`` or ``"test"`` (the CSV's ``split`` column).
        split_csv: the CSV; default ``<root>/split_csv/1cls.csv``.

    Raises:
        FileNotFoundError: missing root, CSV, or any listed image / mask file (counted, first named).
        ValueError: bad ``split``; missing CSV columns; an unknown object (the known ones are listed);
            no rows for this split; a label other than normal/anomaly or an anomaly row without a
            mask (the CSV line is named).
    """

    def __init__(self, root: str | Path, category: str, split: str = "train", split_csv: str | Path | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist or is not a folder")
        self.category = str(category)
        self.split = split
        self.split_csv = Path(split_csv).expanduser() if split_csv is not None else _default_csv(self.root)
        rows = _read_rows(self.split_csv)
        objects = sorted({row["object"] for _, row in rows if row["object"]})
        if self.category not in objects:
            raise ValueError(
                f"object {self.category!r} not in {self.split_csv}; objects there: {', '.join(objects) or 'none'}"
            )
        mine = [(line, row) for line, row in rows if row["object"] == self.category]
        chosen = [(line, row) for line, row in mine if row["split"].lower() == split]
        if not chosen:
            splits = sorted({row["split"] for _, row in mine})
            raise ValueError(
                f"no {split!r} rows for object {self.category!r} in {self.split_csv}; its splits: {splits}"
            )
        records = []
        for line, row in chosen:
            label_name = row["label"].lower()
            if label_name not in _LABELS:
                raise ValueError(
                    f"{self.split_csv} line {line}: label {row['label']!r} is neither 'normal' nor 'anomaly'"
                )
            label = _LABELS[label_name]
            if not row["image"]:
                raise ValueError(f"{self.split_csv} line {line}: empty image path")
            mask_path = None
            if label == 1:
                if not row["mask"]:
                    raise ValueError(
                        f"{self.split_csv} line {line}: anomalous image {row['image']} has no mask; every "
                        "anomaly row needs a mask path"
                    )
                mask_path = self.root / row["mask"]
            records.append((row["image"], Record(self.root / row["image"], label, VISA_ANOMALY if label else "good", mask_path)))
        records.sort(key=lambda item: item[0])
        self._records = [r for _, r in records]
        self._check_files_exist()

    def _check_files_exist(self) -> None:
        for kind, paths in (
            ("image", [r.path for r in self._records]),
            ("mask", [r.mask_path for r in self._records if r.mask_path is not None]),
        ):
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{len(missing)} {kind} file(s) listed in {self.split_csv} do not exist, first {missing[0]}; "
                    f"the CSV's paths are relative to root={str(self.root)!r}"
                )

    def _describe(self) -> str:
        return f"root={str(self.root)!r}, category={self.category!r}, split={self.split!r}"
