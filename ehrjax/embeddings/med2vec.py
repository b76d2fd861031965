"""Med2Vec (Choi et al., KDD 2016) in JAX: code and visit representations from co-occurrence in visits.

The model, as in the authors' Theano code (mp2893/med2vec), for a visit with code ids S (x the multi-hot)::

    u = ReLU(x W_emb + b_emb)          # an embedding-bag: the sum of the rows W_emb[S]
    v = ReLU(u W_hidden + b_hidden)
    y = softmax(v W_output + b_output)

Loss per batch = visit loss + code loss + l2 * ||W_emb||^2:

* visit loss: for each offset o in -w..-1, 1..w, the mean over the batch's visits t that have a visit t + o
  in the same patient of the original's cross-entropy `-sum_c x_{t+o,c} log y_{t,c} + (1 - x_{t+o,c})
  log(1 - y_{t,c})`, summed over the offsets (for w = 1 this is the original's forward + backward sum over
  the number of visit pairs). Every visit of the batch is a centre; its neighbours are gathered from the
  whole cohort, so no visit pair is lost at a batch boundary.
* code loss: skip-gram over ordered pairs (i, j) of distinct codes of one visit, a full softmax over every
  code with code vectors `ReLU(W_emb)`: `-log softmax(c_i . C^T)[j]`, averaged over the step's pairs. Each
  epoch permutes all pairs of the cohort and deals them out to the steps (a fixed number per step, padding
  weighted zero), so every pair is seen once per epoch whatever the batch composition.

Departures from the original, all in the `med2vec` config: Adam (lr 3e-3) instead of Adadelta and
Glorot-uniform weights instead of uniform(-0.01, 0.01) (`optimizer='adadelta'`, `init_range=0.01` give the
original back), because together they reach good code vectors in a few epochs; `log(1 - y)` is computed
from the log-softmax with y clamped below 1 instead of adding the original's 1e-8.

Static shapes: `batch_visits` visits per step, `max_codes` codes per visit (a longer visit keeps its most
frequent codes, i.e. lowest vocab ids, and the cut is counted), `pairs_per_batch` pairs per step (0: just
enough to see every pair once per epoch). Codes index the model vocabulary's clinical codes: Med2Vec index
`k` is vocab id `k + NUM_SPECIAL`, so the exported table aligns to the model; special tokens are not trained.

    python -m ehrjax.embeddings.med2vec --num-patients 20000 --seed 0 --out results/med2vec
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import pickle
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from ehrjax.atomic import check_folder_writable, check_output_path, os_error_line, replace_together
from ehrjax.data.cohort import Cohort
from ehrjax.data.vocab import NUM_SPECIAL, Vocab
from ehrjax.embeddings.io import sibling

PARAM_NAMES: tuple[str, ...] = ("W_emb", "b_emb", "W_hidden", "b_hidden", "W_output", "b_output")
OPTIMIZERS: tuple[str, ...] = ("adam", "adadelta")
PAIR_MULTIPLE = 256  # the automatic pairs-per-step is rounded up to a multiple of this

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class VisitData:
    """A cohort's visits in Med2Vec index space (code k = vocab id k + NUM_SPECIAL), on the host.

    codes: int32[n_visits, max_codes], -1 padded, distinct and ascending within a visit.
    neighbours: int32[n_visits, 2 * window] visit index at offsets -w..-1, 1..w; -1 if outside the patient.
    pairs: int32[n_pairs, 2] ordered pairs (i, j), i != j, of codes in one visit.
    n_codes: size of the code index space (clinical codes of the vocabulary).
    truncated_codes: codes cut from visits longer than max_codes.
    dropped_tokens: tokens whose code is not a clinical code of the vocabulary.
    """

    codes: np.ndarray
    neighbours: np.ndarray
    pairs: np.ndarray
    n_codes: int
    truncated_codes: int
    dropped_tokens: int

    @property
    def num_visits(self) -> int:
        return len(self.codes)


def build_visits(cohort: Cohort, vocab: Vocab, *, max_codes: int, window: int) -> VisitData:
    """Vectorised CSR cohort -> padded visits, neighbour indices and within-visit code pairs.

    Tokens whose code is not a clinical code of `vocab` are dropped (a visit left empty disappears);
    repeated codes in a visit count once (x is multi-hot).
    """
    if max_codes < 2:
        raise ValueError(f"med2vec.max_codes must be >= 2, got {max_codes}")
    if window < 1:
        raise ValueError(f"med2vec.window must be >= 1, got {window}")
    n_codes = len(vocab) - NUM_SPECIAL
    index = vocab.ids(cohort.code_names).astype(np.int64) - NUM_SPECIAL  # per catalogue code; < 0: special/UNK
    code = index[cohort.codes]
    patient = np.repeat(np.arange(len(cohort), dtype=np.int64), cohort.lengths)
    keep = code >= 0
    dropped = int((~keep).sum())
    code, patient, visit = code[keep], patient[keep], cohort.visit[keep].astype(np.int64)
    if not len(code):
        raise ValueError("med2vec: the cohort has no token whose code is in the vocabulary")

    order = np.lexsort((code, visit, patient))
    code, patient, visit = code[order], patient[order], visit[order]
    new_token = np.ones(len(code), dtype=bool)
    new_token[1:] = (code[1:] != code[:-1]) | (visit[1:] != visit[:-1]) | (patient[1:] != patient[:-1])
    code, patient, visit = code[new_token], patient[new_token], visit[new_token]
    new_visit = np.ones(len(code), dtype=bool)
    new_visit[1:] = (visit[1:] != visit[:-1]) | (patient[1:] != patient[:-1])
    visit_id = np.cumsum(new_visit) - 1
    starts = np.flatnonzero(new_visit)
    n_visits = len(starts)
    pos = np.arange(len(code)) - starts[visit_id]
    fits = pos < max_codes
    codes = np.full((n_visits, max_codes), -1, dtype=np.int32)
    codes[visit_id[fits], pos[fits]] = code[fits]
    lengths = np.minimum(np.diff(np.append(starts, len(code))), max_codes)

    visit_patient = patient[starts]
    offsets = [o for o in range(-window, window + 1) if o != 0]
    neighbours = np.full((n_visits, len(offsets)), -1, dtype=np.int32)
    for k, o in enumerate(offsets):
        j = np.arange(n_visits) + o
        inside = (j >= 0) & (j < n_visits)
        same = np.zeros(n_visits, dtype=bool)
        same[inside] = visit_patient[j[inside]] == visit_patient[inside]
        neighbours[same, k] = j[same]

    squares = lengths.astype(np.int64) ** 2
    rep = np.repeat(np.arange(n_visits), squares)
    local = np.arange(int(squares.sum())) - np.repeat(np.cumsum(squares) - squares, squares)
    n_rep = lengths[rep]
    a, b = local // n_rep, local % n_rep
    distinct = a != b
    rep, a, b = rep[distinct], a[distinct], b[distinct]
    pairs = np.stack([codes[rep, a], codes[rep, b]], axis=1).astype(np.int32)
    return VisitData(codes, neighbours, pairs, n_codes, int((~fits).sum()), dropped)


def init_params(key: jax.Array, n_codes: int, dim: int, visit_dim: int, init_range: float = 0.0) -> Params:
    """Weights uniform(-r, r), biases zero; float32, named as in the export.

    `init_range=0` (default): Glorot-uniform, r = sqrt(6 / (fan_in + fan_out)) per matrix, so that the ReLU
    layers start with activations larger than the first optimiser steps on the biases (with the original's
    r = 0.01, Adam can kill every hidden unit in the first steps). `init_range=0.01` is the original's init.
    """
    keys = jax.random.split(key, 3)
    shapes = {"W_emb": (n_codes, dim), "W_hidden": (dim, visit_dim), "W_output": (visit_dim, n_codes)}
    params = {}
    for k, (name, shape) in zip(keys, shapes.items(), strict=True):
        r = init_range or float(np.sqrt(6.0 / sum(shape)))
        params[name] = jax.random.uniform(k, shape, jnp.float32, -r, r)
    params["b_emb"] = jnp.zeros((dim,), jnp.float32)
    params["b_hidden"] = jnp.zeros((visit_dim,), jnp.float32)
    params["b_output"] = jnp.zeros((n_codes,), jnp.float32)
    return {name: params[name] for name in PARAM_NAMES}


def visit_representation(params: Params, codes: jax.Array) -> jax.Array:
    """codes: int32[batch, max_codes] (-1 padded) -> v: f32[batch, visit_dim]."""
    mask = (codes >= 0)[..., None]
    rows = jnp.take(params["W_emb"], jnp.maximum(codes, 0), axis=0)
    u = jax.nn.relu(jnp.where(mask, rows, 0.0).sum(axis=1) + params["b_emb"])
    return jax.nn.relu(u @ params["W_hidden"] + params["b_hidden"])


def code_vectors(params: Params) -> jax.Array:
    """Med2Vec code representations ReLU(W_emb): f32[n_codes, dim] (b_emb is not part of them)."""
    return jax.nn.relu(params["W_emb"])


def loss_fn(
    params: Params,
    codes: jax.Array,
    targets: jax.Array,
    target_valid: jax.Array,
    pairs: jax.Array,
    pair_valid: jax.Array,
    *,
    l2: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Med2Vec loss of one batch.

    codes: int32[B, M] centre visits; targets: int32[B, 2w, M] neighbour visits' codes (-1 padded);
    target_valid: bool[B, 2w]; pairs: int32[P, 2]; pair_valid: bool[P]. Returns (loss, components).
    """
    v = visit_representation(params, codes)
    logp = jax.nn.log_softmax(v @ params["W_output"] + params["b_output"])  # [B, n_codes]
    log1m = jnp.log1p(-jnp.minimum(jnp.exp(logp), 1.0 - 1e-6))  # log(1 - y), y < 1 for the gradient
    batch = codes.shape[0]
    flat = jnp.maximum(targets, 0).reshape(batch, -1)
    hit = jnp.take_along_axis(logp - log1m, flat, axis=1).reshape(targets.shape)
    ce = -log1m.sum(axis=-1)[:, None] - jnp.where(targets >= 0, hit, 0.0).sum(axis=-1)  # [B, 2w]
    per_offset = jnp.where(target_valid, ce, 0.0).sum(axis=0) / jnp.maximum(target_valid.sum(axis=0), 1)
    visit_loss = per_offset.sum()

    c = code_vectors(params)
    n_codes = c.shape[0]
    i, j = pairs[:, 0], pairs[:, 1]
    weight = pair_valid.astype(c.dtype)
    if pairs.shape[0] >= n_codes:
        # Every code normalised once: sum over pairs of lse_i - s_ij = sum(count_i lse_i) - sum(N * S), with
        # N the step's pair counts; no per-pair rows are gathered.
        s = c @ c.T
        counts = jnp.zeros((n_codes, n_codes), c.dtype).at[i, j].add(weight)
        total_nll = (counts.sum(axis=1) * jax.nn.logsumexp(s, axis=1)).sum() - (counts * s).sum()
    else:
        ci = jnp.take(c, i, axis=0)
        nll = jax.nn.logsumexp(ci @ c.T, axis=1) - (ci * jnp.take(c, j, axis=0)).sum(axis=-1)
        total_nll = (weight * nll).sum()
    code_loss = total_nll / jnp.maximum(weight.sum(), 1.0)

    l2_loss = l2 * jnp.sum(params["W_emb"] ** 2)
    loss = visit_loss + code_loss + l2_loss
    return loss, {"loss": loss, "visit": visit_loss, "code": code_loss, "l2": l2_loss}


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """`adam` (default: reaches good embeddings in a few epochs) or the original's `adadelta` (rho 0.95)."""
    if cfg.optimizer == "adam":
        return optax.adam(cfg.learning_rate)
    if cfg.optimizer == "adadelta":
        return optax.adadelta(cfg.learning_rate, rho=0.95, eps=1e-6)
    raise ValueError(f"med2vec.optimizer {cfg.optimizer!r} unknown; expected one of {OPTIMIZERS}")


