"""Trivial MLM and CLM baselines: what a masked-code or next-code loss is worth without a model.

Two predictors of a masked code (MLM), scored on exactly the masked slots the model is scored on:

- `unigram`: the training tokens' code frequencies, `p(c) = (count(c) + 1) / (N + V_clin)` over the
  clinical codes (ids >= NUM_SPECIAL; `N` clinical training tokens, `V_clin` clinical codes). Add-one
  (Laplace) smoothing gives every clinical code, even one never seen in training, a non-zero probability, so
  the loss is always finite; special tokens (never targets) get probability 0 (log-probability -inf).
- `copy`: the in-patient copy mixture `p(c) = λ · count_other(c) / n_other + (1 - λ) · unigram(c)`. For a
  masked slot, `count_other(c)` counts code `c` among the *visible* tokens of the same patient (same
  `segment_ids` value in the row) other than the target position; visible = what the model sees in
  `masked_codes`: clinical codes (>= NUM_SPECIAL), so neither `[MASK]` nor other specials. `n_other` is the
  number of such tokens. A slot whose patient shows no other visible code (`n_other == 0`) is scored by the
  unigram alone (the mixture would put mass 1 - λ on nothing). λ is fitted on validation slots by maximum
  likelihood, then the test slots are scored.

Two predictors of the next code (CLM, `task=clm`), scored on exactly the positions the model is scored on
(`ehrjax.train.steps.clm_targets`: a position whose next token is a clinical code of the same patient):

- `unigram`: the same training code frequencies as above, whatever the current token.
- `bigram`: the code given the current token t (any id: `[CLS]`, `[SEP]`, a time token, a code), add-k
  smoothed with the unigram: `p(c | t) = (n(t, c) + k · unigram(c)) / (n(t) + k)`, `n(t, c)` the times code `c`
  follows `t` in the training patients and `n(t)` its sum over `c`; a token never followed by a code in training
  gets the unigram. k > 0 is fitted on the validation positions by maximum likelihood, then the test positions
  are scored.

Top-1 / top-10 use the model's rank convention: rank = number of codes scoring strictly higher than the
label; a hit at k when rank < k (ties are counted in the label's favour). Losses are in nats per target.

    python -m ehrjax.eval.baselines RUN_DIR [--out FILE]   # a pre-training run's test slots, next to its model
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import brentq, minimize_scalar

from ehrjax.data.batching import DeviceBatcher
from ehrjax.data.cohort import ragged_index
from ehrjax.data.tasks import PRETRAIN_TASKS, TaskData
from ehrjax.data.tokenize import TokenizedCorpus
from ehrjax.data.vocab import NUM_SPECIAL
from ehrjax.train.steps import StepConfig, make_mlm_targets_step

BASELINES: tuple[str, ...] = ("unigram", "copy")
CLM_BASELINES: tuple[str, ...] = ("unigram", "bigram")
K_LOG10_GRID = np.linspace(-3.0, 6.0, 37)  # log10 of the bigram's k candidates, 4 per decade from 1e-3 to 1e6
SUM_KEYS: tuple[str, ...] = ("loss_sum", "correct", "correct_top10", "weight")
BATCH_KEYS: tuple[str, ...] = ("masked_codes", "segment_ids", "positions", "labels", "weights")


def token_counts(corpus: TokenizedCorpus, patients: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64[vocab_size] occurrences of each id among the tokens of `patients` (corpus indices)."""
    index, _ = ragged_index(np.asarray(corpus.offsets, dtype=np.int64), np.asarray(patients, dtype=np.int64))
    codes = np.asarray(corpus.codes)[index]
    if len(codes) and codes.max() >= vocab_size:
        raise ValueError(f"corpus holds id {codes.max()}, outside a vocabulary of {vocab_size} ids")
    return np.bincount(codes, minlength=vocab_size).astype(np.int64)


