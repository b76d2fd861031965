"""MEDS 0.4 output and input: schemas, exact dates, round trips, label cuts (no leak) and one-line errors."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
meds = pytest.importorskip("meds")

from ehrjax.data.cohort import PATIENT_FIELDS, TOKEN_FIELDS, Cohort  # noqa: E402
from ehrjax.data.meds import (  # noqa: E402
    MONTH_US,
    cohort_timestamps,
    read_meds,
    write_meds,
    write_meds_labels,
    write_meds_predictions,
)
from ehrjax.data.synthetic import DAYS_PER_MONTH, generate_cohort  # noqa: E402

RECORD_FIELDS = (*TOKEN_FIELDS, "offsets", *PATIENT_FIELDS, "code_names")


def us(text: str) -> int:
    """Microseconds since the epoch of an ISO timestamp."""
    return int(np.datetime64(text, "us").astype(np.int64))


def assert_same_records(a: Cohort, b: Cohort) -> None:
    for name in RECORD_FIELDS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def hand_cohort(
    visits: list[list[tuple[int, int, list[int]]]],
    *,
    birth_year: list[int] | None = None,
    sex: list[int] | None = None,
    split: list[int] | None = None,
    code_names: tuple[str, ...] = ("A", "B", "C", "D"),
) -> Cohort:
    """A cohort from per-patient lists of (age months, days since first visit, codes) visits."""
    codes, visit, age, time, lengths = [], [], [], [], []
    for patient in visits:
        lengths.append(sum(len(c) for _, _, c in patient))
        for k, (a, d, cs) in enumerate(patient):
            codes += cs
            visit += [k] * len(cs)
            age += [a] * len(cs)
            time += [d] * len(cs)
    n = len(visits)
    return Cohort(
        codes=np.asarray(codes, np.int32),
        visit=np.asarray(visit, np.int32),
        age=np.asarray(age, np.int32),
        time=np.asarray(time, np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        patient_id=np.arange(n, dtype=np.int64) + 100,
        sex=np.asarray(sex or [k % 2 for k in range(n)], np.int8),
        birth_year=np.asarray(birth_year or [1950 + k for k in range(n)], np.int16),
        split=np.asarray(split or [k % 3 for k in range(n)], np.int8),
        code_names=np.asarray(code_names),
    )


def write_shard(path: Path, rows: list[tuple[int, str | None, str]], schema: pa.Schema | None = None) -> None:
    """A data shard from (subject, ISO time or None, code) rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = schema or pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string())])
    columns = {
        "subject_id": [r[0] for r in rows],
        "time": [None if r[1] is None else dt.datetime.fromisoformat(r[1]) for r in rows],
        "code": [r[2] for r in rows],
    }
    pq.write_table(pa.table({k: columns[k] for k in schema.names}, schema=schema), path)


def write_splits(root: Path, split: dict[int, str]) -> None:
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    table = pa.table({"subject_id": pa.array(list(split), pa.int64()), "split": pa.array(list(split.values()))})
    pq.write_table(table, root / "metadata" / "subject_splits.parquet")


def write_labels(path: Path, rows: list[tuple[int, str, bool]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "subject_id": pa.array([r[0] for r in rows], pa.int64()),
            "prediction_time": pa.array([dt.datetime.fromisoformat(r[1]) for r in rows], pa.timestamp("us")),
            "boolean_value": pa.array([r[2] for r in rows], pa.bool_()),
        }
    )
    pq.write_table(table, path)


