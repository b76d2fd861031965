"""The training loop: epochs of jitted steps, evaluation each epoch, early stopping, checkpoints, exports.

`train(config)` runs one task (`mlm`, `outcome`, `next_visit`) for one arm and returns a `RunResult`. The run
directory holds `config.json`, `vocab.json`, `metrics.jsonl` (one JSON object per log point and evaluation),
`checkpoints/{latest,best}` (Orbax) and `export/` (code table, adapters, model, as npz and safetensors).

Exact resume: the data order of epoch e is a function of (seed, e), the PRNG key of step s is
`fold_in(key(seed), s)` (derived inside the step), and the `latest` checkpoint records the epoch and the
batch within it; a resumed run replays the remaining batches of that epoch and ends bitwise equal to an
uninterrupted one (on CPU).
The host syncs with the device only at log points (`train.log_every`), at checkpoints and at epoch ends.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ehrjax.data.batching import DATA_AXIS, DeviceBatcher, EpochPlan
from ehrjax.data.tasks import TASKS, TaskData, build_task_data
from ehrjax.data.vocab import Vocab
from ehrjax.embeddings.io import load_code_table, set_code_table, vocab_token_counts
from ehrjax.eval.metrics import binary_metrics, mlm_metrics, multilabel_metrics
from ehrjax.models.behrt import Behrt, load_pretrained
from ehrjax.train.checkpoint import RunCheckpoints, check_writable, config_mismatch
from ehrjax.train.export import export_adapters, export_code_table, export_model
from ehrjax.train.optimizer import make_optimizer, param_labels, parameter_report
from ehrjax.train.steps import StepConfig, make_eval_step, make_train_step

# arm -> (trainable partitions when fine-tuning, LoRA adapters attached, needs init_from)
ALL_BASE = ("code_table", "embeddings", "encoder", "head")
ARMS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "scratch": (ALL_BASE, False, False),
    "mlm_lora": (("lora", "head"), True, True),
    "med2vec_lora": (("lora", "head"), True, True),
    "mlm_full": (ALL_BASE, False, True),
}
DEFAULT_METRIC = {"mlm": "loss", "outcome": "auroc", "next_visit": "aps"}


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message names the step."""


@dataclasses.dataclass
class RunResult:
    workdir: Path
    task: str
    arm: str
    metric: str
    best_metric: float
    best_epoch: int
    epochs_run: int
    steps: int
    val: dict[str, float]
    test: dict[str, float]
    params: dict[str, Any]
    real_tokens_per_s: float
    wall_seconds: float
    predictions: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["workdir"] = str(self.workdir)
        out.pop("predictions")
        return out


def validate_config(config: ml_collections.ConfigDict) -> None:
    """One-line errors for run-level settings (the model, batching and optimiser check their own)."""
    if config.task not in TASKS:
        raise ValueError(f"task {config.task!r} unknown; expected one of {TASKS}")
    if config.task != "mlm" and config.arm not in ARMS:
        raise ValueError(f"arm {config.arm!r} unknown; expected one of {tuple(ARMS)}")
    if config.task != "mlm" and ARMS[config.arm][2] and not config.init_from:
        raise ValueError(f"arm {config.arm!r} fine-tunes a pre-trained model: set init_from to an MLM run directory")
    for key in ("pretrain.num_patients", "finetune.num_patients"):
        section, name = key.split(".")
        if config[section][name] <= 0:
            raise ValueError(f"{key} must be > 0, got {config[section][name]}")
    if config.train.epochs <= 0:
        raise ValueError(f"train.epochs must be > 0, got {config.train.epochs}")
    for key in ("log_every", "checkpoint_every", "max_eval_patients"):
        if config.train[key] <= 0:
            raise ValueError(f"train.{key} must be > 0, got {config.train[key]}")


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def make_mesh(num_devices: int = 0) -> Mesh | None:
    """A 1-D `data` mesh over the first `num_devices` devices (0: all, every host's); None for one device.

    Every process builds the same cohort and plans (they are seeded), so replicated arrays agree across hosts.
    """
    devices = jax.devices()
    n = len(devices) if num_devices == 0 else num_devices
    if n > len(devices):
        raise ValueError(f"train.num_devices={num_devices} but only {len(devices)} devices are visible")
    if n == 1:
        return None
    return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def _run_dir(config: ml_collections.ConfigDict) -> Path:
    if config.resume:
        return Path(config.resume)
    if config.output_dir:
        return Path(config.output_dir)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{config.name}-{config.task}-{config.arm}-{stamp}"