def unigram_log_probs(token_counts: np.ndarray) -> np.ndarray:
    """f64[V] add-one smoothed log-probabilities of the clinical codes from their training counts int[V].

    `log p(c) = log((count(c) + 1) / (N + V - NUM_SPECIAL))` for c >= NUM_SPECIAL, `-inf` for special ids
    (their counts are ignored: `[CLS]`, `[SEP]` and `[UNK]` are never MLM targets).
    """
    counts = np.asarray(token_counts)
    if counts.ndim != 1 or counts.shape[0] <= NUM_SPECIAL:
        raise ValueError(f"token_counts must be 1-D with more than {NUM_SPECIAL} entries, got shape {counts.shape}")
    if np.any(counts < 0):
        raise ValueError("token_counts must be >= 0")
    clinical = counts[NUM_SPECIAL:].astype(np.float64) + 1.0
    out = np.full(counts.shape[0], -np.inf)
    out[NUM_SPECIAL:] = np.log(clinical) - np.log(clinical.sum())
    return out


def _others(
    masked_codes: jax.Array, segment_ids: jax.Array, positions: jax.Array, code_end: int | None
) -> jax.Array:
    """bool[B, M, L]: the visible clinical tokens (ids NUM_SPECIAL..code_end-1, so no time token) of each slot's
    patient, the slot's own position excluded; code_end None: no time tokens."""
    length = masked_codes.shape[1]
    visible = (masked_codes >= NUM_SPECIAL) & (segment_ids > 0)
    if code_end is not None:
        visible &= masked_codes < code_end
    slot_segment = jnp.take_along_axis(segment_ids, positions, axis=1)
    same = segment_ids[:, None, :] == slot_segment[:, :, None]
    not_self = jnp.arange(length)[None, None, :] != positions[:, :, None]
    return same & visible[:, None, :] & not_self