def train_step(
    params: Params,
    opt_state: optax.OptState,
    data: dict[str, jax.Array],
    visit_idx: jax.Array,
    pair_idx: jax.Array,
    *,
    tx: optax.GradientTransformation,
    l2: float,
) -> tuple[Params, optax.OptState, dict[str, jax.Array]]:
    """One step. data: device-resident `codes` [V, M], `neighbours` [V, 2w], `pairs` [N, 2];
    visit_idx: int32[B] and pair_idx: int32[P] index into them (-1 = padding)."""
    valid = visit_idx >= 0
    centre = jnp.maximum(visit_idx, 0)
    neighbours = jnp.take(data["neighbours"], centre, axis=0)
    target_valid = (neighbours >= 0) & valid[:, None]
    targets = jnp.take(data["codes"], jnp.maximum(neighbours, 0), axis=0)
    codes = jnp.where(valid[:, None], jnp.take(data["codes"], centre, axis=0), -1)
    pairs = jnp.take(data["pairs"], jnp.maximum(pair_idx, 0), axis=0)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(params, codes, targets, target_valid, pairs, pair_idx >= 0, l2=l2)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics


@dataclasses.dataclass
class Med2VecResult:
    """Trained parameters (numpy float32, export names), per-epoch mean losses and run statistics."""

    params: dict[str, np.ndarray]
    vocab: Vocab
    losses: list[dict[str, float]]
    stats: dict[str, Any]

    def code_vectors(self) -> np.ndarray:
        """ReLU(W_emb): f32[n_codes, dim], row k for vocab id k + NUM_SPECIAL."""
        return np.maximum(self.params["W_emb"], 0.0)


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """One-line ValueErrors naming the bad `med2vec.*` key."""
    for key in ("dim", "visit_dim", "window", "epochs", "batch_visits", "max_codes"):
        if not isinstance(cfg[key], int) or cfg[key] <= 0:
            raise ValueError(f"med2vec.{key} must be a positive integer, got {cfg[key]!r}")
    if not isinstance(cfg.pairs_per_batch, int) or cfg.pairs_per_batch < 0:
        raise ValueError(f"med2vec.pairs_per_batch must be an integer >= 0 (0: automatic), got {cfg.pairs_per_batch!r}")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"med2vec.optimizer {cfg.optimizer!r} unknown; expected one of {OPTIMIZERS}")
    if not cfg.learning_rate > 0 or not cfg.l2 >= 0 or cfg.learning_rate == float("inf"):
        raise ValueError(f"med2vec.learning_rate must be > 0 and med2vec.l2 >= 0, got {cfg.learning_rate}, {cfg.l2}")


