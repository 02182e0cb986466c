"""Bundles: round trips (directory and .tar), strict validation, checksums, safe extraction, no pickle."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_ad.runtime import PreprocessSpec
from edge_ad.runtime.bundle import (
    SCHEMA_VERSION,
    BackboneInfo,
    Bundle,
    BundleError,
    Calibration,
    EngineSpec,
    InputSpec,
    Manifest,
    OutputSpec,
    Thresholds,
    current_sdk_version,
    load_bundle,
    manifest_digest,
    update_manifest,
    write_bundle,
)

from torch_blocker import run_without_torch

H = W = 8


def _tiny_onnx() -> bytes:
    """image (1,3,8,8) -> 1x1 Conv -> anomaly_map (1,1,8,8); ReduceMax -> score (1,)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32).reshape(1, 3, 1, 1), "w")
    nodes = [
        helper.make_node("Conv", ["image", "w"], ["anomaly_map"]),
        helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3], keepdims=0),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, H, W])],
        [helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, H, W]),
         helper.make_tensor_value_info("score", TensorProto.FLOAT, [1])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def onnx_bytes() -> bytes:
    return _tiny_onnx()


def _manifest(**overrides) -> Manifest:
    fields = dict(
        method="foundad",
        backbone=BackboneInfo("dinov3_vits16", (9,)),
        input=InputSpec.from_preprocess_spec(PreprocessSpec(H, W)),
        outputs=(OutputSpec("anomaly_map", (1, 1, H, W)), OutputSpec("score", (1,))),
        precision="fp32",
        target="onnx-cpu",
        engine=EngineSpec("onnxruntime"),
        normalization={"map_loc": 0.1, "map_scale": 0.02, "score_loc": 0.3, "score_scale": 0.05, "num_images": 16},
        thresholds=Thresholds(image_threshold=3.0, pixel_threshold=2.5, target_fpr=0.01, source="good-fpr"),
        fidelity={"map_max_abs_err": 0.0},
        info={"run_dir": "runs/hazelnut"},
    )
    fields.update(overrides)
    return Manifest(**fields)


@pytest.fixture()
def bundle_dir(tmp_path: Path, onnx_bytes: bytes) -> Path:
    return write_bundle(tmp_path / "b", _manifest(), {"model.onnx": onnx_bytes}, fidelity={"auroc_delta": 0.0, "n": 3})


def _edit_manifest(root: Path, edit, reseal: bool = False) -> None:
    path = root / "manifest.yaml"
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    if reseal:
        doc["manifest_sha256"] = manifest_digest({k: v for k, v in doc.items() if k != "manifest_sha256"})
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------


def test_round_trip_directory_and_onnx_runs(bundle_dir: Path):
    import onnxruntime as ort

    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m == _manifest().replace(artifacts=m.artifacts, created=m.created, sdk_version=m.sdk_version)
    assert m.schema_version == SCHEMA_VERSION and m.sdk_version == current_sdk_version()
    assert set(m.artifacts) == {"model.onnx", "fidelity.json"}
    assert bundle.preprocess_spec == PreprocessSpec(H, W)
    assert bundle.thresholds.image_threshold == 3.0
    assert bundle.fidelity == {"auroc_delta": 0.0, "n": 3}
    assert bundle.normalization["num_images"] == 16
    assert bundle.target.engine == "onnxruntime"
    assert bundle.engines_dir == bundle_dir / "engines"
    text = (bundle_dir / "manifest.yaml").read_text()
    assert text.startswith("# edge_ad bundle manifest") and "manifest_sha256:" in text

    sess = ort.InferenceSession(str(bundle.path("model.onnx")), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, H, W)).astype(np.float32)
    amap, score = sess.run([o.name for o in m.outputs], {"image": x})
    expected = (x * np.array([1, 2, 3], np.float32).reshape(1, 3, 1, 1)).sum(1, keepdims=True)
    np.testing.assert_allclose(amap, expected, rtol=1e-5, atol=1e-5)
    assert score.shape == (1,) and np.isclose(score[0], expected.max(), atol=1e-5)
    with pytest.raises(BundleError, match="has no artifact 'openvino/model.xml'; it has: fidelity.json, model.onnx"):
        bundle.path("openvino/model.xml")


