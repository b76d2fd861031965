"""MEDS 0.4 datasets <-> cohorts: write a synthetic cohort as MEDS, read a MEDS dataset (and its labels) as a
cohort, write predictions for MEDS-DEV's evaluator.

A MEDS dataset is a folder with `data/**/*.parquet` shards (`subject_id: int64, time: timestamp[us]` (null
for static rows), `code: string, numeric_value: float32`; a subject lives in exactly one shard, its rows
sorted by time), `metadata/codes.parquet`, `metadata/subject_splits.parquet` (`train`, `tuning`,
`held_out`) and `metadata/dataset.json`. Labels are `subject_id, prediction_time, boolean_value` parquet
files under a task folder. Needs the `meds` extra (pyarrow, meds); imported lazily.

Cohort -> MEDS (`write_meds`). A cohort stores, per token, age in whole months (`age`, months of
`DAYS_PER_MONTH` = 30.4375 days) and whole days since the first visit (`time`), not dates. Each visit gets
a timestamp from which both come back exactly: the birth (`MEDS_BIRTH`) is on 1 July of `birth_year`
(midnight; a time of day on that date only where whole-day placement cannot reproduce every age), the first
visit's date is birth + whole days, visit k is `time[k]` days after it, at a sub-day offset (microseconds
to hours) that puts its age in months right; visits on the same day are 1 us apart. Sex is a static row
(`GENDER//F` for 0, `GENDER//M` for 1; other values write none). Numeric values are null.

MEDS -> cohort (`read_meds`), one shard at a time: tokens are the timed rows other than `MEDS_BIRTH` and
the `GENDER//*` codes (so `MEDS_DEATH` is a token); static rows other than sex are ignored, as are numeric
and text values. A visit is a run of a subject's events whose consecutive gaps are <= `visit_hours`
(0: each distinct timestamp is a visit); every token of a visit takes the visit's first timestamp:
`age = floor((t - birth) / 30.4375 days)`, `time` = calendar days from the first visit's date. Unknown sex
is -1. MEDS requires only `subject_id`, `time` and `code`: a subject without a `MEDS_BIRTH` row is read with
its ages measured from its first timed event (age 0 there; its `birth_year` is that event's year), and their
number is `meta["subjects_without_birth"]`; one birthless subject never fails the dataset. Subjects are
ordered by shard path, then subject id; hidden and temporary files (`.x`, `x.tmp`, at any level under `data/`
or the label folder) are skipped. With labels, each label row is one cohort row: the subject's events strictly
before `prediction_time` (stricter than the MEDS label schema, which allows data at the prediction time:
nothing at or after it can leak), `labels["outcome"]` int8 from `boolean_value` and `labels["prediction_time"]`
int64 (us since the epoch).
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ehrjax.atomic import atomic_write, check_output_path, pid_alive, visible_files
from ehrjax.data.cohort import Cohort
from ehrjax.data.synthetic import DAYS_PER_MONTH

DAY_US = 86_400 * 10**6
MONTH_US = round(DAYS_PER_MONTH * DAY_US)  # 30.4375 days = 2,629,800 s exactly
BIRTH_CODE = "MEDS_BIRTH"
SEX_CODES: dict[str, int] = {"GENDER//F": 0, "GENDER//M": 1}
# Codes read_meds consumes (not tokens), as negative code ids: sex = -2 - id.
_RESERVED: dict[str, int] = {BIRTH_CODE: -1, "GENDER//F": -2, "GENDER//M": -3}
MEDS_SPLITS: tuple[str, ...] = ("train", "tuning", "held_out")  # SPLITS (train, val, test) in MEDS words
DEFAULT_SHARD_SIZE = 50_000


def _require() -> tuple[Any, Any, Any]:
    """pyarrow, pyarrow.compute, pyarrow.parquet, or a one-line error naming the extra."""
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("MEDS input/output needs pyarrow: pip install 'ehrjax[meds]'") from err
    return pa, pc, pq


def _meds_version() -> str:
    try:
        import meds
    except ImportError as err:
        raise ImportError("writing MEDS needs the meds package: pip install 'ehrjax[meds]'") from err
    return meds.__version__


def _schemas() -> dict[str, Any]:
    pa, _, _ = _require()
    label_fields = [
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("prediction_time", pa.timestamp("us"), nullable=False),
        pa.field("boolean_value", pa.bool_(), nullable=False),
    ]
    return {
        "data": pa.schema(
            [
                pa.field("subject_id", pa.int64(), nullable=False),
                pa.field("time", pa.timestamp("us")),
                pa.field("code", pa.string(), nullable=False),
                pa.field("numeric_value", pa.float32()),
            ]
        ),
        "codes": pa.schema(
            [
                pa.field("code", pa.string(), nullable=False),
                pa.field("description", pa.string()),
                pa.field("parent_codes", pa.list_(pa.string())),
            ]
        ),
        "splits": pa.schema([pa.field("subject_id", pa.int64(), nullable=False), pa.field("split", pa.string())]),
        "labels": pa.schema(label_fields),
        "predictions": pa.schema(  # a label row and what the model predicted for it
            [
                *label_fields,
                pa.field("predicted_boolean_value", pa.bool_()),
                pa.field("predicted_boolean_probability", pa.float32()),
            ]
        ),
    }


def _write_parquet(table: Any, path: Path) -> None:
    """Write a parquet file atomically (`ehrjax.atomic.atomic_write`)."""
    _, _, pq = _require()
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def _floor_div(a: np.ndarray, b: int) -> np.ndarray:
    return np.floor_divide(a, b)


def _july_first_us(birth_year: np.ndarray) -> np.ndarray:
    """int64 us since the epoch of 1 July, 00:00, of each year."""
    years = (birth_year.astype(np.int64) - 1970).astype("datetime64[Y]")
    return (years.astype("datetime64[M]") + np.timedelta64(6, "M")).astype("datetime64[us]").astype(np.int64)


def cohort_timestamps(cohort: Cohort) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps that reproduce the cohort's ages and days exactly (module docstring).

    Returns (birth: int64[n], token_time: int64[n_tokens]), microseconds since 1970-01-01. Raises a ValueError
    naming the patient where the record cannot be dated: tokens of one visit with different age or time,
    visits out of order, or ages and days that no birth date reconciles.
    """
    n = len(cohort)
    n_tok = cohort.num_tokens
    patient = np.repeat(np.arange(n), cohort.lengths)
    visit, age, days = (np.asarray(getattr(cohort, k), dtype=np.int64) for k in ("visit", "age", "time"))
    new_visit = np.ones(n_tok, dtype=bool)
    new_visit[1:] = (patient[1:] != patient[:-1]) | (visit[1:] != visit[:-1])
    starts = np.flatnonzero(new_visit)
    visit_of_token = np.cumsum(new_visit) - 1
    bad = (age != age[starts][visit_of_token]) | (days != days[starts][visit_of_token])
    backwards = np.zeros(n_tok, dtype=bool)
    backwards[1:] = (patient[1:] == patient[:-1]) & ((visit[1:] < visit[:-1]) | (days[1:] < days[:-1]))
    if bad.any() or backwards.any():
        k = int(np.flatnonzero(bad | backwards)[0])
        raise ValueError(
            f"cohort patient {cohort.patient_id[patient[k]]}: token {k - cohort.offsets[patient[k]]} "
            "breaks the visit order (the tokens of a visit share age and time; visits go forward in time)"
        )
    v_patient, v_age, v_days = patient[starts], age[starts], days[starts]
    first_of_patient = np.ones(len(starts), dtype=bool)
    first_of_patient[1:] = v_patient[1:] != v_patient[:-1]
    new_day = first_of_patient.copy()
    new_day[1:] |= v_days[1:] != v_days[:-1]
    day_start = np.flatnonzero(new_day)
    rank = np.arange(len(starts)) - day_start[np.cumsum(new_day) - 1]  # visits earlier on the same day

    # Birth-to-first-visit-day offset y (us): every visit needs y + d*DAY + delta in its month, delta in a day.
    low = v_age * MONTH_US - v_days * DAY_US
    y = np.zeros(n, dtype=np.int64)
    if len(starts):
        heads = np.flatnonzero(first_of_patient)
        rows = v_patient[heads]
        y_lo = np.maximum.reduceat(low + rank, heads) - DAY_US + 1
        y_hi = np.minimum.reduceat(low + MONTH_US - rank, heads) - 1
        infeasible = y_lo > y_hi
        if infeasible.any():
            p = int(rows[np.flatnonzero(infeasible)[0]])
            raise ValueError(
                f"cohort patient {cohort.patient_id[p]}: its ages (months) and days since the first visit "
                "disagree; no birth date reproduces both"
            )
        whole_days = -_floor_div(-y_lo, DAY_US) * DAY_US  # the first whole number of days >= y_lo
        y[rows] = np.where(whole_days <= y_hi, whole_days, y_lo)
    first_day = _july_first_us(np.asarray(cohort.birth_year)) + (-_floor_div(-y, DAY_US)) * DAY_US
    birth = first_day - y
    delta = np.maximum(low - y[v_patient], 0) + rank
    v_time = first_day[v_patient] + v_days * DAY_US + delta
    token_time = v_time[visit_of_token]

    again_age = _floor_div(v_time - birth[v_patient], MONTH_US)
    again_days = _floor_div(v_time, DAY_US) - _floor_div(first_day[v_patient], DAY_US)
    later = np.ones(len(starts), dtype=bool)
    later[1:] = first_of_patient[1:] | (v_time[1:] > v_time[:-1])
    wrong = (again_age != v_age) | (again_days != v_days) | ~later
    if wrong.any():
        p = int(v_patient[np.flatnonzero(wrong)[0]])
        raise ValueError(
            f"cohort patient {cohort.patient_id[p]}: cannot date its visits (ages must not decrease within a day "
            "and the first visit must have time 0)"
        )
    return birth, token_time