def copy_statistics(
    masked_codes: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    labels: jax.Array,
    code_end: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per masked slot: how often its label appears among its patient's other visible codes, and how many
    such codes there are.

    masked_codes, segment_ids: int32[B, L]; positions, labels: int32[B, M] -> (count_label, n_other)
    int32[B, M] each. code_end: the end of the clinical ids (`Vocab.code_end`; static; None without time tokens).
    """
    others = _others(masked_codes, segment_ids, positions, code_end)
    is_label = masked_codes[:, None, :] == labels[:, :, None]
    count_label = jnp.sum(others & is_label, axis=-1, dtype=jnp.int32)
    n_other = jnp.sum(others, axis=-1, dtype=jnp.int32)
    return count_label, n_other


def fit_copy_lambda(
    count_label: np.ndarray, n_other: np.ndarray, unigram_of_label: np.ndarray, weights: np.ndarray
) -> float:
    """The mixture weight λ in [0, 1] maximising the weighted mean log-likelihood of the labels.

    All arguments have one shape (any); `unigram_of_label` holds the labels' unigram *probabilities*. With
    `a = count_label / n_other` (0 where `n_other == 0`: those slots do not depend on λ) and `u` the unigram
    probability, the log-likelihood `sum w log(λ a + (1 - λ) u)` is concave in λ, so the optimum is λ = 0
    when its derivative at 0 is <= 0, λ = 1 when the derivative at 1 is >= 0, and otherwise the derivative's
    root, found by Brent's method in float64 (deterministic).
    """
    shape = np.shape(count_label)
    arrays = [np.asarray(x, dtype=np.float64) for x in (count_label, n_other, unigram_of_label, weights)]
    if any(x.shape != shape for x in arrays):
        raise ValueError(f"fit_copy_lambda: arguments must share one shape, got {[x.shape for x in arrays]}")
    count, n, u, w = (x.reshape(-1) for x in arrays)
    keep = (w > 0) & (n > 0)
    if not np.any(w > 0):
        raise ValueError("fit_copy_lambda: no weighted slot to fit on")
    if np.any(u[w > 0] <= 0):
        raise ValueError("fit_copy_lambda: unigram_of_label must be > 0 on weighted slots (smoothed probabilities)")
    a, u, w = count[keep] / n[keep], u[keep], w[keep]
    if len(a) == 0:
        return 0.0

    def slope(lam: float) -> float:
        with np.errstate(divide="ignore"):
            return float(np.sum(w * (a - u) / (lam * a + (1.0 - lam) * u)))

    if slope(0.0) <= 0.0:
        return 0.0
    if np.all(a > 0) and slope(1.0) >= 0.0:
        return 1.0
    return float(brentq(slope, 0.0, 1.0, xtol=1e-12, rtol=1e-12, maxiter=200))


def copy_mixture_probs(
    masked_codes: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    log_unigram: jax.Array,
    lam: jax.Array | float,
) -> jax.Array:
    """The copy mixture's distribution over the vocabulary per masked slot: f32[B, M, V].

    masked_codes, segment_ids: int32[B, L]; positions: int32[B, M]; log_unigram: f[V] over the ids below
    `Vocab.code_end` (time tokens, never targets, have no entry); lam: scalar in [0, 1]. Each slot's row sums to
    1 over the clinical codes and is 0 on special ids.
    """
    log_unigram = jnp.asarray(log_unigram, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)
    code_end = log_unigram.shape[0]
    others = _others(masked_codes, segment_ids, positions, code_end).astype(jnp.float32)  # [B, M, L]
    batch, slots, _ = others.shape
    # counts[b, m, c] = sum_l others[b, m, l] [masked_codes[b, l] == c]: a scatter-add, so no [B, L, V] one-hot.
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None, None], others.shape)
    slot = jnp.broadcast_to(jnp.arange(slots)[None, :, None], others.shape)
    code = jnp.broadcast_to(jnp.minimum(masked_codes, code_end - 1)[:, None, :], others.shape)  # 0 weight there
    counts = jnp.zeros((batch, slots, log_unigram.shape[0]), jnp.float32).at[rows, slot, code].add(others)
    n_other = jnp.sum(others, axis=-1, keepdims=True)
    copy_term = counts / jnp.maximum(n_other, 1.0)
    unigram_p = jnp.exp(log_unigram)
    return jnp.where(n_other > 0, lam * copy_term + (1.0 - lam) * unigram_p, unigram_p)


def _rank_sums(rank: jax.Array, loss: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    return {
        "loss_sum": jnp.sum(loss * weights),
        "correct": jnp.sum((rank == 0) * weights),
        "correct_top10": jnp.sum((rank < 10) * weights),
        "weight": jnp.sum(weights),
    }


def _unigram_sums(labels: jax.Array, weights: jax.Array, log_unigram: jax.Array) -> dict[str, jax.Array]:
    """The unigram's sums over the targets `labels` int32[...] weighted by `weights` f32[...]; log_unigram: f32[V]."""
    label_log_u = log_unigram[labels]
    ordered = jnp.sort(log_unigram)
    rank = log_unigram.shape[0] - jnp.searchsorted(ordered, label_log_u, side="right")
    # Empty slots (weight 0, label [PAD]) have p = 0: keep their infinite losses out of the weighted sums.
    return _rank_sums(rank, jnp.where(weights > 0, -label_log_u, 0.0), weights)


def baseline_sums(
    masked_codes: jax.Array,
    segment_ids: jax.Array,
    positions: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    log_unigram: jax.Array,
    lam: jax.Array | float,
) -> dict[str, dict[str, jax.Array]]:
    """Both baselines on one batch: `{'unigram': sums, 'copy': sums}`, sums = loss_sum, correct,
    correct_top10, weight (float32[] each; weighted by `weights`, so empty slots count nothing).

    masked_codes, segment_ids: int32[B, L]; positions, labels: int32[B, M]; weights: float32[B, M];
    log_unigram: f[V] (`unigram_log_probs`); lam: the copy weight (may be traced). The copy mixture's full
    distribution f32[B, M, V] is built per slot, so its ranks are exact. λ = 1 gives an infinite loss on a
    slot whose label its patient does not show.
    """
    log_unigram = jnp.asarray(log_unigram, jnp.float32)
    weights = weights.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    unigram = _unigram_sums(labels, weights, log_unigram)
    mix = copy_mixture_probs(masked_codes, segment_ids, positions, log_unigram, lam)
    label_p = jnp.take_along_axis(mix, labels[..., None], axis=-1)
    copy_rank = jnp.sum(mix > label_p, axis=-1)
    copy = _rank_sums(copy_rank, jnp.where(weights > 0, -jnp.log(label_p[..., 0]), 0.0), weights)
    return {"unigram": unigram, "copy": copy}


_copy_statistics_jit = jax.jit(copy_statistics, static_argnames="code_end")
_baseline_sums_jit = jax.jit(baseline_sums)


def _host_batch(batch: dict[str, Any]) -> tuple[jax.Array, ...]:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"MLM batch: missing arrays {missing}; expected {BATCH_KEYS}")
    return tuple(jnp.asarray(batch[k]) for k in BATCH_KEYS)