# A small MEDS dataset written by hand: subject 7 in shard b, subject 5 in shard a (rows not sorted by
# subject), a death event, a code missing from codes.parquet, a numeric value column.
def small_dataset(root: Path) -> Path:
    write_shard(
        root / "data" / "a.parquet",
        [
            (5, None, "GENDER//M"),
            (5, "1990-03-10T00:00", "MEDS_BIRTH"),
            (5, "2020-01-01T08:00", "X"),
            (5, "2020-01-01T08:00", "Y"),
            (5, "2020-01-01T10:30", "X"),
            (5, "2020-02-15T09:00", "MEDS_DEATH"),
        ],
    )
    write_shard(
        root / "data" / "b.parquet",
        [
            (7, "2001-12-31T23:00", "MEDS_BIRTH"),
            (3, None, "GENDER//F"),
            (3, "1970-01-01T00:00", "MEDS_BIRTH"),
            (3, "1971-01-01T00:00", "Z"),
            (7, "2002-01-01T01:00", "Y"),
        ],
    )
    codes = pa.table({"code": ["Y", "X", "MEDS_BIRTH", "GENDER//F", "GENDER//M"]})
    pq.write_table(codes, _mkdir(root / "metadata") / "codes.parquet")
    write_splits(root, {3: "held_out", 5: "train", 7: "tuning"})
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_read_hand_written_dataset(tmp_path):
    c = read_meds(small_dataset(tmp_path / "m"))
    # Shard a then b; within b subjects by id (3 before 7). Codes: codes.parquet order, then unseen (Z, MEDS_DEATH
    # in first-seen order: a has MEDS_DEATH, b has Z).
    assert c.code_names.tolist() == ["Y", "X", "MEDS_DEATH", "Z"]
    assert c.patient_id.tolist() == [5, 3, 7]
    assert c.sex.tolist() == [1, 0, -1]
    assert c.birth_year.tolist() == [1990, 1970, 2001]
    assert c.split.tolist() == [0, 2, 1]
    assert c.offsets.tolist() == [0, 4, 5, 6]
    assert [str(c.code_names[i]) for i in c.codes[:4]] == ["X", "Y", "X", "MEDS_DEATH"]
    assert c.visit.tolist() == [0, 0, 1, 2, 0, 0]
    # Subject 5: born 1990-03-10; 2020-01-01 is 10,889 days later -> 357.75 months -> 357; 2020-02-15: 10,934 -> 359.
    # Subject 3: 365 days -> 11.99 months -> 11. Subject 7: 2 hours -> 0 months.
    assert c.age.tolist() == [357, 357, 357, 359, 11, 0]
    assert c.time.tolist() == [0, 0, 0, 45, 0, 0]
    assert 10_889 // DAYS_PER_MONTH == 357 and 10_934 // DAYS_PER_MONTH == 359


def test_visit_hours_groups_by_gap(tmp_path):
    root = small_dataset(tmp_path / "m")
    c = read_meds(root, visit_hours=2.5)  # 08:00 and 10:30 of subject 5 are 2.5 h apart: one visit
    assert c.visit.tolist() == [0, 0, 0, 1, 0, 0]
    assert c.time.tolist() == [0, 0, 0, 45, 0, 0]
    c = read_meds(root, visit_hours=2.4)
    assert c.visit.tolist() == [0, 0, 1, 2, 0, 0]


def test_dates_by_hand(tmp_path):
    # Born 2000: visits at 12 months day 0, again that day, 14 months on day 70. A whole-day birth-to-first-visit
    # gap of 365 days puts the first visit at 365.25 days = 12 months only from 06:00 on: birth 2000-07-01 00:00,
    # visits 2001-07-01 06:00, 06:00 + 1 us, 2001-09-09 00:00 (435 days = 14.29 months).
    cohort = hand_cohort([[(12, 0, [0]), (12, 0, [1, 2]), (14, 70, [3])]], birth_year=[2000], sex=[0], split=[0])
    birth, times = cohort_timestamps(cohort)
    assert birth.tolist() == [us("2000-07-01T00:00")]
    expected = [us("2001-07-01T06:00"), us("2001-07-01T06:00") + 1, us("2001-07-01T06:00") + 1, us("2001-09-09T00:00")]
    assert times.tolist() == expected
    write_meds(cohort, tmp_path / "m")
    table = pq.read_table(tmp_path / "m" / "data" / "000000.parquet")
    assert table.column("code").to_pylist() == ["GENDER//F", "MEDS_BIRTH", "A", "B", "C", "D"]
    assert table.column("time").cast(pa.int64()).to_pylist() == [None, birth[0], *expected]
    assert_same_records(read_meds(tmp_path / "m"), cohort)


