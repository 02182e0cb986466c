"""CutPaste synthesis and foreground estimation on real images."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edge_ad.runtime import read_image
from edge_ad.synth import CutPaste, CutPasteConfig, color_jitter, cutpaste, foreground_mask, otsu_threshold

SEEDS = range(24)


@pytest.fixture(scope="module")
def hazelnut(real_root: Path) -> np.ndarray:
    return read_image(real_root / "mvtec_hazelnut_256" / "train" / "good" / "000.png")


@pytest.fixture(scope="module")
def transistor(real_root: Path) -> np.ndarray:
    return read_image(real_root / "mvtec_transistor_256" / "train" / "good" / "000.png")


@pytest.fixture(scope="module")
def real_images(real_root: Path) -> list[np.ndarray]:
    paths = [
        real_root / "mvtec_hazelnut_256" / "train" / "good" / "000.png",
        real_root / "mvtec_hazelnut_256" / "train" / "good" / "007.png",
        real_root / "mvtec_transistor_256" / "train" / "good" / "000.png",
        sorted((real_root / "magnetic_tile" / "train" / "good").iterdir())[0],
    ]
    return [read_image(p) for p in paths]


# ---------------------------------------------------------------------------- geometry
def test_mask_is_exactly_the_changed_pixels_and_inside_foreground(real_images: list[np.ndarray]) -> None:
    for image in real_images:
        original = image.copy()
        fg = foreground_mask(image)
        for seed in SEEDS:
            res = cutpaste(image, np.random.default_rng(seed), foreground=fg)
            assert res.image.dtype == np.uint8 and res.image.shape == image.shape
            assert res.mask.dtype == bool and res.mask.shape == image.shape[:2]
            changed = (res.image != image).any(axis=-1)
            np.testing.assert_array_equal(res.mask, changed)
            assert res.mask.any()
            assert not (res.mask & ~fg).any(), "pasted outside the foreground"
        np.testing.assert_array_equal(image, original)  # the input is never modified


def test_call_returns_image_and_mask(hazelnut: np.ndarray) -> None:
    aug, mask = CutPaste()(hazelnut, np.random.default_rng(0))
    assert aug.shape == hazelnut.shape and mask.shape == hazelnut.shape[:2]
    np.testing.assert_array_equal(mask, (aug != hazelnut).any(-1))


def test_both_variants_appear_and_are_deterministic(hazelnut: np.ndarray) -> None:
    fg = foreground_mask(hazelnut)
    variants = [cutpaste(hazelnut, np.random.default_rng(s), foreground=fg).variant for s in SEEDS]
    assert set(variants) == {"normal", "scar"}
    assert 0.2 < variants.count("scar") / len(variants) < 0.8
    a = cutpaste(hazelnut, np.random.default_rng(5))
    b = cutpaste(hazelnut, np.random.default_rng(5))
    c = cutpaste(hazelnut, np.random.default_rng(6))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)
    assert all(cutpaste(hazelnut, np.random.default_rng(s), CutPasteConfig(scar_prob=0.0)).variant == "normal" for s in range(5))
    assert all(cutpaste(hazelnut, np.random.default_rng(s), CutPasteConfig(scar_prob=1.0)).variant == "scar" for s in range(5))


def _noise(h: int = 256, w: int = 256) -> np.ndarray:
    # Every pixel differs from its neighbours, so every pasted pixel changes: mask == paste shape.
    return np.random.default_rng(123).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_normal_patch_area_and_aspect_bounds() -> None:
    image = _noise()
    cfg = CutPasteConfig(use_foreground=False)
    hw = image.shape[0] * image.shape[1]
    lo, hi = cfg.area_ratio
    for seed in range(40):
        res = cutpaste(image, np.random.default_rng(seed), cfg, variant="normal")
        ys, xs = np.nonzero(res.mask)
        ph, pw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert res.mask.sum() == ph * pw, "the normal patch is a full rectangle"
        # Sides are rounded to whole pixels: (x +- 0.5)(y +- 0.5) with x + y <= 2.38 sqrt(area)
        # over the aspect range, so the area moves by at most 1.19 sqrt(area) + 0.25.
        a_lo, a_hi = lo * hw, hi * hw
        assert a_lo - 1.19 * math.sqrt(a_lo) <= ph * pw <= a_hi + 1.19 * math.sqrt(a_hi) + 0.25
        assert 0.3 * 0.85 <= pw / ph <= 3.3 / 0.85


def test_scar_is_thin_rotated_and_small() -> None:
    image = _noise()
    cfg = CutPasteConfig(use_foreground=False)
    angles = set()
    for seed in range(30):
        res = cutpaste(image, np.random.default_rng(seed), cfg, variant="scar")
        area = int(res.mask.sum())
        # At 256 px: width 2-16, length 10-25 -> 20..400 px (nearest sampling of a rotated
        # rectangle adds / drops at most its perimeter's worth of pixels).
        assert 10 <= area <= 400 + 2 * (16 + 25) + 4
        ys, xs = np.nonzero(res.mask)
        cov = np.cov(np.stack([ys, xs]).astype(float))
        evals, evecs = np.linalg.eigh(cov)
        assert evals[1] >= evals[0]  # elongated along its principal axis
        major = evecs[:, 1]
        angles.add(round(math.degrees(math.atan2(major[1], major[0])) % 180))
    assert len(angles) > 10, "scars must be rotated by varying angles"


def test_scar_scales_with_image_size() -> None:
    small = cutpaste(_noise(128, 128), np.random.default_rng(1), CutPasteConfig(use_foreground=False), variant="scar")
    large = cutpaste(_noise(512, 512), np.random.default_rng(1), CutPasteConfig(use_foreground=False), variant="scar")
    assert large.mask.sum() > 8 * small.mask.sum()


def test_paste_restricted_to_a_given_foreground() -> None:
    image = _noise()
    fg = np.zeros(image.shape[:2], bool)
    fg[100:160, 60:200] = True
    for seed in range(20):
        res = cutpaste(image, np.random.default_rng(seed), foreground=fg)
        assert res.mask.any() and not (res.mask & ~fg).any()
    with pytest.raises(ValueError, match="foreground must be"):
        cutpaste(image, np.random.default_rng(0), foreground=fg[:10])


def test_uniform_image_gives_empty_mask_not_a_lie() -> None:
    image = np.full((64, 64, 3), 128, np.uint8)
    res = cutpaste(image, np.random.default_rng(0), CutPasteConfig(jitter=0.0, hue_jitter=0.0))
    assert not res.mask.any() and np.array_equal(res.image, image)


# ---------------------------------------------------------------------------- foreground
def test_foreground_on_real_objects(hazelnut: np.ndarray, transistor: np.ndarray) -> None:
    fg, info = foreground_mask(hazelnut, return_info=True)
    assert info["fallback"] is None and info["polarity"] == "bright"  # bright nut on dark ground
    assert 0.1 < fg.mean() < 0.6
    assert not fg[0].any() and not fg[-1].any() and not fg[:, 0].any() and not fg[:, -1].any()
    assert fg[128, 128]  # the nut is centred
    fg, info = foreground_mask(transistor, return_info=True)
    assert info["fallback"] is None and info["polarity"] == "dark"  # dark package on copper board
    assert 0.1 < fg.mean() < 0.7


def test_foreground_texture_falls_back_to_whole_image(real_root: Path) -> None:
    folder = real_root / "magnetic_tile" / "train" / "good"
    image = read_image(sorted(folder.iterdir())[0])
    fg, info = foreground_mask(image, return_info=True)
    assert info["fallback"] in ("unimodal", "texture") and fg.all()


@pytest.mark.parametrize("dark_object", [True, False])
def test_foreground_polarity_is_decided_by_border_contact(dark_object: bool) -> None:
    h = w = 128
    yy, xx = np.mgrid[:h, :w]
    disk = (yy - 60) ** 2 + (xx - 70) ** 2 < 30**2
    rng = np.random.default_rng(0)
    obj, bg = (40, 220) if dark_object else (220, 40)
    gray = np.where(disk, obj, bg).astype(np.float64) + rng.normal(0, 5, (h, w))
    image = np.repeat(np.clip(gray, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    fg, info = foreground_mask(image, return_info=True)
    assert info["polarity"] == ("dark" if dark_object else "bright")
    iou = (fg & disk).sum() / (fg | disk).sum()
    assert iou > 0.9


def test_foreground_fallbacks() -> None:
    flat = np.full((64, 64, 3), 90, np.uint8)
    assert foreground_mask(flat).all()
    tiny = flat.copy()
    tiny[30:32, 30:32] = 250  # 4 px object: below min_fraction
    fg, info = foreground_mask(tiny, return_info=True)
    assert fg.all() and info["fallback"] is not None


def test_otsu_threshold_splits_two_modes() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(50, 5, 5000), rng.normal(200, 5, 3000)])
    t = otsu_threshold(values)
    assert 70 < t < 180
    assert otsu_threshold(np.full(10, 7.0)) == 7.0


# ---------------------------------------------------------------------------- jitter and inputs
def test_color_jitter() -> None:
    patch = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    same = color_jitter(patch, np.random.default_rng(0), jitter=0.0, hue=0.0)
    assert np.abs(same.astype(int) - patch.astype(int)).max() <= 1  # float round-trip
    out = color_jitter(patch, np.random.default_rng(1), jitter=0.5, hue=0.1)
    assert out.dtype == np.uint8 and out.shape == patch.shape and not np.array_equal(out, patch)


def test_bad_inputs(hazelnut: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="uint8"):
        cutpaste(hazelnut.astype(np.float32), rng)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        cutpaste(hazelnut[..., 0], rng)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        cutpaste(np.concatenate([hazelnut, hazelnut[..., :1]], axis=-1), rng)
    with pytest.raises(TypeError, match="numpy"):
        cutpaste(hazelnut.tolist(), rng)
    with pytest.raises(ValueError, match="variant"):
        cutpaste(hazelnut, rng, variant="blob")
    with pytest.raises(ValueError, match="scar_prob"):
        CutPasteConfig(scar_prob=1.5)
    with pytest.raises(ValueError, match="area_ratio"):
        CutPasteConfig(area_ratio=(0.0, 0.5))