def mlm_baselines(
    val_batches: Iterable[dict[str, Any]], test_batches: Iterable[dict[str, Any]], log_unigram: np.ndarray
) -> dict[str, dict[str, float]]:
    """Fit λ on the validation batches, score both baselines on the test batches.

    Batches are dicts of `masked_codes, segment_ids, positions, labels, weights` (see `baseline_sums`).
    Returns `{'unigram': {loss, top1, top10, n}, 'copy': {loss, top1, top10, n, lambda}}`; loss in nats per
    masked target, n the number of test targets.
    """
    log_unigram = np.asarray(log_unigram, dtype=np.float64)
    unigram_p = np.exp(log_unigram)
    stats: list[tuple[np.ndarray, ...]] = []
    for batch in val_batches:
        codes, segments, positions, labels, weights = _host_batch(batch)
        count, n_other = jax.device_get(_copy_statistics_jit(codes, segments, positions, labels,
                                                             code_end=len(log_unigram)))  # fmt: skip
        labels_np = np.asarray(labels)
        stats.append((count, n_other, unigram_p[labels_np], np.asarray(weights)))
    if not stats:
        raise ValueError("mlm_baselines: no validation batches to fit λ on")
    lam = fit_copy_lambda(*(np.concatenate([s[i].reshape(-1) for s in stats]) for i in range(4)))

    totals = {name: dict.fromkeys(SUM_KEYS, 0.0) for name in BASELINES}
    log_unigram_dev = jnp.asarray(log_unigram, jnp.float32)
    for batch in test_batches:
        sums = jax.device_get(_baseline_sums_jit(*_host_batch(batch), log_unigram_dev, jnp.float32(lam)))
        for name in BASELINES:
            for key in SUM_KEYS:
                totals[name][key] += float(sums[name][key])
    out = _means(totals, "mlm_baselines: the test batches hold no masked target")
    out["copy"]["lambda"] = lam
    return out


def _means(totals: dict[str, dict[str, float]], empty: str) -> dict[str, dict[str, float]]:
    """Per baseline: loss, top1, top10 per target and n from summed `SUM_KEYS`; `empty`: the error without targets."""
    out: dict[str, dict[str, float]] = {}
    for name, t in totals.items():
        if t["weight"] <= 0:
            raise ValueError(empty)
        out[name] = {
            "loss": t["loss_sum"] / t["weight"],
            "top1": t["correct"] / t["weight"],
            "top10": t["correct_top10"] / t["weight"],
            "n": t["weight"],
        }
    return out


# One compiled targets program per (settings, row length), shared by the validation and test passes.
_targets_step = functools.lru_cache(make_mlm_targets_step)


