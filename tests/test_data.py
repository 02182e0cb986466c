"""edge_ad.data on the real MVTec-layout data and on small trees built in tmp_path."""
from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_ad.data import (
    FolderDataset,
    MVTecDataset,
    Sample,
    Subset,
    VisADataset,
    k_shot_subset,
    list_categories,
    list_visa_categories,
    sample_k_shot,
    source_channels,
)
from edge_ad.data import base as data_base
from edge_ad.runtime.image_io import read_image

HAZELNUT = "mvtec_hazelnut_256"
TILE = "magnetic_tile"


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))


# ----------------------------------------------------------------------------------------------
# Real data
# ----------------------------------------------------------------------------------------------


def test_list_categories_real(real_root):
    # manifest.csv beside the categories is a file, not a category; the categories it lists are the
    # expected set (an independent record: shared/ grows, e.g. bsdata_pitting was added later)
    import csv

    with open(real_root / "manifest.csv", newline="") as f:
        listed = sorted({row[0].split("/")[0] for row in csv.reader(f)} - {"category"})
    assert {TILE, HAZELNUT, "mvtec_transistor_256"} <= set(listed)
    assert list_categories(real_root) == listed


def test_hazelnut_counts_and_metadata_match_files(real_root):
    cat = real_root / HAZELNUT
    train = MVTecDataset(real_root, HAZELNUT, split="train")
    assert len(train) == len(_images_in(cat / "train" / "good")) == 50
    assert train.paths == _images_in(cat / "train" / "good")
    assert set(train.defect_types) == {"good"} and not train.labels.any()
    assert all(p is None for p in train.mask_paths)

    test = MVTecDataset(real_root, HAZELNUT, split="test")
    defects = sorted(d.name for d in (cat / "test").iterdir())
    expected = [p for d in defects for p in _images_in(cat / "test" / d)]
    assert test.paths == expected  # sorted by defect folder, then file name
    assert len(test) == 10
    assert test.labels.tolist() == [0 if p.parent.name == "good" else 1 for p in expected]
    assert test.labels.dtype == np.int64
    assert test.defect_types == [p.parent.name for p in expected]
    for path, mask_path in zip(test.paths, test.mask_paths):
        if path.parent.name == "good":
            assert mask_path is None
        else:
            assert mask_path == cat / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"


def test_hazelnut_samples_are_rgb_with_aligned_masks(real_root):
    test = MVTecDataset(real_root, HAZELNUT, split="test")
    for i in range(len(test)):
        s = test[i]
        assert isinstance(s, Sample)
        assert s.image.dtype == np.uint8 and s.image.shape == (256, 256, 3)
        assert s.mask.dtype == np.bool_ and s.mask.shape == s.image.shape[:2]
        assert s.source_channels == 3
        assert s.path == test.paths[i] and s.label == test.labels[i] and s.defect_type == test.defect_types[i]
        if s.label == 1:
            assert s.mask.any(), f"empty mask for defect image {s.path}"
            assert s.mask_path is not None
        else:
            assert not s.mask.any() and s.mask_path is None
    # RGB order (not BGR): identical to the runtime reader's rgb mode
    np.testing.assert_array_equal(test[0].image, read_image(test.paths[0], mode="rgb"))
    assert test[-1].path == test.paths[-1]


def test_magnetic_tile_grey_sizes_and_masks(real_root):
    test = MVTecDataset(real_root, TILE, split="test")
    assert len(test) == 80 and int(test.labels.sum()) == 50
    shapes = set()
    for i in range(0, len(test), 3):  # every third sample keeps the test fast
        s = test[i]
        assert s.source_channels == 1
        assert s.image.shape[2] == 3 and s.image.dtype == np.uint8
        assert (s.image[..., 0] == s.image[..., 1]).all() and (s.image[..., 1] == s.image[..., 2]).all()
        assert s.mask.shape == s.image.shape[:2]
        assert s.mask.any() == bool(s.label)
        shapes.add(s.image.shape)
    assert len(shapes) > 3  # the images really vary in size
    train = MVTecDataset(real_root, TILE, split="train")
    assert len(train) == 60 and train[0].source_channels == 1