def _check_out_dir(out_dir: Path) -> None:
    """A MEDS output folder must be new or empty, in an existing folder (checked before any work)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"MEDS output {out_dir}: exists and is not an empty folder")
    if not out_dir.parent.is_dir():
        raise ValueError(f"MEDS output {out_dir}: folder {out_dir.parent} does not exist")


def _prepare_out_dir(out_dir: Path) -> Path:
    _check_out_dir(out_dir)
    for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*.tmp"):  # writers killed mid-dataset
        pid = stale.name[len(out_dir.name) + 2 : -len(".tmp")]
        if stale.is_dir() and pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f".{out_dir.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir()
    except OSError as err:
        raise ValueError(f"MEDS output {out_dir}: cannot write in {out_dir.parent} ({err.strerror or err})") from err
    return tmp


def _finish_out_dir(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked before writing)
    os.replace(tmp, out_dir)


def write_meds(
    cohort: Cohort,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    dataset_name: str = "ehrjax-synthetic",
) -> Path:
    """Write `cohort` as a MEDS 0.4 dataset in `out_dir` (new or empty), atomically; returns `out_dir`.

    Subjects are ordered by patient id, `shard_size` subjects per shard (`data/000000.parquet`, ...). Dates
    follow the module docstring; splits train/val/test become train/tuning/held_out. `read_meds` gives back
    the cohort's records (codes, visits, ages, times, sex, birth year, split) exactly.
    """
    pa, _, _ = _require()
    meds_version = _meds_version()
    out_dir = Path(out_dir)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    ids = np.asarray(cohort.patient_id, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    if len(ids) > 1 and np.any(ids[order][1:] == ids[order][:-1]):
        dup = ids[order][1:][ids[order][1:] == ids[order][:-1]][0]
        raise ValueError(f"cohort: patient id {dup} appears twice; MEDS subjects must be unique")
    names = [str(c) for c in cohort.code_names]
    reserved = [c for c in names if c == BIRTH_CODE or c in SEX_CODES]
    if reserved:
        raise ValueError(f"cohort: code {reserved[0]!r} is reserved for the MEDS birth and sex rows")
    if any(not c for c in names):
        raise ValueError("cohort: an empty code string cannot be written as a MEDS code")
    cohort = cohort.select(order)
    birth, token_time = cohort_timestamps(cohort)
    catalogue = [*names, BIRTH_CODE, *SEX_CODES]
    birth_index, sex_index = len(names), len(names) + 1
    dictionary = pa.array(catalogue, pa.string())
    schemas = _schemas()

    tmp = _prepare_out_dir(out_dir)
    try:
        (tmp / "data").mkdir()
        (tmp / "metadata").mkdir()
        n = len(cohort)
        for k, lo in enumerate(range(0, max(n, 1), shard_size)):
            hi = min(lo + shard_size, n)
            table = _shard_table(cohort, lo, hi, birth, token_time, birth_index, sex_index, dictionary, schemas)
            _write_parquet(table, tmp / "data" / f"{k:06d}.parquet")
        codes = pa.table(
            {"code": dictionary, "description": pa.nulls(len(catalogue), pa.string()),
             "parent_codes": pa.nulls(len(catalogue), pa.list_(pa.string()))},
            schema=schemas["codes"],
        )  # fmt: skip
        _write_parquet(codes, tmp / "metadata" / "codes.parquet")
        splits = pa.table(
            {"subject_id": cohort.patient_id.astype(np.int64),
             "split": np.asarray(MEDS_SPLITS, dtype=object)[cohort.split.astype(np.int64)]},
            schema=schemas["splits"],
        )  # fmt: skip
        _write_parquet(splits, tmp / "metadata" / "subject_splits.parquet")
        from ehrjax import __version__ as ehrjax_version

        metadata = {
            "dataset_name": dataset_name,
            "dataset_version": ", ".join(f"{k}={cohort.meta[k]}" for k in ("stream", "seed") if k in cohort.meta),
            "etl_name": "ehrjax.data.meds.write_meds",
            "etl_version": ehrjax_version,
            "meds_version": meds_version,
            "created_at": datetime.datetime.now(datetime.UTC).replace(tzinfo=None).isoformat(),
        }
        (tmp / "metadata" / "dataset.json").write_text(json.dumps(metadata, indent=2))
        _finish_out_dir(tmp, out_dir)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, a folder made read-only: name the output, not a temp file
            raise ValueError(f"MEDS output {out_dir}: cannot write ({err.strerror or err})") from err
        raise
    return out_dir


def _shard_table(
    cohort: Cohort,
    lo: int,
    hi: int,
    birth: np.ndarray,
    token_time: np.ndarray,
    birth_index: int,
    sex_index: int,
    dictionary: Any,
    schemas: dict[str, Any],
) -> Any:
    """The data rows of patients lo..hi-1: static sex row, birth row, then tokens, per subject."""
    pa, pc, _ = _require()
    rows = np.arange(lo, hi)
    sex = np.asarray(cohort.sex[lo:hi], dtype=np.int64)
    has_sex = (sex == 0) | (sex == 1)
    t_lo, t_hi = int(cohort.offsets[lo]), int(cohort.offsets[hi])
    tok_patient = np.repeat(rows, cohort.lengths[lo:hi])
    patient = np.concatenate([rows[has_sex], rows, tok_patient])
    kind = np.repeat(np.arange(3, dtype=np.int8), [int(has_sex.sum()), len(rows), t_hi - t_lo])
    time = np.concatenate([np.zeros(has_sex.sum(), np.int64), birth[lo:hi], token_time[t_lo:t_hi]])
    code = np.concatenate(
        [sex_index + sex[has_sex], np.full(len(rows), birth_index), cohort.codes[t_lo:t_hi].astype(np.int64)]
    ).astype(np.int32)
    order = np.lexsort((kind, patient))  # stable: tokens keep their order
    is_static = kind[order] == 0
    time_arr = pa.array(time[order], pa.int64()).cast(pa.timestamp("us"))
    time_arr = pc.if_else(pa.array(is_static), pa.scalar(None, pa.timestamp("us")), time_arr)
    codes = pa.DictionaryArray.from_arrays(pa.array(code[order]), dictionary).cast(pa.string())
    return pa.table(
        {
            "subject_id": cohort.patient_id[patient[order]].astype(np.int64),
            "time": time_arr,
            "code": codes,
            "numeric_value": pa.nulls(len(order), pa.float32()),
        },
        schema=schemas["data"],
    )


def _index_visit_times(cohort: Cohort, token_time: np.ndarray) -> np.ndarray:
    """int64[n] timestamp of each patient's index visit (label `index_visit`, else the last visit); -1 if none."""
    n = len(cohort)
    out = np.full(n, -1, dtype=np.int64)
    if "index_visit" in cohort.labels:
        target = np.asarray(cohort.labels["index_visit"], dtype=np.int64)
    else:
        target = cohort.num_visits - 1
    patient = np.repeat(np.arange(n), cohort.lengths)
    hit = np.flatnonzero(cohort.visit == target[patient])
    out[patient[hit]] = token_time[hit]  # every token of the visit has its timestamp
    return out