def eval_mlm_batches(
    batcher: DeviceBatcher, code_end: int, mask_prob: float, slot_factor: float
) -> Iterator[dict[str, jax.Array]]:
    """The masked batches the MLM evaluation scores, in its order: the fixed plan `plan_epoch(0,
    shuffle=False)`, its `k`-th batch masked with `eval_mask_key(k)` and the step's `mlm_targets` settings
    (`ehrjax.train.steps`). Yields dicts of `BATCH_KEYS` arrays."""
    return _eval_batches(batcher, StepConfig(task="mlm", code_end=code_end, mask_prob=mask_prob,
                                             mlm_slot_factor=slot_factor))  # fmt: skip


def eval_clm_batches(batcher: DeviceBatcher, code_end: int) -> Iterator[dict[str, jax.Array]]:
    """The batches the CLM evaluation scores, in its order, with their next-code targets (`clm_targets`;
    `masked_codes` is the unchanged input). Yields dicts of `BATCH_KEYS` arrays."""
    return _eval_batches(batcher, StepConfig(task="clm", code_end=code_end))


def _eval_batches(batcher: DeviceBatcher, cfg: StepConfig) -> Iterator[dict[str, jax.Array]]:
    plan = batcher.plan_epoch(0, shuffle=False)
    for k in range(plan.num_batches):
        g, j = (int(x) for x in plan.order[k])
        group = plan.groups[g]
        yield _targets_step(cfg, group.row_len, group.mesh)(group.corpus, group.patient_index[j],
                                                             group.cls_index[j], jnp.int32(k))  # fmt: skip


def run_mlm_baselines(data: TaskData, data_cfg: Any, *, seed: int, max_val_patients: int) -> dict[str, Any]:
    """Both baselines for an MLM task's data, on the slots its run evaluates: λ fitted on the first
    `max_val_patients` validation patients (the run's validation set), scored on every test patient (the
    run's test evaluation); unigram counts from the training split. data_cfg: the `data` config section
    (batching, mask_prob, mlm_slot_factor) the run used."""
    if data.task != "mlm":
        raise ValueError(f"run_mlm_baselines: expected the 'mlm' task's data, got {data.task!r}")
    # Time tokens (ids from code_end on) are context, never targets: the baselines predict clinical codes only.
    code_end = data.vocab.code_end
    log_unigram = unigram_log_probs(token_counts(data.corpus, data.splits["train"], len(data.vocab))[:code_end])
    val = DeviceBatcher.from_config(data_cfg, data.corpus, seed=seed, patients=data.splits["val"][:max_val_patients])
    test = DeviceBatcher.from_config(
        data_cfg, data.corpus, seed=seed, patients=data.splits["test"], device_corpus=val.corpus
    )
    settings = (code_end, data_cfg.mask_prob, data_cfg.mlm_slot_factor)
    return mlm_baselines(eval_mlm_batches(val, *settings), eval_mlm_batches(test, *settings), log_unigram)


def next_code_pairs(corpus: TokenizedCorpus, patients: np.ndarray, code_end: int) -> tuple[np.ndarray, np.ndarray]:
    """Every next-code target of `patients` (corpus indices), in corpus order: `(current, target)` int32[n], the
    token at a position and the clinical code (id NUM_SPECIAL..code_end-1) after it in the same patient, the
    pairs `clm_targets` scores."""
    index, offsets = ragged_index(np.asarray(corpus.offsets, dtype=np.int64), np.asarray(patients, dtype=np.int64))
    codes = np.asarray(corpus.codes, dtype=np.int32)[index]
    first = np.zeros(len(codes), dtype=bool)
    first[offsets[:-1][offsets[:-1] < len(codes)]] = True
    keep = ~first[1:] & (codes[1:] >= NUM_SPECIAL) & (codes[1:] < code_end)
    return codes[:-1][keep], codes[1:][keep]


