"""`pip install .` must build the C++ extension and ship one `edge_ad` namespace from the top-level folders."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation reuses the test environment's scikit-build-core/nanobind: no network,
    # and the same toolchain `pip install .` uses.
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels = list(out.glob("edge_ad-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_maps_top_level_folders_into_one_namespace(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"edge_ad"}, f"generic top-level names leak into site-packages: {top_level}"
    for module in ("edge_ad/runtime/__init__.py", "edge_ad/converters/__init__.py", "edge_ad/calibration/__init__.py",
                   "edge_ad/backbones/__init__.py", "edge_ad/cli/main.py"):
        assert module in names, module
    assert any(n.startswith("edge_ad/runtime/_preprocess") and n.endswith((".so", ".pyd")) for n in names), \
        "the C++ preprocessing extension is missing from the wheel"
    assert not any("/csrc/" in n for n in names), "C++ sources should not ship in the wheel"


def test_wheel_extension_imports_and_runs(wheel: Path, tmp_path: Path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = (
        # Drop the development checkout's editable-install finder so the unpacked wheel is what imports.
        "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in type(f).__module__];"
        "import numpy as np, edge_ad.runtime.preprocessing as p, edge_ad;"
        f"assert edge_ad.__file__.startswith({str(tmp_path)!r}), edge_ad.__file__;"
        "assert p.extension_available();"
        "o = p.preprocess(np.full((40, 50, 3), 128, np.uint8), edge_ad.runtime.PreprocessSpec(16, 16), backend='extension');"
        "print(o.shape)"
    )
    # Run from tmp_path with it first on sys.path, so the unpacked wheel (not the source tree) is imported.
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(1, 3, 16, 16)"
