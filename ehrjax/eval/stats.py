"""Bootstrap statistics of binary metrics over test patients and training seeds.

A benchmark arm is trained with several seeds and scored on one fixed test set, so its uncertainty has two
sources: which patients happen to be in the test set, and which seeds happen to be drawn. The bootstrap here
resamples both at once: each replicate draws the test patients with replacement and the seeds with
replacement, and its value is the mean over the drawn seeds of the metric on the drawn patients. The point
estimate is the mean over seeds of the metric on all test patients; the interval is the 95% percentile
interval of the replicates. A paired difference of two arms applies the same patient and seed draws to both,
so the shared test-set noise cancels; `bootstrap_p_value` turns its replicates into a two-sided p-value and
`holm` adjusts a family of them for multiple comparisons.

A patient resample is a count vector (how often each patient was drawn), and every metric here is computed
from counts used as sample weights, vectorised over many replicates at once: this equals the metric on the
resampled (duplicated) patients exactly, as scikit-learn computes it, and costs one sort per score vector.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

METRICS: tuple[str, ...] = ("auroc", "ap", "pr_auc", "brier")
_CHUNK = 256  # replicates drawn and scored per block (bounds memory at _CHUNK x n counts)


def _tie_groups(sorted_scores: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted vector."""
    return np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])


def _as_weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones((1, n))
    weights = np.asarray(weights, dtype=np.float64)
    return weights[None] if weights.ndim == 1 else weights