def bigram_counts(current: np.ndarray, target: np.ndarray, vocab_size: int, code_end: int) -> np.ndarray:
    """f32[vocab_size, code_end]: how often each code follows each token, from pairs int[n] (`next_code_pairs`)."""
    current, target = np.asarray(current, dtype=np.int64), np.asarray(target, dtype=np.int64)
    if len(current) and (current.max() >= vocab_size or target.max() >= code_end or target.min() < NUM_SPECIAL):
        raise ValueError(f"bigram pairs: ids outside a vocabulary of {vocab_size} ids with codes {NUM_SPECIAL}.."
                         f"{code_end - 1}")  # fmt: skip
    keys, n = np.unique(current * code_end + target, return_counts=True)
    counts = np.zeros(vocab_size * code_end, dtype=np.float32)
    counts[keys] = n
    return counts.reshape(vocab_size, code_end)


def bigram_log_likelihood(k: float, n_pair: np.ndarray, n_current: np.ndarray, unigram_p: np.ndarray) -> float:
    """Mean log p(label | current) of the bigram with smoothing `k`, from each target's pair count, current-token
    count and label unigram probability (float arrays of one shape)."""
    return float(np.mean(np.log(n_pair + k * unigram_p) - np.log(n_current + k)))


def fit_bigram_k(n_pair: np.ndarray, n_current: np.ndarray, unigram_p: np.ndarray) -> float:
    """The smoothing k in [1e-3, 1e6] maximising the bigram's mean log-likelihood of validation targets (arrays as
    in `bigram_log_likelihood`): the best of `K_LOG10_GRID`, refined by a bounded search between its neighbours
    (deterministic)."""
    n_pair, n_current, unigram_p = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (n_pair, n_current,
                                                                                            unigram_p))  # fmt: skip
    if len(n_pair) == 0:
        raise ValueError("fit_bigram_k: no validation target to fit on")
    grid = K_LOG10_GRID
    values = [bigram_log_likelihood(10.0**g, n_pair, n_current, unigram_p) for g in grid]
    best = int(np.argmax(values))
    left, right = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    found = minimize_scalar(lambda g: -bigram_log_likelihood(10.0**g, n_pair, n_current, unigram_p),
                            bounds=(left, right), method="bounded", options={"xatol": 1e-6})  # fmt: skip
    return float(10.0 ** (found.x if -found.fun >= values[best] else grid[best]))


def bigram_sums(
    current: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    counts: jax.Array,
    log_unigram: jax.Array,
    k: jax.Array | float,
) -> dict[str, dict[str, jax.Array]]:
    """Both CLM baselines on one batch: `{'unigram': sums, 'bigram': sums}` (sums as in `baseline_sums`).

    current, labels: int32[...] (the token at each scored position and the code after it); weights: f32[...];
    counts: f32[V, C] (`bigram_counts`); log_unigram: f[C] (`unigram_log_probs` of the codes below code_end = C);
    k: the smoothing (> 0). Ranks compare the numerators n(t, c) + k unigram(c) of one row, so they are exact.
    """
    log_unigram = jnp.asarray(log_unigram, jnp.float32)
    weights = weights.astype(jnp.float32)
    labels = labels.astype(jnp.int32)
    rows = jnp.asarray(counts, jnp.float32)[current]  # [..., C]
    numerators = rows + jnp.asarray(k, jnp.float32) * jnp.exp(log_unigram)
    label_numerator = jnp.take_along_axis(numerators, labels[..., None], axis=-1)
    rank = jnp.sum(numerators > label_numerator, axis=-1)
    log_p = jnp.log(label_numerator[..., 0]) - jnp.log(jnp.sum(rows, axis=-1) + k)
    bigram = _rank_sums(rank, jnp.where(weights > 0, -log_p, 0.0), weights)
    return {"unigram": _unigram_sums(labels, weights, log_unigram), "bigram": bigram}


