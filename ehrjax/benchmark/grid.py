"""The fine-tuning grid: arms x labelled-set sizes x seeds, without fixed costs per run.

The task data is built once (nested sizes are prefixes of its training split) and its corpus goes to the device
once; the seeds of an arm train together (one vmapped step); runs of equal structure share compiled steps
(`ehrjax.train.trainer.ProgramCache`). Every finished (arm, size) cell writes, per seed, `predictions.npz`
(validation and test patients) and `metrics.jsonl` (the epoch history), then is recorded in the manifest, so an
interrupted grid resumes at the next cell.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from ehrjax.data.batching import DeviceCorpus
from ehrjax.data.tasks import TaskData
from ehrjax.eval.logreg import bag_of_codes_features, fit_logreg
from ehrjax.train.arms import Arm
from ehrjax.train.fit import evaluate, fit
from ehrjax.train.loop import run_predictions
from ehrjax.train.rundir import RunLog, predictions_arrays, write_npz
from ehrjax.train.trainer import ProgramCache, build_trainer


@dataclasses.dataclass(frozen=True)
class ArmInputs:
    """What a neural arm starts from, resolved from its sources: the model config (its embed_dim may differ
    for an imported table), pre-trained parameters (or None), a code table (or None) and what trains."""

    arm: Arm
    model_cfg: ml_collections.ConfigDict
    pretrained: nnx.State | None
    code_table: np.ndarray | None
    trainable: tuple[str, ...]
    lora_cfg: ml_collections.ConfigDict | None


def cell_dir(out: Path, arm: str, size: int, seed: int) -> Path:
    return out / "runs" / arm / f"n{size}" / f"seed{seed}"


def write_predictions(directory: Path, data: TaskData, arrays: dict[str, np.ndarray]) -> None:
    """`predictions.npz`; on MEDS data also the test rows in MEDS-DEV's prediction schema
    (`test_predictions.parquet`, for the `meds-evaluation` scorer)."""
    write_npz(directory / "predictions.npz", arrays)
    times = data.cohort.labels.get("prediction_time")
    if times is not None:
        from ehrjax.data.meds import write_meds_predictions

        row_of = {int(p): i for i, p in enumerate(data.cohort.patient_id)}
        test = arrays["split"] == "test"
        rows = np.asarray([row_of[int(p)] for p in arrays["patient_id"][test]])
        write_meds_predictions(directory / "test_predictions.parquet", arrays["patient_id"][test],
                               np.asarray(times)[rows], arrays["label"][test] > 0.5,
                               arrays["probability"][test])  # fmt: skip


def run_neural_cell(
    inputs: ArmInputs,
    data: TaskData,
    size: int,
    seeds: Sequence[int],
    *,
    out: Path,
    optim_cfg: ml_collections.ConfigDict,
    data_cfg: ml_collections.ConfigDict,
    epochs: int,
    patience: int,
    max_eval_patients: int,
    corpus: DeviceCorpus,
    programs: ProgramCache,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train the arm's seeds on the first `size` training patients; write every seed's files. Returns the
    run records (one per seed) and the arm's parameter counts."""
    start = time.perf_counter()
    compile_before = programs.compile_seconds
    trainer = build_trainer(
        data.with_train_size(size), model_cfg=inputs.model_cfg, optim_cfg=optim_cfg, data_cfg=data_cfg,
        trainable=inputs.trainable, seeds=seeds, epochs=epochs, max_eval_patients=max_eval_patients,
        lora_cfg=inputs.lora_cfg, pretrained=inputs.pretrained, code_table=inputs.code_table, corpus=corpus,
        programs=programs,
    )  # fmt: skip
    result = fit(trainer, patience=patience)
    t0 = time.perf_counter()
    _, val_pred = evaluate(trainer, result.best_params, trainer.val_batcher)
    _, test_pred = evaluate(trainer, result.best_params, trainer.test_batcher)
    final_eval = time.perf_counter() - t0
    wall = time.perf_counter() - start
    compile_s = programs.compile_seconds - compile_before
    runs = []
    for s, seed in enumerate(trainer.seeds):
        directory = cell_dir(out, inputs.arm.name, size, seed)
        write_predictions(directory, data, run_predictions(data, {"val": val_pred, "test": test_pred}, s))
        log = RunLog(directory / "metrics.jsonl")
        for record in result.history[s]:
            log.log({"event": "epoch", **record})
        curve = [{"epoch": h["epoch"], "train_loss": h["train_loss"], "val_loss": h.get("val_loss"),
                  "val_auroc": h.get("val_auroc")} for h in result.history[s]]  # fmt: skip
        runs.append({
            "arm": inputs.arm.name, "size": size, "seed": seed,
            "predictions": str((directory / "predictions.npz").relative_to(out)),
            "best_epoch": result.best_epoch[s], "epochs_run": result.epochs_run[s], "steps": result.steps[s],
            "wall_s": wall / len(seeds), "train_s": result.train_seconds / len(seeds),
            "compile_s": compile_s / len(seeds), "real_tokens_per_s": result.real_tokens_per_s, "curve": curve,
            "group_wall_s": wall, "group_train_s": result.train_seconds,
            "group_eval_s": result.eval_seconds + final_eval,
            "group_compile_s": compile_s, "group_seeds": len(seeds),
        })  # fmt: skip
    return runs, trainer.report.as_dict()


