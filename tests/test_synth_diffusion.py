"""Generator-made anomaly data: stages (a) / (b) / (c) end to end on tiny random diffusers pipelines
(built offline from configs), resume, the manifest, the feature filter on real images with pasted
real defects, and the cheap (CutPaste / Perlin) triplet writer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import diffusers  # noqa: F401  (the synth extra; scripts/setup.sh installs it: a missing one must fail, not skip)
torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")

from edge_ad.synth import (  # noqa: E402
    FeatureDistanceFilter,
    PromptSet,
    generate_cheap_dataset,
    generate_dataset,
    read_manifest,
)
from edge_ad.synth.filtering import box_mask  # noqa: E402


def _byte_vocab() -> list[str]:
    """GPT-2 style printable stand-ins for the 256 byte values (what CLIP's BPE vocab is built on)."""
    keep = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def _tiny_components(root: Path):
    """Random-init CLIP tokenizer / text encoder, VAE and schedulers small enough for a CPU test."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    chars = _byte_vocab()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")  # no merges: byte-level tokens only
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, projection_dim=32))
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=32)
    return tokenizer, text_encoder, vae, DDIMScheduler(clip_sample=False, steps_offset=1)


def _unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32)


@pytest.fixture(scope="module")
def tiny_pipelines(tmp_path_factory) -> tuple[Path, Path]:
    """Two local pipeline folders (``save_pretrained``): text-to-image and inpainting (9-channel UNet)."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    root = tmp_path_factory.mktemp("pipelines")
    tokenizer, text_encoder, vae, scheduler = _tiny_components(root)
    common = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    StableDiffusionPipeline(unet=_unet(4), **common).save_pretrained(root / "t2i")
    StableDiffusionInpaintPipeline(unet=_unet(9), **common).save_pretrained(root / "inpaint")
    return root / "t2i", root / "inpaint"


SETTINGS = dict(objects=("hazelnut", "metal screw"), image_size=64, box_size=(16, 32), steps=1, filter_size=64,
                progress=False)


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_generate_dataset_end_to_end_and_resume(tiny_pipelines, tmp_path):
    t2i, inpaint = tiny_pipelines
    out = tmp_path / "synthetic"
    summary = generate_dataset(out, t2i, inpaint, per_object=2, threshold=0.0, **SETTINGS)
    assert summary["objects"] == ["hazelnut", "metal_screw"]
    assert summary["normals"] == 4 and summary["kept"] + summary["dropped"] == 4
    records = read_manifest(out)
    assert sorted(r["id"] for r in records) == ["hazelnut/00000", "hazelnut/00001", "metal_screw/00000",
                                               "metal_screw/00001"]
    assert summary["kept"] >= 1  # random pipelines repaint the box: at T = 0 some change is seen
    for r in records:
        assert {"prompt", "seed", "box", "damage"} <= set(r["anomaly"]) and r["normal"]["prompt"]
        assert r["anomaly"]["damage"] in r["anomaly"]["prompt"]
        normal = _read(out / r["normal"]["path"])
        assert normal.shape == (64, 64, 3) and normal.dtype == np.uint8
        x0, y0, x1, y1 = r["anomaly"]["box"]
        assert 16 <= x1 - x0 <= 32 and 16 <= y1 - y0 <= 32
        if r["kept"]:
            mask = _read(out / r["anomaly"]["mask_path"]) > 0
            assert mask.any() and not (mask & ~box_mask((64, 64), (x0, y0, x1, y1))).any()  # inside the box
            assert int(mask.sum()) == r["distance"]["mask_pixels"]
            assert _read(out / r["anomaly"]["path"]).shape == (64, 64, 3)
        else:
            assert not (out / r["object"].replace(" ", "_") / "test" / "synthetic" / f"{r['index']:05d}.png").exists()

    # Resume: nothing left to do, so the pipelines are not even loaded (these paths do not exist).
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = generate_dataset(out, tmp_path / "missing_t2i", tmp_path / "missing_inpaint", per_object=2,
                             threshold=0.0, **SETTINGS)
    assert again == summary
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    # Growing the dataset only renders the new samples; the old files stay untouched.
    grown = generate_dataset(out, t2i, inpaint, per_object=3, threshold=0.0, **SETTINGS)
    assert grown["normals"] == 6 and len(read_manifest(out)) == 6
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    # Other settings would mix two datasets: refused.
    with pytest.raises(ValueError, match="other settings"):
        generate_dataset(out, t2i, inpaint, per_object=2, threshold=0.5, **SETTINGS)

    # The zero-shot trainer reads the output unchanged (MVTec layout).
    from edge_ad.training.supervised import load_auxiliary

    aux = load_auxiliary(out, None, holdout_fraction=0.0, seed=0)
    assert sorted(aux.summary()["categories"]) == ["hazelnut", "metal_screw"]
    # Clean normals are annotated samples too (test/good): the set alone has both labels.
    assert {it.record.label for it in aux.annotated} == {0, 1}
    assert sum(it.record.label == 0 for it in aux.annotated) == 6  # every normal, kept anomaly or not
    for clean in out.rglob("test/good/*.png"):
        assert np.array_equal(_read(clean), _read(clean.parent.parent.parent / "train" / "good" / clean.name))


def test_filter_drops_samples_without_visible_change(tiny_pipelines, tmp_path):
    t2i, inpaint = tiny_pipelines
    out = tmp_path / "strict"
    summary = generate_dataset(out, t2i, inpaint, per_object=1, threshold=1.999, **SETTINGS)
    assert summary["kept"] == 0 and summary["dropped"] == 2
    assert all(not r["kept"] and r["distance"]["mask_pixels"] == 0 for r in read_manifest(out))
    assert not list(out.rglob("test/synthetic/*.png")) and len(list(out.rglob("train/good/*.png"))) == 2


def test_cli_synth(tiny_pipelines, tmp_path, capsys):
    from edge_ad.cli.main import main

    t2i, inpaint = tiny_pipelines
    rc = main(["synth", str(tmp_path / "cli"), "--text-to-image", str(t2i), "--inpaint", str(inpaint),
               "--objects", "hazelnut", "--per-object", "1", "--image-size", "64", "--box-size", "16", "24",
               "--steps", "1", "--threshold", "0"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["normals"] == 1
    assert len(read_manifest(tmp_path / "cli")) == 1
    rc = main(["synth", str(tmp_path / "none"), "--text-to-image", str(tmp_path), "--inpaint", str(inpaint)])
    assert rc == 2 and "model_index.json" in capsys.readouterr().err
    rc = main(["synth", str(tmp_path / "swapped"), "--text-to-image", str(t2i), "--inpaint", str(t2i),
               "--objects", "hazelnut", "--per-object", "1", "--image-size", "64", "--box-size", "16", "24",
               "--steps", "1"])
    assert rc == 2 and "not an inpainting pipeline" in capsys.readouterr().err


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_filter_finds_pasted_real_defects(real_root):
    """Real MVTec defects pasted (pixels under their ground-truth masks) onto a good hazelnut: the
    filter's mask must lie where the defect is, and an unchanged image must be dropped."""
    root = real_root / "mvtec_hazelnut_256"
    good = _rgb(sorted((root / "train" / "good").glob("*.png"))[0])
    filt = FeatureDistanceFilter("efficientnet_lite0", threshold=0.3, img_size=256)
    for defect in ("crack", "print"):
        path = sorted((root / "test" / defect).glob("*.png"))[0]
        truth = np.asarray(Image.open(root / "ground_truth" / defect / f"{path.stem}_mask.png")) > 127
        pasted = good.copy()
        pasted[truth] = _rgb(path)[truth]
        ys, xs = np.nonzero(truth)
        box = (int(xs.min()) - 16, int(ys.min()) - 16, int(xs.max()) + 17, int(ys.max()) + 17)  # the inpaint box
        result = filt(good, pasted, box)
        assert result.kept
        iou = (result.mask & truth).sum() / (result.mask | truth).sum()
        assert iou > 0.5, f"{defect}: IoU {iou:.2f} of the filter mask with the pasted defect"
        assert result.distance[truth].mean() > 0.6 and result.mean_distance_outside < 0.1
        unchanged = filt(good, good, box)
        assert not unchanged.kept and unchanged.max_distance < 1e-3


def test_cheap_dataset_same_format(real_root, tmp_path):
    root = real_root / "mvtec_hazelnut_256" / "train" / "good"
    sources = sorted(root.glob("*.png"))[:2]
    out = tmp_path / "cheap"
    summary = generate_cheap_dataset(out, {"hazelnut": sources}, synthesizer="perlin", per_image=2, progress=False)
    assert summary["normals"] == 2 and summary["kept"] + summary["dropped"] == 4 and summary["kept"] >= 3
    for r in read_manifest(out):
        if not r["kept"]:
            continue
        image = _rgb(out / "hazelnut" / "test" / "synthetic" / f"{r['index']:05d}.png")
        mask = np.asarray(Image.open(out / "hazelnut" / "ground_truth" / "synthetic" / f"{r['index']:05d}_mask.png")) > 0
        source = _rgb(sources[r["index"] // 2])
        assert np.array_equal((image != source).any(-1), mask)  # the mask is exactly the changed pixels
    assert generate_cheap_dataset(out, {"hazelnut": sources}, per_image=2, progress=False) == summary  # resumed


def test_generated_set_alone_trains_anomalyvfm_with_both_labels(real_root, tmp_path):
    """``edge-ad synth`` output as the only data (the AnomalyVFM paper preset's data mix:
    synthetic_fraction 0, no hold-out): batches hold clean and defective images, so the image head
    sees both labels, and a short run trains."""
    import json

    import torch

    from edge_ad.methods import build_detector
    from edge_ad.training import train
    from edge_ad.training.supervised import _BatchMaker, load_auxiliary

    sources = sorted((real_root / "mvtec_hazelnut_256" / "train" / "good").glob("*.png"))[:4]
    out = tmp_path / "gen"
    generate_cheap_dataset(out, {"hazelnut": sources}, synthesizer="cutpaste", per_image=1, progress=False)
    aux = load_auxiliary(out, None, holdout_fraction=0.0, seed=0)
    tiny = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "init_values": 1.0}
    options = {"adapter_rank": 4, "upsample_channels": 32, "norm_groups": 8, "accumulate": 1}
    det = build_detector("anomalyvfm", backbone={"name": "dinov3_vits16", "img_size": 64, "overrides": tiny},
                         **options)
    maker = _BatchMaker(det, aux, batch_size=8, synthetic_fraction=0.0, seed=0, device=torch.device("cpu"))
    labels = torch.cat([maker(step, 0).labels for step in range(3)])
    assert 0 < labels.sum() < len(labels)  # both labels occur
    run = train("anomalyvfm", "dinov3_vits16", out, None, tmp_path / "run", preset="paper", image_size=64,
                steps=4, batch_size=4, pretrained=False, backbone_overrides=tiny, method_options=options,
                device="cpu", progress=False)
    log = json.loads((run / "train_log.json").read_text())
    assert log["synthetic_fraction"] == 0.0 and log["split"]["holdout_annotated"] == 0
    assert log["split"]["annotated"] == 8 and log["fit"]["end_step"] == 4


def test_prompt_set_file(tmp_path):
    path = tmp_path / "prompts.yaml"
    path.write_text("objects: [gear]\nbackgrounds: [on black]\ndamages: {gear: [a broken tooth]}\n")
    prompts = PromptSet.from_file(path)
    rng = np.random.default_rng(0)
    assert prompts.damage_prompt("gear", rng)[1] == "a broken tooth"
    assert "gear" in prompts.normal_prompt("gear", rng)[0]
    path.write_text("objectz: [gear]\n")
    with pytest.raises(ValueError, match="unknown prompt keys"):
        PromptSet.from_file(path)
