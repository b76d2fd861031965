import numpy as np
import pytest

from ehrjax.eval.metrics import binary_metrics, histogram_metrics, multilabel_metrics


def test_binary_metrics_exact_values():
    m = binary_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert m["auroc"] == pytest.approx(0.75)
    assert m["ap"] == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert m["prevalence"] == 0.5


def test_binary_metrics_single_class_is_nan():
    m = binary_metrics(np.zeros(5), np.arange(5.0))
    assert np.isnan(m["auroc"]) and np.isnan(m["ap"])


def test_multilabel_drops_rows_without_positive():
    labels = np.array([[1, 0, 0], [0, 0, 0], [0, 1, 1]])
    scores = np.array([[0.9, 0.1, 0.0], [0.5, 0.5, 0.5], [0.2, 0.1, 0.9]])
    m = multilabel_metrics(labels, scores)
    assert m["rows_without_positive"] == 1
    # row 0: AP 1; row 2: ranks c2 (pos), c0 (neg), c1 (pos) -> AP (1 + 2/3) / 2
    assert m["aps"] == pytest.approx((1 + (1 + 2 / 3) / 2) / 2)
    assert m["auroc"] == pytest.approx((1.0 + 0.5) / 2)


def test_histogram_metrics_with_one_score_per_bin_equal_the_exact_ones():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=60)  # each of 4 codes one-vs-rest over 60 masked positions
    scores = rng.normal(size=(4, 60))  # distinct: no ties
    order = np.argsort(scores, axis=1)  # bins in increasing score order, one score each
    positive = labels[order] == np.arange(4)[:, None]
    m = histogram_metrics(positive.astype(float), (~positive).astype(float))
    exact = [binary_metrics(labels == k, scores[k]) for k in range(4)]
    assert m["codes"] == 4
    assert m["macro_auroc"] == pytest.approx(np.mean([e["auroc"] for e in exact]))
    assert m["macro_ap"] == pytest.approx(np.mean([e["ap"] for e in exact]))
    one_class = histogram_metrics(np.array([[1.0, 2.0], [0.0, 0.0]]), np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert one_class["codes"] == 0 and np.isnan(one_class["macro_auroc"])
