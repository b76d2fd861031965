"""Hostile MEDS data and label tables, property-based: random valid datasets read exactly (with hidden and
temporary files beside them ignored), and every damage (a dropped column, a changed dtype, a null, a duplicate
or conflicting row, unsorted times, a torn or empty file) is a ONE-line ValueError naming the damaged file,
with nothing in the dataset changed by the read."""

from __future__ import annotations

import datetime as dt
import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from ehrjax.data.meds import MEDS_SPLITS, MONTH_US, read_meds  # noqa: E402
from tests.fuzzkit import assert_one_line, snapshot  # noqa: E402

EXAMPLES = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
DAY_US = 86_400 * 10**6
EPOCH = dt.datetime(1970, 1, 1)
CODES = ("A", "B", "C//1", "LAB//X", "MEDS_DEATH")


def us_to_dt(t: int) -> dt.datetime:
    return EPOCH + dt.timedelta(microseconds=int(t))


@st.composite
def datasets(draw) -> dict:
    """Subjects (sorted ids, optional birth row and sex row, 1-6 events in time order) in 1-3 shards."""
    n = draw(st.integers(1, 6))
    ids = sorted(draw(st.sets(st.integers(1, 10**9), min_size=n, max_size=n)))
    subjects = []
    for sid in ids:
        birth = (draw(st.integers(1930, 2005)) - 1970) * 365 * DAY_US + draw(st.integers(0, 364)) * DAY_US
        start = birth + draw(st.integers(0, 40 * 365)) * DAY_US + draw(st.integers(0, DAY_US - 1))
        gaps = draw(st.lists(st.integers(0, 900 * DAY_US), min_size=1, max_size=6))
        times = list(start + np.cumsum([0, *gaps[1:]]))
        subjects.append({
            "id": sid, "birth": birth if draw(st.booleans()) else None,
            "sex": draw(st.sampled_from([None, "GENDER//F", "GENDER//M"])),
            "events": [(int(t), draw(st.sampled_from(CODES))) for t in times],
            "split": draw(st.sampled_from(MEDS_SPLITS)),
        })  # fmt: skip
    n_shards = draw(st.integers(1, min(3, n)))
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=n_shards - 1, max_size=n_shards - 1))) if n > 1 else []
    bounds = [0, *cuts, n]
    shards = [subjects[a:b] for a, b in itertools.pairwise(bounds)]
    return {"subjects": subjects, "shards": shards}


def shard_rows(group: list[dict]) -> list[tuple[int, int | None, str]]:
    rows: list[tuple[int, int | None, str]] = []
    for s in group:
        if s["sex"]:
            rows.append((s["id"], None, s["sex"]))
        if s["birth"] is not None:
            rows.append((s["id"], s["birth"], "MEDS_BIRTH"))
        rows += [(s["id"], t, c) for t, c in s["events"]]
    return rows


def write_table(path: Path, rows: list[tuple[int, int | None, str]], *, schema=None, columns=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "time": pa.array([None if r[1] is None else us_to_dt(r[1]) for r in rows], pa.timestamp("us")),
            "code": pa.array([r[2] for r in rows], pa.string()),
        }
    pq.write_table(pa.table(columns) if schema is None else pa.table(columns, schema=schema), path)


def write_dataset(root: Path, data: dict) -> list[Path]:
    paths = []
    for k, group in enumerate(data["shards"]):
        path = root / "data" / f"{k:03d}.parquet"
        write_table(path, shard_rows(group))
        paths.append(path)
    write_splits(root, {s["id"]: s["split"] for s in data["subjects"]})
    return paths


def write_splits(root: Path, split: dict[int, str], ids_type=None) -> Path:
    path = root / "metadata" / "subject_splits.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = pa.array(list(split), ids_type or pa.int64())
    table = pa.table({"subject_id": ids, "split": pa.array(list(split.values()))})
    pq.write_table(table, path)
    return path


