"""Fault injection on bundles: concurrent manifest updates (threads and processes), processes killed
at deterministic points while calibrating / writing, hostile directory and tar bundles, allow-listed
artifact formats, and Ed25519 signatures.

Every hostile bundle is built from a real bundle: the shared knn run (real EfficientNet-Lite0
weights, real hazelnut shots) converted to onnx-cpu exactly as ``edge-ad convert`` does, and every
check goes through the real loader (``load_bundle`` / ``Detector.load``)."""
from __future__ import annotations

import hashlib
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
