"""The loop over a trainer: epochs of jitted steps, evaluation each epoch, per-seed early stopping.

`fit(trainer, ...)` trains the trainer's S seeds together and returns a `FitResult` with every seed's best
parameters (by the validation metric), history and timings. Checkpoints and the metrics log are optional
(`RunCheckpoints`, `RunLog`): a stand-alone run (`python -m ehrjax.train`) uses both, a grid keeps the best
parameters in memory and writes its own files.

Exact resume: the data order of epoch e is a function of (seed, e), the PRNG key of step s is
`fold_in(run_key(seed), s)` (`ehrjax.train.streams`; derived inside the step), and the `latest` checkpoint
records the epoch and the batch within it and the early-stopping state; a resumed run replays the remaining
batches of that epoch and ends bitwise equal to an uninterrupted one (on CPU). The host syncs with the device
only at log points (`log_every`), at checkpoints and at epoch ends.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ehrjax.data.batching import DeviceBatcher
from ehrjax.data.tasks import PRETRAIN_TASKS
from ehrjax.eval.metrics import binary_metrics, histogram_metrics, multilabel_metrics
from ehrjax.train.checkpoint import RunCheckpoints
from ehrjax.train.optimizer import param_labels
from ehrjax.train.rundir import RunLog
from ehrjax.train.trainer import Trainer, stacked_where, unstack

DEFAULT_METRIC = {"mlm": "loss", "clm": "loss", "outcome": "auroc", "next_visit": "aps"}


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step."""


@dataclasses.dataclass
class FitResult:
    """Per seed (lists of length S): the best validation value, its epoch, epochs and steps run, the
    validation metrics at the best epoch, and the history; `best_params` stacked over seeds."""

    metric: str
    best_metric: list[float]
    best_epoch: list[int]
    epochs_run: list[int]
    steps: list[int]
    history: list[list[dict[str, float]]]  # per seed, per epoch: train_loss, val metrics
    best_params: Any
    train_seconds: float  # in train steps (compile windows excluded)
    eval_seconds: float
    wall_seconds: float
    real_tokens: float
    compile_seconds: float
    compiles: int

    @property
    def real_tokens_per_s(self) -> float:
        return self.real_tokens / self.train_seconds if self.train_seconds else float("nan")


def improved(metric: str, value: float, best: float | None) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def evaluate(
    trainer: Trainer, params: Any, batcher: DeviceBatcher
) -> tuple[list[dict[str, float]], dict[str, np.ndarray]]:
    """Metrics per seed over every patient of `batcher` (fixed order), and the predictions.

    predictions (fine-tuning tasks): `patient` int64[n] corpus rows in increasing order, `logits` f64[S, n, C],
    `probability` f64[S, n, C] (float64 sigmoid: no saturation ties), `labels` f32[n, C]. MLM: empty.
    """
    plan = batcher.plan_epoch(0, shuffle=False)
    outputs = []
    for k in range(plan.num_batches):
        g, j = (int(x) for x in plan.order[k])
        group = plan.groups[g]
        step = trainer.eval_step(group.row_len)
        outputs.append(step(params, trainer.corpus, group.patient_index[j], group.cls_index[j], jnp.int32(k),
                            trainer.metric_codes))  # fmt: skip
    outputs = jax.device_get(outputs)
    loss = sum(o["loss_sum"] for o in outputs) / np.maximum(sum(o["weight"] for o in outputs), 1.0)  # [S]
    if trainer.task in PRETRAIN_TASKS:
        weight = np.maximum(sum(o["weight"] for o in outputs), 1.0)
        pos, neg = sum(o["hist_pos"] for o in outputs), sum(o["hist_neg"] for o in outputs)
        metrics = []
        for s in range(trainer.num_seeds):
            m = {"loss": float(loss[s]), "top1": float(sum(o["correct"] for o in outputs)[s] / weight[s]),
                 "top10": float(sum(o["correct_top10"] for o in outputs)[s] / weight[s]), "n": float(weight[s])}
            m.update(histogram_metrics(pos[s], neg[s]))
            metrics.append(m)  # fmt: skip
        return metrics, {}
    patient = np.concatenate([o["patient_index"].reshape(-1) for o in outputs])
    num_labels = outputs[0]["logits"].shape[-1]
    num_members = outputs[0]["logits"].shape[0]
    logits = np.concatenate([o["logits"].reshape(num_members, -1, num_labels) for o in outputs], axis=1)
    filled = patient >= 0
    patient, logits = patient[filled], logits[:, filled].astype(np.float64)
    order = np.argsort(patient)
    patient, logits = patient[order].astype(np.int64), logits[:, order]
    probability = 1.0 / (1.0 + np.exp(-logits))
    labels = trainer.data.labels[patient]
    metrics = []
    for s in range(logits.shape[0]):
        if trainer.task == "outcome":
            m = binary_metrics(labels[:, 0], logits[s, :, 0])  # ranks on logits: no ties from saturation
        else:
            m = multilabel_metrics(labels, logits[s])
        m["loss"] = float(loss[s])
        metrics.append(m)
    return metrics, {"patient": patient, "logits": logits, "probability": probability, "labels": labels}