def expected_tokens(s: dict) -> dict[str, list[int]]:
    """The cohort arrays of one subject: ages from the birth row, else from the first event (the documented
    policy); each distinct timestamp a visit (visit_hours=0)."""
    times = [t for t, _ in s["events"]]
    birth = s["birth"] if s["birth"] is not None else times[0]
    distinct = sorted(set(times))
    first_day = times[0] // DAY_US
    return {
        "age": [(t - birth) // MONTH_US for t in times],
        "visit": [distinct.index(t) for t in times],
        "time": [t // DAY_US - first_day for t in times],
    }


def check_cohort(cohort, data: dict) -> None:
    subjects = data["subjects"]
    assert cohort.patient_id.tolist() == [s["id"] for s in subjects]
    assert np.diff(cohort.offsets).tolist() == [len(s["events"]) for s in subjects]
    names = np.asarray(cohort.code_names)[cohort.codes].tolist()
    assert names == [c for s in subjects for _, c in s["events"]]
    for field in ("age", "visit", "time"):
        assert np.asarray(getattr(cohort, field)).tolist() == [v for s in subjects for v in expected_tokens(s)[field]]
    assert cohort.sex.tolist() == [{"GENDER//F": 0, "GENDER//M": 1}.get(s["sex"], -1) for s in subjects]
    assert cohort.split.tolist() == [MEDS_SPLITS.index(s["split"]) for s in subjects]
    assert cohort.meta["subjects_without_birth"] == sum(s["birth"] is None for s in subjects)


# ---------------------------------------------------------------------------------------------- valid data
HARMLESS = ("hidden_copy", "hidden_folder", "tmp_folder", "atomic_temp", "tmp_suffix", "numeric_value",
            "large_string", "shuffled_subjects")  # fmt: skip


@EXAMPLES
@given(data=datasets(), variant=st.sampled_from(HARMLESS))
def test_valid_datasets_read_exactly_and_hidden_or_temporary_files_are_ignored(data, variant):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "meds"
        shards = write_dataset(root, data)
        first = shards[0]
        if variant == "hidden_copy":  # a copy would double its subjects (and fail: a subject in two shards)
            shutil.copy(first, first.with_name("." + first.name))
        elif variant == "hidden_folder":
            (root / "data" / ".cache").mkdir()
            shutil.copy(first, root / "data" / ".cache" / "x.parquet")
        elif variant == "tmp_folder":  # a half-written folder of a killed writer
            (root / "data" / "part.tmp").mkdir()
            shutil.copy(first, root / "data" / "part.tmp" / "x.parquet")
        elif variant == "atomic_temp":  # what a killed atomic_write leaves
            shutil.copy(first, first.with_name(f".{first.name}.tmp-4194304-0a1b2c3d.parquet"))
        elif variant == "tmp_suffix":
            first.with_name("x.parquet.tmp").write_bytes(first.read_bytes())
        elif variant in ("numeric_value", "large_string", "shuffled_subjects"):
            for path, group in zip(shards, data["shards"], strict=True):
                rows = shard_rows(group)
                if variant == "shuffled_subjects":  # subjects out of order, each subject's rows still in time order
                    order = sorted(range(len(rows)), key=lambda i: (-rows[i][0], i))
                    rows = [rows[i] for i in order]
                code_type = pa.large_string() if variant == "large_string" else pa.string()
                columns = {
                    "subject_id": pa.array([r[0] for r in rows], pa.int64()),
                    "time": pa.array([None if r[1] is None else us_to_dt(r[1]) for r in rows], pa.timestamp("us")),
                    "code": pa.array([r[2] for r in rows], code_type),
                }
                if variant == "numeric_value":
                    values = [1.5 if i % 2 else None for i in range(len(rows))]
                    columns["numeric_value"] = pa.array(values, pa.float32())
                write_table(path, rows, columns=columns)
        before = snapshot(root)
        cohort = read_meds(root)
        check_cohort(cohort, data)
        assert snapshot(root) == before


# ---------------------------------------------------------------------------------------------- damaged data
DAMAGES = ("drop_subject_id", "drop_time", "drop_code", "subject_id_int32", "time_as_string", "time_ns", "code_as_int",
           "null_subject", "null_code", "subject_in_two_shards", "unsorted_times", "before_birth", "truncated",
           "empty_file", "not_parquet", "split_missing_subject", "split_bad_name", "split_duplicate",
           "splits_missing", "splits_truncated", "splits_ids_int32")  # fmt: skip


def damage_dataset(root: Path, data: dict, damage: str) -> tuple[str, ...]:
    """Apply `damage` to a written dataset; returns what the error must name."""
    shards = sorted((root / "data").glob("*.parquet"))
    path, group = shards[0], data["shards"][0]
    rows = shard_rows(group)
    splits = root / "metadata" / "subject_splits.parquet"
    base = {
        "subject_id": pa.array([r[0] for r in rows], pa.int64()),
        "time": pa.array([None if r[1] is None else us_to_dt(r[1]) for r in rows], pa.timestamp("us")),
        "code": pa.array([r[2] for r in rows], pa.string()),
    }
    if damage.startswith("drop_"):
        column = damage[len("drop_") :]
        write_table(path, rows, columns={k: v for k, v in base.items() if k != column})
        return str(path), column
    if damage == "subject_id_int32":
        write_table(path, rows, columns=dict(base, subject_id=base["subject_id"].cast(pa.int32())))
        return str(path), "subject_id"
    if damage == "time_as_string":
        write_table(path, rows, columns=dict(base, time=pa.array([str(r[1]) for r in rows])))
        return str(path), "time"
    if damage == "time_ns":
        write_table(path, rows, columns=dict(base, time=base["time"].cast(pa.timestamp("ns"))))
        return str(path), "time"
    if damage == "code_as_int":
        write_table(path, rows, columns=dict(base, code=pa.array(list(range(len(rows))), pa.int64())))
        return str(path), "code"
    if damage in ("null_subject", "null_code"):
        column = "subject_id" if damage == "null_subject" else "code"
        values = base[column].to_pylist()
        values[-1] = None
        write_table(path, rows, columns=dict(base, **{column: pa.array(values, base[column].type)}))
        return str(path), f"null {column}"
    if damage == "subject_in_two_shards":
        s = group[0]
        write_table(root / "data" / "zzz.parquet", [(s["id"], s["events"][0][0], "A")])
        return str(path), f"subject {s['id']}"
    if damage == "unsorted_times":
        s = group[-1]
        s_rows = [r for r in rows if r[0] == s["id"] and r[1] is not None]
        late = (s["id"], max(r[1] for r in s_rows) + DAY_US, "A")
        timed = [r for r in rows if r[1] is not None]
        write_table(path, [*[r for r in rows if r[1] is None], *timed[:-1], late, timed[-1]])
        return str(path), "time goes back"
    if damage == "before_birth":  # an event a day before the subject's (added, if need be) birth row
        s = group[0]
        birth = s["birth"] if s["birth"] is not None else s["events"][0][0]
        own = [r for r in rows if r[0] == s["id"]]
        statics = [r for r in own if r[1] is None]
        events = [r for r in own if r[1] is not None and r[2] != "MEDS_BIRTH"]
        new_rows = [*statics, (s["id"], birth - DAY_US, "A"), (s["id"], birth, "MEDS_BIRTH"), *events]
        write_table(path, [*new_rows, *[r for r in rows if r[0] != s["id"]]])
        return str(path), "before its birth"
    if damage == "truncated":
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
        return str(path), "not readable parquet"
    if damage == "empty_file":
        path.write_bytes(b"")
        return str(path), "not readable parquet"
    if damage == "not_parquet":
        path.write_text("subject_id,time,code\n1,2,3\n")
        return str(path), "not readable parquet"
    ids = {s["id"]: s["split"] for s in data["subjects"]}
    if damage == "split_missing_subject":
        gone = data["subjects"][0]["id"]
        write_splits(root, {k: v for k, v in ids.items() if k != gone} or {gone + 1: "train"})
        return str(splits), f"subject {gone}"
    if damage == "split_bad_name":
        first = next(iter(ids))
        write_splits(root, {**ids, first: "validation"})
        return str(splits), "'validation'"
    if damage == "split_duplicate":
        first = next(iter(ids))
        table = pa.table({"subject_id": pa.array([*ids, first], pa.int64()),
                          "split": pa.array([*ids.values(), "train"])})  # fmt: skip
        pq.write_table(table, splits)
        return str(splits), f"subject {first} appears twice"
    if damage == "splits_missing":
        splits.unlink()
        return str(root), "subject_splits.parquet"
    if damage == "splits_truncated":
        splits.write_bytes(splits.read_bytes()[:20])
        return str(splits), "not readable parquet"
    if damage == "splits_ids_int32":
        write_splits(root, ids, ids_type=pa.int32())
        return str(splits), "subject_id"
    raise AssertionError(damage)


@pytest.mark.parametrize("damage", DAMAGES)
@EXAMPLES
@given(data=datasets())
def test_damaged_data_is_one_line_naming_the_file(data, damage):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "meds"
        write_dataset(root, data)
        needles = damage_dataset(root, data, damage)
        before = snapshot(root)
        with pytest.raises(ValueError) as err:
            read_meds(root)
        assert_one_line(str(err.value), *needles)
        assert snapshot(root) == before


# ---------------------------------------------------------------------------------------------- labels
@st.composite
def labelled(draw) -> tuple[dict, list[tuple[int, int, bool]]]:
    """A dataset and label rows (subject, prediction time at or after its first event, value), at most one row
    per (subject, time)."""
    data = draw(datasets())
    rows = []
    for s in data["subjects"]:
        first = s["events"][0][0]
        times = draw(st.sets(st.integers(0, 4000 * DAY_US), max_size=3))
        rows += [(s["id"], first + t, draw(st.booleans())) for t in sorted(times)]
    if not rows:
        s = data["subjects"][0]
        rows = [(s["id"], s["events"][0][0] + 1, True)]
    return data, rows


def write_labels(path: Path, rows, *, columns=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or label_columns(rows)
    pq.write_table(pa.table(columns), path)


def label_columns(rows) -> dict:
    return {
        "subject_id": pa.array([r[0] for r in rows], pa.int64()),
        "prediction_time": pa.array([us_to_dt(r[1]) for r in rows], pa.timestamp("us")),
        "boolean_value": pa.array([r[2] for r in rows], pa.bool_()),
    }


LABEL_HARMLESS = ("plain", "hidden_copy", "tmp_copy", "atomic_temp", "two_files", "hidden_folder")


@EXAMPLES
@given(case=labelled(), variant=st.sampled_from(LABEL_HARMLESS))
def test_valid_labels_give_one_row_each_with_history_strictly_before(case, variant):
    data, rows = case
    with tempfile.TemporaryDirectory() as tmp:
        root, labels = Path(tmp) / "meds", Path(tmp) / "labels"
        write_dataset(root, data)
        main = labels / "task" / "labels.parquet"
        if variant == "two_files" and len(rows) > 1:
            write_labels(labels / "task" / "a" / "0.parquet", rows[: len(rows) // 2])
            write_labels(labels / "task" / "b" / "1.parquet", rows[len(rows) // 2 :])
        else:
            write_labels(main, rows)
        if variant == "hidden_copy":
            shutil.copy(main, main.with_name(".labels.parquet"))
        elif variant == "tmp_copy":
            (labels / "task" / "old.tmp").mkdir()
            shutil.copy(main, labels / "task" / "old.tmp" / "labels.parquet")
        elif variant == "atomic_temp":
            shutil.copy(main, main.with_name(".labels.parquet.tmp-4194304-0a1b2c3d.parquet"))
        elif variant == "hidden_folder":
            (labels / "task" / ".snapshot").mkdir()
            shutil.copy(main, labels / "task" / ".snapshot" / "labels.parquet")
        before = snapshot(root, labels)
        cohort = read_meds(root, labels_dir=labels / "task")
        assert snapshot(root, labels) == before
        expected = sorted(rows)
        assert len(cohort) == len(expected)
        assert cohort.patient_id.tolist() == [r[0] for r in sorted(expected, key=lambda r: ([s["id"] for s in data[
            "subjects"]].index(r[0]), r[1]))]  # fmt: skip
        assert sorted(zip(cohort.patient_id.tolist(), cohort.labels["prediction_time"].tolist(),
                          cohort.labels["outcome"].astype(bool).tolist(), strict=True)) == expected  # fmt: skip
        events = {s["id"]: [t for t, _ in s["events"]] for s in data["subjects"]}
        lengths = np.diff(cohort.offsets).tolist()
        for sid, pt, n in zip(cohort.patient_id.tolist(), cohort.labels["prediction_time"].tolist(), lengths,
                              strict=True):  # fmt: skip
            assert n == sum(t < pt for t in events[sid])  # nothing at or after the prediction time


LABEL_DAMAGES = ("drop_subject_id", "drop_prediction_time", "drop_boolean_value", "value_as_int", "time_as_string",
                 "subject_int32", "null_subject_id", "null_prediction_time", "null_boolean_value", "duplicate_row",
                 "conflicting_row", "unknown_subject", "before_first_event", "truncated", "empty_file",
                 "no_label_files")  # fmt: skip


@pytest.mark.parametrize("damage", LABEL_DAMAGES)
@EXAMPLES
@given(case=labelled())
def test_damaged_labels_are_one_line_naming_the_file(case, damage):
    data, rows = case
    with tempfile.TemporaryDirectory() as tmp:
        root, labels = Path(tmp) / "meds", Path(tmp) / "labels"
        write_dataset(root, data)
        path = labels / "labels.parquet"
        cols = label_columns(rows)
        needles: tuple[str, ...] = (str(path),)
        if damage.startswith("drop_"):
            column = damage[len("drop_") :]
            write_labels(path, rows, columns={k: v for k, v in cols.items() if k != column})
            needles += (column,)
        elif damage == "value_as_int":
            write_labels(path, rows, columns=dict(cols, boolean_value=pa.array([int(r[2]) for r in rows], pa.int64())))
            needles += ("boolean_value",)
        elif damage == "time_as_string":
            write_labels(path, rows, columns=dict(cols, prediction_time=pa.array([str(r[1]) for r in rows])))
            needles += ("prediction_time",)
        elif damage == "subject_int32":
            write_labels(path, rows, columns=dict(cols, subject_id=cols["subject_id"].cast(pa.int32())))
            needles += ("subject_id",)
        elif damage.startswith("null_"):
            column = damage[len("null_") :]
            values = cols[column].to_pylist()
            values[0] = None
            write_labels(path, rows, columns=dict(cols, **{column: pa.array(values, cols[column].type)}))
            needles += (f"null {column}",)
        elif damage in ("duplicate_row", "conflicting_row"):
            r = rows[0]
            extra = (r[0], r[1], r[2] if damage == "duplicate_row" else not r[2])
            write_labels(path, [*rows, extra])
            needles += ("repeats" if damage == "duplicate_row" else "conflicts with", f"subject {r[0]}")
        elif damage == "unknown_subject":
            missing = max(s["id"] for s in data["subjects"]) + 1
            write_labels(path, [*rows, (missing, rows[0][1], True)])
            needles += (f"subject {missing}",)
        elif damage == "before_first_event":
            s = data["subjects"][0]
            first = s["events"][0][0] if s["birth"] is None else s["birth"]  # the subject's first timed row
            write_labels(path, [(s["id"], first - 1, True)])
            needles += ("before the subject's first event",)
        elif damage == "truncated":
            write_labels(path, rows)
            path.write_bytes(path.read_bytes()[:30])
            needles += ("not readable parquet",)
        elif damage == "empty_file":
            path.parent.mkdir(parents=True)
            path.write_bytes(b"")
            needles += ("not readable parquet",)
        elif damage == "no_label_files":
            write_labels(labels / ".hidden.parquet", rows)  # only a hidden file: nothing to read
            needles = (str(labels), "no *.parquet label files")
        before = snapshot(root, labels)
        with pytest.raises(ValueError) as err:
            read_meds(root, labels_dir=labels)
        assert_one_line(str(err.value), *needles)
        assert snapshot(root, labels) == before
