"""Parameter partitions, the partitioned AdamW optimiser that freezes whole partitions, and a size report.

Every parameter is labelled by its path: the code table `embeddings/code/embedding` -> `code_table` (so an
imported Med2Vec table can be frozen while the other embeddings train), the rest of `embeddings/...` ->
`embeddings`, `encoder/...` -> `encoder`, `mlm_head/...` and `classifier/...` -> `head`, and any
`nnx.LoRAParam` (`lora_a`, `lora_b`, wherever it sits) -> `lora`. An arm names the trainable labels;
`make_optimizer` builds

    optax.partition({'trainable': clip + AdamW(schedule), 'frozen': optax.set_to_zero()}, groups)

where `groups` maps every leaf to `trainable` / `frozen` by its label. One trainable branch (rather than one
per label) keeps gradient clipping on the global norm of all trainable parameters. Frozen leaves get zero
updates and `set_to_zero` holds no state, so the optimiser carries moments for trainable leaves only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ehrjax.models.behrt import CODE_TABLE_PATH, path_names

PARTITIONS: tuple[str, ...] = ("code_table", "embeddings", "encoder", "lora", "head")
CODE_TABLE: tuple[str, ...] = CODE_TABLE_PATH
TOP_LEVEL_PARTITION: dict[str, str] = {
    "embeddings": "embeddings",
    "encoder": "encoder",
    "mlm_head": "head",
    "classifier": "head",
}
LORA_NAMES: frozenset[str] = frozenset({"lora_a", "lora_b"})
DECAYED_NAMES: frozenset[str] = frozenset({"kernel", "embedding", "lora_a", "lora_b"})
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
# The optim keys the train state carries as arrays (`schedule_arrays`), not constants of the compiled step:
# runs that differ only in these (learning-rate candidates, warm-ups) share one program.
SCHEDULE_STATE_KEYS: frozenset[str] = frozenset({"learning_rate", "warmup_steps"})


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_label(names: tuple[str, ...], leaf: Any = None) -> str:
    """Partition of the parameter at `names` (e.g. `('encoder', 'layers', '0', 'attn', 'q', 'kernel')`)."""
    if isinstance(leaf, nnx.LoRAParam) or (names and names[-1] in LORA_NAMES):
        return "lora"
    if tuple(names) == CODE_TABLE:  # its own label, so an imported table can be frozen alone
        return "code_table"
    if not names or names[0] not in TOP_LEVEL_PARTITION:
        raise ValueError(
            f"parameter {'/'.join(names)!r} has no partition; top-level names must be in {sorted(TOP_LEVEL_PARTITION)}"
        )
    return TOP_LEVEL_PARTITION[names[0]]


def param_labels(params: Any) -> Any:
    """A tree of partition names with the structure of `params` (an `nnx.State` or a pure dict).

    Variables are replaced by their label, so the result is a prefix of the params tree (what
    `optax.partition` accepts).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: param_label(path_names(path), leaf), params, is_leaf=_is_variable
    )


def _check_labels(labels: Collection[str], what: str) -> frozenset[str]:
    if isinstance(labels, str):
        raise ValueError(f"{what} must be a collection of partition names, got the string {labels!r}")
    labels = frozenset(labels)
    unknown = sorted(labels - set(PARTITIONS))
    if unknown:
        raise ValueError(f"{what} has unknown partition(s) {unknown}; expected some of {PARTITIONS}")
    return labels


