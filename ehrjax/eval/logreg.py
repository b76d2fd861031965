"""Logistic regression on fixed features: the bag-of-codes baseline and the linear probe's classifier.

`bag_of_codes_features` turns each patient's tokenised history into a sparse count vector (order and timing
thrown away), the classic baseline a sequence model has to beat. `fit_logreg` fits scikit-learn's
`LogisticRegression` (L2, the deterministic `lbfgs` solver) for each inverse regularisation strength `C` on
the training split and keeps the one with the lowest validation log loss. Log loss is a proper scoring rule:
it rewards calibrated probabilities, where AUROC only sees the ranking (and cannot tell a strongly shrunk model,
whose probabilities all sit near the prevalence, from a well-fitted one with the same ordering).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from ehrjax.data.cohort import ragged_index
from ehrjax.data.tokenize import TokenizedCorpus
from ehrjax.data.vocab import NUM_SPECIAL

# Inverse regularisation strengths tried, 1e-4 to 10 (a factor of 1e5, one decade apart).
DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
MONTHS_PER_DECADE = 120.0


def bag_of_codes_features(
    corpus: TokenizedCorpus,
    patients: np.ndarray,
    vocab_size: int,
    *,
    sex: np.ndarray | None = None,
    include_age: bool = True,
) -> sp.csr_matrix:
    """float64 CSR [n, vocab_size + 2]: per patient (corpus indices `patients`, in that order) the code counts
    of its tokenised history as `log1p(count)` in column `id` (special ids, `[UNK]` included, are left out, so
    columns 0..NUM_SPECIAL-1 stay empty), the age at its last token in decades in column `vocab_size` (0 when
    `include_age` is False) and `sex` (0/1, one per patient) in column `vocab_size + 1` (0 when not given).

    log1p damps the long tail of repeated routine codes; decades put age on the scale of the count columns.
    """
    patients = np.asarray(patients, dtype=np.int64)
    if patients.ndim != 1 or (len(patients) and (patients.min() < 0 or patients.max() >= len(corpus))):
        raise ValueError(f"patients must be a 1-D array of corpus indices in [0, {len(corpus)})")
    if sex is not None and np.shape(sex) != (len(patients),):
        raise ValueError(f"sex has shape {np.shape(sex)}, expected one value per patient ({len(patients)},)")
    offsets = np.asarray(corpus.offsets, dtype=np.int64)
    index, new_offsets = ragged_index(offsets, patients)
    codes = np.asarray(corpus.codes, dtype=np.int64)[index]
    if len(codes) and codes.max() >= vocab_size:
        raise ValueError(f"corpus holds id {codes.max()}, outside a vocabulary of {vocab_size} ids")
    rows = np.repeat(np.arange(len(patients)), np.diff(new_offsets))
    clinical = codes >= NUM_SPECIAL
    counts = sp.csr_matrix(
        (np.ones(int(clinical.sum())), (rows[clinical], codes[clinical])), shape=(len(patients), vocab_size + 2)
    )
    counts.sum_duplicates()
    counts.data = np.log1p(counts.data)
    extra = np.zeros((len(patients), vocab_size + 2))
    if include_age:
        extra[:, vocab_size] = np.asarray(corpus.ages)[offsets[patients + 1] - 1] / MONTHS_PER_DECADE
    if sex is not None:
        extra[:, vocab_size + 1] = np.asarray(sex, dtype=np.float64)
    out = (counts + sp.csr_matrix(extra)).tocsr()
    out.eliminate_zeros()
    return out


@dataclasses.dataclass(frozen=True)
class LogregFit:
    """A fitted classifier and how it was chosen: `C` with the lowest validation log loss (`val_log_loss`) among
    `val_log_losses` {C: log loss}; `val_auroc` is that C's validation AUROC and `val_aurocs` {C: AUROC} every
    C's (reported, not used to choose)."""

    model: Pipeline
    C: float
    val_auroc: float
    val_aurocs: dict[float, float]
    val_log_loss: float = float("nan")
    val_log_losses: dict[float, float] = dataclasses.field(default_factory=dict)

    def predict_proba(self, x: Any) -> np.ndarray:
        """float64[n] probability of the positive class."""
        return self.model.predict_proba(x)[:, 1]


def check_binary(y: np.ndarray, name: str) -> np.ndarray:
    """int64[n] labels from 0/1 `y` (any shape with n values); a ValueError unless both classes occur."""
    y = np.asarray(y).reshape(-1)
    if not np.all((y == 0) | (y == 1)):
        raise ValueError(f"{name} must hold 0/1 labels")
    if len(np.unique(y)) < 2:
        raise ValueError(f"{name} holds one class only; fitting and scoring a classifier need both")
    return y.astype(np.int64)


def fit_logreg(
    x_train: Any,
    y_train: np.ndarray,
    x_val: Any,
    y_val: np.ndarray,
    Cs: Sequence[float] = DEFAULT_CS,
    *,
    standardize: bool = False,
    max_iter: int = 5000,
) -> LogregFit:
    """L2 logistic regression on (x_train, y_train) for each C in `Cs`; keep the lowest validation log loss
    (ties: the smallest C, the strongest regularisation). x: [n, d] dense or scipy sparse; y: {0,1}[n].

    `standardize` puts a `StandardScaler` first (centred unless x is sparse), fitted on the training rows,
    for features of arbitrary scale such as hidden states.
    """
    y_train, y_val = check_binary(y_train, "y_train"), check_binary(y_val, "y_val")
    if x_train.shape[0] != len(y_train) or x_val.shape[0] != len(y_val):
        raise ValueError(
            f"features and labels disagree: x_train {x_train.shape[0]} vs {len(y_train)} labels, "
            f"x_val {x_val.shape[0]} vs {len(y_val)}"
        )
    if not Cs or any(c <= 0 for c in Cs):
        raise ValueError(f"Cs must be a non-empty sequence of positive numbers, got {Cs!r}")
    best: tuple[float, Pipeline] | None = None
    aurocs: dict[float, float] = {}
    losses: dict[float, float] = {}
    for c in sorted({float(c) for c in Cs}):
        steps = [StandardScaler(with_mean=not sp.issparse(x_train))] if standardize else []
        model = make_pipeline(*steps, LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter))
        model.fit(x_train, y_train)
        p = model.predict_proba(x_val)[:, 1]
        aurocs[c] = float(roc_auc_score(y_val, p))
        losses[c] = float(log_loss(y_val, p, labels=[0, 1]))
        if best is None or losses[c] < losses[best[0]]:
            best = (c, model)
    assert best is not None
    c, model = best
    return LogregFit(model, c, aurocs[c], aurocs, losses[c], losses)
