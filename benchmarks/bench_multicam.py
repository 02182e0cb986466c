"""Many cameras through one detector: total throughput with a batch-1 vs a batch-N bundle, in one run.

    python benchmarks/bench_multicam.py [--data ../shared/data/real] [--category bsdata_pitting] \
        [--image-size 224] [--sources 4] [--batch 4] [--iterations 160] [--work DIR] [--json out.json]

Trains a knn run on EfficientNet-Lite0 (8 real good shots of ``--category``; needs the training
extras), converts it to ``intel-cpu`` INT8 twice, at static batch 1 and at ``--batch`` (same
calibration set), then, in this one process, runs :func:`edge_ad.runtime.benchmark.benchmark` on
the category's ``test/good`` images (large JPEG frames, cycled to the frame count) for: one camera
on the batch-1 bundle (stream vs bare engine), ``--sources`` cameras on the batch-1 bundle, and
``--sources`` cameras on the batch-N bundle. Prints one JSON line per configuration (per-camera FPS
and capture-to-decision p50 / p99, batch fill, per-stage p50) and the batch-N / batch-1 total
throughput ratio. Bundles are kept in ``--work`` (re-used when present).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
    ap.add_argument("--category", default="bsdata_pitting")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=160)
    ap.add_argument("--work", default=None, help="folder for the run and bundles (default: a temp dir)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from edge_ad.converters.convert import convert
    from edge_ad.runtime import Detector
    from edge_ad.runtime.benchmark import benchmark
    from edge_ad.training import train

    work = Path(args.work or tempfile.mkdtemp(prefix="edge_ad_multicam_"))
    run = work / "run"
    if not (run / "config.yaml").exists():
        train("knn", "efficientnet_lite0", args.data, args.category, run, shots=8, image_size=args.image_size,
              device="cpu", progress=False)
    dets = {}
    for b in sorted({1, args.batch}):
        out = work / f"bundle_b{b}"
        if not (out / "manifest.yaml").exists():
            convert(run, "intel-cpu", out, precision="int8", calib_count=32, progress=False, batch=b)
        dets[b] = Detector.load(out)
    source = str(Path(args.data) / args.category / "test" / "good")
    rows = []
    for b, n in ((1, 1), (1, args.sources), (args.batch, args.sources)):
        r = benchmark(dets[b], source, warmup=20, iterations=args.iterations, sources=n, progress=False)
        row = {"batch": b, "sources": n, "frames": r["frames"], "engine_fps": r["engine_fps"],
               "total_fps": r["end_to_end_fps"], "stream_vs_engine": r["stream_vs_engine"],
               "batch_fill": r["batch_fill"], "stages_p50_ms": {k: v["p50"] for k, v in r["stages"].items()},
               "cameras": {c: {"fps": v["fps"], "c2d_p50_ms": v["capture_to_decision"]["p50"],
                               "c2d_p99_ms": v["capture_to_decision"]["p99"]} for c, v in r["sources"].items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    b1, bn = rows[1]["total_fps"], rows[2]["total_fps"]
    summary = {"sources": args.sources, "batch": args.batch, "total_fps_batch1": b1, "total_fps_batchN": bn,
               "batchN_vs_batch1": bn / b1 if b1 and bn else None,
               "single_camera_stream_vs_engine": rows[0]["stream_vs_engine"]}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
