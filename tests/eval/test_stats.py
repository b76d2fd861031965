import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import auc, average_precision_score, brier_score_loss, precision_recall_curve, roc_auc_score

from ehrjax.eval.stats import (
    bootstrap_draws,
    bootstrap_over_patients_and_seeds,
    bootstrap_p_value,
    brier_score,
    difference,
    difference_replicates,
    holm,
    interval,
    metric_per_weighting,
    paired_difference,
    replicates,
    weighted_auroc,
)


def _sklearn(metric, labels, scores):
    if metric == "auroc":
        return roc_auc_score(labels, scores)
    if metric == "ap":
        return average_precision_score(labels, scores)
    if metric == "pr_auc":
        precision, recall, _ = precision_recall_curve(labels, scores)
        return auc(recall, precision)
    return brier_score_loss(labels, scores)


def test_auroc_by_hand_with_ties_and_weights():
    labels = np.array([0, 1, 0, 1])
    scores = np.array([0.5, 0.5, 0.2, 0.9])
    # positives {0.5, 0.9} vs negatives {0.5, 0.2}: 0.5 (tie) + 1 + 1 + 1 over 4 pairs
    assert weighted_auroc(labels, scores)[0] == 0.875
    # the tied negative drawn twice: negatives {0.5, 0.5, 0.2}: (0.5 + 0.5 + 1) + 3 over 6 pairs
    assert weighted_auroc(labels, scores, np.array([[2.0, 1, 1, 1]]))[0] == pytest.approx(5 / 6, abs=1e-15)
    # no negative drawn: undefined
    assert np.isnan(weighted_auroc(labels, scores, np.array([[0.0, 1, 0, 1]]))[0])


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.tuples(st.booleans(), st.integers(0, 4), st.integers(0, 3), st.integers(0, 3)), min_size=2,
                  max_size=40),
    metric=st.sampled_from(["auroc", "ap", "pr_auc", "brier"]),
)  # fmt: skip
def test_weighted_metrics_equal_sklearn_on_duplicated_rows(data, metric):
    labels = np.array([d[0] for d in data])
    scores = np.array([d[1] for d in data]) / 4.0  # few levels: many ties
    weights = np.array([[d[2] for d in data], [d[3] for d in data]], dtype=np.float64)
    got = metric_per_weighting(labels, scores, weights, metric)
    for row, value in zip(weights, got, strict=True):
        idx = np.repeat(np.arange(len(labels)), row.astype(int))
        lab = labels[idx]
        undefined = (
            len(idx) == 0
            or (metric == "auroc" and len(np.unique(lab)) < 2)
            or (metric in ("ap", "pr_auc") and not lab.any())
        )
        if undefined:
            assert np.isnan(value)
            continue
        assert abs(value - _sklearn(metric, lab, scores[idx])) < 1e-12


def test_brier_score_by_hand():
    assert brier_score(np.array([0, 1]), np.array([0.2, 0.6])) == pytest.approx((0.04 + 0.16) / 2)


def _brute_force(labels, scores, metric, n_boot, seed):
    """The bootstrap spelled out: duplicate the drawn patients, score each drawn seed with scikit-learn."""
    counts, seed_counts = bootstrap_draws(len(labels), len(scores), n_boot, seed)
    values = []
    for row, drawn_seeds in zip(counts, seed_counts, strict=True):
        idx = np.repeat(np.arange(len(labels)), row.astype(int))
        per_seed = [_sklearn(metric, labels[idx], s[idx]) for s in scores]
        values.append(np.dot(drawn_seeds, per_seed) / len(scores))
    point = np.mean([_sklearn(metric, labels, s) for s in scores])
    return point, *np.percentile(values, [2.5, 97.5])


