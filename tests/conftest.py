"""Shared fixtures. Real data lives beside the repository in ../shared/data/real (never copied in)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_data_root() -> Path:
    """Root of the shared real-image datasets (MVTec layout); EDGE_AD_REAL_DATA overrides it."""
    override = os.environ.get("EDGE_AD_REAL_DATA")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_root() -> Path:
    root = real_data_root()
    if not root.is_dir():
        pytest.fail(
            f"real data not found at {root}: clone the repository beside shared/ "
            "or set EDGE_AD_REAL_DATA to the folder holding mvtec_hazelnut_256/ etc."
        )
    return root


@pytest.fixture(scope="session")
def knn_run(real_root, tmp_path_factory) -> Path:
    """One tiny knn run shared by the conversion, engine and runtime tests: real EfficientNet-Lite0
    weights, 4 real hazelnut shots, 64 px input (fits and converts in seconds). Read-only for tests."""
    from edge_ad.training import train

    out = tmp_path_factory.mktemp("shared_runs") / "knn"
    return train("knn", "efficientnet_lite0", real_root, "mvtec_hazelnut_256", out, shots=4, image_size=64,
                 device="cpu", progress=False)


@pytest.fixture(scope="session")
def onnx_bundle(knn_run, real_root, tmp_path_factory) -> Path:
    """The knn run as one onnx-cpu FP32 bundle with thresholds (held-out hazelnut good images), shared
    by the runtime tests. Read-only: a test that changes a bundle copies it first (shutil.copytree)."""
    from edge_ad.converters.convert import convert

    return convert(knn_run, "onnx-cpu", tmp_path_factory.mktemp("shared_bundles") / "onnx", precision="fp32",
                   calib_count=8, val_data=real_root, progress=False)


@pytest.fixture(scope="session")
def ov_bundle(knn_run, tmp_path_factory) -> Path:
    """The knn run as one intel-cpu (OpenVINO) FP32 bundle, shared by the runtime tests. Read-only like
    ``onnx_bundle``: copy it before changing it."""
    from edge_ad.converters.convert import convert

    return convert(knn_run, "intel-cpu", tmp_path_factory.mktemp("shared_bundles") / "ov", precision="fp32",
                   calib_count=8, progress=False)