def test_round_trip_tar(tmp_path: Path, onnx_bytes: bytes):
    out = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": onnx_bytes}, tar=True)
    assert out == tmp_path / "b.tar" and out.is_file()
    with tarfile.open(out) as tf:
        assert tf.getnames()[0] == "manifest.yaml"
    with load_bundle(out) as bundle:
        root = bundle.root
        assert bundle.path("model.onnx").read_bytes() == onnx_bytes
        assert bundle.source == out and bundle.fidelity is None
    assert not root.exists()  # temporary extraction removed on close
    kept = load_bundle(out, extract_to=tmp_path / "x")
    assert kept.root == tmp_path / "x" and (tmp_path / "x" / "model.onnx").is_file()
    # Re-writing over an existing bundle tar is allowed; over any other file it is not.
    write_bundle(out, _manifest(), {"model.onnx": onnx_bytes}, tar=True)
    (tmp_path / "other.tar").write_bytes(b"not a tar")
    with pytest.raises(BundleError, match="not a bundle .tar; refusing to overwrite"):
        write_bundle(tmp_path / "other.tar", _manifest(), {"model.onnx": onnx_bytes}, tar=True)


def test_tar_made_with_tar_cf_of_a_folder_loads(bundle_dir: Path, tmp_path: Path):
    out = tmp_path / "manual.tar"
    with tarfile.open(out, "w") as tf:
        tf.add(bundle_dir, arcname="my_bundle")
    assert load_bundle(out).manifest.method == "foundad"


def test_openvino_bundle_needs_pinned_hint_and_ir(tmp_path: Path, onnx_bytes: bytes):
    xml = b'<?xml version="1.0"?>\n<net name="tiny" version="11"></net>\n'
    ov = dict(target="intel-cpu", engine=EngineSpec("openvino", {"INFERENCE_PRECISION_HINT": "f32"}))
    # Raw weights that happen to start like a pickle header (0x80 0x03) are not mistaken for one.
    weights = b"\x80\x03" + np.random.default_rng(0).standard_normal(4096).astype(np.float32).tobytes()
    out = write_bundle(tmp_path / "ov", _manifest(**ov),
                       {"model.onnx": onnx_bytes, "openvino/model.xml": xml, "openvino/model.bin": weights})
    assert load_bundle(out).path("openvino/model.xml").read_bytes() == xml
    with pytest.raises(BundleError, match=r"missing \['openvino/model.xml', 'openvino/model.bin'\]"):
        write_bundle(tmp_path / "ov2", _manifest(**ov), {"model.onnx": onnx_bytes})
    with pytest.raises(BundleError, match="INFERENCE_PRECISION_HINT' is missing.*write 'f32'"):
        _manifest(target="intel-cpu", engine=EngineSpec("openvino"))
    with pytest.raises(BundleError, match="'bf16' is not allowed.*bf16 is never used"):
        _manifest(target="intel-cpu", engine=EngineSpec("openvino", {"INFERENCE_PRECISION_HINT": "bf16"}))
    with pytest.raises(BundleError, match="'f16' would compute below the declared precision fp32; write 'f32'"):
        _manifest(target="intel-cpu", engine=EngineSpec("openvino", {"INFERENCE_PRECISION_HINT": "f16"}))


def test_summaries_from_calibration_dicts(tmp_path: Path, onnx_bytes: bytes):
    # The shapes edge_ad.calibration produces (Thresholds.to_dict, CalibrationSet.to_manifest).
    fitted = {"image_threshold": 3.2, "pixel_threshold": None, "target_fpr": 0.01, "pixel_fpr": None,
              "num_images": 16, "fit_fpr": 0.0, "method": "order_statistic",
              "score_stats": {"min": -1.0, "max": 2.9}, "map_stats": {}, "source": ""}
    calset = {"count": 64, "hash": "ab" * 32, "num_good": 48, "num_synthetic": 16, "synthetic_fraction": 0.25,
              "seed": 0, "files": ["a.png"] * 48, "kinds": ["good"] * 48, "source": "data/hazelnut/train/good",
              "preprocess": {"height": 8, "width": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "resize": "area"}}
    th, cal = Thresholds.from_summary(fitted), Calibration.from_summary(calset)
    assert th.source is None and th.details["score_stats"] == {"min": -1.0, "max": 2.9}
    assert cal.synthetic_fraction == 0.25 and "files" not in cal.details and "preprocess" not in cal.details
    m = _manifest(precision="int8", thresholds=th, calibration=cal)
    loaded = load_bundle(write_bundle(tmp_path / "b", m, {"model.onnx": onnx_bytes})).manifest
    assert loaded.thresholds == th and loaded.calibration == cal and loaded.calibration.details["seed"] == 0


def test_update_manifest_reseals(bundle_dir: Path):
    new = update_manifest(bundle_dir, {"thresholds": Thresholds(image_threshold=4.0, pixel_threshold=None)})
    assert new.thresholds.image_threshold == 4.0
    assert load_bundle(bundle_dir).thresholds.pixel_threshold is None
    with pytest.raises(BundleError, match="cannot change 'artifacts'"):
        update_manifest(bundle_dir, {"artifacts": {}})