def test_dates_need_a_time_of_day_at_birth_when_days_cannot_reconcile():
    # Visits (age 0, day 0), (0, 30), (3, 90). With y = birth to first-visit midnight: day 30 at age 0 needs
    # y + 30 < 30.4375 days; day 90 at 3 months needs y + 90 + (< 1 day) >= 91.3125: y in (0.3125, 0.4375) days,
    # no whole day, so the birth is at a time of day: y = 0.3125 d + 1 us, birth 1 July + 0.6875 d - 1 us.
    cohort = hand_cohort([[(0, 0, [0]), (0, 30, [1]), (3, 90, [2])]], birth_year=[1999])
    birth, times = cohort_timestamps(cohort)
    assert birth.tolist() == [us("1999-07-01T16:30") - 1]
    assert ((times - birth[0]) // MONTH_US).tolist() == [0, 0, 3]
    assert (times // (86_400 * 10**6) - times[0] // (86_400 * 10**6)).tolist() == [0, 30, 90]


def test_inconsistent_cohort_is_refused(tmp_path):
    cohort = hand_cohort([[(5, 0, [0]), (4, 10, [1])]])  # age goes down
    with pytest.raises(ValueError, match="patient 100"):
        write_meds(cohort, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_written_files_follow_the_meds_schemas(tmp_path):
    cohort = generate_cohort(300, 1, "finetune", 20)
    root = write_meds(cohort, tmp_path / "m", shard_size=128)
    shards = sorted((root / "data").glob("*.parquet"))
    assert len(shards) == 3
    seen: set[int] = set()
    catalogue = set(pq.read_table(root / meds.code_metadata_filepath).column("code").to_pylist())
    for shard in shards:
        table = pq.read_table(shard)
        meds.DataSchema.validate(table)
        ids = table.column("subject_id").to_numpy()
        assert not seen & set(ids.tolist())  # a subject is in one shard only
        seen |= set(ids.tolist())
        assert np.all(np.diff(ids) >= 0)  # contiguous subjects
        time = table.column("time").cast(pa.int64()).to_numpy(zero_copy_only=False)
        timed = ~np.isnan(time.astype(float))
        for sid in np.unique(ids):
            rows = ids == sid
            assert np.all(np.diff(timed[rows].astype(int)) >= 0)  # static rows first
            t = time[rows & timed].astype(np.int64)
            assert np.all(np.diff(t) >= 0)
        assert set(table.column("code").to_pylist()) <= catalogue
    assert seen == set(cohort.patient_id.tolist())
    meds.CodeMetadataSchema.validate(pq.read_table(root / meds.code_metadata_filepath))
    splits = pq.read_table(root / meds.subject_splits_filepath)
    meds.SubjectSplitSchema.validate(splits)
    assert set(splits.column("split").to_pylist()) == {meds.train_split, meds.tuning_split, meds.held_out_split}
    metadata = json.loads((root / meds.dataset_metadata_filepath).read_text())
    meds.DatasetMetadataSchema.validate(metadata)
    assert metadata["meds_version"] == meds.__version__
    task = write_meds_labels(cohort, tmp_path, "hf")
    labels = pq.read_table(task / "labels.parquet")
    meds.LabelSchema.validate(labels)
    assert labels.column_names == ["subject_id", "prediction_time", "boolean_value"]
    assert labels.num_rows == int((cohort.labels["outcome"] >= 0).sum())


@pytest.mark.parametrize("stream", ["pretrain", "finetune"])
def test_round_trip_synthetic(tmp_path, stream):
    cohort = generate_cohort(700, 2, stream, 30)
    write_meds(cohort, tmp_path / "m", shard_size=200)
    assert_same_records(read_meds(tmp_path / "m"), cohort)


def test_round_trip_with_labels(tmp_path):
    cohort = generate_cohort(800, 4, "finetune", 30)
    write_meds(cohort, tmp_path / "m", shard_size=300)
    task = write_meds_labels(cohort, tmp_path)
    read = read_meds(tmp_path / "m", labels_dir=task)
    eligible = cohort.select(cohort.labels["outcome"] >= 0)
    assert_same_records(read, eligible)
    np.testing.assert_array_equal(read.labels["outcome"], eligible.labels["outcome"])
    assert "outcome_p" not in read.labels
    _, times = cohort_timestamps(eligible)
    last = times[eligible.offsets[1:] - 1]  # the index visit closes each eligible history
    np.testing.assert_array_equal(read.labels["prediction_time"], last + 1)


@st.composite
def dated_cohorts(draw):
    """Cohorts made like the generator's: true ages in days (float), then whole months and whole days."""
    n = draw(st.integers(1, 6))
    visits, birth_year = [], []
    for _ in range(n):
        first = draw(st.floats(0.0, 90 * 365.25))
        gaps = draw(st.lists(st.one_of(st.just(0.0), st.floats(0.0, 1.5), st.floats(0.0, 400.0)), max_size=6))
        ages = first + np.cumsum([0.0, *gaps])
        ages = ages[: draw(st.integers(0, len(ages)))]
        record = []
        for a in ages:
            codes = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True))
            record.append((int(a / DAYS_PER_MONTH), int(a - first), sorted(codes)))
        visits.append(record)
        birth_year.append(draw(st.integers(1900, 2030)))
    sex = draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))
    split = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    return hand_cohort(visits, birth_year=birth_year, sex=sex, split=split)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cohort=dated_cohorts(), shard_size=st.integers(1, 4))
