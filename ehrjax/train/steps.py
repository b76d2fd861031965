"""Pure, jitted training and evaluation steps over stacked `nnx.State` pytrees: S seeds in one program.

Every array of the train state has a leading seed axis (S >= 1): the parameters, the optimiser state, the step
counter and the schedule arrays. One `jax.vmap`-ed step advances all seeds, each on its own batch (its own data
order), with its own PRNG key; a seed whose early stopping has fired is carried along unchanged (`active`).

A step gathers its batch from the device corpus (`gather_batch`), so one compiled program does gather, MLM
masking, forward, backward and the optimiser update. The state is donated. On a mesh the batch rows are sharded
on the `data` axis and the parameters replicated; XLA inserts the gradient all-reduce.

Only the trainable partitions are differentiated: frozen parameters get no gradient computation at all (XLA drops
their weight-gradient matmuls), and the clipped norm, the logged `grad_norm` and the finiteness check cover the
trainable leaves only. The learning rate comes from the state's schedule arrays, so runs of any length share
one compiled step.

Losses are means over the real targets of the whole (global) batch: masked codes for `mlm`, next codes for
`clm` (every position whose next token is a clinical code of the same patient), filled patient slots for
`outcome` and `next_visit` (binary cross-entropy per label). Steps return sums (loss x weight,
weight, correct, ...) so that metrics aggregate exactly over any number of steps and devices.
A step whose loss or gradient norm is not finite leaves that seed's state unchanged and reports `nonfinite = 1`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ehrjax.data.batching import DeviceCorpus, gather_batch
from ehrjax.data.masking import mask_tokens, num_mlm_slots
from ehrjax.data.tasks import PRETRAIN_TASKS
from ehrjax.data.vocab import NUM_SPECIAL
from ehrjax.models.behrt import INPUT_KEYS
from ehrjax.train.optimizer import scheduled_lr

TrainState = dict[str, Any]  # {'params', 'opt_state', 'step': int32[S], 'schedule': {...}[S]}
EVAL_MASK_SEED = 20_240_917  # MLM evaluation masks are the same at every evaluation
HIST_RANGE = (-30.0, 0.0)  # log-probability range of the MLM per-code score histograms


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step functions need besides the model: the task, its static sizes and the schedule kind."""

    task: str  # 'mlm' | 'clm' | 'outcome' | 'next_visit'
    code_end: int  # MLM / CLM targets are the clinical codes, ids NUM_SPECIAL..code_end-1 (`Vocab.code_end`)
    mask_prob: float = 0.15
    mlm_slot_factor: float = 1.5  # masked-position slots per row = factor x mask_prob x row length
    schedule: str = "cosine"  # 'cosine' | 'constant'
    hist_bins: int = 512  # MLM evaluation: bins of the per-code score histograms (macro AUROC / AP)


def mlm_targets(key: jax.Array, batch: dict, cfg: StepConfig) -> dict[str, jax.Array]:
    """Masked input and targets of one batch: `masked_codes` int32[B, L], `positions`, `labels` int32[B, M],
    `weights` f32[B, M], `overflow` int32[] (what the MLM loss and the trivial baselines score)."""
    slots = num_mlm_slots(batch["codes"].shape[1], cfg.mask_prob, cfg.mlm_slot_factor)  # static per shape
    masked, positions, labels, weights, overflow = mask_tokens(
        key, batch["codes"], vocab_size=cfg.code_end, mask_prob=cfg.mask_prob, num_slots=slots
    )
    return {"masked_codes": masked, "positions": positions, "labels": labels, "weights": weights, "overflow": overflow}


def clm_targets(batch: dict, cfg: StepConfig) -> dict[str, jax.Array]:
    """Next-code targets of one batch: position i is scored when the token at i + 1 is a clinical code of the same
    patient (not a special or time token, not the next patient's, not padding), and its label is that code.
    `masked_codes` int32[B, L] (the input, unchanged), `positions`, `labels` int32[B, L], `weights` f32[B, L],
    `overflow` int32[] (0: every target has a slot)."""
    codes, segments = batch["codes"], batch["segment_ids"]
    following = jnp.pad(codes[:, 1:], ((0, 0), (0, 1)))
    same = (segments > 0) & (jnp.pad(segments[:, 1:], ((0, 0), (0, 1))) == segments)
    scored = same & (following >= NUM_SPECIAL) & (following < cfg.code_end)
    positions = jnp.broadcast_to(jnp.arange(codes.shape[1], dtype=jnp.int32), codes.shape)
    return {"masked_codes": codes, "positions": positions, "labels": jnp.where(scored, following, 0),
            "weights": scored.astype(jnp.float32), "overflow": jnp.zeros((), jnp.int32)}  # fmt: skip