# ----------------------------------------------------------------------------------------------
# validation errors
# ----------------------------------------------------------------------------------------------


def test_tampered_manifest_fails_the_seal(bundle_dir: Path):
    _edit_manifest(bundle_dir, lambda d: d["thresholds"].update(image_threshold=99.0))
    with pytest.raises(BundleError, match="modified after the bundle was written.*update_manifest"):
        load_bundle(bundle_dir)
    assert load_bundle(bundle_dir, verify=False).thresholds.image_threshold == 99.0  # seal is part of verify


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["input"].update(height="512px"), r"'input.height': expected an integer >= 1, got '512px'"),
        (lambda d: d["input"].update(resize="cubic"), r"'input.resize': 'cubic' is not one of auto, bilinear, area"),
        (lambda d: d["input"].update(color_order="bgr"), r"'input.color_order': 'bgr' is not supported.*write 'rgb'"),
        (lambda d: d["input"].update(std=[0.2, 0.2]), r"'input.std': expected a list of three numbers"),
        (lambda d: d.update(precision="fp8"), r"'precision': 'fp8' is not one of fp32, fp16, int8"),
        (lambda d: d.update(precision="fp16"), r"'fp16' is not allowed on target 'onnx-cpu' \(allowed: fp32, int8\)"),
        (lambda d: d.update(precision="int8"), r"precision int8 needs the calibration record"),
        (lambda d: d.update(target="raspberry-pi"), r"unknown target 'raspberry-pi'; registered targets: jetson-orin"),
        (lambda d: d["engine"].update(name="tensorrt"), r"'engine.name': 'tensorrt' does not match target 'onnx-cpu'"),
        (lambda d: d.update(colour="rgb"), r"manifest top level: unknown key\(s\) \['colour'\]"),
        (lambda d: d.pop("thresholds"), r"missing key\(s\) \['thresholds'\]"),
        (lambda d: d["thresholds"].pop("target_fpr"), r"section 'thresholds': missing key\(s\) \['target_fpr'\]"),
        (lambda d: d["normalization"].update(map_loc=True), r"'normalization.map_loc': expected a finite number"),
        (lambda d: d.update(created="yesterday"), r"'created': expected an ISO 8601 time"),
        (lambda d: d["artifacts"]["model.onnx"].update(sha256="abc"), r"'artifacts.model.onnx.sha256': expected 64"),
        (lambda d: d["artifacts"].pop("model.onnx"), r"missing \['model.onnx'\]"),
        (lambda d: d["outputs"].append({"name": "score", "shape": [1], "dtype": "float32"}), r"must be unique"),
    ],
)
def test_invalid_manifest_fields_are_named(bundle_dir: Path, edit, message):
    _edit_manifest(bundle_dir, edit, reseal=True)
    with pytest.raises(BundleError, match=message) as info:
        load_bundle(bundle_dir)
    assert str(bundle_dir) in str(info.value)


def test_unknown_and_newer_schema_versions(bundle_dir: Path):
    _edit_manifest(bundle_dir, lambda d: d.update(schema_version=2, sdk_version="0.9.0", newfield=1))
    with pytest.raises(BundleError, match=r"schema_version 2, written by edge-ad 0.9.0.*reads schema_version 1 only. "
                                          r"Upgrade edge-ad on this machine to >= 0.9.0"):
        load_bundle(bundle_dir)
    _edit_manifest(bundle_dir, lambda d: d.update(schema_version=0))
    with pytest.raises(BundleError, match="unknown bundle schema_version 0"):
        load_bundle(bundle_dir)
    _edit_manifest(bundle_dir, lambda d: d.update(schema_version="1"))
    with pytest.raises(BundleError, match="'schema_version': expected an integer"):
        load_bundle(bundle_dir)


