import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from visit_cohorts import cohort_from_visits

from ehrjax.data.cohort import Cohort
from ehrjax.data.tokenize import tokenize
from ehrjax.data.vocab import CLS, NUM_SPECIAL, SEP, UNK, Vocab

CODE_NAMES = np.asarray([f"ICD10:C{i:02d}" for i in range(12)])


def make_cohort(patients: list[list[list[int]]]) -> Cohort:
    """A cohort from per-patient visits of code indices; visit v of a patient is at age 100 + 10 v months."""
    return cohort_from_visits([[(100 + 10 * v, 100 + 10 * v, c) for v, c in enumerate(visits)] for visits in patients],
                              CODE_NAMES)  # fmt: skip


# Codes 10 and 11 are left out of the vocabulary, so they map to [UNK].
VOCAB = Vocab(list(CODE_NAMES[:10]))

visits_st = st.lists(st.lists(st.integers(0, 11), min_size=1, max_size=4), min_size=0, max_size=6)
cohorts_st = st.lists(visits_st, min_size=1, max_size=8)


def reference_layout(visits: list[list[int]], max_len: int) -> dict[str, list[int]]:
    """The layout of one patient, written the obvious way."""
    ids = VOCAB.ids(CODE_NAMES)
    entries = []  # (code, age, visit, is_sep)
    for v, visit_codes in enumerate(visits):
        entries += [(int(ids[c]), 100 + 10 * v, v, False) for c in visit_codes]
        entries.append((SEP, 100 + 10 * v, v, True))
    entries = entries[len(entries) - min(len(entries), max_len - 1) :]
    if entries and entries[0][3]:
        entries = entries[1:]
    first_age, first_visit = (entries[0][1], entries[0][2]) if entries else (0, 0)
    return {
        "codes": [CLS] + [e[0] for e in entries],
        "ages": [first_age] + [e[1] for e in entries],
        "visits": [0] + [e[2] - first_visit for e in entries],
    }


def test_layout_by_hand():
    cohort = make_cohort([[[0, 1], [2]], [], [[11]]])
    corpus = tokenize(cohort, VOCAB, max_len=16)
    a, b, c = (VOCAB.id(str(CODE_NAMES[i])) for i in range(3))
    assert corpus.patient(0)["codes"].tolist() == [CLS, a, b, SEP, c, SEP]
    assert corpus.patient(0)["ages"].tolist() == [100, 100, 100, 100, 110, 110]
    assert corpus.patient(0)["visits"].tolist() == [0, 0, 0, 0, 1, 1]
    assert corpus.patient(1)["codes"].tolist() == [CLS]
    assert corpus.patient(2)["codes"].tolist() == [CLS, UNK, SEP]
    assert corpus.lengths.tolist() == [6, 1, 3]
    assert corpus.num_truncated == 0


def test_truncation_by_hand():
    cohort = make_cohort([[[0, 1], [2]]])  # [CLS] a b [SEP] c [SEP]
    c = VOCAB.id(str(CODE_NAMES[2]))
    b = VOCAB.id(str(CODE_NAMES[1]))
    # 4 tokens: the cut leaves "[SEP] c [SEP]": the leading [SEP] goes.
    corpus = tokenize(cohort, VOCAB, max_len=4)
    assert corpus.patient(0)["codes"].tolist() == [CLS, c, SEP]
    assert corpus.patient(0)["ages"].tolist() == [110, 110, 110]
    assert corpus.patient(0)["visits"].tolist() == [0, 0, 0]
    # 5 tokens: a cut inside the first visit keeps its most recent code.
    corpus = tokenize(cohort, VOCAB, max_len=5)
    assert corpus.patient(0)["codes"].tolist() == [CLS, b, SEP, c, SEP]
    assert corpus.patient(0)["visits"].tolist() == [0, 0, 0, 1, 1]
    assert corpus.num_truncated == 1


def test_visit_gaps_and_same_visit_across_patients():
    """Visit indices need not be contiguous, and two patients may both have visit 0 back to back."""
    cohort = make_cohort([[[0]], [[1]]])
    cohort = Cohort(**{**cohort.__dict__, "visit": np.asarray([0, 0], dtype=np.int32)})
    corpus = tokenize(cohort, VOCAB, max_len=8)
    assert corpus.lengths.tolist() == [3, 3]
    gaps = make_cohort([[[0], [1]]])
    gaps = Cohort(**{**gaps.__dict__, "visit": np.asarray([3, 7], dtype=np.int32)})
    assert tokenize(gaps, VOCAB, max_len=8).patient(0)["visits"].tolist() == [0, 0, 0, 1, 1]


@settings(max_examples=150, deadline=None)
@given(patients=cohorts_st, max_len=st.integers(3, 24))
def test_matches_reference_layout(patients, max_len):
    corpus = tokenize(make_cohort(patients), VOCAB, max_len)
    assert len(corpus) == len(patients)
    for i, visits in enumerate(patients):
        got = {k: v.tolist() for k, v in corpus.patient(i).items()}
        assert got == reference_layout(visits, max_len)


@settings(max_examples=150, deadline=None)
@given(patients=cohorts_st, max_len=st.integers(3, 24))
def test_truncation_keeps_most_recent(patients, max_len):
    cohort = make_cohort(patients)
    corpus = tokenize(cohort, VOCAB, max_len)
    full = tokenize(cohort, VOCAB, 10_000)
    assert corpus.lengths.max() <= max_len
    assert corpus.num_truncated == int(np.sum(full.lengths > max_len))
    for i in range(len(cohort)):
        p, f = corpus.patient(i), full.patient(i)
        assert p["codes"][0] == CLS and p["visits"][0] == 0
        if len(p["codes"]) > 1:
            assert p["codes"][1] != SEP  # never a leading [SEP] after [CLS]
            assert p["codes"][-1] == SEP
            assert p["ages"][0] == p["ages"][1]
        kept = len(p["codes"]) - 1
        # The kept tokens are the most recent ones of the full layout; at most one more (a [SEP]) was cut.
        assert p["codes"][1:].tolist() == f["codes"][len(f["codes"]) - kept :].tolist()
        assert p["ages"][1:].tolist() == f["ages"][len(f["ages"]) - kept :].tolist()
        assert kept >= min(len(f["codes"]) - 1, max_len - 1) - 1
        # Visits start at 0 and step by one right after each [SEP].
        steps = np.diff(p["visits"][1:])
        after_sep = p["codes"][1:-1] == SEP
        assert np.all(steps == after_sep.astype(int))


def test_special_ids_and_dtypes():
    corpus = tokenize(make_cohort([[[0, 10], [3]]]), VOCAB, max_len=10)
    assert corpus.codes.dtype == np.int32 and corpus.ages.dtype == np.int32 and corpus.visits.dtype == np.int32
    assert corpus.offsets.dtype == np.int64
    clinical = corpus.codes[(corpus.codes != CLS) & (corpus.codes != SEP)]
    assert set(clinical.tolist()) <= set(range(NUM_SPECIAL, len(VOCAB))) | {UNK}


def test_bad_input():
    with pytest.raises(ValueError, match=r"data\.max_len"):
        tokenize(make_cohort([[[0]]]), VOCAB, max_len=2)
    with pytest.raises(ValueError, match="empty cohort"):
        tokenize(make_cohort([]), VOCAB, max_len=8)