def meds_label_table(cohort: Cohort, task_name: str = "outcome") -> Any:
    """The MEDS label table `write_meds_labels` writes, built and checked without writing anything."""
    pa, _, _ = _require()
    if "outcome" not in cohort.labels:
        raise ValueError("cohort label 'outcome' is missing; write labels from a finetune-stream cohort")
    if not task_name or "/" in task_name or task_name.startswith("."):
        raise ValueError(f"task_name {task_name!r}: expected a plain folder name")
    _, token_time = cohort_timestamps(cohort)
    index_time = _index_visit_times(cohort, token_time)
    y = np.asarray(cohort.labels["outcome"])
    eligible = y >= 0
    undated = eligible & (index_time < 0)
    if undated.any():
        raise ValueError(f"cohort patient {cohort.patient_id[np.flatnonzero(undated)[0]]}: labelled but no index visit")
    rows = np.flatnonzero(eligible)
    rows = rows[np.argsort(cohort.patient_id[rows], kind="stable")]
    return pa.table(
        {
            "subject_id": cohort.patient_id[rows].astype(np.int64),
            "prediction_time": pa.array(index_time[rows] + 1, pa.int64()).cast(pa.timestamp("us")),
            "boolean_value": y[rows] == 1,
        },
        schema=_schemas()["labels"],
    )


