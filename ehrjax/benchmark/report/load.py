"""Loading and checking a benchmark's predictions files, grouped per (task, arm, size) over replicates.

Every run of one task scores the same validation and test patients in the same order
(`runs/<task>/<arm>/n<size>/rep<r>/predictions.npz`). Each file is checked on its own (keys, shapes, labels,
probabilities, the two ceiling columns) and against the task's first file (patients, splits, labels, ceiling
columns); any problem is a one-line ValueError that names the file. The ceilings are read from the columns:
`outcome_p` (the generator's true risk) and `outcome_p_visible` (the risk given the visible record), both NaN
on real data, where there is no ceiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

KEYS = ("patient_id", "split", "label", "probability", "logit", "outcome_p", "outcome_p_visible")
CEILING_COLUMNS = ("outcome_p", "outcome_p_visible")
SPLITS = ("val", "test")


@dataclass(frozen=True)
class Cell:
    """The replicates of one (task, arm, size), sorted by replicate: test float[R, n_test], val float[R, n_val]."""

    replicates: list[int]
    test: np.ndarray
    val: np.ndarray
    runs: list[dict[str, Any]]


@dataclass(frozen=True)
class TaskData:
    """One task's checked predictions: the shared test/val labels, the ceiling columns on the test patients
    (None where the data are real) and every (arm, size) cell."""

    name: str
    patient_id: np.ndarray
    labels: np.ndarray
    val_labels: np.ndarray
    ceilings: dict[str, np.ndarray | None]
    cells: dict[tuple[str, int], Cell]
    first: str
    runs_checked: int


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def read_predictions(out_dir: Path, rel: str) -> dict[str, np.ndarray]:
    """Every row of one predictions.npz, checked; a one-line ValueError naming the file if it is unusable."""
    try:
        with np.load(Path(out_dir) / rel, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key]) for key in KEYS}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise ValueError(f"predictions {rel}: cannot read it as the expected .npz ({_one_line(err)})") from err
    n = len(arrays["patient_id"])
    if any(a.shape != (n,) for a in arrays.values()):
        shapes = ", ".join(f"{k} {a.shape}" for k, a in arrays.items())
        raise ValueError(f"predictions {rel}: expected equal 1-D arrays, got {shapes}")
    split = arrays["split"].astype(str)
    for name in SPLITS:
        if not (split == name).any():
            raise ValueError(f"predictions {rel}: no row has split '{name}'")
    if not np.isin(split, SPLITS).all():
        raise ValueError(f"predictions {rel}: split must be 'val' or 'test', got {sorted(set(split) - set(SPLITS))}")
    arrays["split"] = split
    if not np.isin(arrays["label"], (0, 1)).all():
        raise ValueError(f"predictions {rel}: labels must be 0 or 1, got {np.unique(arrays['label'])[:5].tolist()}")
    probability = arrays["probability"].astype(np.float64)
    if not (np.isfinite(probability).all() and (probability >= 0).all() and (probability <= 1).all()):
        raise ValueError(f"predictions {rel}: probability must be finite and in [0, 1] on every row")
    arrays["probability"] = probability
    for column in CEILING_COLUMNS:
        values = arrays[column].astype(np.float64)
        finite = np.isfinite(values)
        if finite.any() and not (finite.all() and (values >= 0).all() and (values <= 1).all()):
            raise ValueError(f"predictions {rel}: {column} must be NaN on every row (real data) or in [0, 1] on all")
        arrays[column] = values
    return arrays


def _check_same(rel: str, pred: dict[str, np.ndarray], first: dict[str, np.ndarray], first_rel: str) -> None:
    for key, what in (("patient_id", "patient ids"), ("split", "splits"), ("label", "labels")):
        if not np.array_equal(pred[key], first[key]):
            raise ValueError(
                f"predictions {rel}: {what} differ from {first_rel}; "
                "every run of a task must score the same val/test patients in the same order"
            )
    for column in CEILING_COLUMNS:
        if not np.array_equal(pred[column], first[column], equal_nan=True):
            raise ValueError(f"predictions {rel}: {column} differs from {first_rel}")


def _task_names(summary: dict[str, Any]) -> list[str]:
    names = [t["name"] for t in summary.get("tasks") or []]
    if not names:
        raise ValueError("summary: 'tasks' is empty; there is nothing to report")
    if len(set(names)) != len(names):
        raise ValueError(f"summary: task names repeat: {names}")
    return names


def group_runs(summary: dict[str, Any]) -> dict[str, dict[tuple[str, int], list[dict[str, Any]]]]:
    """summary["runs"] as {task: {(arm, size): runs sorted by replicate}}, tasks in summary order."""
    names = _task_names(summary)
    runs = summary.get("runs") or []
    if not runs:
        raise ValueError("summary: 'runs' is empty; there is nothing to report")
    grouped: dict[str, dict[tuple[str, int], list[dict[str, Any]]]] = {name: {} for name in names}
    for run in runs:
        if run.get("task") not in grouped:
            raise ValueError(f"summary: run {run.get('predictions')} names task {run.get('task')!r}, not in 'tasks'")
        grouped[run["task"]].setdefault((run["arm"], int(run["size"])), []).append(run)
    for task, cells in grouped.items():
        for (arm, size), group in cells.items():
            group.sort(key=lambda r: int(r["replicate"]))
            reps = [int(r["replicate"]) for r in group]
            if len(set(reps)) != len(reps):
                raise ValueError(f"summary: task {task} arm {arm} size {size} lists a replicate twice: {reps}")
    return grouped


def _load_task(name: str, cells: dict[tuple[str, int], list[dict[str, Any]]], out_dir: Path) -> TaskData:
    if not cells:
        raise ValueError(f"summary: task {name} has no runs")
    first: dict[str, np.ndarray] | None = None
    first_rel = ""
    loaded, checked = {}, 0
    for key, group in cells.items():
        test_rows, val_rows = [], []
        for run in group:
            rel = run.get("predictions")
            if not rel:
                raise ValueError(f"summary: task {name} arm {key[0]} size {key[1]} has a run without 'predictions'")
            pred = read_predictions(out_dir, rel)
            if first is None:
                first, first_rel = pred, rel
            else:
                _check_same(rel, pred, first, first_rel)
            test_rows.append(pred["probability"][pred["split"] == "test"])
            val_rows.append(pred["probability"][pred["split"] == "val"])
            checked += 1
        reps = [int(r["replicate"]) for r in group]
        loaded[key] = Cell(reps, np.stack(test_rows), np.stack(val_rows), group)
    assert first is not None
    test, val = first["split"] == "test", first["split"] == "val"
    labels = first["label"][test].astype(int)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"predictions {first_rel}: the test labels hold a single class; AUROC is undefined")
    ceilings = {c: first[c][test] if np.isfinite(first[c]).all() else None for c in CEILING_COLUMNS}
    return TaskData(name, first["patient_id"][test], labels, first["label"][val].astype(int), ceilings, loaded,
                    first_rel, checked)  # fmt: skip


def load(summary: dict[str, Any], out_dir: Path) -> dict[str, TaskData]:
    """Every task's checked predictions, in summary["tasks"] order."""
    return {task: _load_task(task, cells, Path(out_dir)) for task, cells in group_runs(summary).items()}