def test_metadata_does_not_decode(real_root, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("metadata access decoded an image")

    monkeypatch.setattr(data_base, "read_image", refuse)
    monkeypatch.setattr(data_base, "read_mask", refuse)
    test = MVTecDataset(real_root, TILE, split="test")
    assert len(test) == len(test.paths) == len(test.labels) == len(test.defect_types) == len(test.mask_paths)
    k_shot_subset(test, 5, seed=0).labels  # noqa: B018 - must not decode either


def test_k_shot_on_real_train(real_root):
    train = MVTecDataset(real_root, HAZELNUT, split="train")
    a = sample_k_shot(train, 8, seed=0)
    assert a == sample_k_shot(train, 8, seed=0) == sample_k_shot(len(train), 8, seed=0)
    assert len(set(a)) == 8 and a == sorted(a) and all(0 <= i < len(train) for i in a)
    assert sample_k_shot(train, 8, seed=1) != a
    assert set(sample_k_shot(train, 4, seed=0)) <= set(a)  # nested in k
    sub = k_shot_subset(train, 8, seed=0)
    assert isinstance(sub, Subset) and len(sub) == 8 and sub.indices == a
    assert sub.paths == [train.paths[i] for i in a]
    np.testing.assert_array_equal(sub[0].image, train[a[0]].image)
    with pytest.raises(ValueError, match="k must be between 1 and the 50 available images, got k=51"):
        sample_k_shot(train, 51, seed=0)


# ----------------------------------------------------------------------------------------------
# k-shot sampling
# ----------------------------------------------------------------------------------------------


def test_sample_k_shot_properties():
    assert sample_k_shot(5, 5, seed=3) == [0, 1, 2, 3, 4]
    picks = {tuple(sample_k_shot(100, 4, seed=s)) for s in range(20)}
    assert len(picks) == 20  # different seeds differ
    assert sample_k_shot(np.int64(10), 3, seed=np.int64(2)) == sample_k_shot(10, 3, seed=2)
    # pinned value: the choice must never change across versions (hash-based, no RNG stream)
    assert sample_k_shot(50, 5, seed=0) == [0, 10, 18, 28, 30]


def test_sample_k_shot_errors():
    with pytest.raises(ValueError, match="got k=0"):
        sample_k_shot(10, 0, seed=0)
    with pytest.raises(ValueError, match="available images, got k=11"):
        sample_k_shot(10, 11, seed=0)
    with pytest.raises(ValueError, match="0 available"):
        sample_k_shot(0, 1, seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        sample_k_shot(-1, 1, seed=0)
    with pytest.raises(TypeError, match="k must be an integer"):
        sample_k_shot(10, 2.0, seed=0)
    with pytest.raises(TypeError, match="seed must be an integer"):
        sample_k_shot(10, 2, seed="a")
    with pytest.raises(TypeError):
        sample_k_shot(True, 1, seed=0)


# ----------------------------------------------------------------------------------------------
# Small MVTec trees in tmp_path
# ----------------------------------------------------------------------------------------------


def _write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), array)
    return path


def _image(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h: int = 24, w: int = 32) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[5:9, 10:15] = 255
    return m


def _tree(root: Path, category: str = "widget") -> Path:
    """root/widget/{train/good: 3, test/good: 1, test/scratch: 2 (+masks)}."""
    cat = root / category
    for i in range(3):
        _write(cat / "train" / "good" / f"{i:03d}.png", _image(i))
    _write(cat / "test" / "good" / "000.png", _image(10))
    for i in range(2):
        _write(cat / "test" / "scratch" / f"{i:03d}.png", _image(20 + i))
        _write(cat / "ground_truth" / "scratch" / f"{i:03d}_mask.png", _mask())
    return cat


