"""``--preset paper|edge``: the paper presets hold the reference code's values (each quoted with its
file and line at the commits named in ../shared/reference/seed-methods.md), ``--print-config``
shows them, explicit arguments win, FoundAD's multi-category training and augmentation, and the
time-honesty features (estimate from the first steps, CPU hint, ``--max-minutes`` clean stop)."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from edge_ad.training.presets import get_preset, list_presets, preset_config


def _paper(method: str) -> dict:
    return preset_config(method, "paper")


def test_every_seed_method_has_a_paper_and_an_edge_preset():
    for method in ("foundad", "anomalyvfm", "avadino", "visualad"):
        assert [n for _, n in list_presets(method)] == ["edge", "paper"]
    with pytest.raises(KeyError, match="choose one of: edge, paper"):
        get_preset("foundad", "fast")
    with pytest.raises(KeyError, match="has no presets"):
        get_preset("knn", "paper")


def test_foundad_paper_preset_matches_the_reference():
    d = _paper("foundad")
    cfg, tr = d["config"], d["train"]
    # foundad/src/foundad.py:58  torch.hub.load("facebookresearch/dinov3", 'dinov3_vitb16', ...)
    assert d["backbone"] == "dinov3_vitb16"
    # foundad/configs/app/train_dinov3.yaml:4  crop_size: 512
    assert cfg["backbone"]["img_size"] == [512, 512]
    # foundad/configs/app/train_dinov3.yaml:9  n_layer: 3  (get_intermediate_layers(n=3)[0] = block 9 of 12)
    assert cfg["backbone"]["layers"] == [9]
    # foundad/configs/app/train_dinov3.yaml:5-6  pred_depth: 6 / pred_emb_dim: 384
    assert cfg["projector_depth"] == 6 and cfg["projector_dim"] == 384
    # foundad/src/foundad.py:34  self.dropout = nn.Dropout(0.2)
    assert cfg["feature_dropout"] == 0.2
    # foundad/configs/config.yaml:12  batch_size: 8
    assert tr["batch_size"] == 8 and cfg["batch_size"] == 8
    # foundad/configs/config.yaml:61-62  lr: 0.001 / lr_config: const
    assert tr["lr"] == 1e-3
    # foundad/configs/config.yaml:59  weight_decay: 1e-4
    assert cfg["weight_decay"] == 1e-4
    # foundad/configs/config.yaml:60  epochs: 2000 (one step per epoch on a few-shot folder; README.md:84
    # evaluates app.ckpt_step=1950)
    assert tr["steps"] == 2000
    # foundad/configs/config.yaml:71  K_top_mvtec: 10
    assert cfg["top_k"] == 10
    # foundad/configs/sample_few_shot.yaml:3  num_samples: 1  (the paper also reports 2 and 4)
    assert tr["shots"] == 1
    # foundad/src/datasets/dataset.py:165  ImageFolder(root/train): every class folder, one model
    assert tr["all_categories"] is True
    # foundad/src/AD.py:109  F.interpolate(..., mode="bilinear", align_corners=False): no Gaussian
    assert cfg["smoothing_sigma"] == 0.0
    # foundad/src/train.py:121  if np.random.rand() < 0.5: (clean) else CutPaste context
    assert cfg["synthetic_prob"] == 0.5
    # foundad/configs/config.yaml:51-56  use_hflip/vflip/rotate90/color_jitter/gray/blur: True
    assert cfg["augment"] is True
    # foundad/src/train.py:61  CutPasteUnion(colorJitter=0.5)  (brightness = contrast = saturation = hue = 0.5)
    assert cfg["cutpaste_hue_jitter"] == 0.5
    # foundad/src/utils/synthesis.py:160  width=[2, 16], height=[10, 25] in pixels of the 512-px input
    assert cfg["cutpaste_scar_side"] == 512.0
    # foundad/src/utils/synthesis.py:119  generate_target_foreground_mask(img, subclass): per-class rules
    assert cfg["class_foreground"] is True
    # foundad/src/foundad.py  get_intermediate_layers(..., norm=True): the tokens are already through the
    # encoder's final LayerNorm, so no extra per-channel standardisation
    assert cfg["feature_norm"] == "none"


def test_anomalyvfm_paper_preset_matches_the_reference():
    d = _paper("anomalyvfm")
    cfg, tr = d["config"], d["train"]
    # models/radio.py:18  version="radio_v2.5-l": a ViT-L/16 RADIO; C-RADIOv3-L is the registered one
    assert d["backbone"] == "radio_v3_l16"
    # train.py:65  --image-size default=768
    assert cfg["backbone"]["img_size"] == [768, 768]
    # train.py:71  --train-steps default=200 (README.md:298 RADIO 200, :300 DINOv3 500)
    assert tr["steps"] == 200
    # train.py:33  --batch-size default=32 with train.py:32 --accumulation-steps default=4
    assert tr["batch_size"] * cfg["accumulate"] == 32 and cfg["accumulate"] == 4
    # train.py:37  --learning-rate default=1e-4; train.py:35  --weight-decay default=1e-2
    assert tr["lr"] == 1e-4 and cfg["weight_decay"] == 1e-2
    # train.py:46  --scheduler default=SCHEDULERS.NONE (constant lr)
    assert cfg["min_lr_ratio"] == 1.0 and cfg["warmup_steps"] == 0
    # train.py:51  --peft-type default=PeftType.DORA; train.py:54  --peft-rank default=64
    assert cfg["adapter"] == "dora" and cfg["adapter_rank"] == 64
    # train.py:78  --mean-kernel-size default=5 (test.py:182 AvgPool2d on the decoder map)
    assert cfg["mean_filter_size"] == 5 and cfg["smoothing_sigma"] == 0.0
    # aux_dataset.py:17  glob(f"{path}/train/*/*.png"): the generated set only, good and bad images
    assert tr["synthetic_fraction"] == 0.0 and tr["holdout_fraction"] == 0.0
    # README.md:300  DINOv3: python train.py --model dinov3 --image-size 768 --train-steps 500
    dino = preset_config("anomalyvfm", "paper", backbone="dinov3_vitl16")
    assert dino["train"]["steps"] == 500 and dino["config"]["backbone"]["img_size"] == [768, 768]
    # train.py:65-66  --image-size ... "For DINOv2 and CLIP we used 672 to get the same ftr size"
    dinov2 = preset_config("anomalyvfm", "paper", backbone="dinov2_vitl14_reg")
    assert dinov2["train"]["image_size"] == 672 and dinov2["config"]["backbone"]["img_size"] == [672, 672]
    assert preset_config("anomalyvfm", "paper", backbone="dinov3_vitl16", steps=50)["train"]["steps"] == 50


def test_visualad_paper_preset_matches_the_reference():
    d = _paper("visualad")
    cfg, tr = d["config"], d["train"]
    # train.py:338  --backbone default="ViT-L/14@336px"
    assert d["backbone"] == "clip_vitl14_336"
    # train.py:347  --image_size default=518
    assert cfg["backbone"]["img_size"] == [518, 518]
    # train.py:342  --features_list default=[6, 12, 18, 24] (1-based)
    assert cfg["backbone"]["layers"] == [5, 11, 17, 23]
    # train.py:346  --batch_size default=8; train.py:345  --learning_rate default=0.001
    assert tr["batch_size"] == 8 and tr["lr"] == 1e-3
    # scripts/CLIP.sh:21  "MVTec → VisA: 2 epoch": 2 x ceil(1725 / 8) test-split images = 432 steps
    assert tr["steps"] == 432
    # train.py:159  CosineAnnealingLR(..., eta_min=args.learning_rate * 0.1)
    assert cfg["min_lr_ratio"] == 0.1
    # test.py:181  --sigma default=4 (test.py:149 gaussian_filter)
    assert cfg["smoothing_sigma"] == 4.0
    # utils/scoring.py:10  DEFAULT_TOPK_RATIO = 0.01
    assert cfg["top_fraction"] == 0.01
    # train on the auxiliary dataset's annotated test split only (AnomalyCLIP meta.json protocol)
    assert tr["synthetic_fraction"] == 0.0 and tr["holdout_fraction"] == 0.0


def test_avadino_paper_preset_matches_the_reference():
    d = _paper("avadino")
    cfg, tr = d["config"], d["train"]
    assert d["backbone"] == "dinov3_vitl16"
    # train.py:30-31  resize=512, imagesize=512
    assert cfg["backbone"]["img_size"] == [512, 512]
    # tools/utils.py:23  layers = [5, 11, 17, 23]
    assert cfg["backbone"]["layers"] == [5, 11, 17, 23]
    # train.py:89  --batch_size default=16; train.py:91  --lr default=1e-4
    assert tr["batch_size"] == 16 and tr["lr"] == 1e-4
    # train.py:90  --epochs default=10 over VisA's 2162 test images at 16: 10 x 136 ~ 1350 steps
    assert tr["steps"] == 1350
    # train.py:122  AdamW(..., weight_decay=1e-2); train.py:125  warmup_steps = int(0.03 * total_steps)
    assert cfg["weight_decay"] == 1e-2 and cfg["warmup_steps"] == int(0.03 * 1350)
    # tools/utils.py:105  torch.cat([adj0, adj1], dim=1).view(B, 768, 2)
    assert cfg["text_layout"] == "reference"
    # tools/utils.py:139  bilinear upsampling only, no smoothing
    assert cfg["smoothing_sigma"] == 0.0
    assert tr["synthetic_fraction"] == 0.0 and tr["holdout_fraction"] == 0.0


def test_print_config_shows_the_preset_and_explicit_options_win(capsys):
    from edge_ad.cli.main import main

    assert main(["train", "--method", "foundad", "--preset", "paper", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out) == _paper("foundad")
    assert main(["train", "--method", "foundad", "--preset", "paper", "--shots", "4", "--steps", "7",
                 "--set", "smoothing_sigma=2", "--print-config"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["train"]["shots"] == 4 and doc["train"]["steps"] == 7 and doc["config"]["steps"] == 7
    assert doc["config"]["smoothing_sigma"] == 2.0 and doc["config"]["top_k"] == 10
    assert main(["train", "--method", "visualad", "--preset", "edge", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["backbone"]["img_size"] == [336, 336]


TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2, "patch_size": 8, "init_values": 1.0}
CATS = ["mvtec_hazelnut_256", "mvtec_transistor_256", "magnetic_tile"]


def test_foundad_one_model_for_several_categories_with_the_paper_preset(real_root, tmp_path):
    """The paper protocol: no category given -> every category, ``shots`` each, one model; explicit
    image size / layers / steps override the preset; each category then evaluates separately."""
    from edge_ad import evaluate, train
    from edge_ad.methods import load_checkpoint_config

    run = train("foundad", None, real_root, None, tmp_path / "run", preset="paper", image_size=64, layers=[0],
                steps=2, pretrained=False, backbone_overrides=TINY_VIT, device="cpu", progress=False,
                method_options={"projector_dim": 16, "projector_depth": 1, "projector_heads": 2})
    log = json.loads((run / "train_log.json").read_text())
    assert log["preset"] == "paper" and log["shots"] == 1 and log["augment"] is True
    from edge_ad.data.mvtec import list_categories

    assert log["categories"] == list_categories(real_root) and len(log["images"]) == len(log["categories"])
    doc = load_checkpoint_config(run)
    cfg = doc["config"]
    assert cfg["smoothing_sigma"] == 0.0 and cfg["cutpaste_hue_jitter"] == 0.5 and cfg["top_k"] == 10
    assert doc["backbone"]["name"] == "dinov3_vitb16" and doc["backbone"]["img_size"] == [64, 64]
    for c in CATS:
        report = evaluate(run, real_root, c, overlays=0, progress=False, device="cpu")
        assert report["num_anomalous"] > 0 and 0.0 <= report["metrics"]["pixel_auroc"] <= 1.0

    two = train("foundad", "dinov3_vits16", real_root, None, tmp_path / "two", categories=CATS[:2], shots=2,
                image_size=64, layers=[0], steps=1, pretrained=False, backbone_overrides=TINY_VIT, device="cpu",
                progress=False, method_options={"projector_dim": 16, "projector_depth": 1, "projector_heads": 2})
    log = json.loads((two / "train_log.json").read_text())
    assert log["categories"] == CATS[:2] and len(log["images"]) == 4 and log["preset"] is None
    with pytest.raises(ValueError, match="not both"):
        train("foundad", "dinov3_vits16", real_root, CATS[0], tmp_path / "x", categories=CATS[:2])
    with pytest.raises(ValueError, match="--categories is for zero-shot"):
        train("knn", "efficientnet_lite0", real_root, None, tmp_path / "y", categories=CATS[:2])


def test_reference_augmentation_moves_the_mask_with_the_image():
    from edge_ad.training.augment import ReferenceAugment

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    mask = np.zeros((40, 60), bool)
    mask[5:10, 2:30] = True
    seen = set()
    for seed in range(60):
        aug, m, applied = ReferenceAugment(p_orient=1.0, p_appear=0.0)(image, np.random.default_rng(seed), mask)
        (op,) = applied
        seen.add(op)
        # Pixels under the moved mask are exactly the original masked pixels, moved the same way.
        assert m.sum() == mask.sum() and sorted(aug[m].tolist()) == sorted(image[mask].tolist())
        assert aug.shape == ((60, 40, 3) if op.startswith("rot") else image.shape)
    assert seen == {"hflip", "vflip", "rot90or270"}
    out, m, applied = ReferenceAugment(p_orient=0.0, p_appear=0.0)(image, rng, mask)
    assert applied == () and out is image and m is mask
    fired = sum(bool(ReferenceAugment()(image, np.random.default_rng(s))[2]) for s in range(400))
    assert 0.45 < fired / 400 < 0.57  # 1 - 0.7 * 0.7 = 0.51 of the images get an operation
    grey, _, applied = ReferenceAugment(p_orient=0.0, p_appear=1.0)(image, np.random.default_rng(3))
    assert len(applied) == 1 and not np.array_equal(grey, image)


def test_cutpaste_scar_side_sets_the_scar_scale():
    from edge_ad.synth import CutPaste

    image = np.full((512, 512, 3), 90, np.uint8)
    image[::7] = 200  # texture, so a moved patch changes pixels
    sizes = {}
    for side in (256.0, 512.0):
        cp = CutPaste(scar_prob=1.0, use_foreground=False, scar_side=side, jitter=0.0, hue_jitter=0.0)
        sizes[side] = np.mean([cp(image, np.random.default_rng(s))[1].sum() for s in range(20)])
    # Same draws, scar sides scaled by 512/256 = 2 -> areas about 4x (the reference's pixels at 512 px).
    assert 3.0 < sizes[256.0] / sizes[512.0] < 5.0
    with pytest.raises(ValueError, match="scar_side"):
        CutPaste(scar_side=0.0)


def test_class_foreground_follows_the_reference_rules(real_root):
    import cv2

    from edge_ad.data import MVTecDataset
    from edge_ad.synth.class_foreground import class_foreground

    image = MVTecDataset(real_root, "mvtec_hazelnut_256", "train")[0].image
    # synthesis.py:31-32: textures and busy objects paste anywhere.
    assert class_foreground(image, "transistor").all() and class_foreground(image, "Carpet").all()
    # synthesis.py:37-40: hazelnut = grey Triangle threshold (then 6x6 closing / opening, :77-80).
    nut = class_foreground(image, "hazelnut")
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    _, direct = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_TRIANGLE)
    assert 0.1 < nut.mean() < 0.9 and (nut == direct.astype(bool)).mean() > 0.97
    assert grey[nut].mean() > grey[~nut].mean() + 25  # the brighter nut on the dark background
    # synthesis.py:41-45: screw = inverted Otsu (a dark object on a bright background).
    screw = class_foreground(image, "screw")
    _, otsu = cv2.threshold(grey, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert (screw == ~otsu.astype(bool)).mean() > 0.9  # morphology moves edges; not inverted would be < 0.1
    assert class_foreground(image, "mvtec_hazelnut_256") is None  # no rule: the generic estimate is used


def test_anomalyvfm_mean_filter_runs_on_the_decoder_map():
    from edge_ad.methods import build_detector

    torch.manual_seed(0)
    det = build_detector("anomalyvfm", backbone={"name": "dinov3_vits16", "img_size": 64, "overrides": TINY_VIT},
                         adapter_rank=4, upsample_channels=32, norm_groups=8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = det.forward_raw(x)
        prob = torch.sigmoid(det.logits(x).mask_logit)
    assert prob.shape[-2:] == det.decoder_size == (16, 16)
    filtered = torch.nn.functional.avg_pool2d(prob, 5, stride=1, padding=2, count_include_pad=False)
    expected = torch.nn.functional.interpolate(filtered, size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(raw.anomaly_map, expected, atol=1e-6, rtol=0)
    late = torch.nn.functional.avg_pool2d(
        torch.nn.functional.interpolate(prob, size=(64, 64), mode="bilinear", align_corners=False), 5, 1, 2,
        count_include_pad=False)
    assert (raw.anomaly_map - late).abs().max() > 1e-3  # filtering after upsampling would differ


def test_avadino_reference_text_layout_interleaves_the_prompts():
    from edge_ad.methods.avadino.adapters import AVADinoHead

    torch.manual_seed(0)
    head = AVADinoHead(12, 1, 8, 6, text_layout="reference")
    text = torch.randn(3, 2, 8)
    adj0 = head.prompt_adapters[0].bottleneck(text[:, 0])
    adj1 = head.prompt_adapters[1].bottleneck(text[:, 1])
    # tools/utils.py:105-110 written out: cat -> view(B, D, 2) -> projection over the D axis.
    adjusted = torch.cat([adj0, adj1], dim=1).view(3, 8, 2)
    expected = head.text_projection(adjusted.permute(0, 2, 1))
    torch.testing.assert_close(head.class_embeddings(text), expected)
    head.text_layout = "paper"
    paper = head.class_embeddings(text)
    torch.testing.assert_close(paper, head.text_projection(torch.stack([adj0, adj1], 1)))
    assert not torch.allclose(paper, expected)
    with pytest.raises(ValueError, match="text_layout"):
        AVADinoHead(12, 1, 8, 6, text_layout="columns")


class _Slow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))


def _slow_loss(model, batch):
    time.sleep(batch)
    return (model.w ** 2).sum()


def test_max_seconds_stops_cleanly_and_resume_finishes(tmp_path):
    from edge_ad.training.loop import TRAIN_STATE_FILE, FitConfig, fit

    cfg = FitConfig(steps=40, lr=0.1, max_seconds=0.5, checkpoint_every=1000, log_every=5)
    model = _Slow()
    res = fit(model, lambda step, rank: 0.05, _slow_loss, cfg, tmp_path, device=torch.device("cpu"), progress=False)
    assert res.stopped_early and 3 <= res.end_step < 40 and res.target_steps == 40
    state = torch.load(tmp_path / TRAIN_STATE_FILE, weights_only=True)
    assert state["step"] == res.end_step  # the budget stop wrote a state at the step it reached
    torch.testing.assert_close(state["params"]["w"], model.w.detach())
    again = fit(_Slow(), lambda step, rank: 0.0, _slow_loss, FitConfig(steps=40, lr=0.1), tmp_path,
                device=torch.device("cpu"), resume=True, progress=False)
    assert not again.stopped_early and again.start_step == res.end_step and again.end_step == 40


def test_eta_from_the_first_steps_and_the_cpu_hint(tmp_path, capsys):
    from edge_ad.training.loop import FitConfig, fit

    cfg = FitConfig(steps=100_000, lr=0.1, max_seconds=0.6, eta_after=3)
    res = fit(_Slow(), lambda step, rank: 0.05, _slow_loss, cfg, tmp_path, device=torch.device("cpu"),
              progress=True, eta_hint="hint: use --preset edge")
    err = capsys.readouterr().err
    assert res.eta_seconds is not None and res.eta_seconds > 100_000 * 0.04
    assert "estimated training time: " in err and " h " in err and "hint: use --preset edge" in err
    assert "stopped cleanly at step" in err
    fit(_Slow(), lambda step, rank: 0.0, _slow_loss, FitConfig(steps=10, lr=0.1), tmp_path / "b",
        device=torch.device("cpu"), progress=True, eta_hint="hint: use --preset edge")
    assert "hint" not in capsys.readouterr().err  # a short run gets no hint
    from edge_ad.training.presets import cpu_hint

    # The hint names the CPU-sized preset, and there is none to name when it is already in use.
    assert "--preset edge" in cpu_hint("foundad", None) and "--preset edge" in cpu_hint("visualad", "paper")
    assert cpu_hint("foundad", "edge") == "" and cpu_hint("knn", None) == ""


def test_train_max_minutes_leaves_a_usable_run(real_root, tmp_path):
    from edge_ad import train
    from edge_ad.methods import load_detector

    run = train("foundad", "dinov3_vits16", real_root, CATS[0], tmp_path / "run", shots=2, image_size=64,
                layers=[0], steps=10_000, pretrained=False, backbone_overrides=TINY_VIT, device="cpu",
                progress=False, max_minutes=0.02,
                method_options={"projector_dim": 16, "projector_depth": 1, "projector_heads": 2})
    fit = json.loads((run / "train_log.json").read_text())["fit"]
    assert fit["stopped_early"] and 1 <= fit["end_step"] < 10_000
    det = load_detector(run)
    with torch.no_grad():
        out = det(det.example_input(1))
    assert torch.isfinite(out.anomaly_map).all()
    with pytest.raises(ValueError, match="max_minutes"):
        train("foundad", "dinov3_vits16", real_root, CATS[0], tmp_path / "z", max_minutes=0)
