"""benchmarks/vs_anomalib.py: argument rules, the mean rows of its table and the phase timer.

The benchmark itself needs the anomalib side venv and ~30 CPU minutes; these tests cover the parts
that decide what the table says without either."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("vs_anomalib", ROOT / "benchmarks" / "vs_anomalib.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_student_needs_its_knn_teacher_and_runs_after_it(capsys) -> None:
    vs = _module()
    with pytest.raises(SystemExit):
        vs.parse_args(["--data", "d", "--out", "o", "--models", "foundad", "student"])
    assert "add knn to --models" in capsys.readouterr().err
    args = vs.parse_args(["--data", "d", "--out", "o", "--models", "student", "patchcore", "knn"])
    assert args.models == ["patchcore", "knn", "student"]
    defaults = vs.parse_args(["--data", "d", "--out", "o"])
    assert defaults.models == ["patchcore", "padim", "knn", "foundad", "student"]
    assert defaults.student_steps == 100 and defaults.foundad_options == []
    over = vs.parse_args(["--data", "d", "--out", "o", "--foundad-option", "projector_dim=384"])
    assert {**vs.FOUNDAD_OPTIONS, **dict(over.foundad_options)}["projector_dim"] == 384


def _row(category: str, model: str, i: float, p: float, di: float) -> dict:
    return {"category": category, "model": model, "metrics": {"image_auroc": i, "pixel_auroc": p, "aupro": 0.5},
            "int8_delta": {"image_auroc": di, "pixel_auroc": 0.0}, "timing": {"engine": 1.0, "e2e": 2.0}}


def test_table_mean_rows_average_each_model_over_the_categories() -> None:
    vs = _module()
    rows = [_row("a", "knn", 0.60, 0.90, 0.0), _row("a", "foundad", 0.70, 0.80, -0.02),
            _row("b", "knn", 0.90, 0.70, 0.01), _row("b", "foundad", 0.75, 0.60, 0.0)]
    lines = vs.format_table(rows).splitlines()
    assert "| mean | knn | 75.0 | 80.0 | 50.0 | +0.5 | +0.0 | | |" in lines
    assert "| mean | foundad | 72.5 | 70.0 | 50.0 | -1.0 | +0.0 | | |" in lines
    # One category: no mean rows (they would repeat it).
    assert not any(line.startswith("| mean") for line in vs.format_table(rows[:2]).splitlines())


def test_phases_sum_repeated_phases_and_account_for_the_rest() -> None:
    vs = _module()
    phases = vs.Phases()
    for _ in range(2):
        with phases.time("fit"):
            time.sleep(0.01)
    assert phases.seconds["fit"] >= 0.02
    with pytest.raises(RuntimeError), phases.time("convert"):  # a failing phase is still timed
        raise RuntimeError("boom")
    table = phases.table(total=10.0)
    assert table.splitlines()[2].startswith("| fit | 0 | 0 % |") and "| other" in table.splitlines()[-1]


def test_seed_spread_table_sits_beside_knn_and_seeds_parse() -> None:
    vs = _module()
    patchcore = _row("a", "patchcore", 0.50, 0.82, 0.0)
    patchcore["seed_metrics"] = {s: {"image_auroc": i, "pixel_auroc": p}
                                 for s, i, p in (("0", 0.50, 0.82), ("1", 0.5625, 0.815), ("2", 0.50, 0.814))}
    padim = _row("a", "padim", 0.50, 0.84, 0.0)
    padim["seed_metrics"] = {"0": padim["metrics"]}  # one seed: no spread row
    rows = [patchcore, padim, _row("a", "knn", 0.625, 0.888, 0.0)]
    lines = vs.format_seed_table(rows).splitlines()
    assert lines[2] == "| a | patchcore | 0, 1, 2 | 50.0 / 50.0 / 56.2 | 81.4 / 81.5 / 82.0 | 62.5 / 88.8 |"
    assert len(lines) == 3 and vs.format_seed_table([padim]) == ""
    assert vs.parse_args(["--data", "d", "--out", "o"]).anomalib_seeds == [0]
    assert vs.parse_args(["--data", "d", "--out", "o", "--anomalib-seeds", "3", "1"]).anomalib_seeds == [3, 1]
    with pytest.raises(SystemExit):
        vs.parse_args(["--data", "d", "--out", "o", "--anomalib-seeds", "1", "1"])
