"""Linear probe: does a pre-trained encoder's representation of a patient predict the outcome?

The encoder is frozen; each patient becomes `concat(h[CLS], mean of h over the patient's tokens)` f32[2H]
(hidden states of a deterministic forward over packed batches; a patient attends only to its own tokens, so
its representation does not depend on its row mates). A standardised L2 logistic regression is fitted on the
training split with C chosen on the validation split, and scored on the test split: AUROC with a 95%
percentile bootstrap interval over test patients (`ehrjax.eval.stats`: every arm and every paired difference
reads the same patient resamples). Next to it, on the same test patients:

- `random`: the same probe on a randomly initialised encoder of the same shape, drawn as a run with the same
  seed draws it (`ehrjax.train.streams.init_rngs(seed)`): the pre-trained encoder before any training, when
  seeds agree;
- `bag_of_codes`: logistic regression on code counts, age and sex (`ehrjax.eval.logreg`);
- `oracle`: the generator's true probability of the task's outcome (`outcome_p` for heart failure,
  `renal_decline_p` for renal decline), the ceiling.

A probe above `random` says pre-training learned something a linear read-out can use; the gap to
`bag_of_codes` and `oracle` says how much.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ehrjax import atomic
from ehrjax.data.batching import DeviceBatcher, batch_at
from ehrjax.data.tasks import TaskData
from ehrjax.data.vocab import Vocab
from ehrjax.eval import stats
from ehrjax.eval.logreg import DEFAULT_CS, bag_of_codes_features, fit_logreg
from ehrjax.eval.metrics import binary_metrics
from ehrjax.models.behrt import INPUT_KEYS, Behrt, load_pretrained
from ehrjax.models.heads import gather_positions
from ehrjax.train.streams import init_rngs

SPLITS: tuple[str, ...] = ("train", "val", "test")


def pool_segments(hidden: jax.Array, segment_ids: jax.Array, cls_index: jax.Array) -> jax.Array:
    """Per patient slot, concat(hidden at its `[CLS]`, mean hidden over its tokens): f32[B, S, 2H].

    hidden: f[B, L, H]; segment_ids: int32[B, L] (0 = padding); cls_index: int32[B, S] (each slot's first
    position). A slot's tokens are the positions sharing the segment id found at its `[CLS]`; empty slots give
    meaningless values (their patient index is -1).
    """
    hidden = hidden.astype(jnp.float32)
    slot_segment = jnp.take_along_axis(segment_ids, cls_index, axis=1)
    member = (segment_ids[:, None, :] == slot_segment[:, :, None]) & (segment_ids[:, None, :] > 0)
    member = member.astype(jnp.float32)
    mean = jnp.einsum("bsl,blh->bsh", member, hidden) / jnp.maximum(member.sum(-1, keepdims=True), 1.0)
    return jnp.concatenate([gather_positions(hidden, cls_index), mean], axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _pooled_batch(graphdef: nnx.GraphDef, state: nnx.State, group: Any, index: jax.Array) -> tuple[jax.Array, ...]:
    """Pooled representations f32[rows, slots, 2H] and patient_index int32[rows, slots] of one batch; one
    compilation serves every encoder of one architecture."""
    batch = batch_at(group, index)
    hidden = nnx.merge(graphdef, state).encode(*(batch[k] for k in INPUT_KEYS), deterministic=True)
    return pool_segments(hidden, batch["segment_ids"], batch["cls_index"]), batch["patient_index"]


def patient_representations(
    model: Behrt, corpus: Any, patients: np.ndarray, data_cfg: Any, seed: int = 0
) -> np.ndarray:
    """f32[len(patients), 2H]: the pooled representation of each patient (corpus indices, in that order),
    from a deterministic forward of `model` over packed batches (`data_cfg`'s row_len / rows / slots)."""
    patients = np.asarray(patients, dtype=np.int64)
    batcher = DeviceBatcher.from_config(data_cfg, corpus, seed=seed, mode="pack", patients=patients)
    graphdef, state = nnx.split(model)
    plan = batcher.plan_epoch(0, shuffle=False)
    out: np.ndarray | None = None
    seen = np.zeros(len(corpus), dtype=bool)
    for k in range(plan.num_batches):
        g, j = (int(x) for x in plan.order[k])
        pooled, index = jax.device_get(_pooled_batch(graphdef, state, plan.groups[g], jnp.int32(j)))
        if out is None:
            out = np.zeros((len(corpus), pooled.shape[-1]), dtype=np.float32)
        filled = index >= 0
        out[index[filled]] = pooled[filled]
        seen[index[filled]] = True
    assert out is not None and seen[patients].all(), "the epoch plan must hold every patient once"
    return out[patients]


def _score(labels: np.ndarray, scores: np.ndarray, reps: stats.Replicates) -> dict[str, float]:
    metrics, (_, low, high) = binary_metrics(labels, scores), stats.interval(reps)
    return {"auroc": metrics["auroc"], "ci_low": low, "ci_high": high, "ap": metrics["ap"]}


def _probe_arm(features: np.ndarray, y: np.ndarray, rows: dict[str, np.ndarray], cs: Sequence[float], *,
               standardize: bool) -> tuple[dict[str, float], np.ndarray]:  # fmt: skip
    """Logistic regression on `features` (rows aligned with `y`; `rows` = positions of each split): its C, its
    validation AUROC and its test probabilities."""
    fit = fit_logreg(features[rows["train"]], y[rows["train"]], features[rows["val"]], y[rows["val"]], cs,
                     standardize=standardize)  # fmt: skip
    return {"C": fit.C, "val_auroc": fit.val_auroc}, fit.predict_proba(features[rows["test"]])


def run_probe(
    model_cfg: ml_collections.ConfigDict,
    params: nnx.State,
    task_data: TaskData,
    data_cfg: Any,
    seed: int = 0,
    *,
    cs: Sequence[float] = DEFAULT_CS,
    n_boot: int = 1000,
    risk: str = "outcome_p",
) -> dict[str, Any]:
    """Probe the encoder in `params` (a pre-trained Behrt's parameters, MLM head optional) on the `outcome`
    task, next to a random encoder, bag-of-codes logistic regression and the oracle (module docstring).

    task_data: `build_task_data(config, 'outcome', vocab=<the pre-training vocabulary>)`; data_cfg: the
    `data` config section (packing sizes); risk: the cohort's column of true outcome probabilities (the
    oracle). Returns {'n': {split: patients}, 'prevalence_test', 'feature_dim',
    'arms': {arm: {'auroc', 'ci_low', 'ci_high', 'ap', and 'C', 'val_auroc' for fitted arms}},
    'differences': {'pretrained - <arm>': {'delta', 'ci_low', 'ci_high'}} (paired bootstrap, same resamples)}.
    """
    if task_data.task != "outcome":
        raise ValueError(f"run_probe: expected the 'outcome' task's data, got {task_data.task!r}")
    if risk not in task_data.cohort.labels:
        raise ValueError(f"run_probe: the cohort has no {risk!r} (the true probability the oracle scores)")
    vocab_size = len(task_data.vocab)
    random_model = Behrt(model_cfg, vocab_size, mlm_head=False, rngs=init_rngs(seed))
    pretrained = Behrt(model_cfg, vocab_size, mlm_head=False, rngs=init_rngs(seed))
    report = load_pretrained(pretrained, params)
    if report["missing"]:
        raise ValueError(f"run_probe: params lack {len(report['missing'])} encoder arrays, e.g. {report['missing'][0]}")

    patients = np.concatenate([task_data.splits[s] for s in SPLITS])
    sizes = [len(task_data.splits[s]) for s in SPLITS]
    bounds = np.cumsum([0, *sizes])
    rows = {s: np.arange(bounds[i], bounds[i + 1]) for i, s in enumerate(SPLITS)}
    y = task_data.labels[patients, 0].astype(np.int64)
    y_test = y[rows["test"]]

    fitted: dict[str, dict[str, float]] = {}
    scores: dict[str, np.ndarray] = {}
    for name, model in (("pretrained", pretrained), ("random", random_model)):
        features = patient_representations(model, task_data.corpus, patients, data_cfg, seed)
        fitted[name], scores[name] = _probe_arm(features, y, rows, cs, standardize=True)
    bag = bag_of_codes_features(task_data.corpus, patients, vocab_size, sex=task_data.cohort.sex[patients])
    fitted["bag_of_codes"], scores["bag_of_codes"] = _probe_arm(bag, y, rows, cs, standardize=False)
    scores["oracle"] = np.asarray(task_data.cohort.labels[risk], dtype=np.float64)[patients[rows["test"]]]
    # One set of patient resamples for every arm: each interval and each paired difference reads the same draws.
    reps = {name: stats.replicates(y_test, s, "auroc", n_boot, seed) for name, s in scores.items()}
    arms = {name: {**_score(y_test, scores[name], reps[name]), **fitted.get(name, {})} for name in scores}
    differences = {}
    for other in ("random", "bag_of_codes", "oracle"):
        delta, low, high = stats.difference(reps["pretrained"], reps[other])
        differences[f"pretrained - {other}"] = {"delta": delta, "ci_low": low, "ci_high": high}
    return {
        "task": "outcome",
        "n": dict(zip(SPLITS, sizes, strict=True)),
        "prevalence_test": float(y_test.mean()),
        "feature_dim": 2 * int(model_cfg.hidden_dim),
        "n_boot": n_boot,
        "arms": arms,
        "differences": differences,
    }


def format_table(result: dict[str, Any]) -> str:
    """The probe's arms as an aligned text table (test AUROC, its 95% bootstrap CI, AP, chosen C)."""
    n = result["n"]
    lines = [
        f"outcome probe: train {n['train']:,}  val {n['val']:,}  test {n['test']:,} patients  "
        f"(test prevalence {result['prevalence_test']:.3f})",
        f"{'arm':<14} {'AUROC':>7} {'95% CI':>17} {'AP':>7} {'C':>8} {'val AUROC':>10}",
    ]
    for name, arm in result["arms"].items():
        c = f"{arm['C']:>8g}" if "C" in arm else f"{'':>8}"
        val = f"{arm['val_auroc']:>10.3f}" if "val_auroc" in arm else f"{'':>10}"
        ci = f"[{arm['ci_low']:.3f}, {arm['ci_high']:.3f}]"
        lines.append(f"{name:<14} {arm['auroc']:>7.3f} {ci:>17} {arm['ap']:>7.3f} {c} {val}")
    for name, d in result.get("differences", {}).items():
        lines.append(f"{name:<27} {d['delta']:>+7.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] (paired bootstrap)")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write `payload` as strict JSON atomically (a NaN metric as null)."""
    atomic.write_json(path, payload, strict=True)


def load_pretrained_run(run_dir: str | os.PathLike) -> tuple[ml_collections.ConfigDict, Vocab, nnx.State]:
    """(model config, vocabulary, parameters) of an MLM pre-training run directory: its `config.json`,
    `vocab.json` and the `best` checkpoint (`latest` if it has no best)."""
    from ehrjax.train.pretrained import load_pretrained_run as load_run

    loaded = load_run(run_dir, label="init_from", task="mlm")
    return loaded.model_cfg, loaded.vocab, loaded.params