def test_round_trip_property(tmp_path_factory, cohort, shard_size):
    root = tmp_path_factory.mktemp("meds") / "m"
    write_meds(cohort, root, shard_size=shard_size)
    assert_same_records(read_meds(root), cohort)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 40),
    seed=st.integers(0, 5),
    stream=st.sampled_from(["pretrain", "finetune"]),
    keep=st.integers(0, 2**20),
)
def test_round_trip_synthetic_property(tmp_path_factory, n, seed, stream, keep):
    cohort = generate_cohort(n, seed, stream, 10)
    rows = np.flatnonzero((keep >> (np.arange(n) % 20)) & 1) if n > 1 else np.arange(n)
    cohort = cohort.select(rows)
    root = tmp_path_factory.mktemp("meds") / "m"
    write_meds(cohort, root, shard_size=7)
    read = read_meds(root)
    if len(cohort):
        assert_same_records(read, cohort)


def leak_dataset(root: Path) -> Path:
    write_shard(
        root / "data" / "0.parquet",
        [
            (1, "1960-01-01T00:00", "MEDS_BIRTH"),
            (1, "2020-01-01T00:00", "A"),
            (1, "2020-06-01T12:00", "B"),
            (1, "2020-06-01T12:00", "C"),  # at the prediction time: must not be seen
            (1, "2020-06-02T00:00", "D"),  # after: must not be seen
            (2, "1970-01-01T00:00", "MEDS_BIRTH"),
            (2, "2010-01-01T00:00", "A"),
        ],
    )
    write_splits(root, {1: "train", 2: "held_out"})
    return root


def test_history_ends_strictly_before_prediction_time(tmp_path):
    root = leak_dataset(tmp_path / "m")
    write_labels(
        tmp_path / "task" / "part" / "0.parquet",
        [
            (1, "2020-06-01T12:00", True),
            (2, "2010-01-01T00:00:00.000001", False),
            (1, "2020-06-01T12:00:00.000001", False),
        ],
    )
    c = read_meds(root, labels_dir=tmp_path / "task")
    assert c.patient_id.tolist() == [1, 1, 2]  # by subject, then prediction time
    assert [[str(c.code_names[k]) for k in c.patient(i)["codes"]] for i in range(3)] == [["A"], ["A", "B", "C"], ["A"]]
    assert c.labels["outcome"].tolist() == [1, 0, 0]
    assert c.labels["prediction_time"].tolist() == [
        us("2020-06-01T12:00"),
        us("2020-06-01T12:00") + 1,
        us("2010-01-01T00:00") + 1,
    ]
    assert set(c.labels) == {"outcome", "prediction_time"}


