"""CPU budget: streaming throughput and stage times for several engine-thread budgets, in one process.

    python benchmarks/bench_cpu_budget.py --bundle DIR [--source ../shared/data/real/bsdata_pitting/test/good] \
        [--budgets auto,1,2] [--rounds 3] [--iterations 150] [--map-resolution lazy] [--full-decode] \
        [--json out.json]

For each budget (``auto`` = :func:`edge_ad.runtime.cpu_budget.plan_cpu_budget`'s default, or a
number of engine threads) one :class:`~edge_ad.runtime.Detector` is loaded with
``engine_threads=``; then ``--rounds`` rounds run :func:`edge_ad.runtime.benchmark.benchmark`
(bare engine + lossless stream over ``--source``, cycled) for every budget in turn, so load from
other jobs falls on all budgets alike. Prints one JSON line per run and a table of medians over
the rounds: stage p50 (capture, preprocess, infer, postprocess), bare-engine FPS at that budget,
end-to-end FPS, its share of the same budget's bare engine and of the fastest bare engine of the
run (the engine on its own, with the cores to itself). The bundle of docs/MULTI_CAMERA.md is the
batch-1 bundle ``benchmarks/bench_multicam.py --work DIR`` writes (``DIR/bundle_b1``).
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _budget(text: str) -> int | None:
    return None if text == "auto" else int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
                                            / "bsdata_pitting" / "test" / "good"))
    ap.add_argument("--budgets", default="auto,1,2", help="comma-separated: auto or engine threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--map-resolution", default="lazy", choices=("frame", "model", "lazy"))
    ap.add_argument("--full-decode", action="store_true", help="decode the JPEGs in full (default: reduced decode)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from edge_ad.runtime import Detector
    from edge_ad.runtime.benchmark import benchmark

    names = args.budgets.split(",")
    dets = {n: Detector.load(args.bundle, map_resolution=args.map_resolution, engine_threads=_budget(n))
            for n in names}
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for n in names:
            rep = benchmark(dets[n], args.source, warmup=args.warmup, iterations=args.iterations, progress=False,
                            reduced_decode=not args.full_decode)
            row = {"round": r, "budget": n, "cpu_budget": rep["cpu_budget"], "frames": rep["frames"],
                   "engine_fps": rep["engine_fps"], "end_to_end_fps": rep["end_to_end_fps"],
                   "stages_p50_ms": {k: v["p50"] for k, v in rep["stages"].items()}}
            runs[n].append(row)
            print(json.dumps(row), flush=True)
    med = {}
    for n, rows in runs.items():
        m = {"engine_fps": statistics.median(x["engine_fps"] for x in rows),
             "end_to_end_fps": statistics.median(x["end_to_end_fps"] for x in rows),
             "stream_vs_own_engine": statistics.median(x["end_to_end_fps"] / x["engine_fps"] for x in rows)}
        for k in ("capture", "preprocess", "infer", "postprocess"):
            m[k] = statistics.median(x["stages_p50_ms"][k] for x in rows)
        m["cpu_budget"] = rows[0]["cpu_budget"]
        med[n] = m
    best = max(m["engine_fps"] for m in med.values())
    print(f"\n{'budget':<8}{'engine thr':>11}{'pre thr':>8}{'capture':>9}{'prepro':>8}{'infer':>8}{'postpro':>9}"
          f"{'bare FPS':>10}{'e2e FPS':>9}{'vs own':>8}{'vs best':>9}   (p50 ms; medians of {args.rounds} rounds)")
    for n, m in med.items():
        m["stream_vs_best_engine"] = m["end_to_end_fps"] / best
        b = m["cpu_budget"]
        print(f"{n:<8}{b['engine_threads']!s:>11}{b['preprocess_threads']:>8}{m['capture']:>9.2f}"
              f"{m['preprocess']:>8.2f}{m['infer']:>8.2f}{m['postprocess']:>9.2f}{m['engine_fps']:>10.0f}"
              f"{m['end_to_end_fps']:>9.0f}{100 * m['stream_vs_own_engine']:>7.0f}%"
              f"{100 * m['stream_vs_best_engine']:>8.0f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": med}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
