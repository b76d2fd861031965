"""A trainer built from explicit inputs: task data, initial parameters, an optional code table, the trainable
partitions and LoRA settings, for S seeds at once. It reads no files and knows no arm names.

Every state array carries a leading seed axis. Each seed has its own initial draw (adapters, heads, untrained
weights; pre-trained weights are the same for all), its own data order (a batcher seeded by the seed), its own
PRNG key and its own schedule arrays. The compiled steps come from a `ProgramCache`: runs whose programs are
identical (same model structure, trainable partitions, optimiser constants, seed count and batch shapes)
reuse one compile, whatever their labelled-set size or seeds, because the run length lives in the state.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ehrjax.data.batching import DeviceBatcher, DeviceCorpus, to_device
from ehrjax.data.tasks import PRETRAIN_TASKS, TaskData
from ehrjax.embeddings.io import set_code_table
from ehrjax.models.behrt import Behrt, load_pretrained
from ehrjax.multihost import put_global
from ehrjax.train.optimizer import (
    SCHEDULE_STATE_KEYS,
    make_optimizer,
    param_labels,
    parameter_report,
    schedule_arrays,
)
from ehrjax.train.steps import StepConfig, make_eval_step, make_mlm_targets_step, make_train_step
from ehrjax.train.streams import init_rngs, run_key

METRIC_CODES = 200  # MLM macro one-vs-rest metrics over the most frequent training codes


class ProgramCache:
    """Jitted step programs keyed by what they close over, with a count and the time of every compilation.

    jax.jit compiles a function object once per input signature; keeping the function objects here lets
    trainers of identical structure share their compiled programs.
    """

    def __init__(self) -> None:
        self._programs: dict[Any, Callable] = {}
        self.compiles: list[tuple[str, float, str]] = []  # (program name, seconds, context)
        self.context = ""  # what the caller is running (e.g. 'scratch/n250'), recorded with each compile

    def get(self, name: str, key: Any, build: Callable[[], Callable]) -> Callable:
        full = (name, key)
        if full not in self._programs:
            self._programs[full] = build()
        fn = self._programs[full]

        def call(*args: Any) -> Any:
            before = fn._cache_size()
            start = time.perf_counter()
            out = fn(*args)
            if fn._cache_size() > before:  # this call traced and compiled a new signature
                self.compiles.append((name, time.perf_counter() - start, self.context))
            return out

        call.jitted = fn  # for ahead-of-time lowering (profiling, memory analysis)
        return call

    @property
    def num_compiles(self) -> int:
        return len(self.compiles)

    @property
    def compile_seconds(self) -> float:
        return float(sum(c[1] for c in self.compiles))


PROGRAMS = ProgramCache()  # the process-wide cache


def stack(trees: Sequence[Any]) -> Any:
    """Stack pytrees of equal structure along a new leading (seed) axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, index: int) -> Any:
    """Seed `index` of a stacked pytree."""
    return jax.tree.map(lambda x: x[index], tree)