def test_wrong_checksum_and_missing_or_truncated_artifact(bundle_dir: Path, onnx_bytes: bytes):
    model = bundle_dir / "model.onnx"
    corrupted = bytearray(onnx_bytes)
    corrupted[-1] ^= 0xFF
    model.write_bytes(bytes(corrupted))
    with pytest.raises(BundleError, match=r"sha256 mismatch for 'model.onnx': expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        load_bundle(bundle_dir)
    load_bundle(bundle_dir, verify=False)  # same size: only the checksum could tell
    model.write_bytes(onnx_bytes[:-3])
    n = len(onnx_bytes)
    with pytest.raises(BundleError, match=rf"'model.onnx' has {n - 3} bytes, the manifest says {n}"):
        load_bundle(bundle_dir, verify=False)
    model.unlink()
    with pytest.raises(BundleError, match="artifact 'model.onnx' listed in manifest.yaml is missing"):
        load_bundle(bundle_dir)


def test_not_a_bundle(tmp_path: Path, onnx_bytes: bytes):
    with pytest.raises(FileNotFoundError, match="bundle not found"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="is not a bundle: no manifest.yaml"):
        load_bundle(tmp_path / "empty")
    (tmp_path / "f.txt").write_text("hi")
    with pytest.raises(BundleError, match="neither a bundle directory nor a .tar bundle"):
        load_bundle(tmp_path / "f.txt")
    # write_bundle refuses to replace a directory that is not a bundle, but fills an empty one.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("precious")
    with pytest.raises(BundleError, match="non-empty directory without manifest.yaml, not a bundle; refusing"):
        write_bundle(tmp_path / "data", _manifest(), {"model.onnx": onnx_bytes})
    assert (tmp_path / "data" / "keep.txt").read_text() == "precious"
    write_bundle(tmp_path / "empty", _manifest(), {"model.onnx": onnx_bytes})
    # An existing bundle is replaced whole; no staging folders are left behind.
    write_bundle(tmp_path / "empty", _manifest(method="knn"), {"model.onnx": onnx_bytes})
    assert load_bundle(tmp_path / "empty").manifest.method == "knn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty", "f.txt"]


# ----------------------------------------------------------------------------------------------
# safe extraction and pickle-freedom
# ----------------------------------------------------------------------------------------------


def _tar_with(path: Path, bundle_dir: Path, extra: tarfile.TarInfo, data: bytes | None = None) -> Path:
    with tarfile.open(path, "w") as tf:
        for f in sorted(bundle_dir.rglob("*")):
            tf.add(f, arcname=f.relative_to(bundle_dir).as_posix())
        tf.addfile(extra, io.BytesIO(data) if data is not None else None)
    return path


@pytest.mark.parametrize(
    "name, kind, message",
    [
        ("../evil.txt", tarfile.REGTYPE, r"unsafe member '../evil.txt' \(absolute path or '..' component\)"),
        ("/tmp/evil.txt", tarfile.REGTYPE, r"unsafe member '/tmp/evil.txt'"),
        ("openvino/../../evil.txt", tarfile.REGTYPE, "unsafe member"),
        ("link.onnx", tarfile.SYMTYPE, r"'link.onnx' is a symbolic link to '/etc/passwd'"),
        ("hard.onnx", tarfile.LNKTYPE, r"'hard.onnx' is a hard link"),
        ("fifo", tarfile.FIFOTYPE, "not a regular file or directory"),
        ("model.onnx", tarfile.REGTYPE, "appears twice"),
    ],
)
def test_tar_path_traversal_and_links_refused(bundle_dir: Path, tmp_path: Path, name, kind, message):
    info = tarfile.TarInfo(name)
    info.type = kind
    data = None
    if kind == tarfile.REGTYPE:
        data = b"x"
        info.size = 1
    else:
        info.linkname = "/etc/passwd"
    bad = _tar_with(tmp_path / "bad.tar", bundle_dir, info, data)
    with pytest.raises(BundleError, match=message):
        load_bundle(bad, extract_to=tmp_path / "x")
    assert list((tmp_path / "x").iterdir()) == []  # nothing half-extracted
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_pickle_artifacts_refused(tmp_path: Path, onnx_bytes: bytes):
    m = _manifest()
    for name in ("weights.pt", "bank.pkl", "state.pth", "x.pickle"):
        with pytest.raises(BundleError, match=f"artifact '{name}': suffix .* means pickle"):
            write_bundle(tmp_path / "b", m, {"model.onnx": onnx_bytes, name: b"whatever"})
    pickled = pickle.dumps({"a": 1}, protocol=4)
    with pytest.raises(BundleError, match="'extra.dat' is a Python pickle"):
        write_bundle(tmp_path / "b", m, {"model.onnx": onnx_bytes, "extra.dat": pickled})
    big = pickle.dumps(np.arange(300_000), protocol=2)  # larger than the 1 MiB sniffing window
    with pytest.raises(BundleError, match="'bank.dat' is a Python pickle"):
        write_bundle(tmp_path / "b", m, {"model.onnx": onnx_bytes, "bank.dat": big})
    with pytest.raises(BundleError, match="'model.onnx' is a Python pickle"):
        write_bundle(tmp_path / "b", m, {"model.onnx": pickled})
    with pytest.raises(BundleError, match="'model.onnx': not an ONNX protobuf"):
        write_bundle(tmp_path / "b", m, {"model.onnx": b"\x00\x00garbage"})
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(BundleError, match="'bank.npy': not a plain .npy.*Python objects in dtype"):
        write_bundle(tmp_path / "b", m, {"model.onnx": onnx_bytes, "bank.npy": buf.getvalue()})
    zbuf = io.BytesIO()
    np.savez(zbuf, ok=np.zeros(3), bad=np.array([None], dtype=object))
    with pytest.raises(BundleError, match=r"'bank.npz' has type .npz, which no listed model references"):
        write_bundle(tmp_path / "b", m, {"model.onnx": onnx_bytes, "bank.npz": zbuf.getvalue()})
    assert not (tmp_path / "b").exists()  # nothing half-written
    # A plain numeric .npy is fine.
    ok = io.BytesIO()
    np.save(ok, np.arange(6, dtype=np.float32))
    out = write_bundle(tmp_path / "b", m, {"model.onnx": onnx_bytes, "bank.npy": ok.getvalue()})
    assert np.load(load_bundle(out).path("bank.npy")).sum() == 15


