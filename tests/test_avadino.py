"""AVA-DINO: parameter count at ViT-L width, prompt embeddings from a (tiny, offline) CLIP text
encoder, the map against the reference's two-channel formulation, the loss, zero-shot training on
real auxiliary categories, and conversion to OpenVINO INT8 / Q-DQ bundles that the runtime
``Detector`` reproduces without any text encoder."""
from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edge_ad.methods import build_detector, load_checkpoint_config, load_detector
from edge_ad.methods.avadino import (
    AVADinoHead,
    ClipTextEncoder,
    TextEmbeddings,
    load_text_embeddings,
    loss_fn,
    prompt_sentences,
    save_text_embeddings,
    set_class_name,
)

TEXT_DIM = 24
AUX = ["mvtec_transistor_256", "magnetic_tile"]
UNSEEN = "mvtec_hazelnut_256"
CLASS_NAMES = {"mvtec_transistor_256": "transistor", "magnetic_tile": "magnetic tile", UNSEEN: "hazelnut"}
# Tiny DINOv3-style ViT (random init; LayerScale 1 so the blocks really change the features).
TINY_BACKBONE = {"depth": 4, "embed_dim": 64, "num_heads": 2, "patch_size": 8, "init_values": 1.0}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random 2-layer CLIP text tower with a character-level BPE tokenizer, saved like a real one."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ".,-'!?":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)  # CLIP's BPE marks a word's last symbol
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=TEXT_DIM,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(path)
    return path


def _tiny(clip_dir, **fields):
    torch.manual_seed(0)
    return build_detector("avadino", backbone={"name": "dinov3_vits16", "layers": [0, 1, 2, 3], "img_size": 128,
                                               "overrides": TINY_BACKBONE},
                          bottleneck=32, text_dim=TEXT_DIM, text_model=str(clip_dir), class_names=CLASS_NAMES,
                          **fields).eval()


def test_parameter_count_at_vit_l_width_matches_the_reference():
    # 16 visual adapters 2*1024*768 + 2 prompt adapters 2*768*768 + text projection 768*1024.
    expected = 16 * 2 * 1024 * 768 + 2 * 2 * 768 * 768 + 768 * 1024
    assert expected == 28_311_552
    with torch.device("meta"):
        head = AVADinoHead(1024, 4, 768, 768)
        det = build_detector("avadino")  # the default: DINOv3 ViT-L/16 at 512, blocks 5/11/17/23
    assert sum(p.numel() for p in head.parameters()) == expected
    assert sum(p.numel() for p in det.trainable_parameters()) == expected
    assert det.backbone.info.layers == (5, 11, 17, 23) and det.grid_size == (32, 32) and det.width == 1024


def test_prompt_embeddings_from_a_local_clip_and_from_a_file(clip_dir, tmp_path):
    enc = ClipTextEncoder(clip_dir)
    emb = enc.encode("hazelnut")
    assert emb.shape == (2, TEXT_DIM)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    normal, abnormal = prompt_sentences("hazelnut")
    assert len(normal) == 7 * 35 and len(abnormal) == 5 * 35 and "a photo of a flawless hazelnut." in normal
    manual = F.normalize(enc.encode_sentences(abnormal).mean(0), dim=0)
    torch.testing.assert_close(emb[1], manual)
    assert not torch.allclose(emb, enc.encode("transistor"))

    path = save_text_embeddings(tmp_path / "emb.safetensors", {"hazelnut": emb})
    torch.testing.assert_close(load_text_embeddings(path)["hazelnut"], emb)
    file_only = TextEmbeddings(embeddings=path, dim=TEXT_DIM)
    torch.testing.assert_close(file_only("hazelnut"), emb)
    with pytest.raises(KeyError, match="not in the embeddings file"):
        file_only("screw")
    with pytest.raises(ValueError, match="text_dim"):
        TextEmbeddings(embeddings=path, dim=TEXT_DIM + 1)("hazelnut")


