"""Fault injection on bundles: concurrent manifest updates (threads and processes), processes killed
at deterministic points while calibrating / writing, hostile directory and tar bundles, allow-listed
artifact formats, and Ed25519 signatures.

Every hostile bundle is built from a real bundle: the shared knn run (real EfficientNet-Lite0
weights, real hazelnut shots) converted to onnx-cpu exactly as ``edge-ad convert`` does, and every
check goes through the real loader (``load_bundle`` / ``Detector.load``)."""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from edge_ad.converters.convert import convert
from edge_ad.runtime import BundleError, Detector, load_bundle, read_image, update_manifest, write_bundle
from edge_ad.runtime.bundle import manifest_digest

CATEGORY = "mvtec_hazelnut_256"


@pytest.fixture(scope="module")
def base_bundle(knn_run, real_root, tmp_path_factory) -> Path:
    """A real onnx-cpu bundle (read-only; tests copy it)."""
    out = tmp_path_factory.mktemp("faults_bundle") / "onnx"
    return convert(knn_run, "onnx-cpu", out, precision="fp32", calib_count=8, val_data=real_root, progress=False)


@pytest.fixture
def bundle(base_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def frames(real_root) -> list[np.ndarray]:
    files = sorted((real_root / CATEGORY / "test" / "crack").iterdir())[:2]
    return [read_image(p, "bgr") for p in files]


def _scores(path: Path, frames: list[np.ndarray], **load_kwargs) -> np.ndarray:
    det = Detector.load(path, regions=False, **load_kwargs)
    return np.array([r.score for r in det.predict_batch(frames)])


def _reseal(root: Path, edit) -> None:
    """Edit manifest.yaml and re-seal it by hand, as an attacker with write access could (the seal is unkeyed)."""
    path = root / "manifest.yaml"
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    doc.pop("manifest_sha256", None)
    doc["manifest_sha256"] = manifest_digest(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _list_artifact(root: Path, name: str, data: bytes) -> None:
    """Put ``data`` into the bundle as ``name`` AND list it with a correct hash (a consistent forgery)."""
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    (root / name).write_bytes(data)
    record = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    _reseal(root, lambda d: d["artifacts"].update({name: record}))


# ----------------------------------------------------------------------------------------------
# concurrent manifest updates
# ----------------------------------------------------------------------------------------------

# Each writer owns one manifest field: with a locked read-modify-write no writer's change is lost.
_FIELDS = ("thresholds", "info", "fidelity", "normalization")


def _change(field: str, writer: int, seq: int, base: dict) -> dict:
    if field == "thresholds":
        t = dict(base["thresholds"])
        t["image_threshold"] = float(writer * 1000 + seq)
        return {"thresholds": t}
    if field == "normalization":
        return {"normalization": {**base["normalization"], "num_images": writer * 1000 + seq}}
    return {field: {"writer": writer, "seq": seq}}


def _stamp(field: str, manifest) -> int:
    if field == "thresholds":
        return int(manifest.thresholds.image_threshold)
    if field == "normalization":
        return int(manifest.normalization["num_images"])
    d = getattr(manifest, field)
    return d["writer"] * 1000 + d["seq"]


def test_concurrent_thread_updates_serialise_and_lose_nothing(bundle: Path):
    base = load_bundle(bundle).manifest.to_dict()
    rounds, errors = 6, []

    def writer(i: int) -> None:
        field = _FIELDS[i % len(_FIELDS)]
        try:
            for seq in range(rounds):
                update_manifest(bundle, _change(field, i, seq, base))
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(_FIELDS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = load_bundle(bundle).manifest  # loads: valid YAML, seal and checksums hold
    for i, field in enumerate(_FIELDS):
        assert _stamp(field, final) == i * 1000 + rounds - 1, field  # every writer's last change survived
    assert sorted(p.name for p in bundle.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_many_threads_on_one_field_last_write_wins_whole(bundle: Path):
    base = load_bundle(bundle).manifest.to_dict()
    results, errors = [], []

    def writer(i: int) -> None:
        try:
            for seq in range(3):
                t = dict(base["thresholds"], image_threshold=float(i * 1000 + seq), pixel_threshold=float(i))
                results.append(update_manifest(bundle, {"thresholds": t, "info": {"writer": i, "seq": seq}}))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    final = load_bundle(bundle).manifest
    # One writer's change set, whole: threshold, pixel threshold and info all from the same call.
    assert final.info["writer"] * 1000 + final.info["seq"] == final.thresholds.image_threshold
    assert final.thresholds.pixel_threshold == final.info["writer"]
    assert any(r == final for r in results)


_PROCESS_WRITER = """
import sys
from edge_ad.runtime import load_bundle, update_manifest
bundle, field, writer, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = load_bundle(bundle).manifest.to_dict()
for seq in range(rounds):
    if field == "thresholds":
        update_manifest(bundle, {"thresholds": dict(base["thresholds"], image_threshold=float(writer * 1000 + seq))})
    else:
        update_manifest(bundle, {field: {"writer": writer, "seq": seq}})
print("done")
"""


def test_two_processes_updating_one_bundle(bundle: Path):
    rounds = 8
    procs = [subprocess.Popen([sys.executable, "-c", _PROCESS_WRITER, str(bundle), field, str(i), str(rounds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, field in enumerate(("thresholds", "info"))]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    final = load_bundle(bundle).manifest
    assert _stamp("thresholds", final) == rounds - 1 and _stamp("info", final) == 1000 + rounds - 1


# ----------------------------------------------------------------------------------------------
# processes killed at deterministic points
# ----------------------------------------------------------------------------------------------

_KILL_POINTS_UPDATE = ("manifest-before-write", "manifest-temp-written", "manifest-temp-synced", "manifest-replaced")


def _calibrate_cli(bundle: Path, source: Path, kill: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("EDGE_AD_FAULT_KILL", None)
    if kill:
        env["EDGE_AD_FAULT_KILL"] = kill
    code = ("import sys; from edge_ad.cli.main import main; "
            f"sys.exit(main(['calibrate', {str(bundle)!r}, '--source', {str(source)!r}, '--target-fpr', '0.2', "
            "'--max-frames', '20']))")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_calibrate_killed_at_each_point_leaves_old_or_new_manifest(base_bundle: Path, real_root, tmp_path: Path):
    source = real_root / CATEGORY / "train" / "good"
    def key(t):  # the fitted values (details also carry the calibration time)
        return t.image_threshold, t.pixel_threshold, t.target_fpr

    old = key(load_bundle(base_bundle).thresholds)
    reference = Path(shutil.copytree(base_bundle, tmp_path / "reference"))
    done = _calibrate_cli(reference, source, None)
    assert done.returncode == 0, done.stderr[-2000:]
    new = key(load_bundle(reference).thresholds)
    assert new != old
    expected = {"manifest-before-write": old, "manifest-temp-written": old, "manifest-temp-synced": old,
                "manifest-replaced": new}
    for point in _KILL_POINTS_UPDATE:
        copy = Path(shutil.copytree(base_bundle, tmp_path / point))
        proc = _calibrate_cli(copy, source, point)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        loaded = load_bundle(copy)  # never torn: it loads, seal and checksums hold
        assert key(loaded.thresholds) == expected[point], point
        # A temp file a killed update left behind is ignored by loaders and removed by the next update.
        update_manifest(copy, {"info": {"after": point}})
        assert [p.name for p in copy.iterdir() if p.name.startswith(".")] == []


def test_failed_update_leaves_no_temp_file_and_the_old_manifest(bundle: Path, monkeypatch):
    from edge_ad.runtime.bundle import durable

    before = load_bundle(bundle).manifest

    def disk_full(point: str) -> None:
        if point == "manifest-temp-written":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(durable, "fault_point", disk_full)
    with pytest.raises(OSError, match="No space left"):
        update_manifest(bundle, {"info": {"x": 1}})
    assert [p.name for p in bundle.iterdir() if p.name.startswith(".")] == []
    assert load_bundle(bundle).manifest == before


_REWRITE = """
import sys
from edge_ad.runtime import load_bundle, write_bundle
src, out = sys.argv[1], sys.argv[2]
b = load_bundle(src)
write_bundle(out, b.manifest.replace(method="rewritten"),
             {n: b.path(n) for n in b.manifest.artifacts if n != "fidelity.json"}, fidelity=b.fidelity)
"""


@pytest.mark.parametrize("point, method", [("bundle-before-swap", "knn"), (None, "rewritten")])
def test_write_bundle_killed_before_the_swap_keeps_the_old_bundle(bundle: Path, base_bundle: Path, point, method):
    env = {k: v for k, v in os.environ.items() if k != "EDGE_AD_FAULT_KILL"}
    if point:
        env["EDGE_AD_FAULT_KILL"] = point
    proc = subprocess.run([sys.executable, "-c", _REWRITE, str(base_bundle), str(bundle)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == (-signal.SIGKILL if point else 0), proc.stderr[-2000:]
    assert load_bundle(bundle).manifest.method == method


# ----------------------------------------------------------------------------------------------
# unlisted files and ONNX external data (directory bundles)
# ----------------------------------------------------------------------------------------------


def _externalise(model_path: Path, location: str, scale: float) -> bytes:
    """Rewrite the ONNX model so its largest initializer (times ``scale``) lives in ``location``;
    returns the external data bytes (written beside the model)."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import set_external_data

    model = onnx.load(str(model_path))
    init = max(model.graph.initializer, key=lambda t: numpy_helper.to_array(t).size)
    data = (numpy_helper.to_array(init) * scale).astype(numpy_helper.to_array(init).dtype).tobytes()
    init.ClearField("float_data")
    init.raw_data = data
    set_external_data(init, location=location, offset=0, length=len(data))  # sets data_location EXTERNAL
    init.ClearField("raw_data")
    model_path.write_bytes(model.SerializeToString())
    return data


def _raw_scores(model: Path, spec, frames) -> np.ndarray:
    """What onnxruntime computes from the file as it lies on disk (external data included)."""
    import onnxruntime as ort

    from edge_ad.runtime import preprocess_batch

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = preprocess_batch(frames, spec, color_order="bgr")
    return np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 1]})[1] for i in range(len(x))])


def test_unlisted_onnx_external_data_is_refused_although_it_changes_scores(bundle: Path, frames):
    spec = load_bundle(bundle).preprocess_spec
    before = _raw_scores(bundle / "model.onnx", spec, frames)
    data = _externalise(bundle / "model.onnx", "weights.bin", 3.0)
    (bundle / "weights.bin").write_bytes(data)
    onnx_bytes = (bundle / "model.onnx").read_bytes()
    _reseal(bundle, lambda d: d["artifacts"].update(
        {"model.onnx": {"sha256": hashlib.sha256(onnx_bytes).hexdigest(), "bytes": len(onnx_bytes)}}))
    # The threat is real: onnxruntime reads the unlisted file and the scores change.
    assert not np.allclose(_raw_scores(bundle / "model.onnx", spec, frames), before)
    with pytest.raises(BundleError, match="reads external data from 'weights.bin', which the manifest does not list"):
        load_bundle(bundle)
    with pytest.raises(BundleError, match="weights.bin"):
        Detector.load(bundle)
    # Listed and hashed, the same external data is a legitimate artifact.
    _list_artifact(bundle, "weights.bin", data)
    assert _scores(bundle, frames).shape == (len(frames),)


def test_onnx_external_data_outside_the_bundle_is_refused(bundle: Path, tmp_path: Path):
    data = _externalise(bundle / "model.onnx", "../outside.bin", 1.0)
    (tmp_path / "outside.bin").write_bytes(data)
    onnx_bytes = (bundle / "model.onnx").read_bytes()
    _reseal(bundle, lambda d: d["artifacts"].update(
        {"model.onnx": {"sha256": hashlib.sha256(onnx_bytes).hexdigest(), "bytes": len(onnx_bytes)}}))
    with pytest.raises(BundleError, match="external data at '../outside.bin', outside the bundle"):
        load_bundle(bundle)


@pytest.mark.parametrize("name", ["evil.pkl", "openvino/extra.bin", "notes.txt", "model.onnx.data"])
def test_unlisted_files_in_a_bundle_directory_are_refused(bundle: Path, name: str):
    (bundle / name).parent.mkdir(parents=True, exist_ok=True)
    (bundle / name).write_bytes(b"not checksummed")
    with pytest.raises(BundleError, match=rf"1 file\(s\) not listed in manifest.yaml: '{name}'.*remove them"):
        load_bundle(bundle)


def test_unlisted_links_refused_engines_and_update_temps_allowed(bundle: Path, tmp_path: Path):
    (bundle / "engines").mkdir()
    (bundle / "engines" / "abc.engine").write_bytes(b"device-built engine")
    (bundle / ".manifest.yaml.tmp-0123abcd").write_bytes(b"torn")  # what a killed update leaves
    load_bundle(bundle)
    (tmp_path / "elsewhere").mkdir()
    (bundle / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match="not listed in manifest.yaml: 'linked'"):
        load_bundle(bundle)
    (bundle / "linked").unlink()
    os.link(bundle / "model.onnx", bundle / "hard.onnx")
    with pytest.raises(BundleError, match="not listed in manifest.yaml: 'hard.onnx'"):
        load_bundle(bundle)


# ----------------------------------------------------------------------------------------------
# the artifact allow-list: every type checked by its real format, at write and at load
# ----------------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _zip_with(member: str, data: bytes) -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(member, data)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data)


def _hostile_artifacts() -> list[tuple[str, bytes, str]]:
    import pickle

    p0, p1 = pickle.dumps(_Evil(), protocol=0), pickle.dumps(_Evil(), protocol=1)
    return [
        ("state.dat", p0, r"'state.dat' has type .dat, which no listed model references"),
        ("bank.npy", p1, r"'bank.npy': not a plain .npy"),
        ("extra.json", p0, r"'extra.json': not valid JSON"),
        ("model.pkl.gz", _gzip(p0), r"'model.pkl.gz' has type .gz"),
        ("weights.bin", _zip_with("archive/data.pkl", pickle.dumps(_Evil(), protocol=2)),
         r"'weights.bin' has type .bin, which no listed model references"),
        ("extra.npz", _zip_with("a.npy", p1), r"'extra.npz' has type .npz"),
        ("big.dat", pickle.dumps(list(range(200_000)), protocol=4), r"'big.dat' is a Python pickle"),
        ("nan.json", b'{"auroc": NaN}', r"'nan.json': not valid JSON \(NaN is not JSON\)"),
        ("bad.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00" + b'{"a":1}' + b" " * 9, r"no valid dtype"),
    ]


@pytest.mark.parametrize("index", range(9))
def test_hostile_artifacts_refused_at_load_even_when_listed_and_hashed(bundle: Path, index: int):
    name, data, message = _hostile_artifacts()[index]
    _list_artifact(bundle, name, data)  # a consistent forgery: listed, hashed, re-sealed
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle)


@pytest.mark.parametrize("index", range(9))
def test_hostile_artifacts_refused_at_write(base_bundle: Path, tmp_path: Path, index: int):
    name, data, message = _hostile_artifacts()[index]
    b = load_bundle(base_bundle)
    artifacts = {n: b.path(n) for n in b.manifest.artifacts}
    with pytest.raises(BundleError, match=message):
        write_bundle(tmp_path / "out", b.manifest, {**artifacts, name: data})
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_pickle_replacing_the_model_is_refused_by_format(bundle: Path):
    import pickle

    for protocol in (0, 1):
        _list_artifact(bundle, "model.onnx", pickle.dumps(_Evil(), protocol=protocol))
        with pytest.raises(BundleError, match="'model.onnx': not an ONNX protobuf"):
            load_bundle(bundle)


def test_pickle_zipped_in_a_referenced_bin_is_refused(bundle: Path):
    import pickle

    ir = b'<?xml version="1.0"?>\n<net name="x" version="11"><layers></layers></net>\n'
    _list_artifact(bundle, "extra/model.xml", ir)
    _list_artifact(bundle, "extra/model.bin", _zip_with("archive/data.pkl", pickle.dumps(_Evil(), protocol=2)))
    with pytest.raises(BundleError, match="'extra/model.bin' is a zip archive"):
        load_bundle(bundle)


def test_legitimate_typed_artifacts_load(bundle: Path, tmp_path: Path):
    from safetensors.numpy import save

    _list_artifact(bundle, "bank.npy", _npy(np.arange(12, dtype=np.float32).reshape(3, 4)))
    _list_artifact(bundle, "extra/weights.safetensors", save({"w": np.ones((2, 3), np.float16)}))
    b = load_bundle(bundle)
    assert np.load(b.path("bank.npy")).sum() == 66 and b.has("extra/weights.safetensors")
    # A numeric .npy with bytes appended (somewhere to hide a payload) is refused.
    _list_artifact(bundle, "bank.npy", _npy(np.zeros(3, np.float32)) + b"trailing")
    with pytest.raises(BundleError, match="'bank.npy': the .npy holds bytes beyond its array"):
        load_bundle(bundle)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@pytest.fixture(scope="module")
def openvino_ir(base_bundle: Path, tmp_path_factory) -> tuple[bytes, bytes]:
    """A real OpenVINO IR of the real model (fp32)."""
    from edge_ad.converters.openvino import convert_openvino

    out = convert_openvino(base_bundle / "model.onnx", tmp_path_factory.mktemp("ov"), precision="fp32")
    return Path(out.xml).read_bytes(), Path(out.bin).read_bytes()


def test_openvino_ir_checked_against_its_bin(bundle: Path, openvino_ir):
    xml, weights = openvino_ir
    _list_artifact(bundle, "extra/model.xml", xml)
    _list_artifact(bundle, "extra/model.bin", weights)
    load_bundle(bundle)  # the real IR passes: every Const lies inside its .bin
    _list_artifact(bundle, "extra/model.bin", weights[: len(weights) // 2])
    with pytest.raises(BundleError, match=r"'extra/model.xml': Const layer .* reads bytes \d+\.\.\d+ of "
                                          r"'extra/model.bin', which has \d+"):
        load_bundle(bundle)
    bomb = b'<?xml version="1.0"?><!DOCTYPE net [<!ENTITY a "aaaa">]><net name="x">&a;</net>'
    _list_artifact(bundle, "extra/model.xml", bomb)
    with pytest.raises(BundleError, match="XML with a DTD / entities is refused"):
        load_bundle(bundle)


# ----------------------------------------------------------------------------------------------
# hostile .tar bundles: manifest first, listed artifacts only, capped at their recorded sizes
# ----------------------------------------------------------------------------------------------


def _tar_of(bundle: Path, out: Path, extra: dict[str, bytes] | None = None, mode: str = "w",
            replace: dict[str, bytes] | None = None) -> Path:
    """A tar of the real bundle (manifest first), plus ``extra`` members and ``replace``d contents."""
    import tarfile

    names = ["manifest.yaml"] + sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*")
                                       if p.is_file() and p.name != "manifest.yaml")
    with tarfile.open(out, mode) as tf:
        for name in names:
            data = (replace or {}).get(name, (bundle / name).read_bytes())
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return out


def _assert_refused_and_clean(tar: Path, tmp_path: Path, message: str) -> None:
    dest = tmp_path / "extract"
    with pytest.raises(BundleError, match=message):
        load_bundle(tar, extract_to=dest)
    assert list(dest.iterdir()) == []  # nothing (half-)extracted is left


@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_tar_members_are_refused(base_bundle: Path, tmp_path: Path, fmt: str):
    work = Path(shutil.copytree(base_bundle, tmp_path / "src"))
    with open(work / "fill.npy", "wb") as f:
        f.truncate(64 << 20)  # 64 MiB of holes: a few KB in the tar, 64 MiB once extracted
    tar = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", str(tar), "-C", str(work), "."],
                   check=True, capture_output=True)
    assert tar.stat().st_size < 8 << 20
    _assert_refused_and_clean(tar, tmp_path, "'./fill.npy' is a sparse file")


def test_tar_gz_bomb_member_is_refused_before_it_is_written(base_bundle: Path, tmp_path: Path):
    tar = _tar_of(base_bundle, tmp_path / "bomb.tar.gz", {"zeros.bin": bytes(64 << 20)}, mode="w:gz")
    assert tar.stat().st_size < 8 << 20  # the real bundle compressed, plus ~64 KB for 64 MiB of zeros
    _assert_refused_and_clean(tar, tmp_path, "member 'zeros.bin' is not listed in manifest.yaml")


def test_unlisted_tar_member_is_refused(base_bundle: Path, tmp_path: Path):
    import pickle

    tar = _tar_of(base_bundle, tmp_path / "evil.tar", {"evil.pkl": pickle.dumps(_Evil(), protocol=0)})
    _assert_refused_and_clean(tar, tmp_path, "member 'evil.pkl' is not listed in manifest.yaml")


def test_oversized_listed_member_is_refused(base_bundle: Path, tmp_path: Path):
    grown = (base_bundle / "calibration.json").read_bytes() + b" " * 4096
    tar = _tar_of(base_bundle, tmp_path / "big.tar", replace={"calibration.json": grown})
    recorded = load_bundle(base_bundle).manifest.artifacts["calibration.json"].bytes
    _assert_refused_and_clean(tar, tmp_path, rf"member 'calibration.json' has {len(grown)} bytes, manifest.yaml "
                                             rf"says {recorded}")


def test_huge_manifest_member_is_refused(base_bundle: Path, tmp_path: Path):
    text = (base_bundle / "manifest.yaml").read_bytes() + b"#" * (2 << 20)
    tar = _tar_of(base_bundle, tmp_path / "m.tar", replace={"manifest.yaml": text})
    _assert_refused_and_clean(tar, tmp_path, r"member 'manifest.yaml' has \d+ bytes, more than the 1048576 allowed")


@pytest.mark.parametrize("kind, name, message", [
    ("reg", "../evil.txt", r"unsafe member '../evil.txt'"),
    ("reg", "/tmp/evil.txt", r"unsafe member '/tmp/evil.txt'"),
    ("sym", "model2.onnx", r"'model2.onnx' is a symbolic link to 'model.onnx'"),
    ("lnk", "model2.onnx", r"'model2.onnx' is a hard link to 'model.onnx'"),
    ("chr", "dev", r"'dev' is not a regular file or directory"),
])
def test_tar_traversal_links_and_devices_refused(base_bundle: Path, tmp_path: Path, kind, name, message):
    import tarfile

    tar = _tar_of(base_bundle, tmp_path / "t.tar")
    with tarfile.open(tar, "a") as tf:
        info = tarfile.TarInfo(name)
        info.type = {"reg": tarfile.REGTYPE, "sym": tarfile.SYMTYPE, "lnk": tarfile.LNKTYPE,
                     "chr": tarfile.CHRTYPE}[kind]
        info.linkname = "model.onnx" if kind in ("sym", "lnk") else ""
        tf.addfile(info, io.BytesIO(b"") if kind == "reg" else None)
    _assert_refused_and_clean(tar, tmp_path, message)
    assert not (tmp_path / "evil.txt").exists()


def test_tar_with_engines_loads_and_scores_like_the_directory(base_bundle: Path, tmp_path: Path, frames):
    tar = _tar_of(base_bundle, tmp_path / "ok.tar.gz", {"engines/abc.engine": b"engine bytes"}, mode="w:gz")
    with load_bundle(tar) as b:
        assert (b.engines_dir / "abc.engine").read_bytes() == b"engine bytes"
    np.testing.assert_allclose(_scores(tar, frames), _scores(base_bundle, frames), rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# signatures: the seal is unkeyed; an Ed25519 signature says who produced the bundle
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    from edge_ad.runtime.bundle import generate_signing_key

    d = tmp_path_factory.mktemp("keys")
    generate_signing_key(d / "plant.pem", d / "plant.pub")
    generate_signing_key(d / "other.pem", d / "other.pub")
    return {"private": d / "plant.pem", "public": d / "plant.pub", "other": d / "other.pub",
            "other_private": d / "other.pem"}


@pytest.fixture
def signed(base_bundle: Path, tmp_path: Path, keys) -> Path:
    b = load_bundle(base_bundle)
    return write_bundle(tmp_path / "signed", b.manifest, {n: b.path(n) for n in b.manifest.artifacts},
                        sign_key=keys["private"])


def test_signed_bundle_loads_with_its_key_and_foreign_or_unsigned_ones_are_refused(signed: Path, keys, frames,
                                                                                    base_bundle: Path):
    assert (signed / "manifest.sig").is_file()
    np.testing.assert_allclose(_scores(signed, frames, verify_key=keys["public"]), _scores(base_bundle, frames))
    with pytest.raises(BundleError, match="is signed by another key .* refusing it"):
        Detector.load(signed, verify_key=keys["other"])
    with pytest.raises(BundleError, match=r"is not signed \(no manifest.sig\) but a verify key was given"):
        Detector.load(base_bundle, verify_key=keys["public"])
    loaded = load_bundle(signed)  # without a key signatures are not checked ...
    with pytest.raises(BundleError, match="is signed by another key"):
        Detector.load(loaded, verify_key=keys["other"])  # ... until a loaded Bundle is given one
    assert Detector.load(loaded, verify_key=keys["public"], regions=False).bundle is loaded


def test_resealed_manifest_passes_the_seal_but_not_the_signature(signed: Path, keys):
    _reseal(signed, lambda d: d["thresholds"].update(image_threshold=1e9))  # what the unkeyed seal cannot stop
    assert load_bundle(signed).thresholds.image_threshold == 1e9
    with pytest.raises(BundleError, match="manifest.sig signs another manifest .* the manifest changed after signing"):
        load_bundle(signed, verify_key=keys["public"])
    # Forging the signed digest too does not help: the signature no longer verifies.
    import json

    sig = json.loads((signed / "manifest.sig").read_text())
    sig["manifest_sha256"] = yaml.safe_load((signed / "manifest.yaml").read_text())["manifest_sha256"]
    (signed / "manifest.sig").write_text(json.dumps(sig))
    with pytest.raises(BundleError, match="does not verify with"):
        load_bundle(signed, verify_key=keys["public"])


def test_update_manifest_drops_or_renews_the_signature(signed: Path, keys):
    update_manifest(signed, {"info": {"site": "line 3"}}, sign_key=keys["private"])
    assert load_bundle(signed, verify_key=keys["public"]).manifest.info["site"] == "line 3"
    with pytest.raises(BundleError, match="not an unencrypted PEM private key"):
        update_manifest(signed, {"info": {"site": "elsewhere"}}, sign_key=keys["public"])
    assert load_bundle(signed, verify_key=keys["public"]).manifest.info["site"] == "line 3"  # nothing changed
    update_manifest(signed, {"info": {"site": "line 4"}})  # no key: the stale signature is removed
    assert not (signed / "manifest.sig").exists()
    with pytest.raises(BundleError, match="is not signed"):
        load_bundle(signed, verify_key=keys["public"])


def test_signed_tar_bundle(base_bundle: Path, tmp_path: Path, keys):
    import tarfile

    b = load_bundle(base_bundle)
    tar = write_bundle(tmp_path / "s", b.manifest, {n: b.path(n) for n in b.manifest.artifacts},
                       sign_key=keys["private"], tar=True)
    with tarfile.open(tar) as tf:
        assert tf.getnames()[:2] == ["manifest.yaml", "manifest.sig"]
    with load_bundle(tar, verify_key=keys["public"]) as loaded:
        assert loaded.manifest == b.manifest.replace(created=loaded.manifest.created,
                                                     sdk_version=loaded.manifest.sdk_version)
    with pytest.raises(BundleError, match="signed by another key"):
        load_bundle(tar, verify_key=keys["other"], extract_to=tmp_path / "x")
    assert list((tmp_path / "x").iterdir()) == []  # refused before any artifact was extracted
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    with pytest.raises(BundleError, match="is not an unencrypted PEM public key"):
        load_bundle(tar, verify_key=bad)
    with pytest.raises(ValueError, match="verify_key needs verify=True"):
        load_bundle(tar, verify=False, verify_key=keys["public"])


def test_cli_convert_signs_and_python_load_verifies(knn_run, real_root, tmp_path: Path, keys):
    from edge_ad.cli.main import main

    out = tmp_path / "cli_signed"
    code = main(["convert", str(knn_run), "--target", "onnx-cpu", "--precision", "fp32", "--calib-count", "8",
                 "--out", str(out), "--sign-key", str(keys["private"])])
    assert code == 0 and (out / "manifest.sig").is_file()
    assert load_bundle(out, verify_key=keys["public"]).manifest.precision == "fp32"
    with pytest.raises(BundleError, match="signed by another key"):
        load_bundle(out, verify_key=keys["other"])


def test_cli_run_refuses_a_foreign_bundle(signed: Path, keys, real_root):
    folder = real_root / CATEGORY / "test" / "crack"
    base = [sys.executable, "-m", "edge_ad.cli.main", "run", str(signed), "--source", str(folder),
            "--max-frames", "2", "--no-progress"]
    bad = subprocess.run(base + ["--verify-key", str(keys["other"])], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "signed by another key" in bad.stderr
    good = subprocess.run(base + ["--verify-key", str(keys["public"])], capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr[-2000:]


def test_runtime_imports_and_loads_without_cryptography(signed: Path, keys):
    from torch_blocker import run_without_torch

    proc = run_without_torch(f"""
        import importlib.abc, sys
        class _NoCrypto(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "cryptography":
                    raise ImportError("blocked: cryptography")
        sys.meta_path.insert(0, _NoCrypto())
        from edge_ad.runtime import Detector, load_bundle
        load_bundle({str(signed)!r})
        try:
            load_bundle({str(signed)!r}, verify_key={str(keys["public"])!r})
        except ImportError as e:
            print("ImportError:", e)
        assert "cryptography" not in sys.modules and "torch" not in sys.modules
    """)
    assert proc.returncode == 0, proc.stderr
    assert "needs the 'cryptography' package: pip install 'edge-ad[sign]'" in proc.stdout
