"""GPU check of the CUDA path without TensorRT (< 5 minutes on one CUDA GPU).

    python benchmarks/gpu_check.py [--data ../shared/data/real] [--out docs/GPU_CHECK.md] [--no-build]

What it does, in order, and writes as markdown (``--out``) with the GPU named:

1. builds the preprocessing extension with the CUDA kernel (``pip install --no-deps
   --no-build-isolation -e .`` with ``CMAKE_CUDA_ARCHITECTURES=native``; ``--no-build`` skips it);
2. compares the CUDA preprocessing kernel (:func:`edge_ad.runtime.cuda.preprocess_cuda_into`, through
   its persistent scratch buffer) with the CPU path (:func:`edge_ad.runtime.preprocess_batch`) on
   random frames (colour / grey, up- / down-scaling, bilinear / area, ROI views with a row stride,
   float32 / float16) and on real frames: the max difference in 8-bit levels (1 level =
   ``1 / 255 / std`` normalised units) must be <= 1;
3. times both (median of ``--iterations`` runs, one 1080p frame to 224 x 224);
4. runs one FoundAD training step with AMP on CUDA (``edge_ad.train(..., steps=1, amp=True)``).

Needs torch with CUDA (device buffers and the stream come from torch: no TensorRT, no cuda-python).
Without a CUDA GPU it checks its arguments and the data, then exits 2 with "no CUDA".
Results go to stdout and ``--out``; the exit code is 1 when a check fails.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = "no CUDA: torch.cuda.is_available() is False (this check needs an NVIDIA GPU with a CUDA build of torch)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "real"),
                        help="dataset root (MVTec layout) for real frames and the training step")
    parser.add_argument("--category", default="mvtec_hazelnut_256")
    parser.add_argument("--out", default=None, help="markdown report file (default: stdout only)")
    parser.add_argument("--iterations", type=int, default=20, help="timed repetitions per path (median)")
    parser.add_argument("--no-build", action="store_true", help="use the installed extension as it is")
    parser.add_argument("--build-note", default=None, help=argparse.SUPPRESS)  # set by the rebuilding parent
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be >= 1")
    if not (Path(args.data) / args.category / "test").is_dir():
        parser.error(f"no {args.category}/test under {args.data}: pass --data ROOT (MVTec layout)")
    return args


def build_extension() -> str:
    """Rebuild the extension with the CUDA kernel for this machine's GPU; returns the build log tail."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT),
           "--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=native",
           "--config-settings=build.verbose=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise RuntimeError(f"building the extension failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return next((line for line in (proc.stdout + proc.stderr).splitlines() if "CUDA preprocessing" in line),
                "(no CMake CUDA status line in the build log)")


class TorchCuda:
    """The :class:`edge_ad.runtime.cuda.CudaApi` subset the CUDA preprocessing needs, on torch."""

    name = "torch"

    def __init__(self, torch: Any, device: int = 0) -> None:
        self.torch, self.device = torch, device
        self._buffers: dict[int, Any] = {}

    def device_alloc(self, nbytes: int) -> int:
        buf = self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device=f"cuda:{self.device}")
        self._buffers[buf.data_ptr()] = buf
        return buf.data_ptr()

    def device_free(self, address: int) -> None:
        del self._buffers[address]

    def stream_handle(self, stream: Any) -> int:
        return int(stream.cuda_stream)

    def stream_synchronize(self, stream: Any) -> None:
        stream.synchronize()

    @contextmanager
    def activate(self) -> Iterator[None]:
        with self.torch.cuda.device(self.device):
            yield


def _levels(gpu: np.ndarray, cpu: np.ndarray, std: tuple[float, float, float]) -> float:
    """Max |gpu - cpu| in 8-bit input levels (per channel: normalised difference * 255 * std)."""
    diff = np.abs(gpu.astype(np.float64) - cpu.astype(np.float64))
    return float(max((diff[:, c] * 255.0 * std[c]).max() for c in range(3)))


def _frames(rng: np.random.Generator) -> list[tuple[str, list[np.ndarray], str]]:
    big = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    return [
        ("random 1080p BGR", [big], "bgr"),
        ("random 480x640 RGB x4", [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(4)], "rgb"),
        ("random 100x90 grey (upscale)", [rng.integers(0, 256, (100, 90), dtype=np.uint8)], "gray"),
        ("ROI view of 1080p (row stride)", [big[100:900, 300:1500]], "bgr"),
    ]