def code_targets(key: jax.Array, batch: dict, cfg: StepConfig) -> dict[str, jax.Array]:
    """The code-prediction targets of a pre-training task: `mlm_targets` (masks drawn from `key`) or
    `clm_targets` (no randomness)."""
    return clm_targets(batch, cfg) if cfg.task == "clm" else mlm_targets(key, batch, cfg)


def eval_mask_key(index: jax.Array) -> jax.Array:
    """The MLM evaluation mask key of evaluation batch `index` (the same at every evaluation and for every seed)."""
    return jax.random.fold_in(jax.random.key(EVAL_MASK_SEED), index)


def _code_outputs(model: nnx.Module, batch: dict, key: jax.Array, cfg: StepConfig, train_key: jax.Array | None):
    targets = code_targets(key, batch, cfg)
    inputs = dict(batch, codes=targets["masked_codes"])
    hidden = model.encode(*(inputs[k] for k in INPUT_KEYS), deterministic=train_key is None, rngs=train_key)
    # The copy head (model.mlm_copy) reads the masked input, never the targets.
    logits = model.mlm_logits(hidden, targets["positions"], targets["masked_codes"], batch["segment_ids"])
    labels, weights = targets["labels"], targets["weights"]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    # The label's rank = how many logits beat it: top-1/top-10 without a sort over the vocabulary (a full
    # sort per slot was 40% of the CPU step).
    label_logit = jnp.take_along_axis(logits, labels[..., None], axis=-1)
    rank = jnp.sum(logits > label_logit, axis=-1)
    sums = {
        "loss_sum": jnp.sum(losses * weights),
        "weight": jnp.sum(weights),
        "correct": jnp.sum((rank == 0) * weights),
        "correct_top10": jnp.sum((rank < 10) * weights),
        "overflow": targets["overflow"].astype(jnp.float32),
    }
    return sums, logits, labels, weights


def _classify_outputs(model: nnx.Module, batch: dict, cfg: StepConfig, train_key: jax.Array | None):
    k_encode, k_head = (None, None) if train_key is None else tuple(jax.random.split(train_key))
    hidden = model.encode(*(batch[k] for k in INPUT_KEYS), deterministic=train_key is None, rngs=k_encode)
    logits = model.classify(hidden, batch["cls_index"], deterministic=train_key is None, rngs=k_head)
    labels = batch["labels"].reshape(logits.shape)
    slot = batch["slot_mask"].astype(jnp.float32)
    per_slot = optax.sigmoid_binary_cross_entropy(logits, labels).mean(axis=-1)
    sums = {"loss_sum": jnp.sum(per_slot * slot), "weight": jnp.sum(slot)}
    return sums, logits


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    tx: optax.GradientTransformation,
    cfg: StepConfig,
    trainable_mask: tuple[bool, ...],
    row_len: int,
    mesh: Mesh | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """train_step(state, corpus, patient_index, cls_index, keys, active) -> (state, sums); jitted, state donated.

    state: stacked over S seeds; patient_index, cls_index: int32[S, rows, slots] (each seed's batch);
    keys: PRNG keys [S] (each seed's run key); active: bool[S] (False: the seed's state is left unchanged).
    trainable_mask: per leaf of `jax.tree.leaves(params)`, whether it trains. The step's key is
    `fold_in(key, step)`, derived on the device: masks and dropout are a function of the seed's step, so a
    resumed run draws exactly what an uninterrupted one would. sums: f32[S] each.
    """

    def loss_fn(trainable: list[jax.Array], frozen: list[jax.Array], treedef: Any, batch: dict, key: jax.Array):
        params = jax.tree.unflatten(treedef, _interleave(trainable, frozen, trainable_mask))
        model = nnx.merge(graphdef, params, rest)
        k_mask, k_dropout = jax.random.split(key)
        if cfg.task in PRETRAIN_TASKS:
            sums = _code_outputs(model, batch, k_mask, cfg, k_dropout)[0]
        else:
            sums = _classify_outputs(model, batch, cfg, k_dropout)[0]
        return sums["loss_sum"] / jnp.maximum(sums["weight"], 1.0), sums

    def one_seed(state: TrainState, corpus: DeviceCorpus, patient: jax.Array, cls: jax.Array, key: jax.Array,
                 active: jax.Array):  # fmt: skip
        batch = gather_batch(corpus, patient, cls, row_len, mesh)
        key = jax.random.fold_in(key, state["step"])
        leaves, treedef = jax.tree.flatten(state["params"])
        trainable, frozen = _split(leaves, trainable_mask)
        (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, frozen, treedef, batch, key)
        grad_norm = optax.tree.norm(grads)
        zeros = [jnp.zeros_like(x) for x in frozen]  # set_to_zero ignores them; XLA folds them away
        full_grads = jax.tree.unflatten(treedef, _interleave(grads, zeros, trainable_mask))
        updates, opt_state = tx.update(full_grads, state["opt_state"], state["params"])
        lr = scheduled_lr(state["schedule"], state["step"], cfg.schedule)
        updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        moved = finite & active
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1, "schedule": state["schedule"]}
        kept = dict(state, step=state["step"] + active.astype(jnp.int32))
        state = jax.tree.map(lambda new, old: jnp.where(moved, new, old), new_state, kept)
        sums = dict(sums, grad_norm=grad_norm, nonfinite=(active & ~finite).astype(jnp.float32), lr=lr,
                    real_tokens=batch["num_real_tokens"].astype(jnp.float32) * active)  # fmt: skip
        return state, sums

    step = jax.vmap(one_seed, in_axes=(0, None, 0, 0, 0, 0))
    return jax.jit(step, donate_argnums=0)