def _frozen_leaves(params: Any, trainable: tuple[str, ...]) -> list[jax.Array]:
    labels = jax.tree.leaves(param_labels(unstack(params, 0)))
    return [leaf for leaf, label in zip(jax.tree.leaves(params), labels, strict=True) if label not in trainable]


def _check_frozen(before: list[jax.Array], after: list[jax.Array], step: int) -> None:
    """Frozen partitions must be bitwise unchanged after training."""
    changed = sum(not bool(jnp.array_equal(a, b)) for a, b in zip(before, after, strict=True))
    if changed:
        raise RuntimeError(f"{changed} frozen parameter arrays changed by step {step}: the freeze mask is broken")


def fit(
    trainer: Trainer,
    *,
    patience: int,
    metric: str = "",
    log_every: int = 50,
    log: RunLog | None = None,
    checkpoints: RunCheckpoints | None = None,
    checkpoint_every: int = 0,
    checkpoint_meta: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool = False,
    eval_every: int = 1,
) -> FitResult:
    """Train every seed of `trainer` for its epochs with early stopping on the validation `metric`.

    checkpoints: `latest` every `checkpoint_every` steps and at every epoch end, `best` when a seed improves
    (the stacked best parameters); `resume` continues from `latest`. eval_every: evaluate (and count patience)
    every that many epochs and after the last one, so a small labelled set with short epochs is not scored
    after every few steps. checkpoint_meta: extra JSON saved with
    every checkpoint (the run's config). Raises TrainingDiverged at the first step whose loss or trainable
    gradient norm is not finite (the update is skipped; the last good checkpoint stays).
    """
    start = time.perf_counter()
    metric = metric or DEFAULT_METRIC[trainer.task]
    num_seeds, steps_per_epoch = trainer.num_seeds, trainer.steps_per_epoch
    state = trainer.state
    compiles_before = trainer.programs.num_compiles
    compile_before = trainer.programs.compile_seconds
    meta: dict[str, Any] = {"epoch": 0, "batch": 0, "best": [None] * num_seeds, "best_epoch": [-1] * num_seeds,
                            "bad_epochs": [0] * num_seeds, "stopped": [False] * num_seeds,
                            "epochs_run": [0] * num_seeds, "history": [[] for _ in range(num_seeds)]}  # fmt: skip
    best_params = state["params"]
    if resume and checkpoints is not None and checkpoints.latest_step() is not None:
        restored, saved = checkpoints.restore(jax.tree.map(_abstract, state))
        state = dict(restored, schedule=state["schedule"])
        meta.update({k: saved[k] for k in meta})
        best_params = (checkpoints.restore_params(jax.tree.map(_abstract, state["params"]), which="best")
                       if checkpoints.best_step() is not None else state["params"])  # fmt: skip
    best_params = jax.tree.map(jnp.copy, best_params)
    frozen_before = [jnp.copy(x) for x in _frozen_leaves(state["params"], trainer.trainable)]
    keys = trainer.keys()
    pending: list[dict[str, jax.Array]] = []
    train_time = train_tokens = eval_time = 0.0
    epoch_losses = np.zeros(num_seeds)
    epoch_weights = np.zeros(num_seeds)
    window_start = time.perf_counter()
    window_compiles = trainer.programs.num_compiles
    epoch = meta["epoch"]

    def flush(step: int) -> None:
        nonlocal window_start, window_compiles, train_time, train_tokens
        if not pending:
            return
        sums = jax.device_get(pending)
        elapsed = time.perf_counter() - window_start
        totals = {k: np.sum([s[k] for s in sums], axis=0) for k in sums[0]}  # per seed
        if totals["nonfinite"].sum() > 0:
            first = next(i for i, s in enumerate(sums) if s["nonfinite"].sum() > 0)
            bad = step - len(sums) + first + 1
            if checkpoints is not None:
                checkpoints.wait()
            where = f"; the last good checkpoint is in {checkpoints.directory}" if checkpoints is not None else ""
            raise TrainingDiverged(f"loss or gradient norm is NaN/inf at step {bad} (epoch {epoch}); the update "
                                   f"was skipped{where}")  # fmt: skip
        epoch_losses[:] += totals["loss_sum"]
        epoch_weights[:] += totals["weight"]
        if log is not None:
            record = {"event": "train", "step": step, "epoch": epoch,
                      "loss": _seedwise(totals["loss_sum"] / np.maximum(totals["weight"], 1.0)),
                      "grad_norm": _seedwise(totals["grad_norm"] / len(sums)), "lr": _seedwise(sums[-1]["lr"]),
                      "real_tokens_per_s": float(totals["real_tokens"].sum() / elapsed),
                      "wall_s": time.perf_counter() - start}  # fmt: skip
            if trainer.task in PRETRAIN_TASKS:
                record["top1"] = _seedwise(totals["correct"] / np.maximum(totals["weight"], 1.0))
            if trainer.task == "mlm":
                record["mlm_overflow"] = _seedwise(totals["overflow"])
            log.log(record)
            log.advance(len(sums), {"loss": f"{np.mean(record['loss']):.4f}"})
        if trainer.programs.num_compiles == window_compiles:  # windows that compiled are not training time
            train_time += elapsed
            train_tokens += float(totals["real_tokens"].sum())
        pending.clear()
        window_start = time.perf_counter()
        window_compiles = trainer.programs.num_compiles

    if log is not None:
        log.open_progress(trainer.epochs * steps_per_epoch, int(np.max(jax.device_get(state["step"]))), progress)
    try:
        while epoch < trainer.epochs and not all(meta["stopped"]):
            active = np.asarray([not s for s in meta["stopped"]])  # host values: every process passes the same
            plan = trainer.stacked_plan(epoch)
            window_start = time.perf_counter()  # evaluation and checkpointing are not training time
            first = meta["batch"] if epoch == meta["epoch"] else 0
            if first == 0:
                epoch_losses[:] = 0.0
                epoch_weights[:] = 0.0
            for k in range(first, plan.num_batches):
                row_len, patient, cls = plan.batch(k)
                step_active = active if plan.present[k].all() else active & plan.present[k]
                state, sums = trainer.train_step(row_len)(state, trainer.corpus, patient, cls, keys, step_active)
                pending.append(sums)
                done = epoch * steps_per_epoch + k + 1
                if done % log_every == 0:
                    flush(done)
                if checkpoints is not None and checkpoint_every and done % checkpoint_every == 0 \
                        and k + 1 < plan.num_batches:  # fmt: skip
                    flush(done)
                    meta.update(epoch=epoch, batch=k + 1)
                    checkpoints.save_latest(done, state, dict(meta, **(checkpoint_meta or {})))
            done = (epoch + 1) * steps_per_epoch
            flush(done)
            if (epoch + 1) % eval_every and epoch + 1 < trainer.epochs:
                epoch += 1
                meta.update(epoch=epoch, batch=0)
                if checkpoints is not None:
                    checkpoints.save_latest(done, state, dict(meta, **(checkpoint_meta or {})))
                continue
            member_steps = [int(x) for x in jax.device_get(state["step"])]
            t0 = time.perf_counter()
            val_metrics, _ = evaluate(trainer, state["params"], trainer.val_batcher)
            eval_time += time.perf_counter() - t0
            better = [False] * num_seeds
            for s in range(num_seeds):
                if meta["stopped"][s]:
                    continue
                value = val_metrics[s][metric]
                better[s] = improved(metric, value, meta["best"][s])
                if better[s]:
                    meta["best"][s], meta["best_epoch"][s], meta["bad_epochs"][s] = value, epoch, 0
                else:
                    meta["bad_epochs"][s] += 1
                meta["epochs_run"][s] = epoch + 1
                train_loss = float(epoch_losses[s] / max(epoch_weights[s], 1.0))
                meta["history"][s].append({"epoch": epoch, "step": member_steps[s], "train_seconds": train_time,
                                           "train_loss": train_loss,
                                           **{f"val_{k}": v for k, v in val_metrics[s].items()}})  # fmt: skip
                meta["stopped"][s] = meta["bad_epochs"][s] >= patience
            if any(better):
                best_params = stacked_where(np.asarray(better), state["params"], best_params)
            if log is not None:
                log.log({"event": "eval", "split": "val", "step": done, "epoch": epoch,
                         **{k: _seedwise([m[k] for m in val_metrics]) for k in val_metrics[0]},
                         "improved": _seedwise(better), "wall_s": time.perf_counter() - start})  # fmt: skip
            _check_frozen(frozen_before, _frozen_leaves(state["params"], trainer.trainable), done)
            epoch += 1
            meta.update(epoch=epoch, batch=0)
            if checkpoints is not None:
                saved_meta = dict(meta, **(checkpoint_meta or {}))
                if any(better):
                    checkpoints.save_best(done, dict(state, params=best_params), saved_meta)
                checkpoints.save_latest(done, state, saved_meta)
        if checkpoints is not None:
            checkpoints.wait()
    finally:
        if log is not None:
            log.close_progress()
    steps = [int(x) for x in jax.device_get(state["step"])]
    trainer.state = state
    return FitResult(
        metric=metric,
        best_metric=[float(b) if b is not None else float("nan") for b in meta["best"]],
        best_epoch=[int(b) for b in meta["best_epoch"]],
        epochs_run=[int(e) for e in meta["epochs_run"]],
        steps=steps,
        history=meta["history"],
        best_params=best_params,
        train_seconds=train_time,
        eval_seconds=eval_time,
        wall_seconds=time.perf_counter() - start,
        real_tokens=train_tokens,
        compile_seconds=trainer.programs.compile_seconds - compile_before,
        compiles=trainer.programs.num_compiles - compiles_before,
    )


def _seedwise(values: Any) -> float | list[float]:
    """A per-seed value for the log: a number for one seed, a list for several."""
    values = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    return values[0] if len(values) == 1 else values


def _abstract(x: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