def weighted_auroc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """AUROC (Mann-Whitney; ties count half) of one score vector under many patient weightings at once.

    labels: {0,1}[n]; scores: float[n]; weights: float[B, n] (bootstrap counts; None = all ones).
    Returns float[B]; NaN where a weighting leaves no positive or no negative weight.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    weights = _as_weights(weights, len(scores))
    order = np.argsort(scores, kind="stable")
    starts = _tie_groups(scores[order])
    w = weights[:, order]
    positive = labels[order]
    pos = np.add.reduceat(w * positive, starts, axis=1)  # [B, groups]
    neg = np.add.reduceat(w, starts, axis=1) - pos
    neg_below = np.cumsum(neg, axis=1) - neg
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / pairs, np.nan)


def _precision_recall_points(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per weighting, precision[B, T] and recall[B, T] at each distinct threshold (descending), positives[B]."""
    order = np.argsort(-scores, kind="stable")
    starts = _tie_groups(scores[order])
    w = weights[:, order]
    positive = labels[order]
    pos = np.add.reduceat(w * positive, starts, axis=1)
    tp = np.cumsum(pos, axis=1)
    fp = np.cumsum(np.add.reduceat(w, starts, axis=1) - pos, axis=1)
    total_pos = tp[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        # Thresholds above every weighted patient have no predicted positives; scikit-learn drops them and
        # they add no area (recall stays 0), so precision 1 there keeps the curve's (0, 1) start.
        precision = np.where(tp + fp > 0, tp / (tp + fp), 1.0)
        recall = tp / total_pos[:, None]
    return precision, recall, total_pos


def weighted_average_precision(
    labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """Average precision (step-wise, as `sklearn.metrics.average_precision_score`) per weighting: float[B]."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    precision, recall, total_pos = _precision_recall_points(labels, scores, _as_weights(weights, len(scores)))
    gained = np.diff(recall, axis=1, prepend=0.0)
    value = (gained * precision).sum(axis=1)
    return np.where(total_pos > 0, value, np.nan)


def weighted_pr_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Trapezoidal area under the PR curve (as `auc(recall, precision)` from `precision_recall_curve`): float[B]."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    precision, recall, total_pos = _precision_recall_points(labels, scores, _as_weights(weights, len(scores)))
    recall = np.concatenate([np.zeros((len(recall), 1)), recall], axis=1)
    precision = np.concatenate([np.ones((len(precision), 1)), precision], axis=1)
    value = (np.diff(recall, axis=1) * (precision[:, 1:] + precision[:, :-1]) / 2).sum(axis=1)
    return np.where(total_pos > 0, value, np.nan)


def weighted_brier(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Brier score (mean squared error of probabilities; lower is better) per weighting: float[B]."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    weights = _as_weights(weights, len(scores))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights * (scores - labels) ** 2).sum(axis=1) / weights.sum(axis=1)


_WEIGHTED = {
    "auroc": weighted_auroc,
    "ap": weighted_average_precision,
    "pr_auc": weighted_pr_auc,
    "brier": weighted_brier,
}


def metric_per_weighting(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None, metric: str) -> np.ndarray:
    """`metric` (one of METRICS) of scores: float[n] under each row of weights: float[B, n] -> float[B]."""
    if metric not in _WEIGHTED:
        raise ValueError(f"metric: expected one of {', '.join(METRICS)}, got {metric!r}")
    return _WEIGHTED[metric](labels, scores, weights)


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Brier score of one run via scikit-learn: labels {0,1}[n], probabilities float[n] in [0, 1]."""
    from sklearn.metrics import brier_score_loss

    return float(brier_score_loss(np.asarray(labels).astype(int), np.asarray(probabilities, dtype=np.float64)))


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent patient and seed generators of `seed`: patient draws never depend on the seed count."""
    patient_seq, seed_seq = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(patient_seq), np.random.default_rng(seed_seq)


def _patient_counts(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of patient resamples as counts: float[b, n] with b <= 256, n_boot rows in all."""
    rng = _streams(seed)[0]
    for start in range(0, n_boot, _CHUNK):
        block = min(_CHUNK, n_boot - start)
        idx = rng.integers(0, n, size=(block, n))
        flat = (idx + n * np.arange(block)[:, None]).ravel()
        yield np.bincount(flat, minlength=block * n).reshape(block, n).astype(np.float64)


def _seed_counts(num_seeds: int, n_boot: int, seed: int) -> np.ndarray:
    """Seed resamples as counts: float[n_boot, num_seeds]."""
    idx = _streams(seed)[1].integers(0, num_seeds, size=(n_boot, num_seeds))
    return (idx[:, :, None] == np.arange(num_seeds)).sum(axis=1).astype(np.float64)


def bootstrap_draws(n: int, num_seeds: int, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The draws every function here uses: (patient_counts: float[n_boot, n], seed_counts: float[n_boot, S]).

    Patients and seeds come from two independent streams of `seed`, so the patient draws do not depend on
    `num_seeds`: with one seed the bootstrap is exactly the patient bootstrap, and arms with different seed
    counts see the same patient resamples. Deterministic given (n, num_seeds, n_boot, seed).
    """
    return np.concatenate(list(_patient_counts(n, n_boot, seed))), _seed_counts(num_seeds, n_boot, seed)


def _check(labels: np.ndarray, scores: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[None]
    if labels.ndim != 1 or scores.ndim != 2 or scores.shape[1] != len(labels) or len(scores) == 0:
        raise ValueError(f"{name}: expected labels[n] and scores[seeds, n], got {labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name}: labels must be 0 or 1, got values {np.unique(labels)[:5].tolist()}")
    if len(np.unique(labels)) < 2:
        raise ValueError(f"{name}: labels need both classes among the {len(labels)} patients")
    if not np.isfinite(scores).all():
        raise ValueError(f"{name}: scores must be finite")
    return labels.astype(bool), scores


@dataclass(frozen=True)
class Replicates:
    """One arm's metric per seed on all patients (`point`: float[S]) and per patient resample and seed
    (`values`: float[n_boot, S]), under the patient draws of `seed`. Combine with `interval` / `difference`."""

    metric: str
    point: np.ndarray
    values: np.ndarray
    seed: int


def replicates(
    labels: np.ndarray, scores: np.ndarray, metric: str = "auroc", n_boot: int = 1000, seed: int = 0
) -> Replicates:
    """The metric of each seed's scores (float[S, n]) on all patients and on each of n_boot patient resamples.

    The expensive step; every arm scored on the same n patients with the same `seed` sees the same resamples,
    so one `Replicates` per arm serves its interval and all its paired differences.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot: expected a positive count, got {n_boot}")
    labels, scores = _check(labels, scores, "scores")
    if metric == "brier" and not ((scores >= 0) & (scores <= 1)).all():
        raise ValueError("scores: the Brier score needs probabilities in [0, 1]")
    point = np.array([metric_per_weighting(labels, row, None, metric)[0] for row in scores])
    blocks = [
        np.stack([metric_per_weighting(labels, row, counts, metric) for row in scores], axis=1)
        for counts in _patient_counts(len(labels), n_boot, seed)
    ]
    return Replicates(metric, point, np.concatenate(blocks), seed)


def _seed_mean(values: np.ndarray, seed_counts: np.ndarray) -> np.ndarray:
    """Per replicate, the mean over drawn seeds: values float[B, S] (S = 1 is broadcast), counts float[B, S']."""
    if values.shape[1] == 1:
        return values[:, 0]
    return (values * seed_counts).sum(axis=1) / seed_counts.shape[1]


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return float("nan"), float("nan")
    lo, hi = np.percentile(finite, [2.5, 97.5])
    return float(lo), float(hi)


def interval(reps: Replicates) -> tuple[float, float, float]:
    """(mean over seeds, lo, hi): 95% percentile interval over replicates that resample patients and seeds."""
    n_boot, num_seeds = reps.values.shape
    values = _seed_mean(reps.values, _seed_counts(num_seeds, n_boot, reps.seed))
    return (float(reps.point.mean()), *_interval(values))


def difference_replicates(a: Replicates, b: Replicates) -> tuple[float, np.ndarray]:
    """(mean A - B on all patients, the paired difference per bootstrap replicate: float[n_boot]).

    Both arms get each replicate's patient draw and seed-index draw. Row s of A and of B must come from the
    same training seed; an arm with one row is broadcast. Replicates whose patients hold one class are NaN.
    """
    if a.values.shape[0] != b.values.shape[0] or a.seed != b.seed or a.metric != b.metric:
        raise ValueError("replicates: A and B must share metric, n_boot and seed to be paired")
    num_a, num_b = a.values.shape[1], b.values.shape[1]
    if num_a != num_b and 1 not in (num_a, num_b):
        raise ValueError(f"scores_a, scores_b: expected the same number of seeds (or one), got {num_a} and {num_b}")
    counts = _seed_counts(max(num_a, num_b), a.values.shape[0], a.seed)
    values = _seed_mean(a.values, counts) - _seed_mean(b.values, counts)
    return float(np.mean(a.point - b.point)), values


def difference(a: Replicates, b: Replicates) -> tuple[float, float, float]:
    """(mean A - B, lo, hi), paired: both arms get each replicate's patient draw and seed-index draw.

    Row s of A and of B must come from the same training seed; an arm with one row is broadcast.
    """
    mean, values = difference_replicates(a, b)
    return (mean, *_interval(values))


def bootstrap_p_value(values: np.ndarray) -> float:
    """Two-sided bootstrap p-value of "the paired difference is 0", from its replicates (float[n_boot]).

    p = 2 * min(share of replicates <= 0, share >= 0), capped at 1 and floored at 1 / (n + 1) (n finite
    replicates: the bootstrap cannot resolve a smaller p). It matches the percentile interval: p < 0.05
    roughly when the 95% interval excludes 0. Identical arms (every replicate 0) give 1. NaN replicates (a
    resample with one class) are left out; NaN if none is finite.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return float("nan")
    share = min(float(np.mean(values <= 0)), float(np.mean(values >= 0)))
    return float(min(1.0, max(2.0 * share, 1.0 / (len(values) + 1))))


def holm(p_values) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values of one family of m tests (float[m], in the input order).

    The i-th smallest p (i = 0, 1, ...) is multiplied by m - i, the running maximum makes the adjusted values
    monotone in the raw ones, and each is capped at 1. Rejecting where adjusted < alpha controls the
    family-wise error rate at alpha. NaN entries stay NaN and do not count towards m.
    """
    p = np.asarray(p_values, dtype=np.float64).reshape(-1)
    out = np.full(p.shape, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m = len(order)
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled)) if m else scaled
    return out


def bootstrap_over_patients_and_seeds(
    labels: np.ndarray, scores: np.ndarray, metric: str = "auroc", n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): mean over seeds of `metric` on all patients, and its 95% bootstrap interval.

    labels: {0,1}[n]; scores: float[S, n] (one row per training seed; float[n] means S = 1). Each replicate
    resamples patients and seeds with replacement; its value is the mean over the drawn seeds of the metric
    on the drawn patients. Replicates whose patients hold a single class are left out of the interval.
    """
    return interval(replicates(labels, scores, metric, n_boot, seed))


def paired_difference(
    labels: np.ndarray,
    scores_a: np.ndarray,
    scores_b: np.ndarray,
    metric: str = "auroc",
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(mean_diff, lo, hi) of `metric` for arm A minus arm B, paired on patients and seed indices.

    scores_a, scores_b: float[S, n] on the same patients, row s of both from the same training seed; an arm
    with one row (a deterministic baseline) is broadcast against the other's seeds. Each replicate applies one
    draw of patients and of seed indices to both arms, so identical arms give exactly 0 with interval [0, 0].
    """
    _, a = _check(labels, scores_a, "scores_a")
    _, b = _check(labels, scores_b, "scores_b")
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        raise ValueError(f"scores_a, scores_b: expected the same number of seeds (or one), got {len(a)} and {len(b)}")
    return difference(replicates(labels, a, metric, n_boot, seed), replicates(labels, b, metric, n_boot, seed))