def make_eval_step(
    graphdef: nnx.GraphDef, rest: nnx.State, cfg: StepConfig, row_len: int, mesh: Mesh | None = None
) -> Callable[..., dict[str, jax.Array]]:
    """eval_step(params, corpus, patient_index, cls_index, index, metric_codes) -> outputs per seed [S, ...].

    Deterministic (no dropout; fixed MLM masks per batch index). params: stacked over S seeds; patient_index,
    cls_index: int32[rows, slots], the same evaluation batch for every seed.
    mlm / clm: reduced sums (loss, top-1, top-10) plus per-code score histograms `hist_pos`, `hist_neg`
    f32[S, K, hist_bins] of the log-probabilities of `metric_codes` int32[K] at the scored slots whose label
    is / is not that code (the sufficient statistics of macro one-vs-rest AUROC / AP): nothing of vocabulary
    size leaves the device. outcome / next_visit: `logits` f32[S, rows, slots, C] and `patient_index`
    int32[rows, slots] (-1 for empty slots).
    """
    lo, hi = HIST_RANGE

    def one_seed(params: nnx.State, batch: dict, index: jax.Array, metric_codes: jax.Array):
        model = nnx.merge(graphdef, params, rest)
        if cfg.task in PRETRAIN_TASKS:
            sums, logits, labels, weights = _code_outputs(model, batch, eval_mask_key(index), cfg, None)
            scores = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)[..., metric_codes]  # [B, M, K]
            bins = jnp.clip(((scores - lo) / (hi - lo) * cfg.hist_bins).astype(jnp.int32), 0, cfg.hist_bins - 1)
            is_code = labels[..., None] == metric_codes
            code_ids = jnp.broadcast_to(jnp.arange(metric_codes.shape[0]), bins.shape)
            w = jnp.broadcast_to(weights[..., None], bins.shape)
            shape = (metric_codes.shape[0], cfg.hist_bins)
            pos = jnp.zeros(shape, jnp.float32).at[code_ids, bins].add(w * is_code)
            neg = jnp.zeros(shape, jnp.float32).at[code_ids, bins].add(w * ~is_code)
            return dict(sums, hist_pos=pos, hist_neg=neg)
        sums, logits = _classify_outputs(model, batch, cfg, None)
        return dict(sums, logits=logits)

    def eval_step(params: nnx.State, corpus: DeviceCorpus, patient: jax.Array, cls: jax.Array, index: jax.Array,
                  metric_codes: jax.Array):  # fmt: skip
        batch = gather_batch(corpus, patient, cls, row_len, mesh)
        out = jax.vmap(one_seed, in_axes=(0, None, None, None))(params, batch, index, metric_codes)
        if cfg.task not in PRETRAIN_TASKS:
            out["patient_index"] = batch["patient_index"]
        return out

    if mesh is None:
        return jax.jit(eval_step)
    # Replicated outputs: every process can read the whole batch's logits and sums (an all-gather on the mesh).
    return jax.jit(eval_step, out_shardings=NamedSharding(mesh, P()))


def make_mlm_targets_step(cfg: StepConfig, row_len: int, mesh: Mesh | None = None) -> Callable[..., dict]:
    """targets(corpus, patient_index, cls_index, index) -> the evaluation batch's targets exactly as the MLM / CLM
    evaluation scores them (`code_targets` plus `segment_ids`), for the trivial baselines."""

    def targets(corpus: DeviceCorpus, patient: jax.Array, cls: jax.Array, index: jax.Array) -> dict:
        batch = gather_batch(corpus, patient, cls, row_len, mesh)
        return dict(code_targets(eval_mask_key(index), batch, cfg), segment_ids=batch["segment_ids"])

    return jax.jit(targets)


def _split(leaves: list, mask: tuple[bool, ...]) -> tuple[list, list]:
    return [x for x, m in zip(leaves, mask, strict=True) if m], [x for x, m in zip(leaves, mask, strict=True) if not m]


def _interleave(trainable: list, frozen: list, mask: tuple[bool, ...]) -> list:
    it_t, it_f = iter(trainable), iter(frozen)
    return [next(it_t) if m else next(it_f) for m in mask]