def test_map_equals_the_reference_two_channel_formulation(clip_dir, real_root):
    from edge_ad.data import MVTecDataset
    from edge_ad.runtime.preprocessing import preprocess_batch

    det = _tiny(clip_dir).set_class_name("magnetic tile")
    images = [s.image for s in list(MVTecDataset(real_root, "magnetic_tile", "test"))[:3]]
    x = torch.from_numpy(preprocess_batch(images, det.preprocess_spec, color_order="rgb"))
    with torch.no_grad():
        raw = det.forward_raw(x)
        train = det(x, train_outputs=True)
        # The reference, written out: two-channel logits 100 f'.T, upsampled, softmax over channels.
        patches, cls = det.tokens(x)
        text = det.text_features.unsqueeze(0)
        t_class = det.head.class_embeddings(text)
        maps = []
        for i in range(4):
            w = det.head.routing(cls[i], text)
            f = det.head.patch_adapters[i](patches[i], w[:, :1, None], w[:, 1:, None])
            logits = 100 * F.normalize(f, dim=-1) @ t_class[0].T  # (B, N, 2)
            logits = logits.transpose(1, 2).reshape(-1, 2, 16, 16)
            up = F.interpolate(logits, size=(128, 128), mode="bilinear", align_corners=True)
            maps.append(torch.softmax(up, dim=1)[:, 1:])
        expected = torch.stack(maps).mean(0)
    torch.testing.assert_close(raw.anomaly_map, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(raw.score, expected.amax(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(train.cross_modal, expected, atol=1e-5, rtol=0)
    assert train.calibration.shape == (3, 1, 128, 128) and train.global_logits.shape == (3, 2)
    torch.testing.assert_close(train.routing.sum(1), torch.ones(3))
    with pytest.raises(ValueError, match="text must be"):
        det(x, train_outputs=True, text=torch.zeros(3, 2, TEXT_DIM + 1))


def test_loss_on_real_masks_reaches_every_used_parameter(clip_dir, real_root):
    from edge_ad.data import MVTecDataset
    from edge_ad.data.masks import resize_mask
    from edge_ad.runtime.preprocessing import preprocess_batch
    from edge_ad.training.supervised import SupervisedBatch

    det = _tiny(clip_dir).train()
    samples = [s for s in MVTecDataset(real_root, "magnetic_tile", "test")][::20][:4]
    spec = det.preprocess_spec
    masks = np.stack([resize_mask(s.mask, (128, 128)) for s in samples])
    batch = SupervisedBatch(torch.from_numpy(preprocess_batch([s.image for s in samples], spec, color_order="rgb")),
                            torch.from_numpy(masks[:, None].astype(np.float32)),
                            torch.tensor([float(s.label) for s in samples]), ["magnetic_tile"] * 4)
    assert batch.labels.sum() >= 1 and batch.masks.sum() > 0
    loss = loss_fn(det, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    unused = {n for n, p in det.head.named_parameters() if p.grad is None}
    # The reference uses the prompt adapters' bottleneck only; their second layer gets no gradient.
    assert unused == {"prompt_adapters.0.fc2.weight", "prompt_adapters.1.fc2.weight"}
    assert all(p.grad is None for p in det.backbone.parameters())


@pytest.fixture(scope="module")
def trained_run(clip_dir, real_root, tmp_path_factory):
    """Zero-shot protocol on real data: train on transistor + magnetic tile, held-back 20 % scored."""
    from edge_ad.training import train

    out = tmp_path_factory.mktemp("ava") / "run"
    return train("avadino", "dinov3_vits16", real_root, None, out, categories=AUX, image_size=128,
                 layers=[0, 1, 2, 3], pretrained=False, steps=60, batch_size=8, lr=1e-3, seed=0, device="cpu",
                 synthetic_fraction=0.25, progress=False, backbone_overrides=TINY_BACKBONE,
                 method_options={"bottleneck": 32, "text_dim": TEXT_DIM, "text_model": str(clip_dir),
                                 "class_names": CLASS_NAMES, "warmup_steps": 4})


def _pixel_auroc_with_own_class_names(run, clip_dir, real_root, split: str) -> dict[str, float]:
    """Pixel AUROC of the trainer's own split (``"train"`` or ``"held_back"``) of each auxiliary
    category's real annotated samples, each category with its class-name prompts (as the reference
    evaluates), and pooled over both categories."""
    from edge_ad.data.base import load_sample
    from edge_ad.data.masks import resize_mask
    from edge_ad.metrics import pixel_auroc
    from edge_ad.runtime.preprocessing import preprocess_batch
    from edge_ad.training.supervised import load_auxiliary

    aux = load_auxiliary(real_root, AUX, holdout_fraction=0.2, seed=0)
    items = aux.annotated if split == "train" else aux.holdout_annotated
    det = load_detector(run)
    out, all_masks, all_maps = {}, [], []
    for cat in AUX:
        samples = [load_sample(it.record) for it in items if it.category == cat]
        x = torch.from_numpy(preprocess_batch([s.image for s in samples], det.preprocess_spec, color_order="rgb"))
        masks = np.stack([resize_mask(s.mask, det.image_size) for s in samples])
        det.set_class_name(CLASS_NAMES[cat], text_model=clip_dir)
        with torch.no_grad():
            maps = torch.cat([det(b).anomaly_map[:, 0] for b in x.split(16)]).numpy()
        out[cat] = float(pixel_auroc(masks, maps))
        all_masks.append(masks)
        all_maps.append(maps)
    out["pooled"] = float(pixel_auroc(np.concatenate(all_masks), np.concatenate(all_maps)))
    return out


def test_zero_shot_training_fits_and_reports_held_back_numbers(trained_run, clip_dir, real_root):
    log = json.loads((trained_run / "train_log.json").read_text())
    losses = [v for _, v in log["fit"]["losses"]]
    assert losses[-1] < losses[0]
    doc = load_checkpoint_config(trained_run)
    assert doc["method"] == "avadino" and doc["config"]["class_name"] == "object"  # default until set
    real = log["holdout"]["real"]  # the trainer's report (generic "object" prompt, categories pooled)
    assert real["anomalous"] >= 5 and real["pixel_auroc"] is not None
    fit = _pixel_auroc_with_own_class_names(trained_run, clip_dir, real_root, "train")
    held = _pixel_auroc_with_own_class_names(trained_run, clip_dir, real_root, "held_back")
    print(f"pixel AUROC, own class names: train split {fit}, held back {held}; trainer report {real}")
    assert fit["pooled"] > 0.55, fit  # it learns the auxiliary categories' defects
    # Held-back transistor images (3, 2 anomalous) are localised above chance: this exact config
    # measured 0.583 / 0.680 / 0.652 with seeds 0 / 1 / 2 (docs/AVADINO.md, "Held-back numbers").
    assert held["mvtec_transistor_256"] > 0.5, held
    # The pooled held-back number with a random-init tiny ViT is reported, not asserted: the
    # direction-only cross-modal score needs pretrained features to transfer (docs/AVADINO.md).
    # That training and inference agree in sign is proven by the planted-squares test below.


def _planted_squares(n: int, seed: int, size: int = 64) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Grey-noise images, half of them with 1-2 bright squares (10-16 px); masks = the squares."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        img = rng.integers(40, 150, (size, size, 3)).astype(np.uint8)
        mask = np.zeros((size, size), bool)
        if i % 2:
            for _ in range(int(rng.integers(1, 3))):
                side = int(rng.integers(10, 17))
                y, x = (int(v) for v in rng.integers(0, size - side, 2))
                mask[y : y + side, x : x + side] = True
            img[mask] = rng.integers(225, 256, (int(mask.sum()), 3)).astype(np.uint8)
        images.append(img)
        masks.append(mask)
    return images, masks


def test_planted_bright_squares_are_localised(clip_dir, tmp_path):
    """Training and inference agree in sign: a tiny AVA-DINO trained (zero-shot protocol, real
    annotated samples only) on images with planted bright squares localises squares in fresh images.
    A sign flip between the loss's anomaly channel and the inference map would put this near 0."""
    from PIL import Image

    from edge_ad.metrics import pixel_auroc
    from edge_ad.runtime.preprocessing import preprocess_batch
    from edge_ad.training import train

    root = tmp_path / "data"
    images, masks = _planted_squares(48, seed=0)
    for i, (img, mask) in enumerate(zip(images, masks)):
        kind = "bright" if mask.any() else "good"
        (root / "squares" / "test" / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "squares" / "test" / kind / f"{i:03d}.png")
        if mask.any():
            (root / "squares" / "ground_truth" / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "squares" / "ground_truth" / kind / f"{i:03d}_mask.png")
    run = train("avadino", "dinov3_vits16", root, None, tmp_path / "run", categories=["squares"], image_size=64,
                layers=[0, 1, 2, 3], pretrained=False, steps=60, batch_size=8, lr=1e-3, seed=0, device="cpu",
                synthetic_fraction=0.0, holdout_fraction=0.0, progress=False, backbone_overrides=TINY_BACKBONE,
                method_options={"bottleneck": 32, "text_dim": TEXT_DIM, "text_model": str(clip_dir),
                                "class_names": {"squares": "square"}, "warmup_steps": 4})
    det = load_detector(run)
    det.set_class_name("square", text_model=clip_dir)
    fresh, fresh_masks = _planted_squares(16, seed=1)
    x = torch.from_numpy(preprocess_batch(fresh, det.preprocess_spec, color_order="rgb"))
    with torch.no_grad():
        maps = det(x).anomaly_map[:, 0].numpy()
    auroc = float(pixel_auroc(np.stack(fresh_masks), maps))
    print(f"planted squares, fresh images: pixel AUROC {auroc:.3f}")
    assert auroc > 0.9, auroc


def test_set_class_name_then_convert_and_deploy_without_text_encoder(trained_run, clip_dir, real_root, tmp_path):
    import onnx

    from edge_ad.converters.convert import convert
    from edge_ad.data import MVTecDataset
    from edge_ad.runtime import Detector, preprocess_batch
    from edge_ad.runtime.bundle import load_bundle

    emb = save_text_embeddings(tmp_path / "hazelnut.safetensors", {"hazelnut": ClipTextEncoder(clip_dir).encode("hazelnut")})
    run = set_class_name(trained_run, "hazelnut", embeddings=emb, out=tmp_path / "run_hazelnut")
    det = load_detector(run)
    assert det.config.class_name == "hazelnut"
    torch.testing.assert_close(det.text_features, load_text_embeddings(emb)["hazelnut"])
    assert not torch.equal(det.text_features, load_detector(trained_run).text_features)

    from transformers import CLIPTokenizer

    vocab = len(CLIPTokenizer.from_pretrained(clip_dir))
    test_set = MVTecDataset(real_root, UNSEEN, "test")
    images = [s.image for s in test_set]
    for target in ("intel-cpu", "jetson-orin"):
        bundle_path = convert(run, target, tmp_path / target, precision="int8", calib=real_root / UNSEEN,
                              calib_count=8, val_data=real_root, val_category=UNSEEN, progress=False)
        bundle = load_bundle(bundle_path)
        fid = bundle.fidelity
        assert fid["num_images"] == 10 and fid["map"]["cosine_mean"] > 0.99, fid["map"]
        model = onnx.load(str(bundle.path("model.onnx")))
        # No text tower: no token-embedding (vocab rows) or position-embedding (77 rows) table, and
        # the graph is the ViT + adapters (a CLIP text tower would add its own transformer).
        shapes = [tuple(t.dims) for t in model.graph.initializer]
        assert not any(vocab in s or 77 in s for s in shapes), shapes
        assert len(model.graph.node) < 2000 and not any("text_model" in n.name for n in model.graph.node)
        x = preprocess_batch(images, bundle.preprocess_spec, color_order="rgb")
        if target == "jetson-orin":
            # TensorRT cannot be installed here: the Q/DQ ONNX the engine is built from must be
            # TensorRT-ready and runs in onnxruntime (what the fidelity report measured).
            from edge_ad.converters.fidelity import onnxruntime_runner
            from edge_ad.converters.trt_check import check_tensorrt_compatible

            assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
            assert check_tensorrt_compatible(bundle.path("model.onnx")) == []
            maps, scores = onnxruntime_runner(bundle.path("model.onnx"))(x)
            assert maps.shape == (10, 1, 128, 128) and np.isfinite(scores).all()
            continue
        from edge_ad.converters.openvino import openvino_runner

        hint = bundle.manifest.engine.hints["INFERENCE_PRECISION_HINT"]
        maps, scores = openvino_runner(bundle.path("openvino/model.xml"), precision_hint=hint)(x)
        runtime = Detector.load(bundle_path)
        for i, img in enumerate(images):
            res = runtime.predict(img, color_order="rgb")
            np.testing.assert_allclose(res.model_map, maps[i, 0], atol=1e-4)
            assert abs(res.score - float(scores[i])) <= 1e-4