def check_label_output(label_dir: str | os.PathLike, task_name: str = "outcome", *, create: bool = False) -> Path:
    """The task folder `label_dir/task_name` labels would be written to, checked without writing: a one-line
    error if `label_dir` is a file, or (unless `create`, which allows making it) does not exist, or the task
    folder already holds files (labels are never replaced)."""
    label_dir = Path(label_dir)
    if label_dir.exists() and not label_dir.is_dir():
        raise ValueError(f"MEDS label output {label_dir}: exists and is not a folder")
    if not label_dir.is_dir() and not create:
        raise ValueError(f"MEDS label output {label_dir}: folder does not exist")
    task_dir = label_dir / task_name
    if task_dir.exists() and (not task_dir.is_dir() or any(task_dir.iterdir())):
        raise ValueError(f"MEDS label output {task_dir}: exists and is not an empty folder")
    return task_dir


def write_meds_labels(cohort: Cohort, label_dir: str | os.PathLike, task_name: str = "outcome") -> Path:
    """Write the cohort's `outcome` labels as a MEDS label file `label_dir/task_name/labels.parquet`.

    One row per eligible patient (`outcome >= 0`): `prediction_time` is the index visit's timestamp (as dated
    by `write_meds`) plus 1 us, the first instant after the index visit: the history the cohort holds ends
    at the index visit and the label concerns the 365 days after it, and a reader that keeps only events
    strictly before the prediction time still sees the index visit. Returns the task folder (what
    `read_meds(labels_dir=...)` takes). Everything is checked before anything is written.
    """
    table = meds_label_table(cohort, task_name)
    task_dir = check_label_output(label_dir, task_name)
    task_dir.mkdir(exist_ok=True)
    _write_parquet(table, task_dir / "labels.parquet")
    return task_dir


def write_meds_predictions(
    path: str | os.PathLike,
    subject_id: np.ndarray,
    prediction_time: np.ndarray,
    label: np.ndarray,
    probability: np.ndarray,
    threshold: float = 0.5,
) -> Path:
    """Write predictions in MEDS-DEV's `meds-evaluation` schema (one parquet file, atomically).

    subject_id: int[n]; prediction_time: int64[n] us since the epoch or datetime64[n]; label: bool/int[n]
    (`boolean_value`); probability: float[n] (`predicted_boolean_probability`); `predicted_boolean_value`
    is `probability >= threshold`.
    """
    pa, _, _ = _require()
    path = check_output_path(path, ".parquet", "predictions output")
    columns = {
        "subject_id": np.asarray(subject_id),
        "prediction_time": np.asarray(prediction_time),
        "label": np.asarray(label),
        "probability": np.asarray(probability, dtype=np.float64),
    }
    n = len(columns["subject_id"])
    for name, value in columns.items():
        if value.shape != (n,):
            raise ValueError(f"predictions output {path}: {name} has shape {value.shape}, expected ({n},)")
    if np.issubdtype(columns["prediction_time"].dtype, np.datetime64):
        columns["prediction_time"] = columns["prediction_time"].astype("datetime64[us]").astype(np.int64)
    if not np.all(np.isfinite(columns["probability"])):
        raise ValueError(f"predictions output {path}: probability holds NaN/inf")
    if not np.all(np.isin(columns["label"], (0, 1))):
        raise ValueError(f"predictions output {path}: label must be 0/1 or boolean")
    probability = columns["probability"]
    table = pa.table(
        {
            "subject_id": columns["subject_id"].astype(np.int64),
            "prediction_time": pa.array(columns["prediction_time"].astype(np.int64)).cast(pa.timestamp("us")),
            "boolean_value": columns["label"].astype(bool),
            "predicted_boolean_value": probability >= threshold,
            "predicted_boolean_probability": probability.astype(np.float32),
        },
        schema=_schemas()["predictions"],
    )
    _write_parquet(table, path)
    return path