def _optim_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    return config.optim if "optim" in config else config


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """Warm-up steps actually used: `optim.warmup_steps`, clamped to a tenth of the run, so a short run
    (a small labelled set) gets a proportionally short warm-up instead of an error."""
    return int(min(warmup_steps, total_steps // 10))


def schedule_arrays(optim: ml_collections.ConfigDict, total_steps: int) -> dict[str, jax.Array]:
    """The schedule's run-dependent numbers as arrays (`peak`, `warmup`, `total`), carried in the train state
    so that runs of any length (any labelled-set size) share one compiled step."""
    if not optim.learning_rate > 0:
        raise ValueError(f"optim.learning_rate must be > 0, got {optim.learning_rate!r}")
    if optim.warmup_steps < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {optim.warmup_steps!r}")
    if optim.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule {optim.schedule!r} unknown; expected one of {SCHEDULES}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return {
        "peak": jnp.float32(optim.learning_rate),
        "warmup": jnp.int32(effective_warmup(optim.warmup_steps, total_steps)),
        "total": jnp.int32(total_steps),
    }


def scheduled_lr(arrays: dict[str, jax.Array], count: jax.Array, kind: str = "cosine") -> jax.Array:
    """Learning rate at optimiser step `count`: linear warm-up from 0 to `peak` over `warmup` steps, then
    cosine decay to 0 at `total` (or constant). The same curve as optax's warmup schedules, as a function of
    arrays instead of Python numbers."""
    count = jnp.asarray(count, jnp.float32)
    peak, warmup, total = arrays["peak"], arrays["warmup"].astype(jnp.float32), arrays["total"].astype(jnp.float32)
    ramp = peak * jnp.where(warmup > 0, count / jnp.maximum(warmup, 1.0), 1.0)
    if kind == "constant":
        after = peak
    else:
        progress = jnp.clip((count - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
        after = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warmup, ramp, after)


def make_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning-rate schedule of a run of `total_steps` as an optax schedule (see `scheduled_lr`)."""
    arrays = schedule_arrays(optim, total_steps)
    return lambda count: scheduled_lr(arrays, count, optim.schedule)


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices (kernels, tables, adapters), not on biases or LayerNorm scales."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path_names(path)[-1] in DECAYED_NAMES, params, is_leaf=_is_variable
    )


def make_optimizer(
    config: ml_collections.ConfigDict,
    params: Any,
    trainable: Collection[str] = ("lora", "head"),
    *,
    total_steps: int | None = None,
) -> optax.GradientTransformation:
    """Clip + AdamW on the `trainable` partitions; every other leaf frozen.

    config: the root config or its `optim` section. params: the model's `nnx.State` of `nnx.Param`
    (LoRA included) as from `nnx.split(model, nnx.Param, ...)`. Init the result on the same tree.
    With `total_steps` the warm-up schedule is inside the optimiser. With None its learning rate is 1 and the
    caller multiplies the updates by `scheduled_lr` (AdamW's decoupled decay scales with it too), so the run
    length is an array of the train state rather than a constant of the compiled step.
    """
    optim = _optim_section(config)
    trainable = _check_labels(trainable, "trainable")
    if not trainable:
        raise ValueError(f"trainable is empty; name some of {PARTITIONS}")
    labels = param_labels(params)
    present = set(jax.tree.leaves(labels))
    absent = sorted(trainable - present)
    if absent:
        raise ValueError(f"trainable partition(s) {absent} match no parameter of the model (it has {sorted(present)})")
    if optim.weight_decay < 0:
        raise ValueError(f"optim.weight_decay must be >= 0, got {optim.weight_decay!r}")
    if optim.clip_norm < 0:
        raise ValueError(f"optim.clip_norm must be >= 0 (0 disables clipping), got {optim.clip_norm!r}")

    adamw = optax.adamw(
        1.0 if total_steps is None else make_schedule(optim, total_steps),
        b1=optim.b1,
        b2=optim.b2,
        weight_decay=optim.weight_decay,
        mask=_decay_mask,
    )
    train_tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw) if optim.clip_norm else adamw
    groups = jax.tree.map(lambda label: "trainable" if label in trainable else "frozen", labels)
    return optax.partition({"trainable": train_tx, "frozen": optax.set_to_zero()}, groups)


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Parameter counts per partition and the trainable share."""

    total: int
    trainable: int
    by_label: dict[str, int]
    trainable_labels: tuple[str, ...]

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "trainable": self.trainable,
            "trainable_pct": 100.0 * self.trainable_fraction,
            "by_label": dict(self.by_label),
            "trainable_labels": list(self.trainable_labels),
        }

    def table(self) -> str:
        rows = [f"{'partition':<12}{'params':>14}{'share':>9}  trainable"]
        for label in PARTITIONS:
            count = self.by_label.get(label, 0)
            share = 100.0 * count / self.total if self.total else 0.0
            flag = "yes" if label in self.trainable_labels else "no"
            rows.append(f"{label:<12}{count:>14,}{share:>8.2f}%  {flag}")
        rows.append(f"{'total':<12}{self.total:>14,}{100.0:>8.2f}%")
        rows.append(f"{'trainable':<12}{self.trainable:>14,}{100.0 * self.trainable_fraction:>8.2f}%")
        return "\n".join(rows)

    def __str__(self) -> str:
        return self.table()


def parameter_report(params: Any, trainable: Collection[str] = ("lora", "head")) -> ParamReport:
    """Counts of `params` (an nnx.State or pure dict) per partition, and how many are trainable."""
    trainable = _check_labels(trainable, "trainable")
    by_label = dict.fromkeys(PARTITIONS, 0)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]
    for path, leaf in flat:
        by_label[param_label(path_names(path), leaf)] += int(leaf.size)
    total = sum(by_label.values())
    n_trainable = sum(n for label, n in by_label.items() if label in trainable)
    return ParamReport(total, n_trainable, by_label, tuple(label for label in PARTITIONS if label in trainable))