def test_label_at_the_index_visit_time_drops_that_visit(tmp_path):
    cohort = generate_cohort(200, 0, "finetune", 10)
    eligible = cohort.select(cohort.labels["outcome"] >= 0)
    write_meds(eligible, tmp_path / "m")
    task = write_meds_labels(eligible, tmp_path)
    table = pq.read_table(task / "labels.parquet")
    shifted = pa.array(table.column(1).cast(pa.int64()).to_numpy() - 1).cast(pa.timestamp("us"))
    earlier = table.set_column(1, "prediction_time", shifted).cast(table.schema)
    pq.write_table(earlier, task / "labels.parquet")
    read = read_meds(tmp_path / "m", labels_dir=task)
    np.testing.assert_array_equal(read.num_visits, eligible.num_visits - 1)


def test_missing_extra_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"ehrjax\[meds\]"):
        read_meds(tmp_path)


def test_a_subject_without_a_birth_row_is_aged_from_its_first_event(tmp_path):
    """MEDS requires only subject_id, time and code: a subject without MEDS_BIRTH does not fail the dataset."""
    root = tmp_path / "m"
    write_shard(root / "data" / "a.parquet", [
        (5, "1990-01-01T00:00", "MEDS_BIRTH"), (5, "2000-01-01T00:00", "X"),
        (6, "2000-03-01T00:00", "X"), (6, "2001-03-02T00:00", "Y"),
    ])  # fmt: skip
    write_splits(root, {5: "train", 6: "train"})
    cohort = read_meds(root)
    assert cohort.patient_id.tolist() == [5, 6]
    ages = cohort.age[cohort.offsets[1] :].tolist()
    assert ages == [0, 12]  # months of 30.4375 days from the first event
    assert int(cohort.birth_year[1]) == 2000 and int(cohort.birth_year[0]) == 1990
    assert cohort.meta["subjects_without_birth"] == 1


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("missing_column", r"a\.parquet: missing column 'code'"),
        ("wrong_type", r"a\.parquet: column 'time' has type timestamp\[ns\], expected timestamp\[us\]"),
        ("unsorted", r"a\.parquet: row 2 \(subject 5\): time goes back"),
        ("split_across", r"subject 5 is also in .*a\.parquet"),
        ("empty", r"no data/\*\*/\*\.parquet shards"),
        ("no_split", r"subject_splits\.parquet: no split for subject 5"),
    ],
)
def test_bad_data_one_line_errors(tmp_path, damage, message):
    root = tmp_path / "m"
    rows = [(5, "1990-01-01T00:00", "MEDS_BIRTH"), (5, "2000-01-01T00:00", "X"), (5, "2001-01-01T00:00", "Y")]
    schema = None
    if damage == "missing_column":
        schema = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us"))])
    elif damage == "wrong_type":
        schema = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("ns")), ("code", pa.string())])
    elif damage == "unsorted":
        rows[1], rows[2] = rows[2], rows[1]
    if damage == "empty":
        root.mkdir()
        (root / "data").mkdir()
    else:
        write_shard(root / "data" / "a.parquet", rows, schema)
    if damage == "split_across":
        write_shard(root / "data" / "b.parquet", [(5, "2002-01-01T00:00", "Z")])
    write_splits(root, {6: "train"} if damage == "no_split" else {5: "train"})
    with pytest.raises(ValueError, match=message) as err:
        read_meds(root)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([(9, "2020-01-01T00:00", True)], r"labels\.parquet: row 0: subject 9 is not in the MEDS data"),
        (
            [(2, "2020-01-01T00:00", True), (1, "1959-12-31T00:00", False)],
            r"labels\.parquet: row 1 \(subject 1\): prediction time is before the subject's first event",
        ),
    ],
)
def test_bad_labels_one_line_errors(tmp_path, rows, message):
    root = leak_dataset(tmp_path / "m")
    write_labels(tmp_path / "task" / "labels.parquet", rows)
    with pytest.raises(ValueError, match=message) as err:
        read_meds(root, labels_dir=tmp_path / "task")
    assert "\n" not in str(err.value)


def test_label_file_with_a_wrong_type(tmp_path):
    root = leak_dataset(tmp_path / "m")
    (tmp_path / "task").mkdir()
    table = pa.table({"subject_id": pa.array([1], pa.int32()), "prediction_time": [dt.datetime(2020, 1, 1)],
                      "boolean_value": [True]})  # fmt: skip
    pq.write_table(table, tmp_path / "task" / "x.parquet")
    with pytest.raises(ValueError, match=r"x\.parquet: column 'subject_id' has type int32, expected int64"):
        read_meds(root, labels_dir=tmp_path / "task")


