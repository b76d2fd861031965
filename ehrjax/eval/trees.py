"""Gradient-boosted trees on tabular history features: a baseline that sees timing as well as counts.

`tabular_features` summarises each patient's tokenised history at its prediction point, the time of its last
code token, in the spirit of MEDS-Tab: for each of a fixed list of clinical codes (`frequent_codes`: the K most
frequent among the training patients) its count, the days since its last occurrence and the days since its
first occurrence, "never" being NaN; then a few per-patient columns (`EXTRA_FEATURES`). The bag-of-codes
logistic regression (`ehrjax.eval.logreg`) sees counts only, so a label that depends on how recently a code
happened is visible here and not there.

The features describe the tokens the sequence model and the bag of codes see: the corpus window (the most
recent `max_len` tokens; the whole history when nothing was truncated). A `TokenizedCorpus` keeps ages in
months but no days, so the days of its code tokens come from the cohort it was tokenised from (corpus row i
is cohort row i, and a row's codes are the last codes of that cohort patient); synthetic and MEDS cohorts
both carry `time`, whole days since the patient's first visit. On MEDS the label's prediction time may lie
after the last event; the recency columns are measured from the last event.

`fit_trees` fits scikit-learn's `HistGradientBoostingClassifier` (which takes NaN as "missing" natively) for
each candidate of a small grid on the training rows and keeps the one with the lowest validation log loss. The
number of boosting rounds is stopped early on the same validation log loss (the best of `max_iter` staged
predictions), as the neural arms are stopped on theirs: with 64 labelled patients, a fixed 200 rounds fits the
training rows and scores worse on validation than the prevalence alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import log_loss, roc_auc_score
from threadpoolctl import threadpool_limits

from ehrjax.data.cohort import Cohort, ragged_index
from ehrjax.data.tokenize import TokenizedCorpus
from ehrjax.data.vocab import CLS, NUM_SPECIAL, SEP
from ehrjax.eval.logreg import check_binary

DEFAULT_TOP_CODES = 256
RECENT_WINDOWS_DAYS: tuple[int, ...] = (90, 365)
PER_CODE_FEATURES: tuple[str, ...] = ("count", "days_since_last", "days_since_first")
EXTRA_FEATURES: tuple[str, ...] = (
    "age_years", "sex", "num_visits", "history_days", *(f"visits_last_{d}d" for d in RECENT_WINDOWS_DAYS),
)  # fmt: skip
MONTHS_PER_YEAR = 12.0

# Settings shared by every candidate: up to 300 boosting rounds at learning rate 0.05 on all training rows (no
# internal early-stopping split: validation is the caller's split; it chooses the candidate and its number of
# rounds). random_state fixes what is random (nothing with these settings; kept for candidates that subsample).
TREE_BASE_PARAMS: Mapping[str, Any] = {
    "learning_rate": 0.05, "max_iter": 300, "early_stopping": False, "l2_regularization": 0.0, "random_state": 0,
}  # fmt: skip
# Candidates, simplest first (ties go to the earlier one): the tree size, from 3 to 15 leaves.
DEFAULT_TREE_GRID: tuple[Mapping[str, Any], ...] = tuple({"max_leaf_nodes": n} for n in (3, 7, 15))


def frequent_codes(corpus: TokenizedCorpus, train_patients: np.ndarray, k: int = DEFAULT_TOP_CODES, *,
                   code_end: int | None = None) -> np.ndarray:  # fmt: skip
    """int32[min(k, distinct clinical ids seen)] the `k` clinical ids (special ids, `[UNK]` included, never)
    with the most tokens among the corpus rows `train_patients`, most frequent first (ties: smaller id first).
    Ids the training rows never hold are left out, and so are ids from `code_end` on (`Vocab.code_end`: the
    time tokens, which are not codes)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    train_patients = _patients(corpus, train_patients)
    index, _ = ragged_index(np.asarray(corpus.offsets, dtype=np.int64), train_patients)
    counts = np.bincount(np.asarray(corpus.codes, dtype=np.int64)[index], minlength=NUM_SPECIAL)
    counts[:NUM_SPECIAL] = 0
    if code_end is not None:
        counts[code_end:] = 0
    order = np.argsort(-counts, kind="stable")
    return order[counts[order] > 0][:k].astype(np.int32)


def tabular_feature_names(codes: np.ndarray, code_names: Sequence[str] | None = None) -> list[str]:
    """Column names of `tabular_features(..., codes)`: `count:<code>` for every code, then
    `days_since_last:<code>`, then `days_since_first:<code>`, then `EXTRA_FEATURES`. `<code>` is
    `code_names[id]` (e.g. `vocab.codes`) when given, else the id."""
    labels = [str(code_names[c]) if code_names is not None else str(int(c)) for c in np.asarray(codes)]
    return [f"{kind}:{label}" for kind in PER_CODE_FEATURES for label in labels] + list(EXTRA_FEATURES)