@pytest.mark.parametrize("metric", ["auroc", "ap", "pr_auc", "brier"])
@pytest.mark.parametrize("num_seeds", [1, 3])
def test_bootstrap_equals_spelled_out_bootstrap(metric, num_seeds):
    rng = np.random.default_rng(3)
    labels = np.r_[np.ones(30), np.zeros(50)].astype(int)  # 30 positives: no single-class replicate
    scores = np.round(rng.random((num_seeds, 80)) + 0.4 * labels, 1) / 1.4  # rounded: ties; in [0, 1]
    got = bootstrap_over_patients_and_seeds(labels, scores, metric, n_boot=60, seed=5)
    np.testing.assert_allclose(got, _brute_force(labels, scores, metric, 60, 5), rtol=0, atol=1e-12)


def test_one_seed_is_the_patient_bootstrap_of_every_seed_count():
    rng = np.random.default_rng(0)
    labels = (rng.random(200) < 0.3).astype(int)
    scores = rng.random((3, 200)) + labels
    three = replicates(labels, scores, n_boot=50, seed=1)
    one = replicates(labels, scores[:1], n_boot=50, seed=1)
    np.testing.assert_array_equal(three.values[:, 0], one.values[:, 0])
    assert interval(one)[0] == three.point[0]


def test_perfect_separation_gives_one_with_interval_one():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([[0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0.0, 0.1, 0.1, 0.5, 0.6, 0.6]])
    assert bootstrap_over_patients_and_seeds(labels, scores, n_boot=200) == (1.0, 1.0, 1.0)


def test_identical_arms_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    labels = (rng.random(300) < 0.3).astype(int)
    scores = (rng.random((3, 300)) + 0.5 * labels) / 1.5
    for metric in ("auroc", "ap", "pr_auc", "brier"):
        assert paired_difference(labels, scores, scores.copy(), metric, n_boot=200) == (0.0, 0.0, 0.0)


def test_clearly_better_arm_has_positive_interval_and_swap_negates():
    rng = np.random.default_rng(2)
    labels = (rng.random(600) < 0.3).astype(int)
    noise = rng.normal(size=(3, 600))
    good, bad = labels + 0.3 * noise, labels + 3.0 * noise
    diff, lo, hi = paired_difference(labels, good, bad, n_boot=300)
    assert 0 < lo < diff < hi
    back = paired_difference(labels, bad, good, n_boot=300)
    np.testing.assert_allclose(back, (-diff, -hi, -lo), atol=1e-12)


def test_one_seed_arm_is_broadcast_like_its_tiled_copy():
    rng = np.random.default_rng(4)
    labels = (rng.random(150) < 0.4).astype(int)
    a = rng.random((3, 150)) + 0.4 * labels
    b = rng.random(150) + 0.2 * labels
    broadcast = paired_difference(labels, a, b[None], n_boot=100)
    tiled = paired_difference(labels, a, np.tile(b, (3, 1)), n_boot=100)
    np.testing.assert_allclose(broadcast, tiled, atol=1e-12)
    # and a one-seed A against a three-seed B is the negation
    np.testing.assert_allclose(paired_difference(labels, b, a, n_boot=100), -np.array(broadcast)[[0, 2, 1]], atol=1e-12)


def test_interval_contains_mean_and_is_deterministic():
    rng = np.random.default_rng(5)
    labels = (rng.random(400) < 0.25).astype(int)
    scores = labels + rng.normal(0, 1.5, (3, 400))
    mean, lo, hi = bootstrap_over_patients_and_seeds(labels, scores, n_boot=300, seed=7)
    assert lo < mean < hi and hi - lo < 0.2
    assert bootstrap_over_patients_and_seeds(labels, scores, n_boot=300, seed=7) == (mean, lo, hi)
    assert bootstrap_over_patients_and_seeds(labels, scores, n_boot=300, seed=8) != (mean, lo, hi)


def test_differences_need_matching_replicates():
    labels = np.array([0, 1, 0, 1])
    a = replicates(labels, np.array([0.1, 0.9, 0.2, 0.8]), n_boot=10, seed=0)
    with pytest.raises(ValueError, match="share metric"):
        difference(a, replicates(labels, np.array([0.1, 0.9, 0.2, 0.8]), n_boot=10, seed=1))


