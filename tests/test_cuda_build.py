"""The optional CUDA preprocessing kernel COMPILES (there is no GPU here: it never runs in these tests).

Skipped without nvcc. nvcc is looked up as ``$EDGE_AD_NVCC``, then ``nvcc`` on PATH, then the
pip wheels' layout (``nvidia/cu13/bin/nvcc`` from ``pip install nvidia-cuda-nvcc nvidia-cuda-crt
nvidia-nvvm nvidia-cuda-runtime nvidia-cuda-cccl`` into any directory on ``sys.path``). What is
checked:

* ``preprocess_cuda.cu`` compiles for Jetson Orin (sm_87) and the object holds the kernel;
* ``bindings.cpp`` compiles with ``-DEDGE_AD_WITH_CUDA`` (the nanobind entry points of the GPU path);
* CMake enables the kernel when given a CUDA compiler and leaves it out with ``-DEDGE_AD_CUDA=OFF``
  (the CPU-only build of every other test is the unchanged default path);
* CMake finds nvcc in ``/usr/local/cuda/bin`` without it on PATH (stock JetPack);
* the default architectures follow the compiler version (``cmake/EdgeAdCudaArchs.cmake``), and
  the kernel compiles for every architecture the list gives this nvcc (Xavier's sm_72 is gone
  from CUDA 13, which the old fixed ``72;87`` asked for).
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
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set EDGE_AD_NVCC or put nvcc on PATH)")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


@needs_nvcc
def test_kernel_compiles_for_orin(tmp_path):
    obj = tmp_path / "preprocess_cuda.o"
    proc = _run([NVCC, "-std=c++17", "-O3", "-c", "-arch=sm_87", "-I", str(CSRC), str(CSRC / "preprocess_cuda.cu"),
                 "-o", str(obj)])
    assert proc.returncode == 0, proc.stderr
    symbols = _run(["nm", "-C", str(obj)]).stdout if shutil.which("nm") else ""
    if symbols:
        assert "resize_normalize" in symbols and "edge_ad::preprocess_cuda" in symbols


@needs_nvcc
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


@needs_nvcc
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


def _archs(version: str, processor: str) -> str:
    proc = _run(["cmake", f"-DVERSION={version}", f"-DPROCESSOR={processor}", "-P",
                 str(ROOT / "cmake" / "EdgeAdCudaArchs.cmake")])
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.strip()  # message() without a mode prints to stderr


def test_default_architectures_follow_the_compiler_version():
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    assert _archs("11.4", "aarch64") == "72;87"   # JetPack 5: Xavier + Orin
    assert _archs("12.6", "aarch64") == "72;87"   # JetPack 6
    assert _archs("13.0", "aarch64") == "87;110"  # JetPack 7: no Volta (Xavier), Thor is sm_110
    assert _archs("11.7", "x86_64") == "75-real;80-real;86"  # no 8.9 / 9.0 before CUDA 11.8
    assert "89-real;90" in _archs("12.4", "x86_64") and "100" not in _archs("12.4", "x86_64")
    assert _archs("13.0", "x86_64").endswith("100-real;120")


def _nvcc_version() -> str:
    out = _run([NVCC, "--version"]).stdout
    import re

    return re.search(r"release (\d+\.\d+)", out).group(1)


@needs_nvcc
@pytest.mark.parametrize("processor", ["aarch64", "x86_64"])
def test_kernel_compiles_for_every_default_architecture_of_this_nvcc(tmp_path, processor):
    """What `pip install` builds on a Jetson / x86 with this nvcc: every listed architecture compiles."""
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    version = _nvcc_version()
    archs = [a.split("-")[0] for a in _archs(version, processor).split(";")]
    gencode = [f"--generate-code=arch=compute_{a},code=sm_{a}" for a in archs]
    proc = _run([NVCC, "-std=c++17", "-O1", "-c", *gencode, "-I", str(CSRC), str(CSRC / "preprocess_cuda.cu"),
                 "-o", str(tmp_path / "k.o")])
    assert proc.returncode == 0, (archs, proc.stderr)
    if float(version) >= 13.0:  # the old fixed Jetson list asked for sm_72, which CUDA 13 cannot build
        old = _run([NVCC, "-c", "-arch=sm_72", "-I", str(CSRC), str(CSRC / "preprocess_cuda.cu"),
                    "-o", str(tmp_path / "old.o")])
        assert old.returncode != 0


@pytest.mark.skipif(not Path("/usr/local/cuda/bin/nvcc").is_file(), reason="no /usr/local/cuda/bin/nvcc")
def test_cmake_finds_nvcc_in_usr_local_cuda_without_path(tmp_path):
    """Stock JetPack installs nvcc in /usr/local/cuda/bin and does not put it on PATH."""
    if shutil.which("cmake") is None:
        pytest.skip("no cmake")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if not (Path(p) / "nvcc").exists())
    cmake = shutil.which("cmake")
    proc = _run([cmake, "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}"],
                env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "/usr/local/cuda/bin/nvcc" in out and ("kernel enabled" in out or "no CUDA toolkit" in out), out


def test_gpu_check_script_without_cuda_says_so():
    """benchmarks/gpu_check.py is ready for a CUDA machine; here it checks its arguments and stops."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: run the script itself")
    script = ROOT / "benchmarks" / "gpu_check.py"
    proc = _run([sys.executable, str(script), "--no-build"])
    assert proc.returncode == 2 and "no CUDA" in proc.stderr, proc.stderr
    bad = _run([sys.executable, str(script), "--data", str(ROOT / "nowhere")])
    assert bad.returncode == 2 and "pass --data ROOT" in bad.stderr