def check_preprocessing(torch: Any, data: Path, category: str, iterations: int) -> tuple[list[str], bool]:
    """Markdown rows comparing GPU with CPU preprocessing, and whether all are within 1 level."""
    from edge_ad.runtime import PreprocessSpec, preprocess_batch, read_image
    from edge_ad.runtime.cuda import CudaScratch, preprocess_cuda_into
    from edge_ad.runtime.preprocessing import cuda_preprocess_available

    if not cuda_preprocess_available():
        return ["extension has no CUDA kernel (built without nvcc?) or no GPU visible"], False
    api = TorchCuda(torch)
    stream = torch.cuda.Stream()
    scratch = CudaScratch(api, stream)
    rng = np.random.default_rng(0)
    real = [read_image(p, "bgr") for p in sorted((data / category / "test").glob("*/*.png"))[:8]]
    cases = _frames(rng) + [(f"real {category} x{len(real)}", real, "bgr")]
    rows = ["| frames | resize | dtype | max diff (8-bit levels) | within 1 level |", "|---|---|---|---|---|"]
    ok = True
    for resize in ("bilinear", "area"):
        spec = PreprocessSpec(224, 224, resize=resize)
        for label, frames, order in cases:
            for dtype in (np.float32, np.float16):
                cpu = preprocess_batch(frames, spec, color_order=order, dtype=dtype)
                out = torch.empty((len(frames), 3, 224, 224), dtype=getattr(torch, np.dtype(dtype).name),
                                  device="cuda")
                with torch.cuda.stream(stream):
                    preprocess_cuda_into(frames, spec, out.data_ptr(), dtype, scratch, color_order=order)
                stream.synchronize()
                levels = _levels(out.cpu().numpy(), cpu, spec.std)
                within = levels <= 1.0
                ok &= within
                rows.append(f"| {label} | {resize} | {np.dtype(dtype).name} | {levels:.4f} | "
                            f"{'yes' if within else 'NO'} |")
    # Timing: one 1080p frame -> 224 x 224 float32, median of `iterations`.
    spec = PreprocessSpec(224, 224)
    frame = cases[0][1]
    out = torch.empty((1, 3, 224, 224), dtype=torch.float32, device="cuda")
    cpu_t, gpu_t = [], []
    for _ in range(iterations):
        t0 = time.perf_counter()
        preprocess_batch(frame, spec)
        cpu_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.cuda.stream(stream):
            preprocess_cuda_into(frame, spec, out.data_ptr(), np.float32, scratch)
        stream.synchronize()
        gpu_t.append(time.perf_counter() - t0)
    c, g = statistics.median(cpu_t) * 1e3, statistics.median(gpu_t) * 1e3
    rows += ["", "| 1080p BGR -> 224x224 float32 | median ms | ratio |", "|---|---|---|",
             f"| CPU (`preprocess_batch`) | {c:.3f} | 1.00x |",
             f"| GPU (`preprocess_cuda_into`, upload included) | {g:.3f} | {c / g:.2f}x |"]
    scratch.release()
    return rows, ok


def foundad_amp_step(data: Path, category: str) -> tuple[str, bool]:
    """One AMP training step of FoundAD on CUDA (EfficientNet-Lite0 backbone, 4 shots, 64 px)."""
    from edge_ad.training import train

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = train("foundad", "efficientnet_lite0", data, category, Path(tmp) / "run", shots=4, image_size=64,
                    device="cuda", steps=1, amp=True, progress=False)
        seconds = time.perf_counter() - t0
        ok = (Path(run) / "model.safetensors").is_file()
    status = "ok" if ok else "NO model written"
    return f"FoundAD + EfficientNet-Lite0, 1 step, AMP on CUDA: {status} ({seconds:.1f} s)", ok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        return 2
    if not args.no_build:
        note = build_extension()
        # The rebuilt module is importable only in a new process: run the checks there.
        cmd = [sys.executable, __file__, "--no-build", "--build-note", note, "--data", args.data, "--category",
               args.category, "--iterations", str(args.iterations)] + (["--out", args.out] if args.out else [])
        return subprocess.run(cmd).returncode
    gpu = torch.cuda.get_device_name(0)
    lines = ["# GPU check (benchmarks/gpu_check.py)", "",
             f"GPU: {gpu}, CUDA {torch.version.cuda}, torch {torch.__version__}, Python {platform.python_version()}",
             "", f"Build: {args.build_note or 'installed extension used as it is (--no-build)'}", ""]
    rows, pre_ok = check_preprocessing(torch, Path(args.data), args.category, args.iterations)
    step, step_ok = foundad_amp_step(Path(args.data), args.category)
    lines += ["## CUDA preprocessing vs CPU", "", *rows, "", "## Training", "", step, ""]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    return 0 if pre_ok and step_ok else 1


if __name__ == "__main__":
    sys.exit(main())
