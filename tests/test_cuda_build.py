"""The optional CUDA preprocessing kernel COMPILES (there is no GPU here: it never runs in these tests).

Skipped without nvcc. nvcc is looked up as ``$EDGE_AD_NVCC``, then ``nvcc`` on PATH, then the
pip wheels' layout (``nvidia/cu13/bin/nvcc`` from ``pip install nvidia-cuda-nvcc nvidia-cuda-crt
nvidia-nvvm nvidia-cuda-runtime nvidia-cuda-cccl`` into any directory on ``sys.path``). What is
checked:

* ``preprocess_cuda.cu`` compiles for Jetson Orin (sm_87) and the object holds the kernel;
* ``bindings.cpp`` compiles with ``-DEDGE_AD_WITH_CUDA`` (the nanobind entry points of the GPU path);
* CMake enables the kernel when given a CUDA compiler and leaves it out with ``-DEDGE_AD_CUDA=OFF``
  (the CPU-only build of every other test is the unchanged default path).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "runtime" / "csrc"


def _find_nvcc() -> str | None:
    env = os.environ.get("EDGE_AD_NVCC")
    if env:
        return env if Path(env).is_file() else None
    found = shutil.which("nvcc")
    if found:
        return found
    for entry in sys.path:
        for rel in ("nvidia/cu13/bin/nvcc", "nvidia/cuda_nvcc/bin/nvcc"):
            cand = Path(entry) / rel
            if cand.is_file():
                return str(cand)
    return None


NVCC = _find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set EDGE_AD_NVCC or put nvcc on PATH)")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def test_kernel_compiles_for_orin(tmp_path):
    obj = tmp_path / "preprocess_cuda.o"
    proc = _run([NVCC, "-std=c++17", "-O3", "-c", "-arch=sm_87", "-I", str(CSRC), str(CSRC / "preprocess_cuda.cu"),
                 "-o", str(obj)])
    assert proc.returncode == 0, proc.stderr
    symbols = _run(["nm", "-C", str(obj)]).stdout if shutil.which("nm") else ""
    if symbols:
        assert "resize_normalize" in symbols and "edge_ad::preprocess_cuda" in symbols


def test_bindings_compile_with_the_cuda_entry_points():
    nanobind = pytest.importorskip("nanobind")
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    include = Path(nanobind.include_dir())
    proc = _run([cxx, "-std=c++17", "-fsyntax-only", "-DEDGE_AD_WITH_CUDA=1", "-I", str(CSRC), "-I", str(include),
                 "-I", str(include.parent / "ext" / "robin_map" / "include"), "-I", sysconfig.get_paths()["include"],
                 str(CSRC / "bindings.cpp")])
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("enabled", [True, False])
def test_cmake_enables_the_kernel_only_with_a_cuda_compiler(tmp_path, enabled):
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    nvcc = Path(NVCC).resolve()
    cmd = ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}",
           f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCUDAToolkit_ROOT={nvcc.parent.parent}",
           f"-DEDGE_AD_CUDA={'ON' if enabled else 'OFF'}"]
    proc = _run(cmd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "CMake Error" not in out, out  # configure AND generate (default architectures)
    if enabled:
        # "enabled", or the warning that keeps the CPU build when nvcc comes without the CUDA runtime library.
        assert "CUDA preprocessing kernel enabled" in out or "no CUDA toolkit (cudart)" in out, out
    else:
        assert "CUDA preprocessing kernel enabled" not in out and "CUDA compiler found" not in out
