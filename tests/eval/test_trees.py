"""Tabular history features (counts, recency, first-seen) and the log-loss-tuned gradient-boosted trees."""

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import log_loss, roc_auc_score
from threadpoolctl import threadpool_limits

from ehrjax.data.cohort import Cohort
from ehrjax.data.tokenize import tokenize
from ehrjax.data.vocab import Vocab
from ehrjax.eval.logreg import bag_of_codes_features, fit_logreg
from ehrjax.eval.trees import (
    EXTRA_FEATURES,
    TREE_BASE_PARAMS,
    fit_trees,
    frequent_codes,
    tabular_feature_names,
    tabular_features,
)

NAN = np.nan


def make_cohort(patients, sex, code_names):
    """patients: per patient a list of visits (day, age in months, [code names])."""
    index = {name: i for i, name in enumerate(code_names)}
    codes, visit, age, time, lengths = [], [], [], [], []
    for visits in patients:
        n = 0
        for v, (day, months, names) in enumerate(visits):
            for name in names:
                codes.append(index[name]), visit.append(v), age.append(months), time.append(day)
                n += 1
        lengths.append(n)
    n = len(patients)
    return Cohort(
        codes=np.array(codes, dtype=np.int32), visit=np.array(visit, dtype=np.int32),
        age=np.array(age, dtype=np.int32), time=np.array(time, dtype=np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), patient_id=np.arange(n, dtype=np.int64),
        sex=np.asarray(sex, dtype=np.int8), birth_year=np.full(n, 1970, dtype=np.int16),
        split=np.zeros(n, dtype=np.int8), code_names=np.array(code_names),
    )  # fmt: skip


def tiny():
    # Vocab ids: A=5, B=6, C=7 (the special tokens come first).
    cohort = make_cohort(
        [
            [(0, 600, ["A", "B"]), (100, 603, ["A"]), (400, 613, ["C", "A"])],
            [(0, 240, ["B"]), (10, 240, ["B"])],
            [(0, 360, ["C"])],
        ],
        sex=[1, 0, -1],
        code_names=["A", "B", "C"],
    )
    return cohort, Vocab(["A", "B", "C"])


