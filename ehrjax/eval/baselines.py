"""Trivial MLM baselines: what a masked-code loss is worth without a model.

Two predictors of a masked code, scored on exactly the masked slots the model is scored on:

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
from scipy.optimize import brentq

from ehrjax.data.batching import DeviceBatcher
from ehrjax.data.cohort import ragged_index
from ehrjax.data.tasks import TaskData
from ehrjax.data.tokenize import TokenizedCorpus
from ehrjax.data.vocab import NUM_SPECIAL
from ehrjax.train.steps import StepConfig, make_mlm_targets_step

BASELINES: tuple[str, ...] = ("unigram", "copy")
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
    vocab = log_unigram.shape[0]
    weights = weights.astype(jnp.float32)
    labels = labels.astype(jnp.int32)

    label_log_u = log_unigram[labels]
    ordered = jnp.sort(log_unigram)
    unigram_rank = vocab - jnp.searchsorted(ordered, label_log_u, side="right")
    # Empty slots (weight 0, label [PAD]) have p = 0: keep their infinite losses out of the weighted sums.
    unigram = _rank_sums(unigram_rank, jnp.where(weights > 0, -label_log_u, 0.0), weights)

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
    out: dict[str, dict[str, float]] = {}
    for name in BASELINES:
        t = totals[name]
        if t["weight"] <= 0:
            raise ValueError("mlm_baselines: the test batches hold no masked target")
        out[name] = {
            "loss": t["loss_sum"] / t["weight"],
            "top1": t["correct"] / t["weight"],
            "top10": t["correct_top10"] / t["weight"],
            "n": t["weight"],
        }
    out["copy"]["lambda"] = lam
    return out


# One compiled targets program per (settings, row length), shared by the validation and test passes.
_targets_step = functools.lru_cache(make_mlm_targets_step)


def eval_mlm_batches(
    batcher: DeviceBatcher, code_end: int, mask_prob: float, slot_factor: float
) -> Iterator[dict[str, jax.Array]]:
    """The masked batches the MLM evaluation scores, in its order: the fixed plan `plan_epoch(0,
    shuffle=False)`, its `k`-th batch masked with `eval_mask_key(k)` and the step's `mlm_targets` settings
    (`ehrjax.train.steps`). Yields dicts of `BATCH_KEYS` arrays."""
    cfg = StepConfig(task="mlm", code_end=code_end, mask_prob=mask_prob, mlm_slot_factor=slot_factor)
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
    for name in ("model", *BASELINES):
        r = result.get(name)
        if r is None:
            continue
        note = f"λ = {r['lambda']:.4f}" if "lambda" in r else ""
        lines.append(f"{name:<10} {r['loss']:>7.4f} {r['top1']:>7.4f} {r['top10']:>7.4f}  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m ehrjax.eval.baselines RUN_DIR [--out FILE]`: the MLM baselines of a pre-training run's
    held-out slots, next to the run's own test evaluation from its metrics.jsonl."""
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
        if config.get("task") != "mlm":
            raise ValueError(f"run {args.run_dir}: a run of task {config.get('task')}, expected mlm")
        metrics = args.run_dir / "metrics.jsonl"
        model = last_test_eval(metrics) if metrics.is_file() else None  # a bad log fails before the work
        data = build_task_data(config, "mlm", vocab=Vocab.load(args.run_dir / "vocab.json"))
        result: dict[str, Any] = run_mlm_baselines(
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
