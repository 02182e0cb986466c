"""Benchmark frame preprocessing: C++ extension vs numpy reference vs an OpenCV + numpy baseline.

    python benchmarks/bench_preprocess.py --frame 1920x1080 --size 224 --repeats 200 --threads 0

Every variant produces the same (1, 3, H, W) float32 RGB-normalised tensor from a BGR uint8 frame.
The baseline is what applications typically write: ``cv2.resize`` then numpy ``astype(float32)``,
``/ 255``, ``- mean``, ``/ std``, transpose to CHW, contiguous. Timings are medians over
``--repeats`` rounds; the variants are interleaved round by round so that background load hits
them alike. The ratio column is baseline time / variant time (> 1: faster than the baseline). The
"cv2.resize alone" row (uint8 HWC, no normalisation) only shows where the baseline's time goes.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # noqa: E402  (run from a checkout)

from edge_ad.runtime import PreprocessSpec, cv2_available, extension_available, preprocess  # noqa: E402
from edge_ad.runtime.preprocess_spec import RESIZE_MODES, effective_resize  # noqa: E402


def _parse_wxh(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected WxH, e.g. 1920x1080, got {text!r}") from exc
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return w, h


def _parse_size(text: str) -> tuple[int, int]:
    """'224' -> (224, 224); 'WxH' -> (W, H)."""
    if "x" in text.lower():
        return _parse_wxh(text)
    try:
        n = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected N or WxH, got {text!r}") from exc
    if n <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return n, n


def _cv2_flag(cv2, spec: PreprocessSpec, frame_hw: tuple[int, int]) -> int:
    """The OpenCV interpolation matching ``spec.resize`` for frames of (height, width) ``frame_hw``."""
    mode = effective_resize(spec.resize, frame_hw, spec.size)
    return cv2.INTER_LINEAR if mode == "bilinear" else cv2.INTER_AREA


def _cv2_baseline(spec: PreprocessSpec, frame_hw: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray]:
    import cv2

    flag = _cv2_flag(cv2, spec, frame_hw)
    mean = np.asarray(spec.mean, np.float32)
    std = np.asarray(spec.std, np.float32)

    def run(frame: np.ndarray) -> np.ndarray:
        x = cv2.resize(frame, (spec.width, spec.height), interpolation=flag)
        x = x[:, :, ::-1].astype(np.float32) / 255.0  # BGR -> RGB
        x = (x - mean) / std
        return np.ascontiguousarray(x.transpose(2, 0, 1))[None]

    return run


def _variants(
    spec: PreprocessSpec, threads: int, frame_hw: tuple[int, int]
) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
    out32 = np.empty((1, 3, spec.height, spec.width), np.float32)
    out16 = np.empty((1, 3, spec.height, spec.width), np.float16)
    v: list[tuple[str, Callable[[np.ndarray], np.ndarray]]] = []
    if cv2_available():
        import cv2

        flag = _cv2_flag(cv2, spec, frame_hw)
        v.append(("cv2.resize + numpy (baseline)", _cv2_baseline(spec, frame_hw)))
        # For scale: the resize alone, uint8 HWC out, no normalisation / layout change.
        size = (spec.width, spec.height)
        v.append(("  (cv2.resize alone, uint8 HWC)", lambda f: cv2.resize(f, size, interpolation=flag)))
    if extension_available():
        v.append(("extension, 1 thread", lambda f: preprocess(f, spec, out=out32, num_threads=1)))
        label = "auto threads" if threads == 0 else f"threads={threads}"
        v.append((f"extension, {label}", lambda f: preprocess(f, spec, out=out32, num_threads=threads)))
        v.append((f"extension, {label}, float16", lambda f: preprocess(f, spec, out=out16, num_threads=threads)))
    v.append(("numpy reference", lambda f: preprocess(f, spec, out=out32, backend="reference")))
    return v


def bench(
    frame: np.ndarray, spec: PreprocessSpec, repeats: int, threads: int, warmup: int = 5
) -> list[tuple[str, float]]:
    variants = _variants(spec, threads, frame.shape[:2])
    # The numpy reference is ~100x slower: give it fewer rounds so the run stays short.
    slow_every = max(1, repeats // 20)
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for _ in range(warmup):
        for _, fn in variants:
            fn(frame)
    for r in range(repeats):
        for name, fn in variants:
            if name == "numpy reference" and r % slow_every:
                continue
            t0 = time.perf_counter()
            fn(frame)
            times[name].append(time.perf_counter() - t0)
    return [(name, float(np.median(t)) * 1e3) for name, t in times.items()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frame", type=_parse_wxh, default=(1920, 1080), help="source frame WxH (default 1920x1080)")
    ap.add_argument("--size", type=_parse_size, default=(224, 224), help="model input N or WxH (default 224)")
    ap.add_argument("--repeats", type=int, default=200, help="timed rounds per variant (default 200)")
    ap.add_argument("--threads", type=int, default=0, help="extension threads for the multi-thread rows (0 = auto)")
    ap.add_argument("--modes", nargs="+", default=["auto", "bilinear", "area"], choices=list(RESIZE_MODES),
                    help="resize modes to time (default: all; 'auto' is the default mode, area when downscaling)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.repeats <= 0 or args.threads < 0:
        ap.error("--repeats must be > 0 and --threads >= 0")

    fw, fh = args.frame
    ow, oh = args.size
    frame = np.random.default_rng(args.seed).integers(0, 256, (fh, fw, 3), dtype=np.uint8)
    info = [f"frame {fw}x{fh} BGR uint8 -> 3x{oh}x{ow} float32", f"repeats {args.repeats} (median)",
            f"{platform.machine()}, {os.cpu_count()} CPUs", f"numpy {np.__version__}"]
    if cv2_available():
        import cv2

        info.append(f"cv2 {cv2.__version__} ({cv2.getNumThreads()} threads)")
    if extension_available():
        from edge_ad.runtime import _preprocess

        info.append(f"extension auto threads {_preprocess.auto_threads()}")
    else:
        info.append("extension NOT built (pip install --no-build-isolation -e .)")
    print("# " + "; ".join(info))
    for mode in args.modes:
        spec = PreprocessSpec(oh, ow, resize=mode)
        rows = bench(frame, spec, args.repeats, args.threads)
        base = dict(rows).get("cv2.resize + numpy (baseline)")
        print(f"\n{mode}")
        print(f"  {'variant':<36} {'median ms':>10} {'vs baseline':>12}")
        for name, ms in rows:
            ratio = f"{base / ms:10.2f}x" if base else "-"
            print(f"  {name:<36} {ms:>10.3f} {ratio:>12}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