def test_output_must_be_new_or_empty(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("keep")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        write_meds(hand_cohort([[(1, 0, [0])]]), tmp_path / "m")
    assert (tmp_path / "m" / "x").read_text() == "keep"


def test_predictions_file_and_meds_evaluation_auroc(tmp_path):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n = 200
    y = rng.random(n) < 0.3
    p = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    times = np.full(n, us("2020-01-01T00:00")) + np.arange(n)
    path = write_meds_predictions(tmp_path / "pred.parquet", np.arange(n) + 10, times, y, p, threshold=0.4)
    table = pq.read_table(path)
    assert table.column_names == [
        "subject_id",
        "prediction_time",
        "boolean_value",
        "predicted_boolean_value",
        "predicted_boolean_probability",
    ]
    assert table.column("predicted_boolean_value").to_pylist() == (p.astype(np.float32) >= 0.4).tolist()
    meds.LabelSchema.validate(table.select(["subject_id", "prediction_time", "boolean_value"]))
    evaluation = pytest.importorskip("meds_evaluation.evaluate")
    polars = pytest.importorskip("polars")
    from meds_evaluation.schema import PredictionSchema

    PredictionSchema.validate(table)
    result = evaluation.evaluate_binary_classification(polars.read_parquet(path))
    expected = roc_auc_score(y, p.astype(np.float32))
    assert result["samples_equally_weighted"]["roc_auc_score"] == pytest.approx(expected, abs=1e-12)


def test_predictions_bad_input(tmp_path):
    with pytest.raises(ValueError, match="probability has shape"):
        write_meds_predictions(tmp_path / "p.parquet", np.arange(3), np.zeros(3, np.int64), np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="NaN"):
        write_meds_predictions(tmp_path / "p.parquet", [1], [0], [1], [np.nan])
    assert not (tmp_path / "p.parquet").exists()


@pytest.mark.slow
def test_meds_reader_sees_the_same_events(tmp_path):
    meds_reader = pytest.importorskip("meds_reader")
    convert = shutil.which("meds_reader_convert", path=str(Path(sys.executable).parent))
    if convert is None:
        pytest.skip("meds_reader_convert not installed")
    cohort = generate_cohort(300, 5, "pretrain", 20)
    root = write_meds(cohort, tmp_path / "m", shard_size=100)
    subprocess.run([convert, str(root), str(tmp_path / "db")], check=True, capture_output=True)
    birth, times = cohort_timestamps(cohort)
    with meds_reader.SubjectDatabase(str(tmp_path / "db")) as db:
        assert sorted(db) == sorted(cohort.patient_id.tolist())
        for i in range(len(cohort)):
            events = db[int(cohort.patient_id[i])].events
            timed = [(e.time, e.code) for e in events if e.time is not None]
            static = [e.code for e in events if e.time is None]
            lo, hi = cohort.offsets[i], cohort.offsets[i + 1]
            expected = [(int(birth[i]), "MEDS_BIRTH")] + [
                (int(t), str(cohort.code_names[c])) for t, c in zip(times[lo:hi], cohort.codes[lo:hi], strict=True)
            ]
            got = [(int(np.datetime64(t, "us").astype(np.int64)), c) for t, c in timed]
            assert sorted(got) == sorted(expected)
            assert static == [("GENDER//F", "GENDER//M")[cohort.sex[i]]]


def test_cli_write_and_read(tmp_path, capsys):
    from ehrjax.data.meds import main

    out = tmp_path / "m"
    code = main(["write", "--num-patients", "50", "--stream", "finetune", "--num-noise-codes", "10",
                 "--out", str(out), "--labels", str(tmp_path / "labels")])  # fmt: skip
    assert code == 0
    assert_same_records(read_meds(out), generate_cohort(50, 0, "finetune", 10))
    assert main(["read", str(out), "--labels", str(tmp_path / "labels" / "outcome")]) == 0
    assert "outcome:" in capsys.readouterr().out
    assert main(["read", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MEDS directory") and err.count("\n") == 1
