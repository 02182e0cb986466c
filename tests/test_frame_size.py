"""``--image-size auto:N``: size from the frames' typical aspect ratio (real files' headers)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
from PIL import Image

from edge_ad.cli._parse import image_size
from edge_ad.data import auto_image_size, parse_auto_size, typical_aspect


def _write(folder, sizes):
    paths = []
    for i, (w, h) in enumerate(sizes):
        p = folder / f"{i:03d}.png"
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(p)
        paths.append(p)
    return paths


def test_long_frames_give_a_wide_input_of_the_same_pixel_budget(tmp_path):
    # Frames like bsdata_pitting (1130 x 460, aspect 2.46) plus one outlier the median ignores.
    paths = _write(tmp_path, [(1130, 460)] * 4 + [(300, 300)])
    assert typical_aspect(paths) == pytest.approx(1130 / 460)
    h, w = auto_image_size(paths, 256)
    assert (h, w) == (160, 416)  # 256 / sqrt(2.46) = 163 -> 160; 256 * sqrt(2.46) = 401 -> 416
    assert abs(h * w - 256 * 256) / (256 * 256) < 0.05


def test_square_frames_keep_the_square_size(tmp_path):
    paths = _write(tmp_path, [(500, 500), (480, 512)])
    assert auto_image_size(paths, 256) == (256, 256)
    assert auto_image_size(paths, 10) == (32, 32)  # at least one multiple


def test_parse_and_cli():
    assert parse_auto_size("auto:256") == 256
    assert image_size("auto:320") == "auto:320" and image_size("2x3") == (2, 3)
    for bad in ("auto:", "auto:-4", "auto:x"):
        with pytest.raises(ValueError, match="auto:N"):
            parse_auto_size(bad)
        with pytest.raises(argparse.ArgumentTypeError):
            image_size(bad)


def test_train_resolves_auto_size(tmp_path):
    """train() turns auto:N into the (H, W) the run records (a tiny random-init knn run)."""
    from edge_ad.methods import load_detector
    from edge_ad.training import train

    good = tmp_path / "data" / "part" / "train" / "good"
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (100, 250, 3), np.uint8)).save(good / f"{i}.png")
    run = train("knn", "efficientnet_lite0", tmp_path / "data", "part", tmp_path / "run", shots=0,
                image_size="auto:64", layers=[2], pretrained=False, progress=False)
    det = load_detector(run)
    assert det.image_size == (32, 96)  # 64 / sqrt(2.5) = 40.5 -> 32; 64 * sqrt(2.5) = 101 -> 96
    with pytest.raises(ValueError, match="one category"):
        train("knn", "efficientnet_lite0", tmp_path / "data", None, tmp_path / "run2", image_size="auto:64",
              pretrained=False, progress=False)