def test_features_by_hand():
    cohort, vocab = tiny()
    corpus = tokenize(cohort, vocab, max_len=32)
    x = tabular_features(corpus, cohort, np.array([0, 1, 2]), np.array([5, 6, 7]))
    assert x.dtype == np.float32 and x.shape == (3, 3 * 3 + len(EXTRA_FEATURES))
    # counts A B C | days since last A B C | days since first A B C | age, sex, visits, days, visits 90d/365d
    expected = np.array(
        [
            [3, 1, 1, 0, 400, 0, 400, 400, 0, 613 / 12, 1, 3, 400, 1, 2],
            [0, 2, 0, NAN, 0, NAN, NAN, 10, NAN, 20, 0, 2, 10, 2, 2],
            [0, 0, 1, NAN, NAN, 0, NAN, NAN, 0, 30, NAN, 1, 0, 1, 1],
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    # Rows follow `patients`; columns follow `codes`.
    y = tabular_features(corpus, cohort, np.array([1, 0]), np.array([7, 5]))
    np.testing.assert_allclose(y[:, :6], expected[[1, 0]][:, [2, 0, 5, 3, 8, 6]])


def test_features_describe_the_truncated_window():
    # max_len 6 keeps "[CLS] A [SEP] C A [SEP]" of patient 0: its first visit (A, B on day 0) is cut.
    cohort, vocab = tiny()
    corpus = tokenize(cohort, vocab, max_len=6)
    x = tabular_features(corpus, cohort, np.array([0]), np.array([5, 6, 7]))
    expected = [2, 0, 1, 0, NAN, 0, 300, NAN, 0, 613 / 12, 1, 2, 300, 1, 2]
    np.testing.assert_allclose(x[0], np.array(expected, dtype=np.float32), rtol=1e-6)


def test_frequent_codes_come_from_the_training_rows():
    cohort, vocab = tiny()
    corpus = tokenize(cohort, vocab, max_len=32)
    np.testing.assert_array_equal(frequent_codes(corpus, np.array([0, 1, 2])), [5, 6, 7])  # A 3, B 3 (ties: id)
    np.testing.assert_array_equal(frequent_codes(corpus, np.array([0, 1, 2]), k=2), [5, 6])
    np.testing.assert_array_equal(frequent_codes(corpus, np.array([1])), [6])  # unseen codes are left out
    names = tabular_feature_names(np.array([5, 7]), vocab.codes)
    assert names[:6] == ["count:A", "count:C", "days_since_last:A", "days_since_last:C", "days_since_first:A",
                         "days_since_first:C"] and names[6:] == list(EXTRA_FEATURES)  # fmt: skip


def test_features_reject_a_foreign_cohort_and_bad_codes():
    cohort, vocab = tiny()
    corpus = tokenize(cohort, vocab, max_len=32)
    other = make_cohort([[(0, 1, ["A"])], [(0, 1, ["B"])], [(0, 1, ["C"])]], [0, 0, 0], ["A", "B", "C"])
    with pytest.raises(ValueError, match="more codes than the cohort"):
        tabular_features(corpus, other, np.array([0]), np.array([5]))
    shifted = make_cohort([[(0, 1, ["A", "B"]), (5, 1, ["A"]), (9, 1, ["C"]), (9, 1, ["A"])], [], []], [0, 0, 0],
                          ["A", "B", "C"])  # fmt: skip
    with pytest.raises(ValueError, match="visits disagree"):
        tabular_features(corpus, shifted, np.array([0]), np.array([5]))
    with pytest.raises(ValueError, match="clinical ids"):
        tabular_features(corpus, cohort, np.array([0]), np.array([1]))
    with pytest.raises(ValueError, match="corpus indices"):
        tabular_features(corpus, cohort, np.array([3]), np.array([5]))


def noisy_threshold(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    y = (x[:, 0] + 0.7 * np.abs(x[:, 1]) + rng.normal(scale=0.7, size=n) > 0.5).astype(int)
    return x, y


def test_fit_trees_keeps_the_lowest_validation_log_loss_over_candidates_and_rounds():
    (x_tr, y_tr), (x_va, y_va) = noisy_threshold(400, 0), noisy_threshold(300, 1)
    # One round barely leaves the prior; 31-leaf trees at learning rate 1 on leaves of one row overfit after a
    # few rounds, so their best round is early and still worse than the 7-leaf trees'.
    grid = (
        {"max_iter": 1},
        {"max_iter": 30, "max_leaf_nodes": 7},
        {"max_iter": 30, "max_leaf_nodes": 31, "learning_rate": 1.0, "min_samples_leaf": 1},
    )
    fit = fit_trees(x_tr, y_tr, x_va, y_va, grid=grid, n_threads=1)
    best, rounds, final = [], [], []
    for candidate in grid:
        with threadpool_limits(limits=1, user_api="openmp"):  # the shared test machine (see fit_trees)
            model = HistGradientBoostingClassifier(**{**TREE_BASE_PARAMS, **candidate}).fit(x_tr, y_tr)
            staged = [log_loss(y_va, p[:, 1]) for p in model.staged_predict_proba(x_va)]
        best.append(min(staged))
        rounds.append(int(np.argmin(staged)) + 1)
        final.append(staged[-1])
    np.testing.assert_allclose(fit.val_log_losses, best)
    assert fit.rounds == tuple(rounds) and rounds[0] == 1 and rounds[2] < 30 and final[2] > best[2] + 0.05
    assert int(np.argmin(best)) == 1 and min(best[0], best[2]) > best[1] + 0.02
    assert fit.params == {**TREE_BASE_PARAMS, **grid[1], "max_iter": rounds[1]} and fit.candidates == grid
    assert fit.val_log_loss == pytest.approx(log_loss(y_va, fit.predict_proba(x_va)))
    assert fit.val_auroc == pytest.approx(roc_auc_score(y_va, fit.predict_proba(x_va)))


def test_fit_trees_breaks_ties_towards_the_earlier_candidate():
    (x_tr, y_tr), (x_va, y_va) = noisy_threshold(200, 0), noisy_threshold(100, 1)
    # Without early stopping or subsampling random_state changes nothing: equal losses.
    grid = ({"max_iter": 20}, {"max_iter": 20, "random_state": 1})
    fit = fit_trees(x_tr, y_tr, x_va, y_va, grid=grid, n_threads=1)
    assert fit.val_log_losses[0] == fit.val_log_losses[1] and fit.params["random_state"] == 0


def test_fit_trees_rejects_bad_input():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="one class only"):
        fit_trees(x, np.zeros(10), x, np.arange(10) % 2)
    with pytest.raises(ValueError, match="at least one candidate"):
        fit_trees(x, np.arange(10) % 2, x, np.arange(10) % 2, grid=())


def recency_cohort(n, seed):
    """Every patient has six visits of noise codes and exactly one code X; the label is whether X's visit lies
    within 180 days of the last visit. X's count is always 1, so counts (and age, sex) cannot see the label."""
    rng = np.random.default_rng(seed)
    noise = [f"N{i}" for i in range(8)]
    patients, labels = [], []
    for _ in range(n):
        days = np.sort(rng.choice(1500, size=6, replace=False))
        age0 = int(rng.integers(240, 900))
        x_visit = int(rng.integers(0, 6))
        visits = []
        for v, day in enumerate(days):
            names = list(rng.choice(noise, size=int(rng.integers(1, 4)), replace=False))
            visits.append((int(day), age0 + int(day) // 30, names + (["X"] if v == x_visit else [])))
        patients.append(visits)
        labels.append(int(days[-1] - days[x_visit] <= 180))
    cohort = make_cohort(patients, rng.integers(0, 2, n), ["X", *noise])
    return cohort, np.array(labels)


def test_trees_with_recency_beat_logreg_on_counts():
    cohort, y = recency_cohort(900, 0)
    vocab = Vocab(list(cohort.code_names))
    corpus = tokenize(cohort, vocab, max_len=64)
    train, val, test = np.arange(500), np.arange(500, 700), np.arange(700, 900)
    codes = frequent_codes(corpus, train)
    x = tabular_features(corpus, cohort, np.arange(900), codes)
    trees = fit_trees(x[train], y[train], x[val], y[val], grid=({"max_leaf_nodes": 7, "max_iter": 100},), n_threads=1)
    bag = bag_of_codes_features(corpus, np.arange(900), len(vocab), sex=cohort.sex)
    logreg = fit_logreg(bag[train], y[train], bag[val], y[val])
    auroc_trees = roc_auc_score(y[test], trees.predict_proba(x[test]))
    auroc_logreg = roc_auc_score(y[test], logreg.predict_proba(bag[test]))
    assert auroc_trees > 0.9 and auroc_logreg < 0.7, (auroc_trees, auroc_logreg)