class _Growable:
    """A preallocated 1-d array that grows by doubling; `view()` is the filled part (no copy)."""

    def __init__(self, capacity: int, dtype: Any) -> None:
        self.array = np.empty(max(capacity, 1), dtype=dtype)
        self.size = 0

    def extend(self, values: np.ndarray) -> None:
        end = self.size + len(values)
        if end > len(self.array):
            grown = np.empty(max(end, 2 * len(self.array)), dtype=self.array.dtype)
            grown[: self.size] = self.array[: self.size]
            self.array = grown
        self.array[self.size : end] = values
        self.size = end

    def view(self) -> np.ndarray:
        return self.array[: self.size]


def _parquet_schema(path: Path, what: str) -> Any:
    """The schema of a parquet file; a truncated, empty or foreign file is a one-line error naming it."""
    pa, _, pq = _require()
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"MEDS {what} file {path}: not readable parquet ({' '.join(str(err).split())})") from err


def _read_parquet(path: Path, what: str, **kwargs: Any) -> Any:
    """`pq.read_table(path, **kwargs)`, its errors as one line naming the file."""
    pa, _, pq = _require()
    try:
        return pq.read_table(path, **kwargs)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"MEDS {what} file {path}: not readable parquet ({' '.join(str(err).split())})") from err


def _check_columns(path: Path, schema: Any, wanted: dict[str, tuple[Any, ...]], what: str) -> None:
    """Every wanted column present with one of its accepted types, else a one-line error."""
    for name, types in wanted.items():
        if name not in schema.names:
            raise ValueError(f"MEDS {what} file {path}: missing column {name!r}")
        got = schema.field(name).type
        if not any(got == t for t in types):
            raise ValueError(f"MEDS {what} file {path}: column {name!r} has type {got}, expected {types[0]}")


def _shards(meds_dir: Path) -> list[Path]:
    if not meds_dir.is_dir():
        raise ValueError(f"MEDS directory {meds_dir}: does not exist")
    data = meds_dir / "data"
    shards = visible_files(data, "**/*.parquet") if data.is_dir() else []  # no hidden or temporary files
    if not shards:
        raise ValueError(f"MEDS directory {meds_dir}: no data/**/*.parquet shards (empty or not a MEDS dataset)")
    return shards


def _code_catalogue(meds_dir: Path) -> list[str]:
    """Codes of metadata/codes.parquet in file order, without the birth and sex codes ([] without the file)."""
    pa, _, _ = _require()
    path = meds_dir / "metadata" / "codes.parquet"
    if not path.is_file():
        return []
    _check_columns(path, _parquet_schema(path, "code metadata"), {"code": (pa.string(), pa.large_string())},
                   "code metadata")  # fmt: skip
    codes = _read_parquet(path, "code metadata", columns=["code"]).column("code")
    if codes.null_count:
        raise ValueError(f"MEDS code metadata file {path}: null codes")
    names = [c for c in codes.to_pylist() if c != BIRTH_CODE and c not in SEX_CODES]
    return list(dict.fromkeys(names))


def _read_splits(meds_dir: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """Sorted subject ids int64[m] and their split int8[m] (index into SPLITS)."""
    pa, _, _ = _require()
    path = meds_dir / "metadata" / "subject_splits.parquet"
    if not path.is_file():
        raise ValueError(f"MEDS directory {meds_dir}: missing metadata/subject_splits.parquet")
    _check_columns(
        path, _parquet_schema(path, "split"), {"subject_id": (pa.int64(),), "split": (pa.string(), pa.large_string())},
        "split",
    )  # fmt: skip
    table = _read_parquet(path, "split", columns=["subject_id", "split"])
    if table.column("subject_id").null_count:
        raise ValueError(f"MEDS split file {path}: null subject_id")
    ids = table.column("subject_id").to_numpy()
    names = table.column("split").to_numpy(zero_copy_only=False)
    known = np.asarray(MEDS_SPLITS, dtype=object)
    split = np.full(len(ids), -1, dtype=np.int8)
    for k, name in enumerate(known):
        split[names == name] = k
    if np.any(split < 0):
        row = int(np.flatnonzero(split < 0)[0])
        raise ValueError(f"MEDS split file {path}: row {row} has split {names[row]!r}, expected one of {MEDS_SPLITS}")
    order = np.argsort(ids, kind="stable")
    ids, split = ids[order], split[order]
    if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
        raise ValueError(f"MEDS split file {path}: subject {ids[1:][ids[1:] == ids[:-1]][0]} appears twice")
    return ids, split, path


def _read_labels(labels_dir: Path) -> dict[str, np.ndarray]:
    """Every label row, sorted by (subject, prediction_time), with the file and row it came from."""
    pa, _, _ = _require()
    if not labels_dir.is_dir():
        raise ValueError(f"MEDS label directory {labels_dir}: does not exist")
    files = visible_files(labels_dir, "**/*.parquet")  # no hidden or temporary files
    if not files:
        raise ValueError(f"MEDS label directory {labels_dir}: no *.parquet label files")
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("subject", "time", "value", "file", "row")}
    wanted = {"subject_id": (pa.int64(),), "prediction_time": (pa.timestamp("us"),), "boolean_value": (pa.bool_(),)}
    for k, path in enumerate(files):
        _check_columns(path, _parquet_schema(path, "label"), wanted, "label")
        table = _read_parquet(path, "label", columns=list(wanted))
        for name in wanted:
            if table.column(name).null_count:
                row = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"MEDS label file {path}: row {row} has a null {name}")
        parts["subject"].append(table.column("subject_id").to_numpy())
        parts["time"].append(table.column("prediction_time").cast(pa.int64()).to_numpy())
        parts["value"].append(table.column("boolean_value").to_numpy(zero_copy_only=False).astype(bool))
        parts["file"].append(np.full(table.num_rows, k, dtype=np.int32))
        parts["row"].append(np.arange(table.num_rows, dtype=np.int64))
    labels = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.lexsort((labels["time"], labels["subject"]))
    labels = {k: v[order] for k, v in labels.items()}
    subject, when = labels["subject"], labels["time"]
    same = np.flatnonzero((subject[1:] == subject[:-1]) & (when[1:] == when[:-1]))
    if len(same):  # one prediction per (subject, time): a repeat would count the patient twice
        a, b = int(same[0]), int(same[0]) + 1
        kind = "conflicts with" if labels["value"][a] != labels["value"][b] else "repeats"
        raise ValueError(
            f"MEDS label file {files[labels['file'][b]]}: row {labels['row'][b]} (subject {labels['subject'][b]}) "
            f"{kind} row {labels['row'][a]} of {files[labels['file'][a]].name}: the same prediction time twice"
        )
    labels["files"] = np.asarray([str(p) for p in files], dtype=object)
    return labels