def _patients(corpus: TokenizedCorpus, patients: np.ndarray) -> np.ndarray:
    patients = np.asarray(patients, dtype=np.int64)
    if patients.ndim != 1 or (len(patients) and (patients.min() < 0 or patients.max() >= len(corpus))):
        raise ValueError(f"patients must be a 1-D array of corpus indices in [0, {len(corpus)})")
    return patients


def tabular_features(corpus: TokenizedCorpus, cohort: Cohort, patients: np.ndarray, codes: np.ndarray, *,
                     code_end: int | None = None) -> np.ndarray:  # fmt: skip
    """float32[len(patients), 3 * len(codes) + len(EXTRA_FEATURES)]: one row per corpus index in `patients`
    (in that order), at the patient's prediction point t_end (the day of its last code token):

    - columns [0, K): count of each id of `codes` (K = len(codes)) in the window;
    - [K, 2K): days from its last occurrence to t_end (0: on the last day); NaN if it never occurs;
    - [2K, 3K): days from its first occurrence in the window to t_end; NaN if it never occurs;
    - then `EXTRA_FEATURES`: age in years at the last token; sex (0/1, NaN when unknown, i.e. negative);
      visits in the window; days from the first to the last code token of the window; visits whose day is
      at most 90 and at most 365 days before t_end (the last visit included).

    Tokens from `code_end` on (`Vocab.code_end`: time tokens between visits) are not codes and are skipped: the
    day columns already say what they would, so the features are the same with time tokens on or off.
    A patient with no code token gets zero counts and visits and NaN elsewhere (sex aside). `cohort` is the
    cohort the corpus was tokenised from (module docstring); a ValueError says when the two disagree.
    Vectorised over tokens: no Python loop per patient or token.
    """
    patients = _patients(corpus, patients)
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 1 or (len(codes) and (codes.min() < NUM_SPECIAL or len(np.unique(codes)) != len(codes))):
        raise ValueError(f"codes must be distinct clinical ids (>= {NUM_SPECIAL}), e.g. from frequent_codes")
    if len(cohort) != len(corpus):
        raise ValueError(f"cohort has {len(cohort)} patients, the corpus {len(corpus)}; pass the cohort it was "
                         "tokenised from")  # fmt: skip
    n, k = len(patients), len(codes)
    index, offsets = ragged_index(np.asarray(corpus.offsets, dtype=np.int64), patients)
    tokens = np.asarray(corpus.codes, dtype=np.int64)[index]
    row = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
    is_code = (tokens != CLS) & (tokens != SEP)
    if code_end is not None:
        is_code &= tokens < code_end
    tokens, row = tokens[is_code], row[is_code]
    visit = np.asarray(corpus.visits, dtype=np.int64)[index][is_code]
    age = np.asarray(corpus.ages, dtype=np.float64)[index][is_code]

    # Day of each code token: a row's j-th of k_i codes is the cohort patient's code (its length - k_i + j).
    kept = np.bincount(row, minlength=n)
    cohort_offsets = np.asarray(cohort.offsets, dtype=np.int64)
    if np.any(kept > np.diff(cohort_offsets)[patients]):
        raise ValueError(
            "corpus rows hold more codes than the cohort's patients; pass the cohort it was tokenised from"
        )
    code_start = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(kept, out=code_start[1:])
    rank = np.arange(len(row), dtype=np.int64) - code_start[row]
    source = cohort_offsets[patients + 1][row] - kept[row] + rank
    cohort_visit = np.asarray(cohort.visit, dtype=np.int64)[source]
    first = code_start[:-1][kept > 0]
    if not np.array_equal(cohort_visit - np.repeat(cohort_visit[first], kept[kept > 0]), visit):
        raise ValueError("corpus visits disagree with the cohort's; pass the cohort it was tokenised from")
    day = np.asarray(cohort.time, dtype=np.float64)[source]

    has = kept > 0
    last_tok = code_start[1:] - 1
    t_end = np.full(n, np.nan)
    t_end[has] = day[last_tok[has]]
    out = np.full((n, 3 * k + len(EXTRA_FEATURES)), np.nan, dtype=np.float32)

    # Per (patient, code) pair: count, first and last day (a stable sort keeps each pair's tokens in order).
    column = np.full(max(int(tokens.max(initial=0)), int(codes.max(initial=0))) + 1, -1, dtype=np.int64)
    column[codes] = np.arange(k)
    col = column[tokens]
    sel = col >= 0
    pair = row[sel] * k + col[sel]
    pair_day = day[sel]
    order = np.argsort(pair, kind="stable")
    pair, pair_day = pair[order], pair_day[order]
    keys, starts, counts = np.unique(pair, return_index=True, return_counts=True)
    first_day = np.minimum.reduceat(pair_day, starts) if len(keys) else np.empty(0)
    last_day = np.maximum.reduceat(pair_day, starts) if len(keys) else np.empty(0)
    prow, pcol = keys // max(k, 1), keys % max(k, 1)
    out[:, :k] = 0
    out[prow, pcol] = counts
    out[prow, k + pcol] = t_end[prow] - last_day
    out[prow, 2 * k + pcol] = t_end[prow] - first_day

    # Per patient.
    extra = 3 * k
    out[has, extra] = age[last_tok[has]] / MONTHS_PER_YEAR
    sex = np.asarray(cohort.sex, dtype=np.float64)[patients]
    out[:, extra + 1] = np.where(sex >= 0, sex, np.nan)
    new_visit = np.ones(len(row), dtype=bool)
    new_visit[1:] = (row[1:] != row[:-1]) | (visit[1:] != visit[:-1])
    out[:, extra + 2] = np.bincount(row[new_visit], minlength=n)
    out[has, extra + 3] = t_end[has] - day[first]
    ago = t_end[row[new_visit]] - day[new_visit]
    for j, window in enumerate(RECENT_WINDOWS_DAYS):
        out[:, extra + 4 + j] = np.bincount(row[new_visit][ago <= window], minlength=n)
    return out