def _val_test_rows(data: TaskData) -> tuple[np.ndarray, np.ndarray]:
    rows = np.concatenate([data.splits["val"], data.splits["test"]])
    split = np.concatenate([np.full(len(data.splits["val"]), "val"), np.full(len(data.splits["test"]), "test")])
    return rows, split


def run_logreg_cell(data: TaskData, size: int, *, out: Path, arm: str = "logreg") -> list[dict[str, Any]]:
    """Bag-of-codes logistic regression on the first `size` training patients (C chosen on validation)."""
    start = time.perf_counter()
    train = data.splits["train"][:size]
    rows, split = _val_test_rows(data)
    vocab_size, y = len(data.vocab), data.labels[:, 0]
    features = bag_of_codes_features(data.corpus, np.concatenate([train, rows]), vocab_size,
                                     sex=data.cohort.sex[np.concatenate([train, rows])])  # fmt: skip
    x_train, x_rest = features[: len(train)], features[len(train):]
    val = np.arange(len(data.splits["val"]))
    fit_result = fit_logreg(x_train, y[train], x_rest[val], y[rows][val])
    probability = fit_result.predict_proba(x_rest)
    return [_reference_run(data, arm, size, rows, split, probability, out, time.perf_counter() - start)]


def run_oracle_cell(data: TaskData, size: int, *, out: Path, arm: str = "oracle") -> list[dict[str, Any]]:
    """The generator's true probability `outcome_p` on the same validation and test patients."""
    if "outcome_p" not in data.cohort.labels:
        raise ValueError("arm 'oracle': the cohort has no true risk 'outcome_p' (real data); drop the arm")
    rows, split = _val_test_rows(data)
    probability = np.asarray(data.cohort.labels["outcome_p"], dtype=np.float64)[rows]
    return [_reference_run(data, arm, size, rows, split, probability, out, 0.0)]


def _reference_run(
    data: TaskData, arm: str, size: int, rows: np.ndarray, split: np.ndarray, probability: np.ndarray, out: Path,
    wall: float,
) -> dict[str, Any]:
    outcome_p = data.cohort.labels.get("outcome_p")
    directory = cell_dir(out, arm, size, 0)
    write_predictions(directory, data, predictions_arrays(
        patient_id=data.cohort.patient_id[rows], split=split, label=data.labels[rows, 0], probability=probability,
        outcome_p=None if outcome_p is None else np.asarray(outcome_p, dtype=np.float64)[rows],
    ))  # fmt: skip
    return {"arm": arm, "size": size, "seed": 0, "predictions": str((directory / "predictions.npz").relative_to(out)),
            "best_epoch": -1, "epochs_run": 0, "steps": 0, "wall_s": wall, "train_s": wall, "compile_s": 0.0,
            "real_tokens_per_s": float("nan"), "curve": []}  # fmt: skip


CellRunner = Callable[[], list[dict[str, Any]]]