def _epoch_indices(rng: np.random.Generator, n: int, steps: int, per_step: int) -> tuple[np.ndarray, int]:
    """A permutation of range(n) dealt into int32[steps, per_step] (-1 padding) and how many were left out."""
    perm = rng.permutation(n).astype(np.int32)[: steps * per_step]
    out = np.full(steps * per_step, -1, dtype=np.int32)
    out[: len(perm)] = perm
    return out.reshape(steps, per_step), n - len(perm)


def train_med2vec(
    cohort: Cohort,
    vocab: Vocab,
    cfg: ml_collections.ConfigDict,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Med2VecResult:
    """Train Med2Vec on `cohort` over the clinical codes of `vocab` with the `med2vec` config section.

    Deterministic given `cfg.seed`. Epoch timings exclude compilation (compiled ahead of the loop) and end
    with a device sync. `log` receives one line per epoch (default: the progress bar's `write`).
    """
    validate_config(cfg)
    log = log or tqdm.write
    data = build_visits(cohort, vocab, max_codes=cfg.max_codes, window=cfg.window)
    if not len(data.pairs):
        raise ValueError("med2vec: no visit has two codes; the code-level loss has nothing to learn from")
    steps = -(-data.num_visits // cfg.batch_visits)
    pairs_per_step = cfg.pairs_per_batch or -(-len(data.pairs) // (steps * PAIR_MULTIPLE)) * PAIR_MULTIPLE

    rng = np.random.default_rng([cfg.seed, 7])
    tx = make_optimizer(cfg)
    params = init_params(jax.random.key(cfg.seed), data.n_codes, cfg.dim, cfg.visit_dim, cfg.init_range)
    opt_state = tx.init(params)
    device_data = {
        "codes": jnp.asarray(data.codes),
        "neighbours": jnp.asarray(data.neighbours),
        "pairs": jnp.asarray(data.pairs),
    }
    step_fn = jax.jit(functools.partial(train_step, tx=tx, l2=float(cfg.l2)), donate_argnums=(0, 1))
    t0 = time.perf_counter()
    visit_spec = jax.ShapeDtypeStruct((cfg.batch_visits,), jnp.int32)
    pair_spec = jax.ShapeDtypeStruct((pairs_per_step,), jnp.int32)
    compiled = step_fn.lower(params, opt_state, device_data, visit_spec, pair_spec).compile()
    compile_seconds = time.perf_counter() - t0

    losses: list[dict[str, float]] = []
    epoch_seconds: list[float] = []
    epoch_cpu_seconds: list[float] = []  # CPU time of this process (all threads): less sensitive to other jobs
    pairs_left_out = 0
    for epoch in range(cfg.epochs):
        visit_idx, _ = _epoch_indices(rng, data.num_visits, steps, cfg.batch_visits)
        pair_idx, left_out = _epoch_indices(rng, len(data.pairs), steps, pairs_per_step)
        pairs_left_out += left_out
        t0, cpu0 = time.perf_counter(), time.process_time()
        history = []
        bar = tqdm(range(steps), desc=f"med2vec epoch {epoch + 1}/{cfg.epochs}", disable=not progress, leave=False)
        for s in bar:
            params, opt_state, metrics = compiled(params, opt_state, device_data, visit_idx[s], pair_idx[s])
            history.append(metrics)
            if progress and s % 20 == 0:
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
        means = {k: float(v) for k, v in jax.tree.map(lambda *x: jnp.stack(x).mean(), *history).items()}
        epoch_seconds.append(time.perf_counter() - t0)
        epoch_cpu_seconds.append(time.process_time() - cpu0)
        if not np.isfinite(means["loss"]):
            raise ValueError(
                f"med2vec: the loss became {means['loss']} in epoch {epoch + 1}; lower med2vec.learning_rate"
            )
        losses.append(means)
        log(
            f"med2vec epoch {epoch + 1}/{cfg.epochs}: loss {means['loss']:.4f} (visit {means['visit']:.4f}, "
            f"code {means['code']:.4f}, l2 {means['l2']:.4f}) {epoch_seconds[-1]:.1f}s"
        )

    stats = {
        "visits": data.num_visits,
        "codes": data.n_codes,
        "pairs": len(data.pairs),
        "steps_per_epoch": steps,
        "batch_visits": cfg.batch_visits,
        "pairs_per_step": pairs_per_step,
        "pairs_left_out": pairs_left_out,
        "truncated_codes": data.truncated_codes,
        "dropped_tokens": data.dropped_tokens,
        "compile_seconds": compile_seconds,
        "epoch_seconds": epoch_seconds,
        "epoch_cpu_seconds": epoch_cpu_seconds,
    }
    return Med2VecResult({k: np.asarray(v, np.float32) for k, v in params.items()}, vocab, losses, stats)


def save_med2vec(path: str | os.PathLike, params: dict[str, Any], vocab: Vocab) -> dict[str, Path]:
    """Export in the original layout: `X.npz` (W_emb, b_emb, W_hidden, b_hidden, W_output, b_output),
    the code -> index map as `X.types` (a pickled plain dict, protocol 2 as the Python 2 tool read) and
    `X.types.json`, and the model vocabulary as `X.vocab.json`. Index k is vocab id k + NUM_SPECIAL.

    Every file is written to a temporary name first; the `.npz` is renamed last. Returns the paths.
    """
    path = check_output_path(path, ".npz", "med2vec output")
    missing = sorted(set(PARAM_NAMES) - set(params))
    if missing:
        raise ValueError(f"med2vec output {path}: params lack {missing}")
    arrays = {k: np.asarray(params[k], dtype=np.float32) for k in PARAM_NAMES}
    n_codes = len(vocab) - NUM_SPECIAL
    if arrays["W_emb"].shape[0] != n_codes:
        raise ValueError(f"med2vec output {path}: W_emb has {arrays['W_emb'].shape[0]} rows, the vocab {n_codes} codes")
    types = {code: k for k, code in enumerate(vocab.codes[NUM_SPECIAL:])}
    out = {
        "types": sibling(path, ".types"),
        "types_json": sibling(path, ".types.json"),
        "vocab": sibling(path, ".vocab.json"),
        "npz": path,
    }
    replace_together(
        {
            out["types"]: lambda fh: pickle.dump(types, fh, protocol=2),
            out["types_json"]: lambda fh: fh.write(json.dumps(types).encode()),
            out["vocab"]: lambda fh: fh.write(vocab.to_json().encode()),
            out["npz"]: lambda fh: np.savez_compressed(fh, **arrays),
        }
    )
    return out


def _load_config(path: str | None) -> ml_collections.ConfigDict:
    from ehrjax.config import base_config, load_config_file

    return load_config_file(path) if path else base_config()


def main(argv: list[str] | None = None) -> int:
    """Generate a pre-training cohort, build its vocabulary, train Med2Vec on its training split, export it."""
    from ehrjax.data.synthetic import generate_cohort

    parser = argparse.ArgumentParser(prog="python -m ehrjax.embeddings.med2vec", description=main.__doc__)
    parser.add_argument("--num-patients", type=int, default=None, help="default: config pretrain.num_patients")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--config", default=None, help="a config file with get_config() (default: base_config())")
    parser.add_argument("--epochs", type=int, default=None, help="override med2vec.epochs")
    args = parser.parse_args(argv)
    created = False
    try:
        c = _load_config(args.config)
        if args.epochs is not None:
            c.med2vec.epochs = args.epochs
        c.med2vec.seed = args.seed
        validate_config(c.med2vec)
        # Before any work, without creating it: a folder (or a new name in an existing folder) we may write.
        if not args.out.parent.is_dir():
            raise ValueError(f"--out {args.out}: folder {args.out.parent} does not exist")
        check_folder_writable(args.out, "--out")
        num_patients = c.pretrain.num_patients if args.num_patients is None else args.num_patients
        if num_patients <= 0:
            raise ValueError(f"--num-patients must be > 0, got {num_patients}")
        cohort = generate_cohort(num_patients, args.seed, "pretrain",
                                 c.data.num_noise_codes)  # fmt: skip
        # The training split only: the MLM run's validation and test patients must stay unseen (its vocabulary
        # is built on the same split).
        cohort = cohort.select(cohort.split_mask("train"))
        vocab = Vocab.build(cohort.code_names, cohort.code_counts(), c.data.min_count)
        result = train_med2vec(cohort, vocab, c.med2vec)
        created = not args.out.exists()
        args.out.mkdir(exist_ok=True)
        paths = save_med2vec(args.out / "med2vec.npz", result.params, vocab)
    except (ValueError, OSError) as err:
        if created:  # remove the folder this run made, if nothing else landed in it
            with contextlib.suppress(OSError):
                args.out.rmdir()
        message = f"--out {args.out}: {os_error_line(err)}" if isinstance(err, OSError) else str(err)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    seconds = result.stats["epoch_seconds"]
    print(f"{result.stats['visits']:,} visits, {result.stats['codes']:,} codes, {len(seconds)} epochs, "
          f"{result.stats['visits'] * len(seconds) / sum(seconds):,.0f} visits/s")  # fmt: skip
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