_bigram_sums_jit = jax.jit(bigram_sums)


def _current_tokens(batch: dict[str, Any]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(current, labels, weights) of a CLM evaluation batch: the input token at each scored position."""
    codes, _, positions, labels, weights = _host_batch(batch)
    return jnp.take_along_axis(codes, positions, axis=1), labels, weights


def clm_baselines(
    val_batches: Iterable[dict[str, Any]],
    test_batches: Iterable[dict[str, Any]],
    counts: np.ndarray,
    log_unigram: np.ndarray,
) -> dict[str, dict[str, float]]:
    """Fit the bigram's k on the validation batches, score both CLM baselines on the test batches.

    Batches are dicts of `BATCH_KEYS` arrays (`eval_clm_batches`); counts: f32[V, C] training bigram counts;
    log_unigram: f[C]. Returns `{'unigram': {loss, top1, top10, n}, 'bigram': {loss, top1, top10, n, k}}`;
    loss in nats per next-code target, n the number of test targets.
    """
    counts = np.asarray(counts, dtype=np.float32)
    log_unigram = np.asarray(log_unigram, dtype=np.float64)
    totals = counts.sum(axis=1, dtype=np.float64)
    fit: list[tuple[np.ndarray, ...]] = []
    for batch in val_batches:
        current, labels, weights = (np.asarray(x) for x in jax.device_get(_current_tokens(batch)))
        current, labels = current[weights > 0], labels[weights > 0]
        fit.append((counts[current, labels], totals[current], np.exp(log_unigram[labels])))
    if not fit:
        raise ValueError("clm_baselines: no validation batches to fit k on")
    k = fit_bigram_k(*(np.concatenate([f[i] for f in fit]) for i in range(3)))

    sums_total = {name: dict.fromkeys(SUM_KEYS, 0.0) for name in CLM_BASELINES}
    counts_dev, log_unigram_dev = jnp.asarray(counts), jnp.asarray(log_unigram, jnp.float32)
    for batch in test_batches:
        sums = jax.device_get(_bigram_sums_jit(*_current_tokens(batch), counts_dev, log_unigram_dev, jnp.float32(k)))
        for name in CLM_BASELINES:
            for key in SUM_KEYS:
                sums_total[name][key] += float(sums[name][key])
    out = _means(sums_total, "clm_baselines: the test batches hold no next-code target")
    out["bigram"]["k"] = k
    return out


def run_clm_baselines(data: TaskData, data_cfg: Any, *, seed: int, max_val_patients: int) -> dict[str, Any]:
    """Both CLM baselines for a CLM task's data, on the positions its run evaluates: unigram and bigram counts
    from the training split, k fitted on the first `max_val_patients` validation patients (the run's
    validation set), scored on every test patient. data_cfg: the run's `data` config section (batching)."""
    if data.task != "clm":
        raise ValueError(f"run_clm_baselines: expected the 'clm' task's data, got {data.task!r}")
    code_end = data.vocab.code_end
    log_unigram = unigram_log_probs(token_counts(data.corpus, data.splits["train"], len(data.vocab))[:code_end])
    counts = bigram_counts(*next_code_pairs(data.corpus, data.splits["train"], code_end), len(data.vocab), code_end)
    val = DeviceBatcher.from_config(data_cfg, data.corpus, seed=seed, patients=data.splits["val"][:max_val_patients])
    test = DeviceBatcher.from_config(
        data_cfg, data.corpus, seed=seed, patients=data.splits["test"], device_corpus=val.corpus
    )
    return clm_baselines(eval_clm_batches(val, code_end), eval_clm_batches(test, code_end), counts, log_unigram)


def run_baselines(data: TaskData, data_cfg: Any, *, seed: int, max_val_patients: int) -> dict[str, Any]:
    """The baselines of a pre-training task's data: `run_mlm_baselines` or `run_clm_baselines`."""
    run = run_clm_baselines if data.task == "clm" else run_mlm_baselines
    return run(data, data_cfg, seed=seed, max_val_patients=max_val_patients)


def last_test_eval(metrics_path: str | os.PathLike) -> dict[str, Any] | None:
    """The last `eval` record of split `test` in a run's metrics.jsonl, or None (a torn last line, left by a
    kill, is dropped with a warning; a bad line elsewhere is a one-line ValueError naming the file and line)."""
    from ehrjax.train.rundir import read_jsonl

    found = None
    for record in read_jsonl(metrics_path):
        if record.get("event") == "eval" and record.get("split") == "test":
            found = record
    return found


def format_table(result: dict[str, Any]) -> str:
    """Model (when known) and baselines as an aligned text table: loss (nats per target), top-1, top-10."""
    lines = [f"{'predictor':<10} {'loss':>7} {'top1':>7} {'top10':>7}  note"]
    for name in ("model", *dict.fromkeys(BASELINES + CLM_BASELINES)):
        r = result.get(name)
        if r is None:
            continue
        note = f"λ = {r['lambda']:.4f}" if "lambda" in r else f"k = {r['k']:.4g}" if "k" in r else ""
        lines.append(f"{name:<10} {r['loss']:>7.4f} {r['top1']:>7.4f} {r['top10']:>7.4f}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m ehrjax.eval.baselines RUN_DIR [--out FILE]`: the baselines of a pre-training run's held-out
    targets (MLM: unigram and copy; CLM: unigram and bigram), next to the run's own test evaluation from its
    metrics.jsonl."""
    import argparse
    import sys

    import ml_collections

    from ehrjax.data.tasks import build_task_data
    from ehrjax.data.vocab import Vocab

    parser = argparse.ArgumentParser(prog="python -m ehrjax.eval.baselines", description=main.__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    from ehrjax.atomic import read_json, write_json
    from ehrjax.cli import error_line
    from ehrjax.config import fill_defaults

    try:
        for name in ("config.json", "vocab.json"):
            if not (args.run_dir / name).is_file():
                raise ValueError(f"run {args.run_dir}: no {name}; not an ehrjax run directory")
        if args.out is not None:  # before the work
            if args.out.is_dir():
                raise ValueError(f"--out {args.out}: is a folder, expected a file path")
            if not args.out.parent.is_dir():
                raise ValueError(f"--out {args.out}: folder {args.out.parent} does not exist")
        saved = read_json(args.run_dir / "config.json", f"run {args.run_dir}: config file")
        if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ("data", "train")):
            raise ValueError(f"run {args.run_dir}: config.json is not a run config (a JSON object with 'data' and "
                             "'train' sections)")  # fmt: skip
        config = ml_collections.ConfigDict(fill_defaults(saved))
        if config.get("task") not in PRETRAIN_TASKS:
            raise ValueError(f"run {args.run_dir}: a run of task {config.get('task')}, expected one of "
                             f"{', '.join(PRETRAIN_TASKS)}")  # fmt: skip
        metrics = args.run_dir / "metrics.jsonl"
        model = last_test_eval(metrics) if metrics.is_file() else None  # a bad log fails before the work
        data = build_task_data(config, config.task, vocab=Vocab.load(args.run_dir / "vocab.json"))
        result: dict[str, Any] = run_baselines(
            data, config.data, seed=config.seed, max_val_patients=config.train.max_eval_patients
        )
        if model is not None:
            result["model"] = {k: model[k] for k in ("loss", "top1", "top10", "n") if k in model}
        print(format_table(result))
        if args.out is not None:
            write_json(args.out, result, strict=True)
    except (ValueError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    except (KeyError, AttributeError) as err:  # a hand-edited config.json without a setting the run needs
        print(f"error: run {args.run_dir}: config.json lacks a setting ({error_line(err)})", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