def _check_resume(config: ml_collections.ConfigDict, workdir: Path) -> None:
    saved_path = workdir / "config.json"
    if not saved_path.is_file():
        raise ValueError(f"resume {workdir}: no config.json; not an ehrjax run directory")
    saved = json.loads(saved_path.read_text())
    current = config_to_dict(config)
    keys = ("task", "arm", "seed", "model", "lora", "data", "optim", "pretrain", "finetune", "train.epochs")
    diffs = config_mismatch(saved, current, keys)
    if diffs:
        raise ValueError(f"resume {workdir}: checkpoint was made with a different config ({', '.join(diffs[:5])})")


def _init_model(config: ml_collections.ConfigDict, data: TaskData) -> tuple[Behrt, dict[str, list[str]] | None]:
    uses_lora = config.task != "mlm" and ARMS[config.arm][1]
    model = Behrt(
        config.model,
        len(data.vocab),
        num_labels=data.num_labels,
        lora_cfg=config.lora if uses_lora else None,
        mlm_head=config.task == "mlm",
        rngs=nnx.Rngs(params=config.seed),
    )
    if not config.init_from:
        return model, None
    source = Path(config.init_from)
    saved = json.loads((source / "config.json").read_text())
    diffs = config_mismatch(saved, config_to_dict(config), ("model",))
    if diffs:
        raise ValueError(f"init_from {source}: the pre-trained model has another architecture ({', '.join(diffs)})")
    template = nnx.eval_shape(lambda: Behrt(config.model, len(data.vocab), mlm_head=True, rngs=nnx.Rngs(params=0)))
    abstract = nnx.state(template, nnx.Param)
    checkpoints = RunCheckpoints(source / "checkpoints")
    which = "best" if checkpoints.best_step() is not None else "latest"
    params = checkpoints.restore_params(abstract, which=which)
    checkpoints.close()
    return model, load_pretrained(model, params)


def _load_vocab(config: ml_collections.ConfigDict, workdir: Path) -> Vocab | None:
    if config.resume and (workdir / "vocab.json").is_file():
        return Vocab.load(workdir / "vocab.json")
    if config.init_from:
        path = Path(config.init_from) / "vocab.json"
        if not path.is_file():
            raise ValueError(f"init_from {config.init_from}: no vocab.json; not an ehrjax pre-training run")
        return Vocab.load(path)
    return None


def _frozen_leaves(params: nnx.State, trainable: tuple[str, ...]) -> list[jax.Array]:
    labels = jax.tree.leaves(param_labels(params))
    return [leaf for leaf, label in zip(jax.tree.leaves(params), labels, strict=True) if label not in trainable]