@pytest.mark.parametrize(
    ("labels", "scores", "match"),
    [
        (np.array([0, 1, 2]), np.zeros(3), "0 or 1"),
        (np.array([1, 1, 1]), np.zeros(3), "both classes"),
        (np.array([0, 1, 1]), np.zeros(4), "expected labels"),
        (np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3]), "finite"),
    ],
)
def test_bad_input_is_named(labels, scores, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_over_patients_and_seeds(labels, scores, n_boot=5)


def test_bad_metric_and_seed_counts_are_named():
    labels = np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="probabilities"):
        bootstrap_over_patients_and_seeds(labels, np.arange(4.0), metric="brier", n_boot=5)
    with pytest.raises(ValueError, match="metric"):
        bootstrap_over_patients_and_seeds(labels, np.arange(4.0), metric="f1", n_boot=5)
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_difference(labels, np.zeros((3, 4)) + np.arange(4), np.zeros((2, 4)) + np.arange(4), n_boot=5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_over_patients_and_seeds(labels, np.arange(4.0), n_boot=0)


@settings(max_examples=30, deadline=None)
@given(
    levels=st.lists(st.integers(0, 5), min_size=8, max_size=30),
    flips=st.lists(st.booleans(), min_size=8, max_size=30),
    seed=st.integers(0, 2**16),
)
def test_interval_depends_only_on_the_order_of_scores_and_self_difference_is_zero(levels, flips, seed):
    n = min(len(levels), len(flips))
    labels = np.array(flips[:n], dtype=int)
    labels[:2] = [0, 1]
    scores = np.array(levels[:n], dtype=np.float64)
    got = bootstrap_over_patients_and_seeds(labels, scores, n_boot=40, seed=seed)
    assert bootstrap_over_patients_and_seeds(labels, 3 * scores - 7, n_boot=40, seed=seed) == got
    assert paired_difference(labels, scores, 3 * scores - 7, n_boot=40, seed=seed) == (0.0, 0.0, 0.0)


def test_holm_by_hand():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])  # capped at 1
    np.testing.assert_allclose(holm([0.02]), [0.02])  # a family of one is not adjusted
    adjusted = holm([0.01, np.nan, 0.02])  # NaN stays NaN and does not count towards m
    assert np.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)
    assert holm([]).shape == (0,)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_is_monotone_at_least_the_raw_p_and_at_most_bonferroni(p):
    p = np.array(p)
    adjusted = holm(p)
    order = np.argsort(p, kind="stable")
    assert (np.diff(adjusted[order]) >= 0).all()
    assert (adjusted >= p - 1e-15).all() and (adjusted <= np.minimum(1, len(p) * p) + 1e-15).all()


def test_bootstrap_p_value_has_the_known_sign_and_floor():
    assert bootstrap_p_value(np.full(99, 0.1)) == pytest.approx(1 / 100)  # all above 0: the floor
    assert bootstrap_p_value(np.r_[np.full(90, 0.1), np.full(10, -0.1)]) == pytest.approx(0.2)
    assert bootstrap_p_value(np.r_[np.full(90, -0.1), np.full(10, 0.1)]) == pytest.approx(0.2)  # symmetric
    assert bootstrap_p_value(np.zeros(50)) == 1.0  # identical arms
    assert np.isnan(bootstrap_p_value(np.full(5, np.nan)))
    rng = np.random.default_rng(3)
    labels = np.r_[np.zeros(100), np.ones(100)]
    good = labels + rng.normal(0, 0.5, (3, 200))
    bad = labels + rng.normal(0, 2.0, (3, 200))
    a, b = replicates(labels, good, n_boot=300), replicates(labels, bad, n_boot=300)
    mean, values = difference_replicates(a, b)
    assert mean > 0 and bootstrap_p_value(values) == pytest.approx(1 / 301)
    assert (mean, *np.percentile(values, [2.5, 97.5])) == pytest.approx(difference(a, b))
