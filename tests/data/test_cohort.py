import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrjax.data.cohort import Cohort, ragged_index


def make_cohort(lengths, next_visit_lengths=None):
    lengths = np.asarray(lengths, dtype=np.int64)
    n, total = len(lengths), int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    patient = np.repeat(np.arange(n), lengths)
    within = np.arange(total) - offsets[patient]
    labels = {"outcome": (np.arange(n) % 3 - 1).astype(np.int8)}
    if next_visit_lengths is not None:
        nv = np.asarray(next_visit_lengths)
        labels["next_visit"] = np.arange(nv.sum(), dtype=np.int32) % 7
        labels["next_visit_offsets"] = np.concatenate([[0], np.cumsum(nv)]).astype(np.int64)
    return Cohort(
        codes=((patient * 7 + within) % 10).astype(np.int32),
        visit=(within // 2).astype(np.int32),
        age=(400 + patient + within).astype(np.int32),
        time=(within * 30).astype(np.int32),
        offsets=offsets,
        patient_id=np.arange(n, dtype=np.int64) + 100,
        sex=(np.arange(n) % 2).astype(np.int8),
        birth_year=np.full(n, 1970, dtype=np.int16),
        split=(np.arange(n) % 3).astype(np.int8),
        code_names=np.array([f"NOISE:{k:04d}" for k in range(10)]),
        labels=labels,
    )


def test_select_gathers_exact_records_and_ragged_labels():
    cohort = make_cohort([3, 0, 2, 4], next_visit_lengths=[1, 2, 0, 3])
    sub = cohort.select(np.array([3, 0]))
    assert len(sub) == 2 and sub.num_tokens == 7
    np.testing.assert_array_equal(sub.codes, np.concatenate([cohort.codes[5:9], cohort.codes[0:3]]))
    np.testing.assert_array_equal(sub.patient_id, [103, 100])
    np.testing.assert_array_equal(sub.labels["next_visit"], [3, 4, 5, 0])
    np.testing.assert_array_equal(sub.labels["next_visit_offsets"], [0, 3, 4])
    np.testing.assert_array_equal(sub.labels["outcome"], cohort.labels["outcome"][[3, 0]])


def test_slice_boolean_mask_and_patient_view():
    cohort = make_cohort([2, 1, 3])
    assert cohort[1:].equals(cohort.select(np.array([1, 2])))
    assert cohort.select(np.array([False, True, True])).equals(cohort[1:])
    view = cohort.patient(2)
    assert view["patient_id"] == 102 and view["split"] == "test"
    assert view["code_strings"] == [str(cohort.code_names[c]) for c in cohort.codes[3:6]]
    np.testing.assert_array_equal(cohort.num_visits, [1, 1, 2])


@given(st.lists(st.integers(0, 12), min_size=1, max_size=30), st.data())
@settings(max_examples=50, deadline=None)
def test_ragged_index_matches_python_reference(lengths, data):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    rows = np.array(data.draw(st.lists(st.integers(0, len(lengths) - 1), max_size=40)), dtype=np.int64)
    index, new_offsets = ragged_index(offsets, rows)
    expected = [i for r in rows for i in range(offsets[r], offsets[r + 1])]
    np.testing.assert_array_equal(index, np.array(expected, dtype=np.int64))
    np.testing.assert_array_equal(np.diff(new_offsets), [lengths[r] for r in rows])


def test_save_load_round_trip(tmp_path):
    cohort = make_cohort([3, 1, 5], next_visit_lengths=[0, 2, 1])
    cohort.save(tmp_path / "c.npz")
    loaded = Cohort.load(tmp_path / "c.npz")
    assert loaded.equals(cohort)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=r"bad\.npz: not a readable \.npz"):
        Cohort.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not an ehrjax cohort"):
        Cohort.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="does not exist"):
        Cohort.load(tmp_path / "missing.npz")


def test_save_to_missing_folder_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_cohort([1]).save(tmp_path / "nope" / "c.npz")
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_arrays_are_rejected():
    cohort = make_cohort([2, 2])
    with pytest.raises(ValueError, match="offsets"):
        Cohort(**{**cohort.__dict__, "offsets": np.array([0, 3, 2])})
    with pytest.raises(ValueError, match="'sex' has 1 rows"):
        Cohort(**{**cohort.__dict__, "sex": np.zeros(1, dtype=np.int8)})


def test_summary_counts():
    cohort = make_cohort([1, 2, 3, 10])
    s = cohort.summary()
    assert s["patients"] == 4 and s["tokens"] == 16 and s["visits"] == 1 + 1 + 2 + 5
    assert s["splits"] == {"train": 2, "val": 1, "test": 1}
    assert "length histogram" in cohort.format_summary()


@pytest.mark.parametrize("chunk", [1, 3, 16, 1 << 22])
def test_code_counts_in_chunks_equal_one_bincount(monkeypatch, chunk):
    import ehrjax.data.cohort as cohort_module

    monkeypatch.setattr(cohort_module, "_COUNT_CHUNK", chunk)
    cohort = make_cohort([1, 2, 3, 10, 0, 7])
    counts = cohort.code_counts()
    assert counts.dtype == np.int64 and len(counts) == 10
    np.testing.assert_array_equal(counts, np.bincount(cohort.codes, minlength=10))
