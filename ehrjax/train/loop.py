"""One stand-alone training run from a config: `train(config)`, what `python -m ehrjax.train` runs.

It reads the config and the files it names (a pre-trained run, an embedding file), then hands explicit inputs to
the pieces: task data (`ehrjax.data.tasks`) -> trainer (`ehrjax.train.trainer`) -> `fit` -> evaluation and
files (`ehrjax.train.rundir`). The run directory holds `config.json`, `vocab.json`, `metrics.jsonl` (one JSON
object per log point and per evaluation), `checkpoints/{latest,best}` (Orbax), `predictions.npz` (fine-tuning:
val and test patients) and `export/` (code table, adapters, model, as npz and safetensors).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from ehrjax.data.cohort import Cohort
from ehrjax.data.tasks import TASKS, TaskData, build_task_data
from ehrjax.data.vocab import Vocab
from ehrjax.embeddings.io import load_code_table, vocab_token_counts
from ehrjax.eval.baselines import format_table, run_mlm_baselines
from ehrjax.models.behrt import CODE_TABLE_PATH
from ehrjax.train.arms import EVERYTHING, Arm, arm_from_config, arm_lora_config
from ehrjax.train.checkpoint import RunCheckpoints, check_writable, config_mismatch
from ehrjax.train.export import export_adapters, export_code_table, export_model, flat_arrays
from ehrjax.train.fit import DEFAULT_METRIC, FitResult, TrainingDiverged, evaluate, fit
from ehrjax.train.pretrained import PretrainedRun, load_pretrained_run
from ehrjax.train.rundir import RunLog, is_writer, predictions_arrays, run_directory, write_json, write_npz
from ehrjax.train.trainer import Trainer, build_trainer, unstack

__all__ = ["RunResult", "TrainingDiverged", "build_run_trainer", "make_mesh", "train", "validate_config"]


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
    compile_seconds: float = 0.0
    compiles: int = 0
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
    if config.task != "mlm":
        arm = arm_from_config(config.arm, config.arms)
        if arm.kind != "neural":
            raise ValueError(f"arm {config.arm!r} is a {arm.kind} arm; python -m ehrjax.train trains neural arms")
        if arm.pretrained_run or arm.code_table == "mlm":
            if not config.init_from:
                raise ValueError(f"arm {config.arm!r} starts from a pre-trained model: set init_from to an MLM run")
        if arm.code_table == "med2vec" and not config.embeddings_from:
            raise ValueError(f"arm {config.arm!r} uses a Med2Vec table: set embeddings_from to its file")
    validate_cohort_sizes(config)
    if config.train.epochs <= 0:
        raise ValueError(f"train.epochs must be > 0, got {config.train.epochs}")
    if config.train.patience <= 0:
        raise ValueError(f"train.patience must be > 0, got {config.train.patience}")
    for key in ("log_every", "checkpoint_every", "max_eval_patients"):
        if config.train[key] <= 0:
            raise ValueError(f"train.{key} must be > 0, got {config.train[key]}")


def validate_cohort_sizes(config: ml_collections.ConfigDict) -> None:
    """One-line errors for cohort sizes that are not positive (`pretrain.num_patients`, `finetune.num_patients`)."""
    for key in ("pretrain.num_patients", "finetune.num_patients"):
        section, name = key.split(".")
        if config[section][name] <= 0:
            raise ValueError(f"{key} must be > 0, got {config[section][name]}")


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh | None:
    """A 1-D `data` mesh over the first `num_devices` devices (0: all, every host's); None for one device.

    Every process builds the same cohort and plans (they are seeded), so replicated arrays agree across hosts.
    """
    from ehrjax.data.batching import DATA_AXIS

    devices = jax.devices()
    n = len(devices) if num_devices == 0 else num_devices
    if n > len(devices):
        raise ValueError(f"train.num_devices={num_devices} but only {len(devices)} devices are visible")
    if n == 1:
        return None
    return jax.sharding.Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def _run_dir(config: ml_collections.ConfigDict) -> Path:
    who = "mlm" if config.task == "mlm" else f"{config.task}-{config.arm}"
    return run_directory(config, f"{config.name}-{who}")


def _check_resume(config: ml_collections.ConfigDict, workdir: Path) -> None:
    saved_path = workdir / "config.json"
    if not saved_path.is_file():
        raise ValueError(f"resume {workdir}: no config.json; not an ehrjax run directory")
    saved = json.loads(saved_path.read_text())
    keys = ("task", "arm", "seed", "model", "lora", "data", "optim", "pretrain", "finetune", "train.epochs")
    diffs = config_mismatch(saved, config_to_dict(config), keys)
    if diffs:
        raise ValueError(f"resume {workdir}: checkpoint was made with a different config ({', '.join(diffs[:5])})")


def _code_table(path: str, data: TaskData, config: ml_collections.ConfigDict) -> tuple[np.ndarray, Any]:
    """An embedding file as the model's code table (rows = vocab ids) and its coverage report; the code map and
    pickle opt-in of `med2vec.codes_path` / `med2vec.allow_pickle` apply."""
    return load_code_table(path, data.vocab, embed_dim=config.model.embed_dim,
                           codes_path=config.med2vec.codes_path or None, allow_pickle=config.med2vec.allow_pickle,
                           code_counts=vocab_token_counts(data.cohort, data.vocab), seed=config.seed)  # fmt: skip


def pretrained_table(run: PretrainedRun) -> np.ndarray:
    """The code table of a pre-trained run's parameters, f32[len(vocab), embed_dim]."""
    return flat_arrays(run.params)["/".join(CODE_TABLE_PATH)]


def build_run_trainer(
    config: ml_collections.ConfigDict,
    vocab: Vocab | None = None,
    *,
    seeds: tuple[int, ...] | None = None,
    cohort: Cohort | None = None,
) -> tuple[Trainer, Any]:
    """The trainer of a stand-alone run (the config's task and arm) and the embedding coverage report, if any.
    `cohort`: the config's cohort for the task, when the caller already holds it."""
    validate_config(config)
    task = config.task
    run = load_pretrained_run(config.init_from, label="init_from") if config.init_from else None
    if run is not None:
        diffs = config_mismatch(run.config, config_to_dict(config), ("model",))
        if diffs:
            raise ValueError(f"init_from {run.path}: the pre-trained model has another architecture "
                             f"({', '.join(diffs)})")  # fmt: skip
        vocab = vocab or run.vocab
    data = build_task_data(config, task, vocab=vocab, cohort=cohort)
    arm = Arm("mlm", trainable=EVERYTHING) if task == "mlm" else arm_from_config(config.arm, config.arms)
    table_path = config.embeddings_from or (arm.code_table if arm.table_from_file else "")
    code_table = coverage = None
    trainable = arm.trainable
    if table_path:  # an imported table stays frozen
        code_table, coverage = _code_table(table_path, data, config)
        trainable = tuple(p for p in trainable if p != "code_table")
    elif arm.code_table == "mlm" and run is not None and not arm.pretrained_run:
        code_table = pretrained_table(run)  # the learned table alone (a pre-trained encoder carries its own)
    pretrained = run.params if (run is not None and arm.pretrained_run) else None
    trainer = build_trainer(
        data, model_cfg=config.model, optim_cfg=config.optim, data_cfg=config.data, trainable=trainable,
        seeds=seeds or (config.seed,), epochs=config.train.epochs, max_eval_patients=config.train.max_eval_patients,
        lora_cfg=arm_lora_config(arm, config.lora), pretrained=pretrained, code_table=code_table,
        mesh=make_mesh(config.train.num_devices),
    )  # fmt: skip
    return trainer, coverage


def train(config: ml_collections.ConfigDict, cohort: Cohort | None = None) -> RunResult:
    """Run `config.task` for `config.arm`; see the module docstring for what is written where. `cohort`: the
    config's cohort for the task when the caller already holds it (it is not generated or read again)."""
    start_time = time.perf_counter()
    validate_config(config)
    task = config.task
    workdir = _run_dir(config).absolute()
    vocab = None
    if config.resume:
        _check_resume(config, workdir)
        if (workdir / "vocab.json").is_file():
            vocab = Vocab.load(workdir / "vocab.json")
    check_writable(workdir)
    trainer, coverage = build_run_trainer(config, vocab, cohort=cohort)
    data = trainer.data
    checkpoints = RunCheckpoints(workdir / "checkpoints")
    resume_step = None
    if config.resume and checkpoints.latest_step() is not None:
        resume_step = int(checkpoints.latest_step())
    elif is_writer():
        write_json(workdir / "config.json", config_to_dict(config))
        data.vocab.save(workdir / "vocab.json")
        if coverage is not None:
            coverage.save(workdir / "embedding_coverage.json")
            print(coverage.format())
    log = RunLog(workdir / "metrics.jsonl", resume_step=resume_step, tensorboard=config.train.tensorboard)
    batcher = trainer.train_batchers[0]
    if resume_step is None:
        log.log({"event": "start", "step": 0, "task": task, "arm": "mlm" if task == "mlm" else config.arm,
                 "data": data.summary(), "params": trainer.report.as_dict(),
                 "loaded": {k: len(v) for k, v in (trainer.loaded or {}).items()},
                 "batching": {"mode": batcher.mode, "efficiency": batcher.efficiency,
                              "steps_per_epoch": trainer.steps_per_epoch, "shapes": batcher.shapes}})  # fmt: skip
    try:
        result = fit(
            trainer, patience=config.train.patience, metric=config.train.metric, log_every=config.train.log_every,
            log=log, checkpoints=checkpoints, checkpoint_every=config.train.checkpoint_every,
            checkpoint_meta={"config": config_to_dict(config)}, resume=resume_step is not None,
            progress=config.train.progress,
        )  # fmt: skip
    finally:
        log.close()
        checkpoints.close()
    return finish_run(trainer, result, workdir, log, config.arm if task != "mlm" else "mlm", start_time)


def finish_run(
    trainer: Trainer, result: FitResult, workdir: Path, log: RunLog, arm: str, start_time: float, seed_index: int = 0
) -> RunResult:
    """Score one seed's best parameters on val and test, write predictions and exports, and summarise."""
    data, task = trainer.data, trainer.task
    best = result.best_params
    val, val_pred = evaluate(trainer, best, trainer.val_batcher)
    test, predictions = evaluate(trainer, best, trainer.test_batcher)
    log.log({"event": "eval", "split": "test", "step": result.steps[seed_index],
             "epoch": result.best_epoch[seed_index], **test[seed_index],
             "wall_s": time.perf_counter() - start_time})  # fmt: skip
    if task == "mlm":
        baselines = mlm_baselines_of(trainer)
        log.log({"event": "baselines", "split": "test", "step": result.steps[seed_index], **baselines})
        test[seed_index]["baselines"] = baselines
        print(format_table({"model": test[seed_index], **baselines}))
    params = unstack(best, seed_index)
    if is_writer():
        if task != "mlm":
            arrays = run_predictions(data, {"val": val_pred, "test": predictions}, seed_index)
            write_npz(workdir / "predictions.npz", arrays)
        export_dir = workdir / "export"
        export_code_table(params, data.vocab, export_dir)
        export_adapters(params, export_dir)
        export_model(params, export_dir)
    return RunResult(
        workdir=workdir, task=task, arm=arm, metric=result.metric, best_metric=result.best_metric[seed_index],
        best_epoch=result.best_epoch[seed_index], epochs_run=result.epochs_run[seed_index],
        steps=result.steps[seed_index], val=val[seed_index], test=test[seed_index],
        params=trainer.report.as_dict(), real_tokens_per_s=result.real_tokens_per_s,
        wall_seconds=time.perf_counter() - start_time, compile_seconds=result.compile_seconds,
        compiles=result.compiles,
        predictions={k: (v[seed_index] if k in ("logits", "probability") else v) for k, v in predictions.items()},
    )  # fmt: skip


def mlm_baselines_of(trainer: Trainer) -> dict[str, dict[str, float]]:
    """The unigram and copy-mixture baselines on exactly the held-out slots the trainer's MLM evaluation scores
    (λ fitted on its validation patients, scored on its test patients)."""
    return run_mlm_baselines(trainer.data, trainer.data_cfg, seed=trainer.seeds[0],
                             max_val_patients=len(trainer.val_batcher.patients))  # fmt: skip


def run_predictions(
    data: TaskData, by_split: dict[str, dict[str, np.ndarray]], seed_index: int
) -> dict[str, np.ndarray]:
    """`predictions.npz` arrays of one seed from `evaluate`'s predictions per split (see `predictions_arrays`)."""
    parts = list(by_split.items())
    rows = np.concatenate([p["patient"] for _, p in parts])
    split = np.concatenate([np.full(len(p["patient"]), s) for s, p in parts])
    pick = (lambda a: a[..., 0]) if data.task == "outcome" else (lambda a: a)
    outcome_p = data.cohort.labels.get("outcome_p")
    return predictions_arrays(
        patient_id=data.cohort.patient_id[rows], split=split,
        label=pick(np.concatenate([p["labels"] for _, p in parts])),
        probability=pick(np.concatenate([p["probability"][seed_index] for _, p in parts])),
        logit=pick(np.concatenate([p["logits"][seed_index] for _, p in parts])),
        outcome_p=None if outcome_p is None else np.asarray(outcome_p, dtype=np.float64)[rows],
    )  # fmt: skip


__all__ += ["DEFAULT_METRIC", "finish_run", "run_predictions"]