def test_tmp_tree_loads(tmp_path):
    cat = _tree(tmp_path)
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"\x00")
    (cat / "train" / "good" / "._000.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    (cat / "test" / "scratch" / "Thumbs.db").write_bytes(b"\x00")
    train = MVTecDataset(tmp_path, "widget", "train")
    assert [p.name for p in train.paths] == ["000.png", "001.png", "002.png"]
    test = MVTecDataset(tmp_path, "widget", "test")
    assert test.defect_types == ["good", "scratch", "scratch"]
    assert test.labels.tolist() == [0, 1, 1]
    s = test[1]
    assert s.mask.sum() == 20 and s.defect_type == "scratch"
    np.testing.assert_array_equal(s.image, _image(20)[..., ::-1])  # written BGR by cv2, read RGB
    assert "widget" in repr(test) and "3 samples" in repr(test)


def test_mask_named_stem_png_is_accepted(tmp_path):
    cat = _tree(tmp_path)
    gt = cat / "ground_truth" / "scratch" / "001_mask.png"
    gt.rename(gt.with_name("001.png"))
    test = MVTecDataset(tmp_path, "widget", "test")
    assert test.mask_paths[2] == gt.with_name("001.png")
    assert test[2].mask.any()


def test_list_categories_and_missing_category(tmp_path):
    _tree(tmp_path, "widget")
    _tree(tmp_path, "bolt")
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "not_a_category").mkdir()
    assert list_categories(tmp_path) == ["bolt", "widget"]
    with pytest.raises(FileNotFoundError, match=r"category 'screw' not found .*categories there: bolt, widget"):
        MVTecDataset(tmp_path, "screw", "train")
    with pytest.raises(FileNotFoundError, match="pass root=.*category='widget'"):
        MVTecDataset(tmp_path / "widget", "good", "train")  # root given one level too deep
    with pytest.raises(FileNotFoundError, match="no MVTec-layout categories"):
        MVTecDataset(tmp_path / "not_a_category", "x", "train")


def test_missing_root_split_and_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        MVTecDataset(tmp_path / "nope", "widget")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_categories(tmp_path / "nope")
    cat = _tree(tmp_path)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        MVTecDataset(tmp_path, "widget", "val")
    shutil.rmtree(cat / "test")
    with pytest.raises(FileNotFoundError, match="no 'test' folder in"):
        MVTecDataset(tmp_path, "widget", "test")


def test_no_good_images(tmp_path):
    cat = _tree(tmp_path)
    for p in (cat / "train" / "good").iterdir():
        p.unlink()
    (cat / "train" / "good" / "notes.txt").write_text("only a text file")
    with pytest.raises(ValueError, match="no good images in .*train/good"):
        MVTecDataset(tmp_path, "widget", "train")
    shutil.rmtree(cat / "train" / "good")
    with pytest.raises(FileNotFoundError, match="no good images in"):
        MVTecDataset(tmp_path, "widget", "train")


def test_empty_test_split(tmp_path):
    cat = _tree(tmp_path)
    shutil.rmtree(cat / "test")
    (cat / "test" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images in"):
        MVTecDataset(tmp_path, "widget", "test")


def test_missing_mask_names_expected_path(tmp_path):
    cat = _tree(tmp_path)
    (cat / "ground_truth" / "scratch" / "001_mask.png").unlink()
    expected = cat / "ground_truth" / "scratch" / "001_mask.png"
    with pytest.raises(FileNotFoundError, match="have no mask; expected " + str(expected)):
        MVTecDataset(tmp_path, "widget", "test")


def test_mask_size_mismatch_names_both_files(tmp_path):
    cat = _tree(tmp_path)
    mask_path = _write(cat / "ground_truth" / "scratch" / "000_mask.png", _mask(12, 16))
    test = MVTecDataset(tmp_path, "widget", "test")  # sizes are checked on read, not on listing
    with pytest.raises(ValueError, match="pixel-aligned") as err:
        test[1]
    assert str(mask_path) in str(err.value) and str(cat / "test" / "scratch" / "000.png") in str(err.value)
    assert "16x12" in str(err.value) and "32x24" in str(err.value)


def test_unreadable_image_error_names_file(tmp_path):
    cat = _tree(tmp_path)
    broken = cat / "train" / "good" / "001.png"
    broken.write_bytes(b"this is not a png")
    train = MVTecDataset(tmp_path, "widget", "train")
    with pytest.raises(ValueError, match="cannot decode image .*001.png"):
        train[1]
    train[0]  # the others still load


def test_indexing_and_subset(tmp_path):
    _tree(tmp_path)
    test = MVTecDataset(tmp_path, "widget", "test")
    assert test[-1].path == test.paths[2]
    assert test[np.int64(1)].path == test.paths[1]
    with pytest.raises(IndexError, match="out of range"):
        test[3]
    with pytest.raises(TypeError, match="integers"):
        test[0:2]
    sub = test.subset([2, 0])
    assert sub.paths == [test.paths[2], test.paths[0]] and sub.labels.tolist() == [1, 0]
    assert [s.path for s in sub] == sub.paths
    with pytest.raises(IndexError):
        test.subset([5])
    with pytest.raises(TypeError):
        test.subset([0.5])


# ----------------------------------------------------------------------------------------------
# Source channel detection
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, channels, params",
    [
        ("grey.png", 1, []),
        ("colour.png", 3, []),
        ("rgba.png", 4, []),
        ("grey.jpg", 1, []),
        ("colour.jpg", 3, []),
        ("grey_progressive.jpg", 1, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        ("grey.bmp", 1, []),
        ("colour.tif", 3, []),
        ("grey.tif", 1, []),
    ],
)
def test_source_channels(tmp_path, name, channels, params):
    shape = (12, 10) if channels == 1 else (12, 10, channels)
    path = tmp_path / name
    assert cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8), params)
    assert source_channels(path) == min(channels, 3)
    ds = FolderDataset(tmp_path)
    s = ds[0]
    assert s.source_channels == min(channels, 3) and s.image.shape == (12, 10, 3)