class _Logger:
    """metrics.jsonl (appended, one line per record), an optional progress bar and optional TensorBoard."""

    def __init__(
        self, path: Path, resume_step: int | None, progress: bool, total: int, initial: int, tensorboard: bool
    ):
        self.path = path
        self._tb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as err:
                raise ValueError(
                    "train.tensorboard=True needs tensorboardX: pip install 'ehrjax[tensorboard]'"
                ) from err
            self._tb = SummaryWriter(str(path.parent / "tensorboard"))
        if resume_step is not None and path.is_file():  # drop records past the checkpoint we resume from
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in lines))
        self._bar = None
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None and record["event"] in ("train", "eval"):
            tag = record["event"] if record["event"] == "train" else record["split"]
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{tag}/{key}", value, record["step"])

    def advance(self, n: int, postfix: dict[str, str] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def evaluate(
    eval_step: Any, params: nnx.State, batcher: DeviceBatcher, data: TaskData, task: str
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Metrics over every patient of `batcher` (fixed order), and per-patient predictions for fine-tuning."""
    plan = batcher.plan_epoch(0, shuffle=False)
    outputs = [_eval_batch(eval_step, params, plan, k) for k in range(plan.num_batches)]
    outputs = jax.device_get(outputs)
    loss = sum(float(o["loss_sum"]) for o in outputs) / max(sum(float(o["weight"]) for o in outputs), 1.0)
    if task == "mlm":
        keep = [o["weights"].reshape(-1) > 0 for o in outputs]
        labels = np.concatenate([o["labels"].reshape(-1)[k] for o, k in zip(outputs, keep, strict=True)])
        logits = np.concatenate(
            [o["logits"].reshape(-1, o["logits"].shape[-1])[k] for o, k in zip(outputs, keep, strict=True)]
        )
        metrics = mlm_metrics(labels, logits)
        metrics["loss"] = loss
        return metrics, {}
    patient = np.concatenate([o["patient_index"].reshape(-1) for o in outputs])
    logits = np.concatenate([o["logits"].reshape(len(o["patient_index"].reshape(-1)), -1) for o in outputs])
    filled = patient >= 0
    patient, logits = patient[filled], logits[filled]
    order = np.argsort(patient)
    patient, scores = patient[order], 1.0 / (1.0 + np.exp(-logits[order]))
    labels = data.labels[patient]
    metrics = binary_metrics(labels[:, 0], scores[:, 0]) if task == "outcome" else multilabel_metrics(labels, scores)
    metrics["loss"] = loss
    return metrics, {"patient": patient, "scores": scores, "labels": labels}


def _eval_batch(eval_step: Any, params: nnx.State, plan: EpochPlan, k: int) -> dict[str, jax.Array]:
    g, j = (int(x) for x in plan.order[k])
    return eval_step(params, plan.groups[g], jnp.int32(j))


def _improved(metric: str, value: float, best: float | None) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


@dataclasses.dataclass
class Trainer:
    """Everything a run needs, built once from a config: data, model states, batchers, jitted steps."""

    config: ml_collections.ConfigDict
    data: TaskData
    graphdef: nnx.GraphDef
    rest: nnx.State
    state: dict[str, Any]  # {'params', 'opt_state', 'step'}; replicated on the mesh
    trainable: tuple[str, ...]
    report: Any
    loaded: dict[str, list[str]] | None
    mesh: Mesh | None
    train_batcher: DeviceBatcher
    val_batcher: DeviceBatcher
    train_step: Any
    eval_step: Any
    coverage: Any = None  # the import's coverage report when `embeddings_from` is set

    @property
    def steps_per_epoch(self) -> int:
        return self.train_batcher.num_batches

    def batcher(self, split: str, limit: int | None = None) -> DeviceBatcher:
        """A fixed-order batcher over a split's patients, sharing the device corpus."""
        return DeviceBatcher.from_config(
            self.config.data, self.data.corpus, seed=self.config.seed, patients=self.data.splits[split][:limit],
            mesh=self.mesh, device_corpus=self.train_batcher.corpus,
        )  # fmt: skip


def build_trainer(config: ml_collections.ConfigDict, vocab: Vocab | None = None) -> Trainer:
    """Data, model, optimiser, batchers and compiled-on-first-use steps for `config` (no I/O to a run dir)."""
    validate_config(config)
    task = config.task
    data = build_task_data(config, task, vocab=vocab)
    model, loaded = _init_model(config, data)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    coverage = None
    if config.embeddings_from:
        # An imported table (e.g. Med2Vec) replaces the code embeddings and stays frozen.
        table, coverage = load_code_table(
            config.embeddings_from, data.vocab, embed_dim=config.model.embed_dim,
            code_counts=vocab_token_counts(data.cohort, data.vocab), seed=config.seed,
        )  # fmt: skip
        params = set_code_table(params, table)
    if task == "mlm":
        trainable = tuple(p for p in ALL_BASE if not (config.embeddings_from and p == "code_table"))
    else:
        trainable = ARMS[config.arm][0]
    mesh = make_mesh(config.train.num_devices)
    train_batcher = DeviceBatcher.from_config(
        config.data, data.corpus, seed=config.seed, patients=data.splits["train"], labels=data.labels, mesh=mesh
    )
    val_batcher = DeviceBatcher.from_config(
        config.data, data.corpus, seed=config.seed, patients=data.splits["val"][: config.train.max_eval_patients],
        mesh=mesh, device_corpus=train_batcher.corpus,
    )  # fmt: skip
    tx = make_optimizer(config, params, trainable, total_steps=config.train.epochs * train_batcher.num_batches)
    step_cfg = StepConfig(
        task=task,
        vocab_size=len(data.vocab),
        mask_prob=config.data.mask_prob,
        mlm_slot_factor=config.data.mlm_slot_factor,
    )
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if mesh is not None:
        state = jax.device_put(state, NamedSharding(mesh, P()))
    return Trainer(
        config=config, data=data, graphdef=graphdef, rest=rest, state=state, trainable=trainable,
        report=parameter_report(params, trainable), loaded=loaded, mesh=mesh, train_batcher=train_batcher,
        val_batcher=val_batcher, train_step=make_train_step(graphdef, rest, tx, step_cfg),
        eval_step=make_eval_step(graphdef, rest, step_cfg), coverage=coverage,
    )  # fmt: skip


def train(config: ml_collections.ConfigDict) -> RunResult:
    """Run `config.task` for `config.arm`; see the module docstring for what is written where."""
    start_time = time.perf_counter()
    validate_config(config)
    task = config.task
    workdir = _run_dir(config).absolute()
    if config.resume:
        _check_resume(config, workdir)
    check_writable(workdir)

    trainer = build_trainer(config, _load_vocab(config, workdir))
    data, state, trainable, report, loaded = (
        trainer.data,
        trainer.state,
        trainer.trainable,
        trainer.report,
        trainer.loaded,
    )
    train_batcher, val_batcher, train_step, eval_step = (
        trainer.train_batcher,
        trainer.val_batcher,
        trainer.train_step,
        trainer.eval_step,
    )
    steps_per_epoch = trainer.steps_per_epoch
    total_steps = config.train.epochs * steps_per_epoch
    metric = config.train.metric or DEFAULT_METRIC[task]
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    meta: dict[str, Any] = {"epoch": 0, "batch": 0, "best": None, "best_epoch": -1, "bad_epochs": 0}
    resume_step = None
    if config.resume and checkpoints.latest_step() is not None:
        state, saved_meta = checkpoints.restore(jax.tree.map(_abstract, state))
        meta.update({k: saved_meta[k] for k in meta})
        resume_step = int(state["step"])
    else:
        (workdir / "config.json").write_text(json.dumps(config_to_dict(config), indent=2))
        data.vocab.save(workdir / "vocab.json")
        (workdir / "metrics.jsonl").unlink(missing_ok=True)
        if trainer.coverage is not None:
            trainer.coverage.save(workdir / "embedding_coverage.json")
            print(trainer.coverage.format())
    frozen_before = [jnp.copy(x) for x in _frozen_leaves(state["params"], trainable)]

    logger = _Logger(
        workdir / "metrics.jsonl", resume_step, config.train.progress, total_steps, int(state["step"]),
        config.train.tensorboard,
    )  # fmt: skip
    if resume_step is None:
        logger.log({"event": "start", "step": 0, "task": task, "arm": config.arm, "data": data.summary(),
                    "params": report.as_dict(), "loaded": {k: len(v) for k, v in (loaded or {}).items()},
                    "batching": {"mode": train_batcher.mode, "efficiency": train_batcher.efficiency,
                                 "steps_per_epoch": steps_per_epoch, "shapes": train_batcher.shapes}})  # fmt: skip

    base_key = jax.random.key(config.seed)
    pending: list[dict[str, jax.Array]] = []
    window_start, train_tokens, train_time, first_window = time.perf_counter(), 0.0, 0.0, True
    val_metrics: dict[str, float] = {}
    epoch = meta["epoch"]
    stopped_early = False

    def flush(step: int, epoch: int) -> None:
        nonlocal window_start, train_tokens, train_time, first_window
        if not pending:
            return
        sums = jax.device_get(pending)
        elapsed = time.perf_counter() - window_start
        totals = {k: float(sum(s[k] for s in sums)) for k in sums[0]}
        if totals["nonfinite"] > 0:
            bad = step - len(sums) + next(i for i, s in enumerate(sums) if s["nonfinite"] > 0) + 1
            checkpoints.wait()
            raise TrainingDiverged(
                f"loss or gradient norm is NaN/inf at step {bad} (epoch {epoch}); the update was skipped and "
                f"the last good checkpoint is in {workdir / 'checkpoints'}"
            )
        record = {
            "event": "train",
            "step": step,
            "epoch": epoch,
            "loss": totals["loss_sum"] / max(totals["weight"], 1.0),
            "grad_norm": totals["grad_norm"] / len(sums),
            "real_tokens_per_s": totals["real_tokens"] / elapsed,
            "wall_s": time.perf_counter() - start_time,
        }
        if task == "mlm":
            record["top1"] = totals["correct"] / max(totals["weight"], 1.0)
            record["mlm_overflow"] = totals["overflow"]
        logger.log(record)
        logger.advance(len(sums), {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['real_tokens_per_s']:,.0f}"})
        if not first_window:  # the first window of a process includes compiling the step
            train_tokens += totals["real_tokens"]
            train_time += elapsed
        first_window = False
        pending.clear()
        window_start = time.perf_counter()

    try:
        while epoch < config.train.epochs and not stopped_early:
            plan = train_batcher.plan_epoch(epoch)
            window_start = time.perf_counter()  # evaluation and checkpointing are not training time
            first = meta["batch"] if epoch == meta["epoch"] else 0
            for k in range(first, plan.num_batches):
                g, j = (int(x) for x in plan.order[k])
                state, sums = train_step(state, plan.groups[g], jnp.int32(j), base_key)
                pending.append(sums)
                done = epoch * steps_per_epoch + k + 1
                if done % config.train.log_every == 0:
                    flush(done, epoch)
                if done % config.train.checkpoint_every == 0 and k + 1 < plan.num_batches:
                    flush(done, epoch)
                    meta.update(epoch=epoch, batch=k + 1)
                    checkpoints.save_latest(done, state, dict(meta, config=config_to_dict(config)))
            done = (epoch + 1) * steps_per_epoch
            flush(done, epoch)
            val_metrics, _ = evaluate(eval_step, state["params"], val_batcher, data, task)
            value = val_metrics[metric]
            improved = _improved(metric, value, meta["best"])
            if improved:
                meta.update(best=value, best_epoch=epoch, bad_epochs=0)
            else:
                meta["bad_epochs"] += 1
            logger.log({"event": "eval", "split": "val", "step": done, "epoch": epoch, **val_metrics,
                        "improved": improved, "wall_s": time.perf_counter() - start_time})  # fmt: skip
            _check_frozen(frozen_before, _frozen_leaves(state["params"], trainable), done)
            stopped_early = meta["bad_epochs"] >= config.train.patience
            epoch += 1
            meta.update(epoch=epoch, batch=0)
            saved_meta = dict(meta, config=config_to_dict(config))
            if improved:
                checkpoints.save_best(done, state, saved_meta)
            checkpoints.save_latest(done, state, saved_meta)
        checkpoints.wait()
    finally:
        logger.close()

    which = "best" if checkpoints.best_step() is not None else "latest"
    best_params = checkpoints.restore_params(jax.tree.map(_abstract, state["params"]), which=which)
    checkpoints.close()
    test_batcher = trainer.batcher("test")
    best_val, _ = evaluate(eval_step, best_params, val_batcher, data, task)
    test_metrics, predictions = evaluate(eval_step, best_params, test_batcher, data, task)
    logger.log({"event": "eval", "split": "test", "step": int(state["step"]), "epoch": meta["best_epoch"],
                **test_metrics, "wall_s": time.perf_counter() - start_time})  # fmt: skip
    export_dir = workdir / "export"
    export_code_table(best_params, data.vocab, export_dir)
    export_adapters(best_params, export_dir)
    export_model(best_params, export_dir)
    return RunResult(
        workdir=workdir,
        task=task,
        arm=config.arm if task != "mlm" else "mlm",
        metric=metric,
        best_metric=float(meta["best"]) if meta["best"] is not None else float("nan"),
        best_epoch=int(meta["best_epoch"]),
        epochs_run=int(epoch),
        steps=int(state["step"]),
        val=best_val,
        test=test_metrics,
        params=report.as_dict(),
        real_tokens_per_s=train_tokens / train_time if train_time else float("nan"),
        wall_seconds=time.perf_counter() - start_time,
        predictions=predictions,
    )


def _abstract(x: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))


def _check_frozen(before: list[jax.Array], after: list[jax.Array], step: int) -> None:
    """Frozen partitions must be bitwise unchanged after training."""
    changed = sum(not bool(jnp.array_equal(a, b)) for a, b in zip(before, after, strict=True))
    if changed:
        raise RuntimeError(f"{changed} frozen parameter arrays changed by step {step}: the freeze mask is broken")
