"""knn (PatchCore-style): matmul nearest-neighbour distances, coreset, bank in checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from edge_ad.methods import build_detector, load_detector, save_checkpoint
from edge_ad.methods.knn import (
    KNNDetector,
    coreset_size,
    covering_radius,
    k_center_greedy,
    nearest_neighbor_distance,
)
from edge_ad.methods.knn.config import KNNConfig
from edge_ad.methods.common import fuse_feature_maps
from edge_ad.methods.knn.model import bank_neighbors, reweighted_image_score

from test_methods_contract import IMG, export_onnx, make_backbone, make_detector


def test_nearest_neighbor_distance_matches_cdist() -> None:
    g = torch.Generator().manual_seed(0)
    queries = torch.randn(2, 50, 24, generator=g, dtype=torch.float64) * 3 + 1
    bank = torch.randn(300, 24, generator=g, dtype=torch.float64) * 3 + 1
    brute = torch.cdist(queries, bank.expand(2, -1, -1)).min(dim=-1).values
    torch.testing.assert_close(nearest_neighbor_distance(queries, bank), brute, rtol=1e-10, atol=1e-10)
    # float32 with the precomputed ||b||^2 buffer: within float rounding of the expansion.
    q32, b32 = queries.float(), bank.float()
    torch.testing.assert_close(
        nearest_neighbor_distance(q32, b32, b32.pow(2).sum(1)), brute.float(), rtol=1e-4, atol=1e-3
    )
    # Features with a large common component (as foundation-model tokens have): centring on the
    # bank mean keeps the expansion exact enough; a query equal to a bank entry is at distance ~0.
    offset = 200.0 * torch.randn(24, generator=g)
    big_bank = bank.float() + offset
    center = big_bank.mean(0)
    d = nearest_neighbor_distance(big_bank[:5].unsqueeze(0), big_bank, center=center)
    assert torch.isfinite(d).all() and float(d.max()) < 1e-2
    # Reference in float64 (float32 cdist itself uses the expansion and loses digits here).
    brute = torch.cdist((q32 + offset).double(), big_bank.double().expand(2, -1, -1)).min(dim=-1).values
    got = nearest_neighbor_distance(q32 + offset, big_bank, center=center)
    torch.testing.assert_close(got.double(), brute, rtol=1e-4, atol=1e-3)


def test_detector_patch_scores_match_brute_force() -> None:
    det = make_detector("knn", "cnn")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        feats = det.patch_features(x)  # (B, N, C)
        brute = torch.cdist(feats.double(), det.memory_bank.double().expand(2, -1, -1)).min(-1).values
        patches = det.patch_scores(x)
    assert patches.shape == (2, 1, *det.grid_size)
    torch.testing.assert_close(patches.flatten(1).double(), brute, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(det.image_score(patches), patches.flatten(1).max(1).values)
    torch.testing.assert_close(det.memory_bank_center, det.memory_bank.mean(0))
    torch.testing.assert_close(det.memory_bank_sq_norm, (det.memory_bank - det.memory_bank_center).pow(2).sum(1))


def test_exported_graph_uses_matmul_not_broadcast_subtraction() -> None:
    onnx = pytest.importorskip("onnx")
    det = make_detector("knn")
    data, _ = export_onnx(det, det.example_input())
    model = onnx.load_from_string(data)
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" in ops
    # No tensor of rank 4 with the bank and channel axes: infer shapes and look for M x C products.
    inferred = onnx.shape_inference.infer_shapes(model)
    m, c = det.bank_size, det.feature_dim
    for vi in inferred.graph.value_info:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        assert not (len(dims) >= 4 and m in dims and c in dims and dims[-1] == c), (vi.name, dims)


def test_local_aggregation_is_3x3_mean_without_padding_bias() -> None:
    det = make_detector("knn", "cnn", local_aggregation=3)  # 8 x 8 grid
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        fmap = det.extract_features(x)
        agg = det.patch_features(x).transpose(1, 2).reshape(fmap.shape)
    torch.testing.assert_close(agg[:, :, 0, 0], fmap[:, :, :2, :2].mean(dim=(2, 3)))  # corner: 4 real cells
    torch.testing.assert_close(agg[:, :, 3, 4], fmap[:, :, 2:5, 3:6].mean(dim=(2, 3)))
    off = make_detector("knn", local_aggregation=1)
    with torch.no_grad():
        torch.testing.assert_close(off.patch_features(x), off.extract_features(x).flatten(2).transpose(1, 2))


def test_pool_per_layer_aggregates_each_layer_before_fusing() -> None:
    det = make_detector("knn", "cnn", local_aggregation=3, pool_per_layer=True)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        features, _ = det.backbone(x)
        assert len(features) >= 2  # the test needs two grids for the orders to differ
        expected = fuse_feature_maps([det.aggregate(f) for f in features]).flatten(2).transpose(1, 2)
        after = det.aggregate(det.extract_features(x)).flatten(2).transpose(1, 2)
        got = det.patch_features(x)
    torch.testing.assert_close(got, expected)
    assert float((got - after).abs().max()) > 1e-3  # the order matters: not the fused-then-pooled features


def test_bank_neighbors_match_brute_force() -> None:
    g = torch.Generator().manual_seed(3)
    bank = torch.randn(50, 8, generator=g) + 40.0  # large common offset: the centring keeps it exact
    got = bank_neighbors(bank, 5, chunk=16)
    brute = torch.cdist(bank.double(), bank.double()).topk(5, dim=1, largest=False).indices
    assert got.shape == (50, 5) and torch.equal(got[:, 0], torch.arange(50))
    assert torch.equal(got.sort(1).values, brute.sort(1).values)
    assert bank_neighbors(bank[:3], 9).shape == (3, 3)  # k capped at the bank size


def test_reweighted_image_score_follows_patchcore_formula() -> None:
    g = torch.Generator().manual_seed(4)
    bank = torch.randn(30, 6, generator=g, dtype=torch.float64)
    queries = torch.randn(2, 12, 6, generator=g, dtype=torch.float64) * 2
    all_d = torch.cdist(queries, bank.expand(2, -1, -1))
    dist, idx = all_d.min(-1)
    nbrs = bank_neighbors(bank, 4)
    got = reweighted_image_score(dist, idx, queries, bank, nbrs)
    for b in range(2):  # the paper's steps, one image at a time
        p = int(dist[b].argmax())
        m = int(idx[b, p])
        d = torch.stack([torch.dist(queries[b, p], bank[j]) for j in nbrs[m]])
        expected = (1 - torch.softmax(d, 0)[0]) * dist[b, p]
        torch.testing.assert_close(got[b], expected)
        assert got[b] < dist[b].max()


def test_knn_detector_reweights_image_score_and_exports() -> None:
    det = make_detector("knn", "cnn", score_neighbors=3)
    plain = make_detector("knn", "cnn", score_neighbors=1)
    assert det.memory_bank_neighbors.shape == (det.bank_size, 3)
    assert plain.memory_bank_neighbors.shape == (plain.bank_size, 0)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        raw, ref = det.forward_raw(x), plain.forward_raw(x)
        feats = det.patch_features(x)
        dist, idx = torch.cdist(feats, det.memory_bank.expand(2, -1, -1)).min(-1)
        expected = reweighted_image_score(dist, idx, feats, det.memory_bank, det.memory_bank_neighbors)
    torch.testing.assert_close(raw.score, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(raw.anomaly_map, ref.anomaly_map)  # maps do not depend on the re-weighting
    assert bool((raw.score < ref.score).all())
    data, _ = export_onnx(det, det.example_input())
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    out = sess.run(None, {"images": x[:1].numpy()})  # the export has batch 1
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out[1]), det(x[:1]).score, rtol=1e-3, atol=1e-3)


def test_knn_option_defaults_and_validation() -> None:
    assert KNNConfig().score_neighbors == 1 and KNNConfig().pool_per_layer is False  # old checkpoints' behaviour
    with pytest.raises(ValueError, match="score_neighbors"):
        KNNConfig(score_neighbors=0)
    with pytest.raises(TypeError, match="pool_per_layer"):
        KNNConfig(pool_per_layer="yes")


def test_fit_builds_coreset_bank_and_updates_config() -> None:
    backbone = make_backbone("vit")
    det = build_detector("knn", backbone=backbone, coreset_ratio=0.25)
    assert det.bank_size == 0 and det.config.bank_size == 0
    with pytest.raises(RuntimeError, match="fit"):
        det(torch.randn(1, 3, IMG, IMG))
    images = torch.randn(6, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    det.fit([images[:4], images[4:]])
    m = 6 * det.num_patches
    assert det.bank_size == det.config.bank_size == round(0.25 * m)
    # Every bank entry is one of the training patch features (a subset, not a mean).
    with torch.no_grad():
        feats = det.patch_features(images).reshape(-1, det.feature_dim)
    d = torch.cdist(det.memory_bank.double(), feats.double()).min(1).values
    assert float(d.max()) < 1e-4
    # Training patches are in (or near) the bank, so their scores are low relative to noise.
    with torch.no_grad():
        good = det.forward_raw(images).score.mean()
        noisy = det.forward_raw(images + 3 * torch.randn_like(images)).score.mean()
    assert noisy > good
    # Same data + seed = same bank; max_bank_size caps it.
    det2 = build_detector("knn", backbone=make_backbone("vit"), coreset_ratio=0.25).fit(images)
    assert torch.equal(det2.memory_bank, det.memory_bank)
    det3 = build_detector("knn", backbone=make_backbone("vit"), coreset_ratio=0.25, max_bank_size=10).fit(images)
    assert det3.bank_size == 10
    # Batches of precomputed patch features give the same bank as the images.
    with torch.no_grad():
        feats = [det.patch_features(images[:3]), det.patch_features(images[3:])]  # B = 3: not an image
    det4 = build_detector("knn", backbone=make_backbone("vit"), coreset_ratio=0.25).fit(feats)
    torch.testing.assert_close(det4.memory_bank, det.memory_bank)


def test_ratio_one_keeps_every_feature() -> None:
    det = make_detector("knn", coreset_ratio=1.0)
    assert det.bank_size == 4 * det.num_patches


def test_fit_features_validates() -> None:
    det = make_detector("knn")
    with pytest.raises(ValueError, match=f"M, {det.feature_dim}"):
        det.fit_features(torch.zeros(10, det.feature_dim + 1))
    with pytest.raises(ValueError, match="non-finite"):
        det.fit_features(torch.full((10, det.feature_dim), float("nan")))
    with pytest.raises(ValueError, match="no images"):
        det.fit([])


# ---------------------------------------------------------------------------- coreset
def _clustered(n_per: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(8, 32, generator=g) * 10
    return (centers.repeat_interleave(n_per, 0) + torch.randn(8 * n_per, 32, generator=g)).contiguous()


def test_k_center_greedy_deterministic_and_unique() -> None:
    x = _clustered()
    a = k_center_greedy(x, 50, projection_dim=16, seed=3)
    b = k_center_greedy(x, 50, projection_dim=16, seed=3)
    c = k_center_greedy(x, 50, projection_dim=16, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.int64 and len(set(a.tolist())) == 50
    assert k_center_greedy(x, 1, seed=0).shape == (1,)
    with pytest.raises(ValueError):
        k_center_greedy(x, 0)
    with pytest.raises(ValueError):
        k_center_greedy(x, x.shape[0] + 1)


def test_covering_radius_decreases_and_beats_random() -> None:
    x = _clustered()
    order = k_center_greedy(x, 64, projection_dim=0, seed=0)  # exact distances
    radii = [covering_radius(x, x[order[:k]]) for k in (1, 2, 4, 8, 16, 32, 64)]
    assert all(r1 >= r2 for r1, r2 in zip(radii, radii[1:]))
    assert radii[-1] < 0.5 * radii[0]
    # The first 8 picks hit the 8 clusters (200 points each), so the radius drops from the
    # between-cluster scale (~80) to the within-cluster scale (~10).
    assert sorted((order[:8] // 200).tolist()) == list(range(8))
    assert radii[3] < 20.0 < radii[2]
    # Greedy covers much better than a random subset of the same size.
    g = torch.Generator().manual_seed(0)
    random_radius = min(covering_radius(x, x[torch.randperm(len(x), generator=g)[:16]]) for _ in range(5))
    assert radii[4] < random_radius
    # With a random projection the guarantee is approximate but the radius still shrinks.
    proj = k_center_greedy(x, 16, projection_dim=8, seed=0)
    assert covering_radius(x, x[proj]) < 20.0


def test_coreset_size() -> None:
    assert coreset_size(1000, 0.1) == 100
    assert coreset_size(3, 0.1) == 1
    assert coreset_size(1000, 0.1, max_size=50) == 50
    assert coreset_size(10, 1.0) == 10
    with pytest.raises(ValueError):
        coreset_size(0, 0.1)


def test_coreset_progress_bar(capsys) -> None:
    pytest.importorskip("tqdm")
    k_center_greedy(_clustered(20), 30, progress=True)
    assert "coreset" in capsys.readouterr().err


# ---------------------------------------------------------------------------- checkpoint
def test_bank_size_travels_with_checkpoint(tmp_path: Path) -> None:
    det = make_detector("knn", coreset_ratio=0.3)
    save_checkpoint(det, tmp_path)
    doc = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert doc["config"]["bank_size"] == det.bank_size > 0
    loaded = load_detector(tmp_path)
    assert isinstance(loaded, KNNDetector) and loaded.bank_size == det.bank_size
    torch.testing.assert_close(loaded.memory_bank, det.memory_bank, rtol=0, atol=0)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).score, det(x).score, rtol=0, atol=0)
    # A config whose bank size disagrees with the file is caught before loading.
    doc["config"]["bank_size"] = det.bank_size + 1
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(doc))
    from edge_ad.methods import CheckpointError

    with pytest.raises(CheckpointError, match="memory_bank: file"):
        load_detector(tmp_path)


def test_unfitted_knn_exports_nothing_silently() -> None:
    det = build_detector("knn", backbone=make_backbone("vit"))
    with pytest.raises(RuntimeError, match="empty"):
        det.forward_raw(det.example_input())


def test_distance_is_euclidean_units() -> None:
    """A bank of one entry: the patch score is the plain L2 distance to it."""
    det = make_detector("knn", local_aggregation=1, smoothing_sigma=0.0)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        feats = det.patch_features(x)[0]
        det.set_memory_bank(feats[:1])
        scores = det.patch_scores(x).flatten()
    torch.testing.assert_close(scores, (feats - feats[0]).norm(dim=1), rtol=1e-4, atol=1e-4)
    assert float(scores[0]) == pytest.approx(0.0, abs=1e-3)
