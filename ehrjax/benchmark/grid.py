"""The fine-tuning grid: tasks x arms x labelled-set sizes x replicates, tuned on validation.

A replicate fixes a labelled subset (its own draw from the task's training pool; the sizes of one replicate
are nested prefixes of that draw), the model's initial draw and the data order. A neural cell (task, arm,
size) trains every learning-rate candidate of the arm's grid for every replicate as the members of ONE
vmapped program (the learning rate is state, so this costs no compile), with early stopping on the
validation loss per member; the candidate with the lowest mean (over replicates) best validation loss is
chosen, and its replicates are the cell's reported runs. The non-neural baselines (logistic regression on code
counts, gradient-boosted trees on count / recency features) tune their own setting on the same validation
patients, per replicate. The ceilings (the true risk and the risk given the visible record) are one run each.

Every finished cell writes, per replicate, `predictions.npz` (validation and test patients) and
`metrics.jsonl` (the evaluation history), then is recorded in the manifest, so an interrupted grid resumes at
the next cell.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from ehrjax.data.batching import DeviceCorpus
from ehrjax.data.tasks import TaskData
from ehrjax.eval.logreg import bag_of_codes_features, fit_logreg
from ehrjax.eval.trees import fit_trees, frequent_codes, tabular_features
from ehrjax.train.arms import Arm
from ehrjax.train.fit import evaluate, fit
from ehrjax.train.resolve import ArmInputs
from ehrjax.train.rundir import RunLog, predictions_arrays, write_npz
from ehrjax.train.trainer import ProgramCache, build_trainer

SUBSET_SEED = 7919  # labelled subsets: replicate r draws permutation([SUBSET_SEED, r]) of the training pool


def replicate_rows(train: np.ndarray, replicate: int, size: int) -> np.ndarray:
    """The labelled set of `replicate` at `size`: the first `size` of the replicate's own permutation of the
    training pool `train` (so the sizes of one replicate are nested, and replicates draw different sets)."""
    if size > len(train):
        raise ValueError(f"labelled-set size {size} exceeds the {len(train)} training patients of the task")
    order = np.random.default_rng([SUBSET_SEED, int(replicate)]).permutation(len(train))
    return np.sort(train[order[:size]])


def cell_folder(out: Path, task: str, arm: str, size: int) -> Path:
    return out / "runs" / task / arm / f"n{size}"


def cell_dir(out: Path, task: str, arm: str, size: int, replicate: int) -> Path:
    return cell_folder(out, task, arm, size) / f"rep{replicate}"


def cell_record_path(out: Path, task: str, arm: str, size: int) -> Path:
    """A finished cell's record (its runs, tuning and parameter counts), written by the process that ran it:
    a resumed grid skips the cell whichever process ran it."""
    return cell_folder(out, task, arm, size) / "cell.json"


def cell_cost(arm: Arm, size: int, replicates: int, max_steps: int) -> float:
    """A rough relative cost of one grid cell, for spreading cells over processes: a neural cell trains every
    (learning rate, replicate) member for at most `max_steps` steps (fewer on a small labelled set that stops
    early) plus a fixed cost for compiling and evaluating; a baseline fits per replicate; a ceiling is free."""
    if arm.kind == "oracle":
        return 0.0
    if arm.kind != "neural":
        return 0.05 * replicates * (1.0 + size / 100.0)
    return max(1, len(arm.lr_grid)) * replicates * min(max_steps, 10.0 + size / 4.0) + 50.0


def assign_cells(costs: Sequence[float], num_processes: int) -> list[int]:
    """The process of each cell: longest first onto the least-loaded process (ties to the lower index), the
    same on every process."""
    load = [0.0] * num_processes
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        p = min(range(num_processes), key=lambda q: (load[q], q))
        owner[i] = p
        load[p] += costs[i]
    return owner


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


@dataclasses.dataclass(frozen=True)
class CellData:
    """A task's data as the grid sees it: the task data, its ceilings' columns (true and visible risk; None on
    real data) and the validation patients every arm is tuned and stopped on."""

    name: str
    data: TaskData
    risk: np.ndarray | None
    visible_risk: np.ndarray | None
    val: np.ndarray

    def ceilings(self, rows: np.ndarray) -> dict[str, np.ndarray | None]:
        return {"outcome_p": None if self.risk is None else self.risk[rows],
                "outcome_p_visible": None if self.visible_risk is None else self.visible_risk[rows]}  # fmt: skip

    def eval_rows(self) -> tuple[np.ndarray, np.ndarray]:
        test = self.data.splits["test"]
        rows = np.concatenate([self.val, test])
        return rows, np.concatenate([np.full(len(self.val), "val"), np.full(len(test), "test")])


def _prediction_file(cell: CellData, rows: np.ndarray, split: np.ndarray, probability: np.ndarray,
                     logit: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    arrays = predictions_arrays(patient_id=cell.data.cohort.patient_id[rows], split=split,
                                label=cell.data.labels[rows, 0], probability=probability, logit=logit,
                                outcome_p=cell.ceilings(rows)["outcome_p"])  # fmt: skip
    visible = cell.ceilings(rows)["outcome_p_visible"]
    arrays["outcome_p_visible"] = np.full(len(rows), np.nan) if visible is None else visible.astype(np.float64)
    return arrays


def convergence(history: list[dict[str, float]], seconds_per_step: float) -> tuple[int | None, float | None]:
    """Optimizer steps (and seconds) to the first evaluation whose validation AUROC reaches 95% of the run's
    own best gain over chance (0.5); None when the run never rose above chance."""
    aurocs = [h.get("val_auroc", float("nan")) for h in history]
    finite = [a for a in aurocs if np.isfinite(a)]
    if not finite or max(finite) <= 0.5:
        return None, None
    target = 0.5 + 0.95 * (max(finite) - 0.5)
    step = next(int(h["step"]) for h, a in zip(history, aurocs, strict=True) if np.isfinite(a) and a >= target)
    return step, step * seconds_per_step


def choose_candidate(best_loss: np.ndarray) -> int:
    """The candidate (row of best_loss f64[candidates, replicates], each replicate's best validation loss) with
    the lowest mean over replicates; a candidate with a non-finite loss in any replicate (diverged, or never
    evaluated) is never chosen unless all are; ties go to the earlier candidate."""
    mean = np.asarray(best_loss, dtype=np.float64).mean(axis=1)
    finite = np.isfinite(mean)
    return int(np.argmin(np.where(finite, mean, np.inf))) if finite.any() else 0


def run_neural_cell(
    inputs: ArmInputs,
    cell: CellData,
    size: int,
    replicates: Sequence[int],
    learning_rates: Sequence[float],
    *,
    out: Path,
    optim_cfg: ml_collections.ConfigDict,
    data_cfg: ml_collections.ConfigDict,
    max_steps: int,
    eval_steps: int,
    patience: int,
    corpus: DeviceCorpus,
    programs: ProgramCache,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Train every (learning rate, replicate) member on its replicate's labelled set of `size` in one
    vmapped program; choose the learning rate by mean best validation loss; write the chosen replicates'
    files. Returns their run records, the tuning record and the arm's parameter counts.

    Budget: at most `max_steps` optimizer steps per member (whole epochs), an evaluation every
    ceil(eval_steps / steps per epoch) epochs, early stopping after `patience` evaluations without a lower
    validation loss. The budget is the same for every arm."""
    start = time.perf_counter()
    compile_before = programs.compile_seconds
    data = cell.data
    rates = [float(r) for r in learning_rates]
    members = [(r, rate) for rate in rates for r in replicates]
    data_eval = dataclasses.replace(data, splits=dict(data.splits, val=cell.val))
    probe = build_trainer(
        data_eval, model_cfg=inputs.model_cfg, optim_cfg=optim_cfg, data_cfg=data_cfg, trainable=inputs.trainable,
        seeds=[m[0] for m in members], epochs=1, max_eval_patients=len(cell.val), lora_cfg=inputs.lora_cfg,
        pretrained=inputs.pretrained, code_table=inputs.code_table, corpus=corpus, programs=programs,
        train_patients=[replicate_rows(data.splits["train"], r, size) for r, _ in members],
        learning_rates=[m[1] for m in members],
    )  # fmt: skip
    per_epoch = probe.steps_per_epoch
    eval_every = max(1, -(-eval_steps // per_epoch))
    epochs = max(eval_every, max_steps // per_epoch)
    trainer = dataclasses.replace(probe, epochs=epochs)
    result = fit(trainer, patience=patience, metric="loss", eval_every=eval_every)
    best_loss = np.asarray(result.best_metric).reshape(len(rates), len(replicates))
    chosen = choose_candidate(best_loss)
    picked = [chosen * len(replicates) + i for i in range(len(replicates))]
    params = jax.tree.map(lambda x: x[np.asarray(picked)], result.best_params)
    t0 = time.perf_counter()
    _, val_pred = evaluate(trainer, params, trainer.val_batcher)
    _, test_pred = evaluate(trainer, params, trainer.test_batcher)
    final_eval = time.perf_counter() - t0
    wall = time.perf_counter() - start
    compile_s = programs.compile_seconds - compile_before
    total_steps = float(sum(result.steps)) or 1.0
    per_member_step = result.train_seconds / total_steps  # this member's share of the vmapped program
    rows, split = cell.eval_rows()
    runs = []
    for i, (m, replicate) in enumerate(zip(picked, replicates, strict=True)):
        directory = cell_dir(out, cell.name, inputs.arm.name, size, replicate)
        by_split = {"val": val_pred, "test": test_pred}
        logit = np.concatenate([by_split[s]["logits"][i, :, 0] for s in ("val", "test")])
        order = np.concatenate([by_split[s]["patient"] for s in ("val", "test")])
        if not np.array_equal(order, rows):
            raise RuntimeError("evaluation rows are not in the grid's val/test order")
        write_predictions(directory, data, _prediction_file(cell, rows, split, 1.0 / (1.0 + np.exp(-logit)), logit))
        history = result.history[m]
        log = RunLog(directory / "metrics.jsonl", owner=True)  # the cell's own process writes its files
        for record in history:
            log.log({"event": "eval", "split": "val", **record, "epoch": record["epoch"] + 1})
        steps_95, seconds_95 = convergence(history, per_member_step)
        best = next(h for h in history if h["epoch"] == result.best_epoch[m]) if result.best_epoch[m] >= 0 else {}
        runs.append({
            "task": cell.name, "arm": inputs.arm.name, "size": size, "replicate": int(replicate),
            "seed": int(replicate), "predictions": str((directory / "predictions.npz").relative_to(out)),
            "hparam": {"learning_rate": rates[chosen]},
            "best_epoch": result.best_epoch[m] + 1, "epochs_run": result.epochs_run[m], "steps": result.steps[m],
            "steps_to_95": steps_95, "seconds_to_95": seconds_95,
            "val_loss": best.get("val_loss"), "val_auroc": best.get("val_auroc"),
            "wall_s": wall / len(members), "train_s": result.steps[m] * per_member_step,
            "compile_s": compile_s / len(members), "real_tokens_per_s": result.real_tokens_per_s,
            "curve": [{"epoch": h["epoch"] + 1, "step": h["step"], "seconds": h["step"] * per_member_step,
                       "train_loss": h["train_loss"], "val_loss": h.get("val_loss"), "val_auroc": h.get("val_auroc")}
                      for h in history],
            "group_wall_s": wall, "group_train_s": result.train_seconds,
            "group_eval_s": result.eval_seconds + final_eval,
            "group_compile_s": compile_s, "group_members": len(members),
        })  # fmt: skip
    val_auroc = [[next((h.get("val_auroc") for h in result.history[c * len(replicates) + i]
                        if h["epoch"] == result.best_epoch[c * len(replicates) + i]), float("nan"))
                  for i in range(len(replicates))] for c in range(len(rates))]  # fmt: skip
    tuning = {"task": cell.name, "arm": inputs.arm.name, "size": size, "param": "learning_rate",
              "candidates": rates, "val_loss": best_loss.mean(axis=1).tolist(),
              "val_auroc": np.nanmean(np.asarray(val_auroc, dtype=float), axis=1).tolist(),
              "chosen": rates[chosen]}  # fmt: skip
    return runs, tuning, trainer.report.as_dict()


def _reference_run(cell: CellData, arm: str, size: int, replicate: int, probability: np.ndarray, out: Path,
                   wall: float, hparam: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    rows, split = cell.eval_rows()
    directory = cell_dir(out, cell.name, arm, size, replicate)
    write_predictions(directory, cell.data, _prediction_file(cell, rows, split, probability))
    return {"task": cell.name, "arm": arm, "size": size, "replicate": int(replicate), "seed": int(replicate),
            "predictions": str((directory / "predictions.npz").relative_to(out)), "hparam": hparam,
            "best_epoch": None, "epochs_run": 0, "steps": 0, "steps_to_95": None, "seconds_to_95": None,
            "wall_s": wall, "train_s": wall, "compile_s": 0.0, "real_tokens_per_s": None, "curve": []}  # fmt: skip


def run_baseline_cell(kind: str, cell: CellData, size: int, replicates: Sequence[int], *, out: Path,
                      arm: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """`logreg` (code counts + age + sex, C tuned) or `trees` (count / recency / first-seen features + age, sex,
    visit counts; tree size and boosting rounds tuned) on every replicate's labelled set, each tuned on the
    validation patients by log loss. Returns the runs and the tuning record."""
    data, y = cell.data, cell.data.labels[:, 0]
    rows, _ = cell.eval_rows()
    runs, chosen, losses = [], [], []
    for replicate in replicates:
        start = time.perf_counter()
        train = replicate_rows(data.splits["train"], replicate, size)
        every = np.concatenate([train, rows])
        if kind == "logreg":
            x = bag_of_codes_features(data.corpus, every, len(data.vocab), sex=data.cohort.sex[every])
        else:
            code_end = data.vocab.code_end
            x = tabular_features(data.corpus, data.cohort, every,
                                 frequent_codes(data.corpus, train, code_end=code_end), code_end=code_end)  # fmt: skip
        x_train, x_rest = x[: len(train)], x[len(train):]
        x_val = x_rest[: len(cell.val)]
        if kind == "logreg":
            fitted = fit_logreg(x_train, y[train], x_val, y[cell.val])
            hparam, grid_losses = {"C": fitted.C}, list(fitted.val_log_losses.values())
            candidates = list(fitted.val_log_losses)
        else:
            fitted = fit_trees(x_train, y[train], x_val, y[cell.val])
            name = "max_leaf_nodes"
            hparam = {name: fitted.params[name], "rounds": fitted.params["max_iter"]}
            grid_losses = list(fitted.val_log_losses)
            candidates = [c[name] for c in fitted.candidates]
        chosen.append(next(iter(hparam.values())))
        losses.append(grid_losses)
        runs.append(_reference_run(cell, arm, size, replicate, fitted.predict_proba(x_rest), out,
                                   time.perf_counter() - start, hparam))  # fmt: skip
    tuning = {"task": cell.name, "arm": arm, "size": size, "param": next(iter(runs[0]["hparam"])),
              "candidates": candidates, "val_loss": np.mean(losses, axis=0).tolist(), "chosen": chosen}  # fmt: skip
    return runs, tuning


def run_ceiling_cell(cell: CellData, *, out: Path, arm: str, visible: bool) -> list[dict[str, Any]]:
    """A ceiling on the same validation and test patients: the true risk, or the risk given the record."""
    risk = cell.visible_risk if visible else cell.risk
    if risk is None:
        raise ValueError(f"arm {arm!r}: the cohort has no generator risk (real data); drop the arm")
    rows, _ = cell.eval_rows()
    return [_reference_run(cell, arm, 0, 0, np.asarray(risk, dtype=np.float64)[rows], out, 0.0, {})]