@dataclasses.dataclass(frozen=True)
class TreesFit:
    """A fitted classifier and how it was chosen: `params` (the full settings: `TREE_BASE_PARAMS` updated by the
    chosen candidate, `max_iter` set to the chosen number of rounds) with the lowest validation log loss
    `val_log_loss` (its validation AUROC: `val_auroc`); `candidates` and `val_log_losses` are the grid, in
    order, and each candidate's best validation log loss over its rounds (`rounds`: where that best was);
    `n_threads` the OpenMP cap of the fits and of `predict_proba`."""

    model: HistGradientBoostingClassifier
    params: dict[str, Any]
    val_log_loss: float
    val_auroc: float
    candidates: tuple[dict[str, Any], ...]
    val_log_losses: tuple[float, ...]
    n_threads: int | None = None
    rounds: tuple[int, ...] = ()

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """float64[n] probability of the positive class after the chosen number of rounds (with the fit's
        `n_threads` cap)."""
        with threadpool_limits(limits=self.n_threads, user_api="openmp"):
            return _after_rounds(self.model, x, self.params["max_iter"])


def _after_rounds(model: HistGradientBoostingClassifier, x: np.ndarray, rounds: int) -> np.ndarray:
    """float64[n] the positive-class probability of `model`'s first `rounds` boosting rounds."""
    if rounds >= model.n_iter_:
        return model.predict_proba(x)[:, 1]
    for i, p in enumerate(model.staged_predict_proba(x), start=1):
        if i == rounds:
            return p[:, 1]
    raise AssertionError("unreachable: rounds < n_iter_")


def fit_trees(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    grid: Sequence[Mapping[str, Any]] = DEFAULT_TREE_GRID,
    *,
    n_threads: int | None = None,
) -> TreesFit:
    """`HistGradientBoostingClassifier(**TREE_BASE_PARAMS, **candidate)` on (x_train, y_train) for each
    candidate of `grid`, its rounds stopped at its lowest validation log loss; keep the candidate with the
    lowest (ties: the earlier candidate; across rounds, the fewer). x: float[n, d] dense, NaN for missing;
    y: {0,1}[n].

    `n_threads` caps the OpenMP threads of the fits (None: scikit-learn's default, one per core). On a machine
    whose cores other processes keep busy, 1 can be far faster: the boosting's threads wait for each other at
    every split (tests/eval/test_trees.py's recency test on the shared 2-core machine: 0.2 s with 1 thread, 22 s
    with 2). The returned fit's `predict_proba` keeps the cap."""
    y_train, y_val = check_binary(y_train, "y_train"), check_binary(y_val, "y_val")
    if x_train.shape[0] != len(y_train) or x_val.shape[0] != len(y_val):
        raise ValueError(
            f"features and labels disagree: x_train {x_train.shape[0]} vs {len(y_train)} labels, "
            f"x_val {x_val.shape[0]} vs {len(y_val)}"
        )
    if not grid:
        raise ValueError("grid must hold at least one candidate")
    best: tuple[float, HistGradientBoostingClassifier, dict[str, Any], np.ndarray] | None = None
    losses, rounds = [], []
    for candidate in grid:
        params = {**TREE_BASE_PARAMS, **candidate}
        with threadpool_limits(limits=n_threads, user_api="openmp"):
            model = HistGradientBoostingClassifier(**params).fit(x_train, y_train)
            staged = [p[:, 1] for p in model.staged_predict_proba(x_val)]
        per_round = [float(log_loss(y_val, p, labels=[0, 1])) for p in staged]
        k = int(np.argmin(per_round))
        losses.append(per_round[k])
        rounds.append(k + 1)
        if best is None or losses[-1] < best[0]:
            best = (losses[-1], model, {**params, "max_iter": k + 1}, staged[k])
    assert best is not None
    loss, model, params, p = best
    candidates = tuple(dict(c) for c in grid)
    return TreesFit(model, params, loss, float(roc_auc_score(y_val, p)), candidates, tuple(losses), n_threads,
                    tuple(rounds))  # fmt: skip
