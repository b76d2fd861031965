"""Time tokens between visits: the gap bins, the layout (against one written the obvious way), the vocabulary
block, what masking and the MLM baselines do with them, the task data's checks and the MEDS round trip."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from visit_cohorts import cohort_from_visits

from ehrjax.data.cohort import Cohort
from ehrjax.data.masking import mask_tokens
from ehrjax.data.tasks import make_task_data
from ehrjax.data.tokenize import time_gap_index, tokenize
from ehrjax.data.vocab import CLS, NUM_SPECIAL, SEP, TIME_TOKENS, Vocab
from ehrjax.eval.baselines import copy_statistics

CODE_NAMES = np.asarray([f"ICD10:C{i:02d}" for i in range(6)])
VOCAB = Vocab.build(CODE_NAMES, np.arange(6, 0, -1), time_tokens=True)


def make_cohort(patients: list[list[tuple[int, list[int]]]], splits: list[int] | None = None) -> Cohort:
    """A cohort from per-patient visits `(day, codes)`; age in months = 600 + day // 30."""
    return cohort_from_visits([[(day, 600 + day // 30, c) for day, c in visits] for visits in patients], CODE_NAMES,
                              splits)  # fmt: skip


def test_gap_bins_at_every_boundary():
    days = [0, 6, 7, 13, 14, 20, 21, 27, 28, 59, 60, 89, 329, 330, 359, 360, 5000]
    names = ["W0", "W0", "W1", "W1", "W2", "W2", "W3", "W3", "M1", "M1", "M2", "M2", "M10", "M11", "M11", "LT", "LT"]
    assert [TIME_TOKENS[i] for i in time_gap_index(np.asarray(days))] == [f"TIME:{n}" for n in names]
    assert len(TIME_TOKENS) == 16 and len(set(TIME_TOKENS)) == 16


def test_layout_of_hand_made_visits():
    cohort = make_cohort([[(0, [0]), (3, [1, 2]), (10, [3]), (40, [4]), (400, [5])], [(100, [0])]])
    corpus = tokenize(cohort, VOCAB, max_len=64, time_tokens=True)
    ids = VOCAB.ids(CODE_NAMES)
    t = {name: VOCAB.id(f"TIME:{name}") for name in ("W0", "W1", "M1", "LT")}
    first = corpus.patient(0)
    assert first["codes"].tolist() == [CLS, ids[0], SEP, t["W0"], ids[1], ids[2], SEP, t["W1"], ids[3], SEP,
                                       t["M1"], ids[4], SEP, t["LT"], ids[5], SEP]  # fmt: skip
    assert first["visits"].tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert first["ages"].tolist() == [600, 600, 600, 600, 600, 600, 600, 600, 600, 600, 601, 601, 601, 613, 613, 613]
    assert corpus.patient(1)["codes"].tolist() == [CLS, ids[0], SEP]  # one visit: no gap token


def reference_layout(visits: list[tuple[int, list[int]]], max_len: int) -> list[int]:
    """One patient's codes, written the obvious way: gap token, codes, [SEP] per visit; cut from the front,
    then a leading [SEP] and a leading gap token dropped."""
    ids = VOCAB.ids(CODE_NAMES)
    entries: list[tuple[int, str]] = []
    for v, (day, codes) in enumerate(visits):
        if v:
            entries.append((int(VOCAB.time_token_ids()[time_gap_index(day - visits[v - 1][0])]), "time"))
        entries += [(int(ids[c]), "code") for c in codes]
        entries.append((SEP, "sep"))
    entries = entries[len(entries) - min(len(entries), max_len - 1) :]
    for kind in ("sep", "time"):
        if entries and entries[0][1] == kind:
            entries = entries[1:]
    return [CLS] + [code for code, _ in entries]


gaps_st = st.integers(0, 900)
patients_st = st.lists(
    st.lists(st.tuples(gaps_st, st.lists(st.integers(0, 5), min_size=1, max_size=3)), min_size=0, max_size=6),
    min_size=1,
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(patients_st, st.integers(3, 20))
def test_layout_matches_the_obvious_one(patients, max_len):
    dated = []
    for visits in patients:
        day, timed = 0, []
        for gap, codes in visits:
            day += gap
            timed.append((day, codes))
        dated.append(timed)
    cohort = make_cohort(dated)
    corpus = tokenize(cohort, VOCAB, max_len, time_tokens=True)
    for i, visits in enumerate(dated):
        got = corpus.patient(i)["codes"].tolist()
        assert got == reference_layout(visits, max_len)
        assert len(got) <= max_len
    # Without the gap tokens the layout is exactly the plain one.
    plain = tokenize(cohort, VOCAB, max_len=10_000)
    timed = tokenize(cohort, VOCAB, max_len=10_000, time_tokens=True)
    keep = timed.codes < VOCAB.code_end
    np.testing.assert_array_equal(timed.codes[keep], plain.codes)
    np.testing.assert_array_equal(timed.ages[keep], plain.ages)
    np.testing.assert_array_equal(timed.visits[keep], plain.visits)


def test_vocab_block_and_errors(tmp_path):
    assert VOCAB.codes[-16:] == TIME_TOKENS and VOCAB.code_end == len(VOCAB) - 16 == NUM_SPECIAL + 6
    VOCAB.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json").code_end == VOCAB.code_end
    plain = Vocab.build(CODE_NAMES, np.ones(6))
    assert plain.code_end == len(plain) and not plain.has_time_tokens
    with pytest.raises(ValueError, match="close the vocabulary"):
        Vocab([*TIME_TOKENS, "ICD10:C00"])
    with pytest.raises(ValueError, match="TIME: prefix is reserved"):
        Vocab.build(np.asarray(["TIME:W0", "ICD10:C00"]), np.ones(2))
    cohort = make_cohort([[(0, [0]), (9, [1])]])
    with pytest.raises(ValueError, match="vocabulary has no time tokens"):
        tokenize(cohort, plain, 16, time_tokens=True)


def test_task_data_refuses_a_vocabulary_of_the_other_choice():
    cohort = make_cohort([[(0, [0]), (9, [1])]] * 3, splits=[0, 1, 2])
    data = make_task_data(cohort, "mlm", max_len=16, time_tokens=True)
    assert data.vocab.has_time_tokens and (data.corpus.codes >= data.vocab.code_end).sum() == 3
    assert (data.frequent_codes(100) < data.vocab.code_end).all()
    with pytest.raises(ValueError, match=r"data\.time_tokens: False, but the vocabulary holds time tokens"):
        make_task_data(cohort, "mlm", max_len=16, vocab=data.vocab)
    with pytest.raises(ValueError, match="vocabulary has no time tokens"):
        make_task_data(cohort, "mlm", max_len=16, vocab=Vocab.build(CODE_NAMES, np.ones(6)), time_tokens=True)


def test_masking_never_selects_or_draws_a_time_token():
    corpus = tokenize(make_cohort([[(d, [d % 6, (d + 1) % 6]) for d in range(0, 400, 17)]] * 8), VOCAB, 64,
                      time_tokens=True)  # fmt: skip
    codes = jnp.asarray(corpus.codes[: 8 * 60].reshape(8, 60))
    is_time = np.asarray(codes) >= VOCAB.code_end
    assert is_time.any()
    for seed in range(5):
        masked, positions, labels, weights, _ = mask_tokens(
            jax.random.key(seed), codes, vocab_size=VOCAB.code_end, mask_prob=0.5, num_slots=60
        )
        chosen = np.zeros(codes.shape, bool)
        rows = np.repeat(np.arange(8)[:, None], 60, axis=1)
        chosen[rows[np.asarray(weights) > 0], np.asarray(positions)[np.asarray(weights) > 0]] = True
        assert chosen.any() and not (chosen & is_time).any()
        assert (np.asarray(labels)[np.asarray(weights) > 0] < VOCAB.code_end).all()
        np.testing.assert_array_equal(np.asarray(masked)[is_time], np.asarray(codes)[is_time])
        assert (np.asarray(masked)[chosen] < VOCAB.code_end).all()


def test_copy_baseline_ignores_time_tokens():
    t = VOCAB.id("TIME:W1")
    masked = jnp.asarray([[CLS, 5, SEP, t, 5, 6, SEP]], jnp.int32)
    segments = jnp.ones_like(masked)
    positions, labels = jnp.asarray([[4]], jnp.int32), jnp.asarray([[5]], jnp.int32)
    count, n_other = copy_statistics(masked, segments, positions, labels, code_end=VOCAB.code_end)
    assert (int(count[0, 0]), int(n_other[0, 0])) == (1, 2)  # codes 5 and 6 at positions 1 and 5, not W1
    count, n_other = copy_statistics(masked, segments, positions, labels)
    assert int(n_other[0, 0]) == 3  # without the bound the gap token would count as a visible code


def test_gap_tokens_survive_a_meds_round_trip(tmp_path):
    from ehrjax.data.meds import read_meds, write_meds

    cohort = make_cohort([[(0, [0]), (3, [1, 2]), (45, [3]), (800, [4])], [(0, [5]), (20, [0])]], splits=[0, 2])
    write_meds(cohort, tmp_path / "meds")
    back = read_meds(tmp_path / "meds")
    a = tokenize(cohort, VOCAB, 64, time_tokens=True)
    b = tokenize(back, VOCAB, 64, time_tokens=True)
    np.testing.assert_array_equal(
        np.asarray(VOCAB.codes)[a.codes], np.asarray(VOCAB.codes)[b.codes]
    )
    assert (a.codes >= VOCAB.code_end).sum() == 4


def test_tree_features_are_the_same_with_time_tokens_on_or_off():
    from ehrjax.eval.trees import frequent_codes, tabular_features

    cohort = make_cohort([[(0, [0, 1]), (5, [2]), (40, [0]), (700, [3, 4])], [(10, [5]), (12, [5, 1])],
                          [(3, [2, 2, 4])]])  # fmt: skip
    plain = Vocab.build(CODE_NAMES, np.arange(6, 0, -1))
    assert plain.ids(CODE_NAMES).tolist() == VOCAB.ids(CODE_NAMES).tolist()
    rows = np.arange(3)
    off = tokenize(cohort, plain, max_len=64)
    on = tokenize(cohort, VOCAB, max_len=64, time_tokens=True)
    assert (on.codes >= VOCAB.code_end).sum() == 4
    codes = frequent_codes(on, rows, code_end=VOCAB.code_end)
    np.testing.assert_array_equal(codes, frequent_codes(off, rows))
    np.testing.assert_array_equal(tabular_features(on, cohort, rows, codes, code_end=VOCAB.code_end),
                                  tabular_features(off, cohort, rows, codes))  # fmt: skip
    assert (frequent_codes(on, rows) >= VOCAB.code_end).any()  # without the bound gap tokens rank as codes
