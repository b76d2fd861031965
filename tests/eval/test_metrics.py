import numpy as np
import pytest

from ehrjax.eval.metrics import binary_metrics, mlm_metrics, multilabel_metrics


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


def test_mlm_metrics_perfect_and_chance():
    labels = np.array([5, 6, 7, 5])
    logits = np.full((4, 10), -5.0)
    logits[np.arange(4), labels] = 5.0
    m = mlm_metrics(labels, logits)
    assert m["top1"] == 1.0 and m["top10"] == 1.0 and m["macro_auroc"] == 1.0
    uniform = mlm_metrics(labels, np.zeros((4, 10)))
    assert uniform["loss"] == pytest.approx(np.log(10))
