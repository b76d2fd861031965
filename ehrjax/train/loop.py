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
from ehrjax.data.tasks import PRETRAIN_TASKS, TASKS, TaskData, build_task_data, check_evaluable
from ehrjax.data.vocab import Vocab
from ehrjax.embeddings.io import load_code_table, validate_embedding_file, vocab_token_counts
from ehrjax.eval.baselines import format_table, run_baselines
from ehrjax.models.behrt import CODE_TABLE_PATH
from ehrjax.multihost import sync
from ehrjax.train.arms import EVERYTHING, Arm, arm_from_config, arm_lora_config
from ehrjax.train.checkpoint import RunCheckpoints, check_writable, config_mismatch
from ehrjax.train.export import export_adapters, export_code_table, export_model, flat_arrays
from ehrjax.train.fit import DEFAULT_METRIC, FitResult, TrainingDiverged, evaluate, fit
from ehrjax.train.pretrained import PretrainedRun, check_run_folder, load_pretrained_run
from ehrjax.train.resolve import imports_table, resolve_arm
from ehrjax.train.rundir import (
    FolderLock,
    RunLog,
    check_output_folder,
    is_writer,
    predictions_arrays,
    run_directory,
    write_json,
    write_npz,
)
from ehrjax.train.trainer import Trainer, build_trainer, unstack

__all__ = ["RunResult", "TrainingDiverged", "build_run_trainer", "make_mesh", "train", "validate_config"]

# The validation metrics `train.metric` may name per task ('loss' is minimised, the others maximised).
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "mlm": ("loss", "top1", "top10", "macro_auroc", "macro_ap", "macro_pr_auc"),
    "clm": ("loss", "top1", "top10", "macro_auroc", "macro_ap", "macro_pr_auc"),
    "outcome": ("auroc", "ap", "pr_auc", "loss"),
    "next_visit": ("aps", "auroc", "loss"),
}


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
    if config.task not in PRETRAIN_TASKS:
        arm = arm_from_config(config.arm, config.arms)
        if arm.kind != "neural":
            raise ValueError(f"arm {config.arm!r} is a {arm.kind} arm; python -m ehrjax.train trains neural arms")
        if arm.init_task is not None and not config.init_from:
            raise ValueError(f"arm {config.arm!r} starts from a pre-trained model: set init_from to a run of task "
                             f"{arm.init_task}")  # fmt: skip
        if config.embeddings_from and arm.pretrained_run:
            raise ValueError(f"embeddings_from: arm {config.arm!r} starts from a pre-trained encoder, which brings "
                             "its own code table; choose an arm with a random encoder")  # fmt: skip
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
    metric = config.train.metric
    if metric and metric not in TASK_METRICS[config.task]:
        raise ValueError(f"train.metric {metric!r} is not a validation metric of the {config.task!r} task; "
                         f"expected one of {', '.join(TASK_METRICS[config.task])} (or '' for the default)")  # fmt: skip
    validate_settings(config)
    if config.init_from:
        check_run_folder(config.init_from, label="init_from", task=init_task(config))
    table_path = _table_path(config)
    if table_path:
        _check_embedding_file(table_path, config)