def _first_of_runs(values: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values starts (`values` grouped)."""
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], values[1:] != values[:-1]]))


def _check_new_subjects(path: Path, ids: np.ndarray, seen: list[tuple[Path, np.ndarray]]) -> None:
    """A subject must be in one shard: `ids` (sorted) against the sorted ids of the shards read before."""
    for other, other_ids in seen:
        if not len(ids) or not len(other_ids) or ids[-1] < other_ids[0] or ids[0] > other_ids[-1]:
            continue
        pos = np.minimum(np.searchsorted(other_ids, ids), len(other_ids) - 1)
        both = np.flatnonzero(other_ids[pos] == ids)
        if len(both):
            raise ValueError(
                f"MEDS data file {path}: subject {ids[both[0]]} is also in {other}; a subject must be in exactly "
                "one shard"
            )


def _shard_events(
    path: Path, code_id: dict[str, int], codes: list[str], visit_gap_us: int, seen: list[tuple[Path, np.ndarray]]
) -> dict[str, np.ndarray]:
    """One shard -> its subjects (sorted ids, sex, birth, first event) and tokens (subject, code, visit, age,
    time, timestamp), sorted by subject then time. `seen`: (path, ids) of the shards read before; this shard
    is appended. Raises a one-line error naming the file and row."""
    pa, pc, _ = _require()
    _check_columns(
        path,
        _parquet_schema(path, "data"),
        {
            "subject_id": (pa.int64(),),
            "time": (pa.timestamp("us"),),
            "code": (pa.string(), pa.large_string(), pa.dictionary(pa.int32(), pa.string())),
        },
        "data",
    )
    table = _read_parquet(path, "data", columns=["subject_id", "time", "code"], read_dictionary=["code"])
    for name in ("subject_id", "code"):
        if table.column(name).null_count:
            row = int(np.flatnonzero(table.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(f"MEDS data file {path}: row {row} has a null {name}")
    subject = table.column("subject_id").to_numpy()
    time_col = table.column("time")
    timed = ~time_col.is_null().to_numpy(zero_copy_only=False)
    time = pc.cast(time_col, pa.int64()).fill_null(0).to_numpy()
    code_col = table.column("code")
    if not pa.types.is_dictionary(code_col.type):
        code_col = pc.dictionary_encode(code_col)
    code_col = code_col.combine_chunks() if code_col.num_chunks != 1 else code_col.chunk(0)
    file_codes = code_col.dictionary.to_pylist()
    for c in file_codes:
        if c not in code_id and c not in _RESERVED:
            code_id[c] = len(codes)
            codes.append(c)
    lookup = np.asarray([_RESERVED.get(c, code_id.get(c, 0)) for c in file_codes], dtype=np.int32)
    code = lookup[code_col.indices.to_numpy(zero_copy_only=False)]
    del table, time_col, code_col

    order = None  # file row of each sorted row, where the shard was not grouped by subject
    if len(subject) > 1 and np.any(subject[1:] < subject[:-1]):
        order = np.argsort(subject, kind="stable")
        subject, time, timed, code = subject[order], time[order], timed[order], code[order]

    def row(r: int) -> int:
        return int(order[r]) if order is not None else int(r)

    starts_subject = np.ones(len(subject), dtype=bool)
    starts_subject[1:] = subject[1:] != subject[:-1]
    ids = subject[starts_subject]
    _check_new_subjects(path, ids, seen)
    seen.append((path, ids))
    subj = np.cumsum(starts_subject, dtype=np.int32) - 1
    del subject, starts_subject

    t_rows = np.flatnonzero(timed)
    t_subj, t_time = subj[t_rows], time[t_rows]
    back = np.flatnonzero((t_subj[1:] == t_subj[:-1]) & (t_time[1:] < t_time[:-1]))
    if len(back):
        r = t_rows[back[0] + 1]
        raise ValueError(
            f"MEDS data file {path}: row {row(r)} (subject {ids[subj[r]]}): time goes back; a subject's rows "
            "must be sorted by time"
        )
    first_event = np.full(len(ids), np.iinfo(np.int64).max, dtype=np.int64)
    first = _first_of_runs(t_subj)
    first_event[t_subj[first]] = t_time[first]  # timed rows are in time order within a subject
    del t_rows, t_subj, t_time, first
    sex = np.full(len(ids), -1, dtype=np.int8)
    sex_rows = np.flatnonzero(code <= _RESERVED["GENDER//F"])
    sex[subj[sex_rows]] = -2 - code[sex_rows]
    birth_rows = np.flatnonzero(timed & (code == _RESERVED[BIRTH_CODE]))
    birth = np.full(len(ids), np.iinfo(np.int64).min, dtype=np.int64)
    first = _first_of_runs(subj[birth_rows])
    birth[subj[birth_rows][first]] = time[birth_rows][first]  # the earliest birth row of each subject
    no_birth = birth == np.iinfo(np.int64).min
    # No MEDS_BIRTH row: ages count from the subject's first timed event (module docstring); a subject with no
    # timed row at all has no tokens, and its ages never matter.
    birth[no_birth] = np.where(first_event[no_birth] == np.iinfo(np.int64).max, 0, first_event[no_birth])

    events = np.flatnonzero(timed & (code >= 0))
    del timed
    e_subj, e_time, e_code = subj[events], time[events], code[events]
    del subj, time, code
    early = np.flatnonzero(e_time < birth[e_subj])
    if len(early):
        k = early[0]
        raise ValueError(f"MEDS data file {path}: row {row(events[k])} (subject {ids[e_subj[k]]}) is before its birth")
    del events
    new_subject = np.ones(len(e_subj), dtype=bool)
    new_subject[1:] = e_subj[1:] != e_subj[:-1]
    new_visit = new_subject.copy()
    new_visit[1:] |= (e_time[1:] - e_time[:-1]) > visit_gap_us
    visit_count = np.cumsum(new_visit, dtype=np.int32)
    visit_time = e_time[np.flatnonzero(new_visit)][visit_count - 1]
    e_visit = visit_count - visit_count[np.flatnonzero(new_subject)][np.cumsum(new_subject, dtype=np.int32) - 1]
    del visit_count, new_visit
    first_visit_day = np.zeros(len(ids), dtype=np.int64)
    first_visit_day[e_subj[new_subject]] = _floor_div(visit_time[new_subject], DAY_US)
    age = _floor_div(visit_time - birth[e_subj], MONTH_US).astype(np.int32)
    days = (_floor_div(visit_time, DAY_US) - first_visit_day[e_subj]).astype(np.int32)
    return {
        "ids": ids,
        "sex": sex,
        "birth": birth,
        "no_birth": no_birth,
        "first_event": first_event,
        "subject": e_subj,
        "code": e_code,
        "visit": e_visit,
        "age": age,
        "time": days,
        "timestamp": e_time,
    }


def _label_cuts(shard: dict[str, np.ndarray], labels: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """For the label rows of this shard's subjects: label index, subject, and event range [start, cut)."""
    ids = shard["ids"]
    pos = np.searchsorted(ids, labels["subject"])
    here = np.flatnonzero((pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == labels["subject"]))
    subj = pos[here]
    pt = labels["time"][here]
    early = pt < shard["first_event"][subj]
    if early.any():
        k = here[np.flatnonzero(early)[0]]
        raise ValueError(
            f"MEDS label file {labels['files'][labels['file'][k]]}: row {labels['row'][k]} (subject "
            f"{labels['subject'][k]}): prediction time is before the subject's first event in {path}"
        )
    # Events strictly before the prediction time: a query sorts before events of equal (subject, time).
    n_ev = len(shard["subject"])
    keys_subject = np.concatenate([shard["subject"], subj])
    keys_time = np.concatenate([shard["timestamp"], pt])
    is_event = np.concatenate([np.ones(n_ev, np.int8), np.zeros(len(subj), np.int8)])
    order = np.lexsort((is_event, keys_time, keys_subject))
    where = np.empty(len(order), dtype=np.int64)
    where[order] = np.arange(len(order))
    query_pos = where[n_ev:]
    queries_before = np.empty(len(subj), dtype=np.int64)
    queries_before[np.argsort(query_pos, kind="stable")] = np.arange(len(subj))
    cut = query_pos - queries_before
    start = np.searchsorted(shard["subject"], subj, side="left")
    return {"label": here, "subject": subj, "start": start, "cut": cut}


def read_meds(
    meds_dir: str | os.PathLike, *, labels_dir: str | os.PathLike | None = None, visit_hours: float = 0.0
) -> Cohort:
    """A cohort from a MEDS 0.4 dataset, shard by shard (memory: the largest shard + the output arrays).

    Without `labels_dir`: every subject. With it (a folder of label parquet files, searched recursively):
    one cohort row per label row, history strictly before its prediction time, `labels["outcome"]` int8 and
    `labels["prediction_time"]` int64 us. Visits, ages, times, sex and splits: module docstring. Every
    problem is a one-line ValueError naming the file and the row or column.
    """
    _require()
    meds_dir = Path(meds_dir)
    if visit_hours < 0:
        raise ValueError(f"visit_hours must be >= 0, got {visit_hours}")
    shards = _shards(meds_dir)
    split_ids, split_of, split_path = _read_splits(meds_dir)
    codes = _code_catalogue(meds_dir)
    code_id = {c: i for i, c in enumerate(codes)}
    labels = _read_labels(Path(labels_dir)) if labels_dir is not None else None
    visit_gap_us = round(visit_hours * 3600 * 10**6)

    pa, _, pq = _require()
    capacity = 0
    for p in shards:
        try:
            capacity += pq.ParquetFile(p).metadata.num_rows
        except (OSError, pa.ArrowException) as err:
            raise ValueError(f"MEDS data file {p}: not readable parquet ({' '.join(str(err).split())})") from err
    tokens = {k: _Growable(capacity, np.int32) for k in ("codes", "visit", "age", "time")}
    counts, patients = [], {k: [] for k in ("patient_id", "sex", "birth_year", "split", "outcome", "prediction_time")}
    without_birth = 0
    seen: list[tuple[Path, np.ndarray]] = []
    label_found = np.zeros(len(labels["subject"]) if labels else 0, dtype=bool)
    for path in shards:
        shard = _shard_events(path, code_id, codes, visit_gap_us, seen)
        ids = shard["ids"]
        pos = np.searchsorted(split_ids, ids)
        missing = (pos >= len(split_ids)) | (split_ids[np.minimum(pos, len(split_ids) - 1)] != ids)
        if missing.any():
            subject = ids[np.flatnonzero(missing)[0]]
            raise ValueError(f"MEDS split file {split_path}: no split for subject {subject} of {path}")
        split = split_of[pos]
        without_birth += int(shard["no_birth"].sum())
        birth_year = shard["birth"].astype("datetime64[us]").astype("datetime64[Y]").astype(np.int64) + 1970
        if labels is None:
            index = None
            rows = np.arange(len(ids))
            lens = np.bincount(shard["subject"], minlength=len(ids))
        else:
            cuts = _label_cuts(shard, labels, path)
            label_found[cuts["label"]] = True
            rows = cuts["subject"]
            lens = cuts["cut"] - cuts["start"]
            offsets = np.concatenate([[0], np.cumsum(lens)])
            index = np.repeat(cuts["start"] - offsets[:-1], lens) + np.arange(offsets[-1])
            patients["outcome"].append(labels["value"][cuts["label"]].astype(np.int8))
            patients["prediction_time"].append(labels["time"][cuts["label"]])
        for name, source in (("codes", "code"), ("visit", "visit"), ("age", "age"), ("time", "time")):
            tokens[name].extend(shard[source] if index is None else shard[source][index])
        counts.append(lens)
        patients["patient_id"].append(ids[rows])
        patients["sex"].append(shard["sex"][rows])
        patients["birth_year"].append(birth_year[rows].astype(np.int16))
        patients["split"].append(split[rows])
        del shard

    if labels is not None and not label_found.all():
        k = int(np.flatnonzero(~label_found)[0])
        raise ValueError(
            f"MEDS label file {labels['files'][labels['file'][k]]}: row {labels['row'][k]}: subject "
            f"{labels['subject'][k]} is not in the MEDS data"
        )
    lengths = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    cohort_labels: dict[str, np.ndarray] = {}
    if labels is not None:
        cohort_labels = {
            "outcome": np.concatenate(patients["outcome"]),
            "prediction_time": np.concatenate(patients["prediction_time"]).astype(np.int64),
        }
    return Cohort(
        **{k: v.view() for k, v in tokens.items()},
        offsets=offsets,
        patient_id=np.concatenate(patients["patient_id"]).astype(np.int64),
        sex=np.concatenate(patients["sex"]).astype(np.int8),
        birth_year=np.concatenate(patients["birth_year"]),
        split=np.concatenate(patients["split"]).astype(np.int8),
        code_names=np.asarray(codes, dtype=str) if codes else np.zeros(0, dtype="<U1"),
        labels=cohort_labels,
        meta={"source": "meds", "meds_dir": str(meds_dir), "labels_dir": str(labels_dir or ""),
              "visit_hours": visit_hours, "subjects_without_birth": without_birth},
    )  # fmt: skip



def main(argv: list[str] | None = None) -> int:
    """`python -m ehrjax.data.meds write|read ...`: a synthetic cohort as MEDS (+ labels), or a MEDS summary."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ehrjax.data.meds", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="write a synthetic cohort as a MEDS dataset")
    write.add_argument("--num-patients", type=int, required=True)
    write.add_argument("--seed", type=int, default=0)
    write.add_argument("--stream", default="pretrain", help="pretrain | finetune")
    write.add_argument("--num-noise-codes", type=int, default=1000)
    write.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    write.add_argument("--out", type=Path, required=True, help="the dataset folder (new or empty)")
    write.add_argument("--labels", type=Path, help="also write the outcome labels under this folder (finetune)")
    read = sub.add_parser("read", help="read a MEDS dataset and print the cohort's summary")
    read.add_argument("meds_dir", type=Path)
    read.add_argument("--labels", type=Path, help="a folder of label parquet files")
    read.add_argument("--visit-hours", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        if args.command == "write":
            _write_command(args)
        else:
            cohort = read_meds(args.meds_dir, labels_dir=args.labels, visit_hours=args.visit_hours)
            print(cohort.format_summary())
    except (ValueError, ImportError, OSError) as err:  # OSError: a read-only folder, a full disk
        from ehrjax.cli import error_line

        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    return 0


def _write_command(args: Any) -> None:
    """`write`: everything (outputs, labels) is checked before anything is written, and a failure part-way
    removes what this command wrote, so the dataset and its labels appear together or not at all."""
    from ehrjax.data.synthetic import generate_cohort

    out, labels = Path(args.out), args.labels
    _check_out_dir(out)
    if args.shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {args.shard_size}")
    task_dir = check_label_output(labels, create=True) if labels is not None else None
    if labels is not None and args.stream != "finetune":
        raise ValueError(f"--labels {labels}: outcome labels need --stream finetune, got {args.stream!r}")
    cohort = generate_cohort(args.num_patients, args.seed, args.stream, args.num_noise_codes)
    label_table = meds_label_table(cohort) if labels is not None else None
    made = [p for p in (labels, task_dir) if p is not None and not p.exists()]
    existed = out.exists()
    write_meds(cohort, out, shard_size=args.shard_size)
    try:
        if label_table is not None:
            task_dir.mkdir(parents=True, exist_ok=True)
            _write_parquet(label_table, task_dir / "labels.parquet")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if existed:
            out.mkdir(exist_ok=True)  # it was an empty folder
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    print(f"wrote {out} ({len(cohort):,} subjects, {cohort.num_tokens:,} code events)")
    if task_dir is not None:
        print(f"wrote labels {task_dir}")


if __name__ == "__main__":
    raise SystemExit(main())
