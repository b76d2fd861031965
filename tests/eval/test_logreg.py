"""Bag-of-codes features and the logistic regression whose C is chosen by validation log loss."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import log_loss, roc_auc_score

from ehrjax.data.tokenize import TokenizedCorpus
from ehrjax.data.vocab import CLS, SEP, UNK
from ehrjax.eval.logreg import bag_of_codes_features, fit_logreg


def tiny_corpus():
    # patient 0: [CLS] 5 6 [SEP] 5 [UNK] [SEP]; patient 1: [CLS] 7 [SEP]. Ages in months.
    codes = np.array([CLS, 5, 6, SEP, 5, UNK, SEP, CLS, 7, SEP], dtype=np.int32)
    ages = np.array([600, 600, 600, 600, 612, 612, 630, 240, 240, 252], dtype=np.int32)
    visits = np.array([0, 0, 0, 0, 1, 1, 1, 0, 0, 0], dtype=np.int32)
    return TokenizedCorpus(codes=codes, ages=ages, visits=visits, offsets=np.array([0, 7, 10]), max_len=8)


def test_bag_of_codes_features_by_hand():
    x = bag_of_codes_features(tiny_corpus(), np.array([1, 0]), vocab_size=8, sex=np.array([1, 0]))
    assert sp.isspmatrix_csr(x) and x.shape == (2, 10)
    expected = np.zeros((2, 10))
    expected[0, 7], expected[0, 8], expected[0, 9] = math.log(2), 252 / 120, 1
    expected[1, 5], expected[1, 6], expected[1, 8] = math.log(3), math.log(2), 630 / 120
    np.testing.assert_allclose(x.toarray(), expected)


def test_bag_of_codes_features_without_age_or_sex():
    x = bag_of_codes_features(tiny_corpus(), np.array([0]), vocab_size=8, include_age=False).toarray()
    assert np.all(x[:, 8:] == 0) and x[0, 5] == pytest.approx(math.log(3))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(patients=np.array([2]), vocab_size=8), "corpus indices"),
        (dict(patients=np.array([0]), vocab_size=6), "outside a vocabulary of 6"),
        (dict(patients=np.array([0, 1]), vocab_size=8, sex=np.array([1])), "sex has shape"),
    ],
)
def test_bag_of_codes_features_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bag_of_codes_features(tiny_corpus(), **kwargs)


def separable(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    return x, y


def test_fit_logreg_on_separable_data():
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = separable(200, 0), separable(100, 1), separable(100, 2)
    fit = fit_logreg(x_tr, y_tr, x_va, y_va, Cs=(0.01, 1.0, 100.0), standardize=True)
    probs = fit.predict_proba(x_te)
    # Separable data: log loss keeps the weakest regularisation, whose probabilities may round to 0 or 1.
    assert probs.shape == (100,) and np.all((probs >= 0) & (probs <= 1))
    assert roc_auc_score(y_te, probs) > 0.99
    assert set(fit.val_aurocs) == set(fit.val_log_losses) == {0.01, 1.0, 100.0}
    best = min(fit.val_log_losses.values())
    assert fit.val_log_loss == best and fit.C == min(c for c, v in fit.val_log_losses.items() if v == best)
    assert fit.val_auroc == fit.val_aurocs[fit.C]


def test_fit_logreg_chooses_c_on_validation_log_loss():
    # One informative feature among many noise features and few training rows: weak regularisation overfits
    # the noise, so the validation log loss (recomputed here) must pick the C the fit reports.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(260, 60))
    y = (x[:, 0] + rng.normal(scale=1.5, size=260) > 0).astype(int)
    fit = fit_logreg(x[:60], y[:60], x[60:], y[60:], Cs=(1e-3, 1e-1, 1e3), standardize=True)
    assert fit.val_log_losses[1e3] > min(fit.val_log_losses.values())
    assert fit.C == min(fit.val_log_losses, key=fit.val_log_losses.get)
    assert fit.val_log_loss == pytest.approx(log_loss(y[60:], fit.predict_proba(x[60:])))
    assert fit.val_auroc == pytest.approx(roc_auc_score(y[60:], fit.predict_proba(x[60:])))


def test_fit_logreg_prefers_calibrated_over_shrunk_probabilities():
    # With one feature every C ranks the validation rows alike (equal AUROCs, so AUROC would keep the smallest
    # C), but C=1e-6 shrinks every probability to near the prevalence: log loss picks C=1.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 1))
    y = (rng.random(400) < 1 / (1 + np.exp(-3 * x[:, 0]))).astype(int)
    fit = fit_logreg(x[:200], y[:200], x[200:], y[200:], Cs=(1e-6, 1.0))
    assert fit.val_aurocs[1e-6] == pytest.approx(fit.val_aurocs[1.0])
    assert fit.C == 1.0 and fit.val_log_losses[1e-6] > fit.val_log_losses[1.0] + 0.1


def test_fit_logreg_accepts_sparse_features():
    x, y = separable(200, 0)
    xs = sp.csr_matrix(np.abs(x) * (x > 0))
    fit = fit_logreg(xs[:150], y[:150], xs[150:], y[150:], Cs=(1.0,), standardize=True)
    assert fit.predict_proba(xs[150:]).shape == (50,)


@pytest.mark.parametrize(
    "y_train, message", [(np.zeros(10), "one class only"), (np.arange(10) % 3, "0/1 labels")]
)
def test_fit_logreg_rejects_bad_labels(y_train, message):
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match=message):
        fit_logreg(x, y_train, x, np.arange(10) % 2)
