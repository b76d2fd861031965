"""Statistics, plots and the markdown report of a benchmark output folder.

Reads the summary dict the engine wrote (tasks, roles, arms, runs, tuning, stages, ...) and each run's
`runs/<task>/<arm>/n<size>/rep<r>/predictions.npz`; answers the study's questions per task with bootstrap
intervals over test patients and replicates. The parts, one job each:

- `load`: reading and checking the predictions files, grouped per (task, arm, size) over replicates;
- `analysis`: the statistics (intervals, paired differences, Holm families, best baseline on validation);
- `sections`, `markdown`, `text`: the prose and tables of report.md and the terminal table;
- `plots`: the figures.

The questions name roles of summary["roles"], never arm names, so renaming an arm changes no answer.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ehrjax.atomic import atomic_write
from ehrjax.benchmark.report import analysis, load, markdown, plots
from ehrjax.benchmark.report.analysis import ALPHA, UNRESOLVED
from ehrjax.benchmark.report.markdown import format_results_table

__all__ = ["ALPHA", "UNRESOLVED", "compute_stats", "format_results_table", "write_report"]


def compute_stats(summary: dict[str, Any], out_dir: Path, n_boot: int = 1000) -> dict[str, Any]:
    """Per task, arm and size: AUROC, AP, PR-AUC and Brier with 95% bootstrap CIs over patients and replicates,
    both ceilings, validation AUROC and log loss, convergence; per task the Holm families of paired AUROC
    differences (reference, Q1 against the best baseline, Q2 table pairs), tuning, sizing and the seed study's
    checks; per arm its parameters. JSON-ready.

    Raises a one-line ValueError naming the file when a predictions file is unreadable or disagrees with the
    others of its task.
    """
    return analysis.compute(summary, load.load(summary, Path(out_dir)), n_boot)


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays to Python, non-finite floats to null, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(summary: dict[str, Any], out_dir: Path, n_boot: int = 1000) -> dict[str, Any]:
    """Compute the statistics (stored as summary["stats"]) and write plots/, summary.json and report.md.

    Only process 0 writes (`ehrjax.train.rundir.is_writer`); every process computes and returns the stats.
    Each file is written atomically, report.md last, and a stale report.md is removed first: if anything fails
    (an unreadable predictions file, a plot, a stage record that does not add up) the error propagates and no
    report claims success. Adds summary["stages"]["report"] (statistics and plots) unless the caller set it.
    """
    from ehrjax.train.rundir import is_writer

    start = time.perf_counter()
    out_dir = Path(out_dir)
    writer = is_writer()
    if writer:
        (out_dir / "report.md").unlink(missing_ok=True)
    data = load.load(summary, out_dir)
    stats = analysis.compute(summary, data, n_boot)
    summary["stats"] = stats
    if not writer:
        return stats
    stage_rows = markdown.stage_rows(summary["stages"]) if summary.get("stages") else None
    written = plots.write_plots(summary, data, stats, out_dir, stage_rows)
    if "report" not in summary.setdefault("stages", {}):
        wall = time.perf_counter() - start
        summary["stages"]["report"] = {"wall_s": wall, "compile_s": 0.0, "train_s": 0.0, "skipped": False}
    text = json.dumps(_jsonable(summary), indent=2, allow_nan=False)
    atomic_write(out_dir / "summary.json", lambda p: p.write_text(text))
    report = markdown.document(summary, stats, written)
    atomic_write(out_dir / "report.md", lambda p: p.write_text(report))
    return stats