def test_source_channels_grey_alpha_and_palette_png(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    pil.new("LA", (8, 6), (100, 255)).save(tmp_path / "la.png")
    pil.new("P", (8, 6), 3).save(tmp_path / "palette.png")
    assert source_channels(tmp_path / "la.png") == 1
    assert source_channels(tmp_path / "palette.png") == 3


# ----------------------------------------------------------------------------------------------
# FolderDataset
# ----------------------------------------------------------------------------------------------


def test_folder_dataset(tmp_path):
    _write(tmp_path / "b.png", _image(1))
    _write(tmp_path / "a.jpg", _image(2))
    _write(tmp_path / "sub" / "c.png", _image(3))
    (tmp_path / "list.csv").write_text("x")
    flat = FolderDataset(tmp_path)
    assert [p.name for p in flat.paths] == ["a.jpg", "b.png"]
    assert flat.labels.tolist() == [0, 0] and flat.defect_types == ["good", "good"]
    s = flat[0]
    assert s.image.shape == (24, 32, 3) and not s.mask.any() and s.mask_path is None and s.label == 0
    deep = FolderDataset(tmp_path, recursive=True)
    assert [p.relative_to(tmp_path).as_posix() for p in deep.paths] == ["a.jpg", "b.png", "sub/c.png"]


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        FolderDataset(tmp_path / "empty")
    _write(tmp_path / "nested" / "deeper" / "x.png", _image(0))
    with pytest.raises(ValueError, match="recursive=True"):
        FolderDataset(tmp_path / "nested")
    assert len(FolderDataset(tmp_path / "nested", recursive=True)) == 1


# ----------------------------------------------------------------------------------------------
# VisA (split-CSV layout), built from real hazelnut images
# ----------------------------------------------------------------------------------------------

_HEADER = "object,split,label,image,mask\n"


def _visa_tree(root: Path, real_root: Path) -> Path:
    """root/candle/Data/{Images/Normal, Images/Anomaly, Masks/Anomaly} + root/split_csv/1cls.csv."""
    src = real_root / HAZELNUT
    data = root / "candle" / "Data"
    rows = []
    for i, p in enumerate(_images_in(src / "train" / "good")[:3]):
        dst = data / "Images" / "Normal" / f"{i:04d}.JPG"  # VisA's upper-case suffix
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dst)  # PNG bytes under a .JPG name: the decoder sniffs the content
        rows.append(f"candle,train,normal,{dst.relative_to(root).as_posix()},")
    good = _images_in(src / "test" / "good")[0]
    dst = data / "Images" / "Normal" / "0100.JPG"
    shutil.copy(good, dst)
    rows.append(f"candle,test,normal,{dst.relative_to(root).as_posix()},")
    for i, (defect, scale) in enumerate([("crack", 1), ("cut", 255)]):  # VisA masks: 0/1 or 0/255
        img = _images_in(src / "test" / defect)[0]
        dst = data / "Images" / "Anomaly" / f"{i:03d}.JPG"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(img, dst)
        mask = (cv2.imread(str(src / "ground_truth" / defect / f"{img.stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0)
        mask_path = _write(data / "Masks" / "Anomaly" / f"{i:03d}.png", mask.astype(np.uint8) * scale)
        rows.append(f"candle,test,anomaly,{dst.relative_to(root).as_posix()},{mask_path.relative_to(root).as_posix()}")
    rows.append("capsules,train,normal,capsules/Data/Images/Normal/0000.JPG,")  # another object
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True)
    csv_path.write_text(_HEADER + "\n".join(rows) + "\n")
    return csv_path


def test_visa_dataset(tmp_path, real_root):
    _visa_tree(tmp_path, real_root)
    assert list_visa_categories(tmp_path) == ["candle", "capsules"]
    train = VisADataset(tmp_path, "candle", "train")
    assert len(train) == 3 and not train.labels.any() and set(train.defect_types) == {"good"}
    test = VisADataset(tmp_path, "candle", "test")
    # sorted by CSV path: Images/Anomaly/* before Images/Normal/*
    assert [p.relative_to(tmp_path).as_posix() for p in test.paths] == [
        "candle/Data/Images/Anomaly/000.JPG",
        "candle/Data/Images/Anomaly/001.JPG",
        "candle/Data/Images/Normal/0100.JPG",
    ]
    assert test.labels.tolist() == [1, 1, 0]
    assert test.defect_types == ["anomaly", "anomaly", "good"]
    reference = cv2.imread(str(real_root / HAZELNUT / "ground_truth" / "crack" / "000_mask.png"), 0) > 0
    for i in range(2):  # the 0/1 mask and the 0/255 mask decode to the same kind of bool mask
        s = test[i]
        assert s.mask.dtype == np.bool_ and s.mask.any() and s.mask.shape == s.image.shape[:2]
    np.testing.assert_array_equal(test[0].mask, reference)
    assert not test[2].mask.any() and test[2].mask_path is None
    # an explicit CSV path works too
    assert len(VisADataset(tmp_path, "candle", "test", split_csv=tmp_path / "split_csv" / "1cls.csv")) == 3


def test_visa_errors(tmp_path, real_root):
    csv_path = _visa_tree(tmp_path, real_root)
    text = csv_path.read_text()
    with pytest.raises(FileNotFoundError, match="split CSV .* not found"):
        VisADataset(tmp_path, "candle", "train", split_csv=tmp_path / "other.csv")
    with pytest.raises(ValueError, match=r"object 'pcb1' not in .*objects there: candle, capsules"):
        VisADataset(tmp_path, "pcb1", "test")
    with pytest.raises(ValueError, match="split must be"):
        VisADataset(tmp_path, "candle", "val")
    with pytest.raises(FileNotFoundError, match="1 image file"):
        VisADataset(tmp_path, "capsules", "train")  # listed in the CSV, not on disk
    with pytest.raises(ValueError, match="no 'test' rows for object 'capsules'"):
        VisADataset(tmp_path, "capsules", "test")

    bad = tmp_path / "bad.csv"
    bad.write_text("object,split,label,image\ncandle,train,normal,x.JPG\n")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['mask'\]"):
        VisADataset(tmp_path, "candle", "train", split_csv=bad)
    bad.write_text(text.replace("candle,test,anomaly", "candle,test,defective", 1))
    with pytest.raises(ValueError, match="line [0-9]+: label 'defective'"):
        VisADataset(tmp_path, "candle", "test", split_csv=bad)
    lines = text.splitlines()
    lines = [ln.rsplit(",", 1)[0] + "," if ",anomaly," in ln else ln for ln in lines]
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="line 6: anomalous image .* has no mask"):
        VisADataset(tmp_path, "candle", "test", split_csv=bad)
    (tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 mask file"):
        VisADataset(tmp_path, "candle", "test")