def stacked_where(mask: jax.Array, new: Any, old: Any) -> Any:
    """Per seed (mask bool[S]), take `new` where True and `old` elsewhere."""
    return jax.tree.map(lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


@dataclasses.dataclass(frozen=True)
class SeedPlan:
    """One epoch of S members: per shape group (row_len, patient_index int32[nb, S, rows, slots], cls_index),
    `order` int32[num_batches, 2] = (group, batch in group) and `present` bool[num_batches, S]: whether the
    batch is one of the member's own (members with fewer batches, e.g. another labelled subset, get empty
    padding batches at the end of a group and sit them out)."""

    groups: list[tuple[int, jax.Array, jax.Array]]
    order: np.ndarray
    present: np.ndarray

    @property
    def num_batches(self) -> int:
        return len(self.order)

    def batch(self, k: int) -> tuple[int, jax.Array, jax.Array]:
        """(row_len, patient_index int32[S, rows, slots], cls_index) of batch `k`."""
        g, j = (int(x) for x in self.order[k])
        row_len, patient, cls = self.groups[g]
        return row_len, patient[j], cls[j]


@dataclasses.dataclass
class Trainer:
    """Data, stacked states, batchers and compiled-on-first-use steps of S seeds of one run."""

    data: TaskData
    graphdef: nnx.GraphDef
    rest: nnx.State
    state: dict[str, Any]  # {'params', 'opt_state', 'step', 'schedule'}, each with a leading seed axis
    seeds: tuple[int, ...]
    trainable: tuple[str, ...]
    report: Any  # ParamReport
    loaded: dict[str, list[str]] | None
    mesh: Mesh | None
    corpus: DeviceCorpus
    train_batchers: list[DeviceBatcher]
    val_batcher: DeviceBatcher
    test_batcher: DeviceBatcher
    step_cfg: StepConfig
    epochs: int
    programs: ProgramCache
    _train: dict[int, Callable]
    _eval: dict[int, Callable]
    metric_codes: jax.Array
    data_cfg: Any

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    @property
    def steps_per_epoch(self) -> int:
        """Batches of a stacked epoch: per shape, the most any member has."""
        return steps_per_epoch(self.train_batchers)

    @property
    def task(self) -> str:
        return self.data.task

    def keys(self) -> jax.Array:
        """Each seed's run key [S] (replicated over the mesh)."""
        def stacked() -> jax.Array:
            return jnp.stack([run_key(s) for s in self.seeds])

        return stacked() if self.mesh is None else jax.jit(stacked, out_shardings=NamedSharding(self.mesh, P()))()

    def stacked_plan(self, epoch: int) -> SeedPlan:
        """Every member's plan of epoch `epoch`, stacked. Each member keeps its own data order: its batches of
        a shape come in its own sequence. Members share the sequence of batch shapes (the first member's, then
        the extra batches other members have); a member with fewer batches of a shape gets empty batches
        (`present` False) there, so a member trained alone sees exactly the same batches."""
        plans = [b.host_plan(epoch) for b in self.train_batchers]  # (parts, order) per member, on the host
        member_shapes = [b.shapes for b in self.train_batchers]  # (rows, row_len) of each member's parts
        shapes = sorted({shape for own in member_shapes for shape in own}, key=lambda s: s[1])
        counts = np.zeros((len(plans), len(shapes)), dtype=np.int64)
        for m, (parts, _) in enumerate(plans):
            for (p, _), shape in zip(parts, member_shapes[m], strict=True):
                counts[m, shapes.index(shape)] = p.shape[0]
        most = counts.max(axis=0)
        sequence = [shapes.index(member_shapes[0][g]) for g in plans[0][1][:, 0]]
        for g, n in enumerate(most):
            sequence += [g] * int(n - counts[0, g])
        sequence = np.asarray(sequence, dtype=np.int32)
        occurrence = np.zeros(len(sequence), dtype=np.int32)
        for g in range(len(shapes)):
            where = sequence == g
            occurrence[where] = np.arange(int(where.sum()), dtype=np.int32)
        sharding = self.train_batchers[0].rows_sharding(4)
        slots = self.train_batchers[0].slots
        groups = []
        for g, (rows, row_len) in enumerate(shapes):
            patient = np.full((int(most[g]), len(plans), rows, slots), -1, np.int32)
            cls = np.zeros_like(patient)
            for m, (parts, order) in enumerate(plans):
                if (rows, row_len) not in member_shapes[m]:
                    continue
                own = member_shapes[m].index((rows, row_len))
                in_order = order[order[:, 0] == own, 1]
                patient[: len(in_order), m] = parts[own][0][in_order]
                cls[: len(in_order), m] = parts[own][1][in_order]
            groups.append((row_len, put_global(patient, sharding), put_global(cls, sharding)))
        present = occurrence[:, None] < counts[:, sequence].T
        return SeedPlan(groups=groups, order=np.stack([sequence, occurrence], axis=1), present=present)

    def train_step(self, row_len: int) -> Callable:
        return self._train[row_len]

    def eval_step(self, row_len: int) -> Callable:
        return self._eval[row_len]

    def mlm_targets_step(self, row_len: int) -> Callable:
        return self.programs.get(
            "mlm_targets", (self.step_cfg, row_len, self.mesh),
            lambda: make_mlm_targets_step(self.step_cfg, row_len, self.mesh),
        )  # fmt: skip


def _with_rate(optim_cfg: Any, rate: float) -> Any:
    out = ml_collections.ConfigDict(optim_cfg.to_dict())
    out.learning_rate = rate
    return out


def steps_per_epoch(batchers: Sequence[DeviceBatcher]) -> int:
    """Batches of one stacked epoch over `batchers` (per shape, the most any batcher has)."""
    most: dict[tuple[int, int], int] = {}
    for b in batchers:
        for shape, n in zip(b.shapes, b.group_batches, strict=True):
            most[shape] = max(most.get(shape, 0), n)
    return sum(most.values())


def _batcher(
    data_cfg: Any, data: TaskData, patients: np.ndarray, seed: int, mesh: Mesh | None, corpus: DeviceCorpus
) -> DeviceBatcher:
    return DeviceBatcher.from_config(data_cfg, data.corpus, seed=seed, patients=patients, mesh=mesh,
                                     device_corpus=corpus)  # fmt: skip


def init_seed_params(
    model_cfg: ml_collections.ConfigDict,
    data: TaskData,
    seed: int,
    *,
    lora_cfg: ml_collections.ConfigDict | None,
    pretrained: nnx.State | None,
    code_table: np.ndarray | None,
) -> tuple[nnx.GraphDef, nnx.State, nnx.State, dict[str, list[str]] | None]:
    """One seed's model: initial draw from `seed`'s init stream (`ehrjax.train.streams`), then the pre-trained
    weights, then the imported table."""
    model = Behrt(
        model_cfg, len(data.vocab), num_labels=data.num_labels, lora_cfg=lora_cfg,
        mlm_head=data.task in PRETRAIN_TASKS, causal=data.task == "clm", rngs=init_rngs(seed),
    )  # fmt: skip
    loaded = load_pretrained(model, pretrained) if pretrained is not None else None
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if code_table is not None:
        params = set_code_table(params, code_table)
    return graphdef, params, rest, loaded


def build_trainer(
    data: TaskData,
    *,
    model_cfg: ml_collections.ConfigDict,
    optim_cfg: ml_collections.ConfigDict,
    data_cfg: ml_collections.ConfigDict,
    trainable: Collection[str],
    seeds: Sequence[int],
    epochs: int,
    max_eval_patients: int,
    lora_cfg: ml_collections.ConfigDict | None = None,
    pretrained: nnx.State | None = None,
    code_table: np.ndarray | None = None,
    mesh: Mesh | None = None,
    corpus: DeviceCorpus | None = None,
    programs: ProgramCache | None = None,
    train_patients: Sequence[np.ndarray] | None = None,
    learning_rates: Sequence[float] | None = None,
) -> Trainer:
    """A trainer for `data` (train split = the labelled set; val capped at `max_eval_patients`).

    pretrained: parameters of a pre-trained model, loaded wherever their paths exist in this model (the
    same for every seed). code_table: f32[len(vocab), embed_dim] replacing the code table. corpus: `data`'s
    corpus already on the device (shared between the runs of a grid); uploaded once otherwise.
    """
    programs = programs if programs is not None else PROGRAMS
    seeds = tuple(int(s) for s in seeds)
    rates = [float(optim_cfg.learning_rate)] * len(seeds) if learning_rates is None else list(learning_rates)
    patients = [data.splits["train"]] * len(seeds) if train_patients is None else list(train_patients)
    if len(rates) != len(seeds) or len(patients) != len(seeds):
        raise ValueError(f"learning_rates and train_patients need one entry per member ({len(seeds)})")
    if not seeds or len(set(zip(seeds, rates, strict=True))) != len(seeds):
        raise ValueError(f"members (seed, learning rate) must be distinct and non-empty, got {list(seeds)}")
    if epochs <= 0:
        raise ValueError(f"train.epochs must be > 0, got {epochs}")
    trainable = tuple(trainable)
    by_seed = {s: init_seed_params(model_cfg, data, s, lora_cfg=lora_cfg, pretrained=pretrained,
                                   code_table=code_table) for s in dict.fromkeys(seeds)}  # fmt: skip
    built = [by_seed[s] for s in seeds]  # members of one seed (learning-rate candidates) start alike
    graphdef, _, rest, loaded = built[0]
    params = stack([b[1] for b in built])
    per_seed = built[0][1]
    tx = make_optimizer(optim_cfg, per_seed, trainable)
    labels = jax.tree.leaves(param_labels(per_seed))
    trainable_mask = tuple(label in trainable for label in labels)

    if corpus is None:
        corpus = to_device(data.corpus, data.labels, mesh)
    train_batchers = [
        _batcher(data_cfg, data, rows, s, mesh, corpus) for s, rows in zip(seeds, patients, strict=True)
    ]
    val_batcher = _batcher(data_cfg, data, data.splits["val"][:max_eval_patients], seeds[0], mesh, corpus)
    test_batcher = _batcher(data_cfg, data, data.splits["test"], seeds[0], mesh, corpus)
    # Each member's schedule counts its own steps (a member on a smaller labelled set takes fewer per epoch).
    schedule = stack([schedule_arrays(_with_rate(optim_cfg, r), epochs * b.num_batches)
                      for r, b in zip(rates, train_batchers, strict=True)])  # fmt: skip
    opt_state = jax.vmap(tx.init)(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.zeros(len(seeds), jnp.int32),
             "schedule": schedule}  # fmt: skip
    # Committed like the step's outputs, so the second step reuses the first one's compile. Every process
    # holds the same initial values (seeded), and each puts only its own devices' replicas.
    if mesh is not None:
        state = put_global(jax.device_get(state), NamedSharding(mesh, P()))
    else:
        state = jax.device_put(state, jax.local_devices()[0])

    step_cfg = StepConfig(
        task=data.task, code_end=data.vocab.code_end, mask_prob=data_cfg.mask_prob,
        mlm_slot_factor=data_cfg.mlm_slot_factor, schedule=optim_cfg.schedule,
    )  # fmt: skip
    # Every optim setting the step is built from; a new optimizer constant cannot reuse a stale program.
    optim_key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in optim_cfg.items()
                             if k not in SCHEDULE_STATE_KEYS))  # fmt: skip
    row_lens = sorted({length for b in (*train_batchers, val_batcher, test_batcher) for _, length in b.shapes})
    train_steps, eval_steps = {}, {}
    for row_len in row_lens:
        key = (graphdef, jax.tree.structure(rest), step_cfg, trainable_mask, optim_key, row_len, mesh)
        train_steps[row_len] = programs.get(
            "train", key, lambda r=row_len: make_train_step(graphdef, rest, tx, step_cfg, trainable_mask, r, mesh)
        )
        eval_steps[row_len] = programs.get(
            "eval", key[:3] + key[5:], lambda r=row_len: make_eval_step(graphdef, rest, step_cfg, r, mesh)
        )
    trainer = Trainer(
        data=data, graphdef=graphdef, rest=rest, state=state, seeds=seeds, trainable=trainable,
        report=parameter_report(per_seed, trainable), loaded=loaded, mesh=mesh, corpus=corpus,
        train_batchers=train_batchers, val_batcher=val_batcher, test_batcher=test_batcher, step_cfg=step_cfg,
        epochs=epochs, programs=programs, _train=train_steps, _eval=eval_steps,
        metric_codes=jnp.asarray(data.frequent_codes(METRIC_CODES), jnp.int32), data_cfg=data_cfg,
    )  # fmt: skip
    return trainer
