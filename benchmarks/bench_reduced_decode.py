"""Reduced-size decode vs full decode of image folders: accuracy change and speed, in one process.

    python benchmarks/bench_reduced_decode.py --bundle DIR [--data ../shared/data/real] \
        [--category bsdata_pitting] [--rounds 3] [--iterations 150] [--json out.json]

1. Accuracy. Every test image of ``--category`` (MVTec layout: ``test/<defect>/`` and masks in
   ``ground_truth/``) is streamed twice through one detector (``map_resolution="lazy"``), with
   full and with reduced decode (``reduced_decode=True``). Results of both are in the stored
   frame's pixels, so each score and each frame-size map is compared as is: image AUROC, pixel
   AUROC (maps vs the full-size masks), verdicts at the bundle's threshold, median / largest
   score change (relative to the threshold), and whether every reduced-decode map is at the
   stored frame's size.
2. Speed. ``--rounds`` rounds alternate :func:`edge_ad.runtime.benchmark.benchmark` (lossless
   stream of ``test/good``, cycled) with full and reduced decode: stage p50, end-to-end FPS, and
   the process CPU time per streamed frame (``time.process_time`` around a plain stream of the
   same frames: what reduced decode saves on a busy box even when FPS is bound by the engine).

The bundle of docs/MULTI_CAMERA.md is ``benchmarks/bench_multicam.py --work DIR``'s
``DIR/bundle_b1`` (224 px knn on EfficientNet-Lite0, intel-cpu INT8).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def _stream_scores(det, folder: Path, reduced: bool) -> list:
    with det.stream(str(folder), reduced_decode=reduced) as s:
        return [(r.score, r.is_anomalous, r.raw_map, r.decode_scale) for r in s]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real"))
    ap.add_argument("--category", default="bsdata_pitting")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from edge_ad.metrics import image_auroc, pixel_auroc
    from edge_ad.runtime import Detector, read_mask
    from edge_ad.runtime.benchmark import CycledSource, benchmark

    det = Detector.load(args.bundle, map_resolution="lazy")
    root = Path(args.data) / args.category
    labels, masks, out = [], [], {False: [], True: []}
    for folder in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        for f in files:
            labels.append(int(folder.name != "good"))
            gt = root / "ground_truth" / folder.name / f"{f.stem}_mask.png"
            masks.append(read_mask(gt) if gt.is_file() else None)
        for reduced in (False, True):
            out[reduced] += _stream_scores(det, folder, reduced)
    thr = det.image_threshold
    full_s = np.array([r[0] for r in out[False]])
    red_s = np.array([r[0] for r in out[True]])
    shapes_ok = all(r[2].shape == f[2].shape for r, f in zip(out[True], out[False]))
    pix = {}
    for reduced in (False, True):
        ms = [m if m is not None else np.zeros(r[2].shape, bool) for m, r in zip(masks, out[reduced])]
        # frames differ in size: every pixel of every frame as one (1, 1, P) image
        pix[reduced] = pixel_auroc(np.concatenate([m.ravel() for m in ms])[None, None],
                                   np.concatenate([r[2].ravel() for r in out[reduced]])[None, None])
        out[reduced] = [(s, v, None, k) for s, v, _, k in out[reduced]]  # drop the maps
    acc = {
        "images": len(labels), "decode_scales": sorted({r[3] for r in out[True]}),
        "image_auroc_full": image_auroc(labels, full_s), "image_auroc_reduced": image_auroc(labels, red_s),
        "pixel_auroc_full": pix[False], "pixel_auroc_reduced": pix[True],
        "same_verdicts": int(sum(a[1] == b[1] for a, b in zip(out[False], out[True]))),
        "image_threshold": thr, "score_range": [float(full_s.min()), float(full_s.max())],
        "median_abs_score_change_rel": float(np.median(np.abs(red_s - full_s) / np.abs(full_s))),
        "max_abs_score_change": float(np.max(np.abs(red_s - full_s))),
        "maps_at_stored_size": shapes_ok,
    }
    print(json.dumps(acc), flush=True)

    good = str(root / "test" / "good")
    n = 20 + args.iterations
    speed = {False: [], True: []}
    for r in range(args.rounds):
        for reduced in (False, True):
            rep = benchmark(det, good, warmup=20, iterations=args.iterations, progress=False, reduced_decode=reduced)
            src = CycledSource(good, n)
            c0 = time.process_time()
            with det.stream(src, reduced_decode=reduced) as s:
                frames = sum(1 for _ in s)
            cpu_ms = (time.process_time() - c0) * 1e3 / frames
            row = {"round": r, "reduced": reduced, "frames": rep["frames"], "engine_fps": rep["engine_fps"],
                   "end_to_end_fps": rep["end_to_end_fps"], "cpu_ms_per_frame": cpu_ms,
                   "stages_p50_ms": {k: v["p50"] for k, v in rep["stages"].items()}}
            speed[reduced].append(row)
            print(json.dumps(row), flush=True)
    med = {}
    for reduced, rows in speed.items():
        m = {k: statistics.median(x[k] for x in rows) for k in ("engine_fps", "end_to_end_fps", "cpu_ms_per_frame")}
        for k in ("capture", "preprocess", "infer", "postprocess"):
            m[k] = statistics.median(x["stages_p50_ms"][k] for x in rows)
        med["reduced" if reduced else "full"] = m
    print(f"\n{'decode':<9}{'capture':>9}{'prepro':>8}{'infer':>8}{'postpro':>9}{'bare FPS':>10}{'e2e FPS':>9}"
          f"{'share':>7}{'CPU ms/frame':>14}   (p50 ms; medians of {args.rounds} rounds)")
    for k, m in med.items():
        print(f"{k:<9}{m['capture']:>9.2f}{m['preprocess']:>8.2f}{m['infer']:>8.2f}{m['postprocess']:>9.2f}"
              f"{m['engine_fps']:>10.0f}{m['end_to_end_fps']:>9.0f}{100 * m['end_to_end_fps'] / m['engine_fps']:>6.0f}%"
              f"{m['cpu_ms_per_frame']:>14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"accuracy": acc, "speed": speed, "medians": med}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