def validate_settings(config: ml_collections.ConfigDict) -> None:
    """The model, LoRA and optimiser numbers, before any cohort is built (their builders check them again)."""
    from ehrjax.models.behrt import validate_lora_dims, validate_model_config

    validate_model_config(config.model)
    if config.task not in PRETRAIN_TASKS:  # adapters only where the arm has them
        lora_cfg = arm_lora_config(arm_from_config(config.arm, config.arms), config.lora)
        if lora_cfg is not None:
            validate_lora_dims(lora_cfg, config.model)
    o = config.optim
    checks = {
        "learning_rate": (o.learning_rate, 0 < o.learning_rate < float("inf"), "> 0 and finite"),
        "weight_decay": (o.weight_decay, 0 <= o.weight_decay < float("inf"), ">= 0 and finite"),
        "clip_norm": (o.clip_norm, 0 <= o.clip_norm < float("inf"), ">= 0 and finite (0 disables clipping)"),
        "b1": (o.b1, 0 <= o.b1 < 1, "in [0, 1)"),
        "b2": (o.b2, 0 <= o.b2 < 1, "in [0, 1)"),
        "warmup_steps": (o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
    }
    for key, (value, ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"optim.{key} must be {expected}, got {value!r}")
    from ehrjax.train.optimizer import SCHEDULES

    if o.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule {o.schedule!r} unknown; expected one of {SCHEDULES}")
    d = config.data
    if not 0 < d.mask_prob < 1:
        raise ValueError(f"data.mask_prob must be in (0, 1), got {d.mask_prob!r}")
    if not d.mlm_slot_factor > 0 or d.mlm_slot_factor == float("inf"):
        raise ValueError(f"data.mlm_slot_factor must be > 0 and finite, got {d.mlm_slot_factor!r}")
    for key in ("max_len", "row_len", "rows_per_batch", "slots_per_row", "tokens_per_batch", "batch_size",
                "min_count"):  # fmt: skip
        if d[key] <= 0:
            raise ValueError(f"data.{key} must be > 0, got {d[key]!r}")


def run_arm(config: ml_collections.ConfigDict) -> Arm:
    """The arm a stand-alone run trains: for pre-training everything, from `embeddings_from` if set; for
    fine-tuning the config's arm, whose table source `embeddings_from` replaces if set."""
    if config.task in PRETRAIN_TASKS:
        return Arm(config.task, code_table=config.embeddings_from or "random", trainable=EVERYTHING)
    arm = arm_from_config(config.arm, config.arms)
    return dataclasses.replace(arm, code_table=config.embeddings_from) if config.embeddings_from else arm


def _table_path(config: ml_collections.ConfigDict) -> str:
    """The embedding file a run imports as its frozen code table ('' for none)."""
    arm = run_arm(config)
    return arm.code_table if imports_table(arm) and arm.table_from_file else ""


def run_model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the model a run builds: `model.embed_dim` is an imported table's width (`resolve_arm`'s
    rule), so the run's config.json describes its checkpoint."""
    path = _table_path(config)
    if not path:
        return config
    width = _check_embedding_file(path, config)[1]
    if width == config.model.embed_dim:
        return config
    out = config.copy_and_resolve_references()
    out.model.embed_dim = width
    return out


def init_task(config: ml_collections.ConfigDict) -> str:
    """The task `init_from` must have trained: a pre-training run's own task (it reuses that run's vocabulary),
    the arm's pre-training for fine-tuning (MLM for an arm that starts from none)."""
    if config.task in PRETRAIN_TASKS:
        return config.task
    return arm_from_config(config.arm, config.arms).init_task or "mlm"


_CHECKED_FILES: dict[tuple, tuple[int, int]] = {}


def _check_embedding_file(path: str, config: ml_collections.ConfigDict) -> tuple[int, int]:
    """`validate_embedding_file` once per file version (validate_config runs more than once per run); the
    file's (codes, width)."""
    try:
        st = Path(path).stat()
        key = (str(Path(path).absolute()), st.st_mtime_ns, st.st_size, config.med2vec.codes_path,
               bool(config.med2vec.allow_pickle))  # fmt: skip
    except OSError:
        key = None
    if key is not None and key in _CHECKED_FILES:
        return _CHECKED_FILES[key]
    label = "embeddings_from" if config.embeddings_from else f"arm {config.arm!r} code table"
    shape = validate_embedding_file(path, config.med2vec.codes_path or None, bool(config.med2vec.allow_pickle),
                                    label=label)  # fmt: skip
    if key is not None:
        _CHECKED_FILES[key] = shape
    return shape


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
    who = config.task if config.task in PRETRAIN_TASKS else f"{config.task}-{config.arm}"
    return run_directory(config, f"{config.name}-{who}")


def _check_resume(config: ml_collections.ConfigDict, workdir: Path) -> None:
    from ehrjax.atomic import read_json

    check_output_folder(workdir, resume=True, marker="config.json", what="run")
    saved = read_json(workdir / "config.json", f"resume {workdir}: config file")
    if not isinstance(saved, dict):
        raise ValueError(f"resume {workdir}: config.json is not a JSON object")
    keys = ("task", "arm", "seed", "model", "lora", "data", "optim", "pretrain", "finetune", "train.epochs")
    diffs = config_mismatch(saved, config_to_dict(config), keys)
    if diffs:
        raise ValueError(f"resume {workdir}: checkpoint was made with a different config ({', '.join(diffs[:5])})")


