"""Streaming vs bare engine on a real-image video, and flat memory over a long synthetic stream.

    python benchmarks/bench_stream.py [--bundle DIR] [--target onnx-cpu] [--image-size 256] \
        [--data ../shared/data/real] [--category mvtec_hazelnut_256] [--video-frames 400] \
        [--frames 10000] [--json out.json]

1. Throughput. A bundle (``--bundle``, or a tiny knn run on EfficientNet-Lite0 trained on 4 real
   good images and converted for ``--target``, both in a temp dir: needs the training extras) and
   an MJPG video made from the category's real images (cycled to ``--video-frames`` frames, temp
   dir). :func:`edge_ad.runtime.benchmark.benchmark` measures, in one process, the bare engine
   (``engine_fps``) and the lossless stream over the video (``end_to_end_fps``: decode, preprocess,
   infer, postprocess at the frame's resolution, results to the consumer), ``--rounds`` times
   alternately. PASS when the median ratio stream / engine is >= 90 %.
2. Memory. ``--frames`` synthetic 480x640 frames streamed (lossless: every frame inferred and
   postprocessed) with a consumer that does nothing; resident memory (``/proc/self/statm``)
   sampled every 500 frames. Prints start (after 200 warm-up frames), end and peak RSS; FLAT
   when peak - start < 16 MiB.

Exit status 1 when either verdict fails. ``--frames 0`` / ``--video-frames 0`` skip a part.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

THROUGHPUT_FLOOR = 0.90
RSS_GROWTH_LIMIT_MB = 16.0


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc; falls back to the peak elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_bundle(data: Path, category: str, target: str, image_size: int, work: Path) -> Path:
    """Tiny knn run (4 real good shots) -> bundle for ``target`` (the conftest fixture's recipe).

    Runs in a child process, so torch (training, export) never loads into this one and the RSS
    figures below are the torch-free runtime's, as on the device.
    """
    code = (
        "import sys; from pathlib import Path; from edge_ad.training import train; "
        "from edge_ad.converters.convert import convert; "
        f"data, work = Path({str(data)!r}), Path({str(work)!r}); "
        f"run = train('knn', 'efficientnet_lite0', data, {category!r}, work / 'knn', shots=4, "
        f"image_size={image_size}, device='cpu', progress=False); "
        f"convert(run, {target!r}, work / {target!r}, precision='fp32', calib_count=8, val_data=data, "
        "progress=False)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, stdout=subprocess.DEVNULL)
    return work / target


def make_video(data: Path, category: str, frames: int, path: Path) -> Path:
    """An MJPG .avi of the category's real train/good and test images, cycled to ``frames`` frames."""
    from edge_ad.runtime import read_image, require_cv2

    cv2 = require_cv2("write the benchmark video")
    root = data / category
    paths = sorted((root / "train" / "good").glob("*.png"))[:40] + sorted((root / "test").glob("*/*.png"))
    if not paths:
        raise FileNotFoundError(f"no .png images under {root}/train/good or {root}/test")
    images = [read_image(p, "bgr") for p in paths]
    h, w = images[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30.0, (w, h))
    if not writer.isOpened():
        raise OSError("this OpenCV cannot write MJPG .avi files")
    for i in range(frames):
        img = images[i % len(images)]
        writer.write(img if img.shape[:2] == (h, w) else cv2.resize(img, (w, h)))
    writer.release()
    return path


def throughput(bundle: Path, video: Path, frames: int, warmup: int, rounds: int) -> dict:
    """``rounds`` alternating (bare engine, stream) measurements on one detector; verdict on the medians.

    Alternating and taking medians keeps a burst of load from another process from landing on only
    one side of the comparison.
    """
    import statistics

    from edge_ad.runtime import Detector
    from edge_ad.runtime.benchmark import benchmark, format_report

    det = Detector.load(bundle)
    reports = []
    for r in range(rounds):
        # Same count for the bare engine calls and the measured stream frames.
        reports.append(benchmark(det, str(video), warmup=warmup, iterations=max(1, frames - warmup), progress=False))
        print(f"round {r + 1}/{rounds}: engine {reports[-1]['engine_fps']:.1f} fps, stream "
              f"{reports[-1]['end_to_end_fps']:.1f} fps, ratio {reports[-1]['stream_vs_engine']:.3f}")
    engine = statistics.median(x["engine_fps"] for x in reports)
    stream = statistics.median(x["end_to_end_fps"] for x in reports)
    ratio = statistics.median(x["stream_vs_engine"] for x in reports)
    print(format_report(reports[-1]))
    ok = ratio >= THROUGHPUT_FLOOR
    print(f"\nmedian of {rounds} rounds: streaming {stream:.1f} fps vs bare engine {engine:.1f} fps: ratio "
          f"{100 * ratio:.1f} % -> {'PASS' if ok else 'FAIL'} (floor {100 * THROUGHPUT_FLOOR:.0f} %)")
    return {"rounds": reports, "engine_fps": engine, "end_to_end_fps": stream, "ratio": ratio, "pass": ok}


def memory(bundle: Path, frames: int) -> dict:
    from tqdm import tqdm

    from edge_ad.runtime import Detector
    from edge_ad.runtime.benchmark import synthetic_frames

    det = Detector.load(bundle)
    samples: list[tuple[int, float]] = []
    start = None
    # Lossless, so every one of the frames really goes through the whole pipeline (a line-speed
    # stream over an in-memory source would drop most of them unread).
    with det.stream(synthetic_frames(frames), lossless=True) as stream:
        for k, _ in enumerate(tqdm(stream, total=frames, desc="rss stream", unit="frame")):
            if k == 200:
                start = _rss_mb()
                samples.append((k, start))
            elif (k % 500 == 0 and k > 200) or k == frames - 1:
                samples.append((k, _rss_mb()))
    end = samples[-1][1] if samples else _rss_mb()  # at the last frame, before the stream frees its buffers
    stats = stream.stats
    start = start if start is not None else samples[0][1] if samples else end
    peak = max([end] + [v for _, v in samples])
    flat = peak - start < RSS_GROWTH_LIMIT_MB  # peak, not end: a transient bulge counts too
    print(f"\n{frames} synthetic 480x640 frames, lossless: captured {stats.captured}, delivered {stats.delivered}, "
          f"dropped {stats.dropped}, {stats.fps:.1f} fps")
    print(f"RSS start {start:.1f} MiB (after 200 frames), end {end:.1f} MiB (last frame), peak {peak:.1f} MiB, growth "
          f"{peak - start:+.1f} MiB at peak -> {'FLAT' if flat else 'GROWING'} (limit {RSS_GROWTH_LIMIT_MB:.0f} MiB)")
    return {"frames": frames, "start_mb": start, "end_mb": end, "peak_mb": peak, "samples": samples, "flat": flat,
            "stats": stats.to_dict()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="existing bundle (default: make a tiny knn one)")
    parser.add_argument("--target", default="onnx-cpu", help="target of the bundle made here (onnx-cpu, intel-cpu)")
    parser.add_argument("--image-size", type=int, default=256, help="model input of the bundle made here (pixels)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
    parser.add_argument("--category", default="mvtec_hazelnut_256")
    parser.add_argument("--video-frames", type=int, default=400, help="frames of the real-image video (0 = skip)")
    parser.add_argument("--warmup", type=int, default=30, help="stream results / engine calls not measured")
    parser.add_argument("--rounds", type=int, default=5, help="alternating engine / stream measurements (median)")
    parser.add_argument("--frames", type=int, default=10000, help="frames of the memory run (0 = skip)")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    args = parser.parse_args(argv)

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        work = Path(tmp)
        bundle = args.bundle or make_bundle(args.data, args.category, args.target, args.image_size, work)
        print(f"bundle: {bundle}")
        if args.video_frames > 0:
            video = make_video(args.data, args.category, args.video_frames, work / "line.avi")
            out["throughput"] = throughput(bundle, video, args.video_frames, args.warmup, args.rounds)
        if args.frames > 0:
            out["memory"] = memory(bundle, args.frames)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    ok = out.get("throughput", {}).get("pass", True) and out.get("memory", {}).get("flat", True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