def test_pickle_smuggled_into_a_bundle_is_refused_on_load(bundle_dir: Path):
    # Even with a consistent checksum (someone re-sealed by hand), pickle content never loads.
    pickled = pickle.dumps([1, 2], protocol=2)
    (bundle_dir / "model.onnx").write_bytes(pickled)

    def edit(d):
        import hashlib
        d["artifacts"]["model.onnx"] = {"sha256": hashlib.sha256(pickled).hexdigest(), "bytes": len(pickled)}

    _edit_manifest(bundle_dir, edit, reseal=True)
    with pytest.raises(BundleError, match="'model.onnx' is a Python pickle"):
        load_bundle(bundle_dir)


def test_bad_artifact_names_and_inputs(tmp_path: Path, onnx_bytes: bytes):
    m = _manifest()
    for name, msg in (("../x.onnx", "not a plain relative path"), ("/abs.onnx", "not a plain relative path"),
                      ("engines/a.engine", "is reserved"), ("manifest.yaml", "is reserved")):
        with pytest.raises(BundleError, match=msg):
            write_bundle(tmp_path / "b", m, {"model.onnx": onnx_bytes, name: b"x"})
    with pytest.raises(BundleError, match="source .* is not a file"):
        write_bundle(tmp_path / "b", m, {"model.onnx": tmp_path / "missing.onnx"})
    with pytest.raises(BundleError, match="'fidelity.json.auroc': expected a finite number \\(use null"):
        write_bundle(tmp_path / "b", m, {"model.onnx": onnx_bytes}, fidelity={"auroc": float("nan")})
    with pytest.raises(BundleError, match="'calibration.synthetic_fraction': expected a number in"):
        Calibration(count=10, hash="ab" * 32, synthetic_fraction=1.5)
    int8 = _manifest(precision="int8", calibration=Calibration(count=64, hash="ab" * 32, synthetic_fraction=0.25))
    src = tmp_path / "m.onnx"
    src.write_bytes(onnx_bytes)  # artifacts can be paths as well as bytes
    out = write_bundle(tmp_path / "q", int8, {"model.onnx": src})
    assert load_bundle(out).manifest.calibration.synthetic_fraction == 0.25


# ----------------------------------------------------------------------------------------------
# torch-free
# ----------------------------------------------------------------------------------------------


def test_bundle_loads_and_runs_with_torch_blocked(tmp_path: Path, onnx_bytes: bytes):
    out = write_bundle(tmp_path / "b", _manifest(), {"model.onnx": onnx_bytes}, tar=True)
    proc = run_without_torch(
        f"""
        import numpy as np, onnxruntime as ort
        from edge_ad.runtime import load_bundle, preprocess
        from edge_ad.converters.targets import get_target
        with load_bundle({str(out)!r}) as b:
            x = preprocess(np.zeros((20, 30, 3), np.uint8), b.preprocess_spec)
            sess = ort.InferenceSession(str(b.path("model.onnx")), providers=["CPUExecutionProvider"])
            amap, score = sess.run(None, {{"image": x}})
            assert amap.shape == (1, 1, {H}, {W}) and score.shape == (1,)
        assert get_target("intel-npu").device == "NPU"
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_bundle_type_is_exported():
    import edge_ad.runtime as rt

    assert rt.Bundle is Bundle and rt.load_bundle is load_bundle and rt.BundleError is BundleError