def _code_table(path: str, data: TaskData, config: ml_collections.ConfigDict) -> tuple[np.ndarray, Any]:
    """An embedding file as the model's code table (rows = vocab ids) and its coverage report; the code map and
    pickle opt-in of `med2vec.codes_path` / `med2vec.allow_pickle` apply."""
    return load_code_table(path, data.vocab,
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
    run = load_pretrained_run(config.init_from, label="init_from", task=init_task(config)) if config.init_from else None
    if run is not None:
        diffs = config_mismatch(run.config, config_to_dict(config), ("model",))
        if diffs:
            raise ValueError(f"init_from {run.path}: the pre-trained model has another architecture "
                             f"({', '.join(diffs)})")  # fmt: skip
        vocab = vocab or run.vocab
    data = build_task_data(config, task, vocab=vocab, cohort=cohort)
    check_evaluable(data)
    coverage = None

    def import_table(path: str) -> np.ndarray:
        nonlocal coverage
        table, coverage = _code_table(path, data, config)
        return table

    runs = {init_task(config): run} if run is not None else {}
    inputs = resolve_arm(run_arm(config), model_cfg=config.model, lora_cfg=config.lora, runs=runs,
                         learned_table=pretrained_table, import_table=import_table)  # fmt: skip
    trainer = build_trainer(
        data, model_cfg=inputs.model_cfg, optim_cfg=config.optim, data_cfg=config.data, trainable=inputs.trainable,
        seeds=seeds or (config.seed,), epochs=config.train.epochs, max_eval_patients=config.train.max_eval_patients,
        lora_cfg=inputs.lora_cfg, pretrained=inputs.pretrained, code_table=inputs.code_table,
        mesh=make_mesh(config.train.num_devices),
    )  # fmt: skip
    return trainer, coverage


def train(config: ml_collections.ConfigDict, cohort: Cohort | None = None) -> RunResult:
    """Run `config.task` for `config.arm`; see the module docstring for what is written where. `cohort`: the
    config's cohort for the task when the caller already holds it (it is not generated or read again)."""
    start_time = time.perf_counter()
    validate_config(config)
    config = run_model_config(config)  # an imported table's width is the model's, in config.json too
    workdir = _run_dir(config).absolute()
    # Everything is checked before the folder is made or touched: a failure leaves no folder and an existing
    # run is never replaced (a finished run is continued only with resume).
    # A resumed run locks its folder at once (a folder another process writes fails before any work); a new
    # run locks the folder it makes once everything is validated, and checks again under the lock.
    vocab = None
    lock = FolderLock(workdir) if is_writer() else None
    try:
        if config.resume:
            _check_resume(config, workdir)
            if lock is not None:
                lock.acquire()
                _check_resume(config, workdir)  # under the lock: its writer may have changed it meanwhile
            if (workdir / "vocab.json").is_file():
                vocab = Vocab.load(workdir / "vocab.json")
        else:
            check_output_folder(workdir, resume=False, marker="config.json", what="run")
        if is_writer():
            check_writable(workdir)
        sync("run folder checked")  # every process checked it before process 0 makes it
        trainer, coverage = build_run_trainer(config, vocab, cohort=cohort)
        if lock is not None and not config.resume:
            workdir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            check_output_folder(workdir, resume=False, marker="config.json", what="run")
        result = _train(config, trainer, coverage, workdir, start_time)
        sync("run written")  # no process reads the run's files (a benchmark stage does) before process 0 wrote them
        return result
    finally:
        if lock is not None:
            lock.release()


def _train(config: ml_collections.ConfigDict, trainer: Trainer, coverage: Any, workdir: Path,
           start_time: float) -> RunResult:  # fmt: skip
    """`train` once its folder is claimed."""
    task = config.task
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
        log.log({"event": "start", "step": 0, "task": task, "arm": task if task in PRETRAIN_TASKS else config.arm,
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
    return finish_run(trainer, result, workdir, log, task if task in PRETRAIN_TASKS else config.arm, start_time)


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
    if task in PRETRAIN_TASKS:
        baselines = baselines_of(trainer)
        log.log({"event": "baselines", "split": "test", "step": result.steps[seed_index], **baselines})
        test[seed_index]["baselines"] = baselines
        print(format_table({"model": test[seed_index], **baselines}))
    params = unstack(best, seed_index)
    if is_writer():
        if task not in PRETRAIN_TASKS:
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


def baselines_of(trainer: Trainer) -> dict[str, dict[str, float]]:
    """The baselines on exactly the held-out targets the trainer's pre-training evaluation scores (MLM: unigram
    and copy mixture, λ fitted on its validation patients; CLM: unigram and bigram, k fitted there), scored on
    its test patients."""
    return run_baselines(trainer.data, trainer.data_cfg, seed=trainer.seeds[0],
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
