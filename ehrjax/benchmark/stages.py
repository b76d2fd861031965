"""The benchmark's stages, each cached behind the manifest: a rerun with `--config.resume=DIR` skips what is done.

    cohorts -> pretrain_mlm -> pretrain_clm -> med2vec -> pretrain_med2vec_mlm -> finetune (arms x sizes x seeds)
        -> probe -> report

`pretrain_clm` (next-code pre-training), `med2vec` and `pretrain_med2vec_mlm` run only when an arm of the run
uses them.

The config is read here, at the edge; the pieces below (trainer, fit, grid cells, probe, report) take explicit
inputs. Every stage records its wall time and compile time; the summary (`summary.json`) is assembled from the
stage records alone, so a resumed benchmark reports exactly what an uninterrupted one would.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from ehrjax.atomic import read_json, write_json
from ehrjax.benchmark.grid import (
    CellData,
    assign_cells,
    cell_cost,
    cell_record_path,
    run_baseline_cell,
    run_ceiling_cell,
    run_neural_cell,
)
from ehrjax.benchmark.manifest import Manifest, cohort_fingerprint, patient_hashes, save_patient_hashes
from ehrjax.data.batching import to_device
from ehrjax.data.labels import OUTCOME_TASKS, outcome_labels, outcome_task
from ehrjax.data.tasks import make_task_data, task_cohort
from ehrjax.data.vocab import Vocab
from ehrjax.embeddings.io import load_code_table, validate_embedding_file, vocab_token_counts
from ehrjax.embeddings.med2vec import save_med2vec, train_med2vec
from ehrjax.multihost import is_writer, sync
from ehrjax.train.arms import Arm, arm_from_config
from ehrjax.train.loop import config_to_dict, pretrained_table, train, validate_cohort_sizes
from ehrjax.train.pretrained import PretrainedRun, load_pretrained_run
from ehrjax.train.resolve import ArmInputs, resolve_arm
from ehrjax.train.rundir import read_jsonl
from ehrjax.train.trainer import ProgramCache


def parse_list(text: str, key: str, cast: type = str) -> list[Any]:
    """A comma-separated config value as a list (`benchmark.train_sizes=250,1000`)."""
    items = [t.strip() for t in str(text).strip("()[] ").split(",") if t.strip()]
    try:
        return [cast(t) for t in items]
    except ValueError as err:
        raise ValueError(f"{key}={text!r}: expected comma-separated {cast.__name__} values") from err


@dataclasses.dataclass
class Plan:
    """The validated grid a config asks for."""

    arms: list[Arm]
    sizes: list[int]
    replicates: list[int]
    tasks: list[str]

    @property
    def neural(self) -> list[Arm]:
        return [a for a in self.arms if a.kind == "neural"]

    def needs(self, source: str) -> bool:
        """Whether any arm uses a pre-training (`mlm`, `clm`, `med2vec`, `med2vec_mlm`)."""
        return any(source in (a.code_table, a.encoder) for a in self.neural)


def validate(config: ml_collections.ConfigDict) -> Plan:
    """One-line errors for the benchmark's own settings, before any work."""
    b = config.benchmark
    names = parse_list(b.arms, "benchmark.arms")
    if not names:
        raise ValueError("benchmark.arms is empty; name some of " + ",".join(config.arms.keys()))
    arms = [arm_from_config(n, config.arms) for n in names]
    sizes = sorted(set(parse_list(b.train_sizes, "benchmark.train_sizes", int)))
    replicates = parse_list(b.replicates, "benchmark.replicates", int)
    tasks = parse_list(b.tasks, "benchmark.tasks")
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"benchmark.train_sizes={b.train_sizes!r}: expected positive labelled-set sizes")
    if not replicates or len(set(replicates)) != len(replicates) or min(replicates) < 0:
        raise ValueError(f"benchmark.replicates={b.replicates!r}: expected distinct non-negative integers")
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"benchmark.tasks={b.tasks!r}: expected distinct names of {sorted(OUTCOME_TASKS)}")
    for task in tasks:
        outcome_task(task)
    for key in ("pretrain_epochs", "finetune_max_steps", "finetune_eval_steps", "finetune_patience",
                "finetune_rows_per_batch", "max_val_patients", "n_boot"):  # fmt: skip
        if b[key] <= 0:
            raise ValueError(f"benchmark.{key} must be > 0, got {b[key]}")
    if b.finetune_schedule not in ("constant", "cosine"):
        raise ValueError(f"benchmark.finetune_schedule {b.finetune_schedule!r}: expected 'constant' or 'cosine'")
    validate_cohort_sizes(config)
    plan = Plan(arms=arms, sizes=sizes, replicates=replicates, tasks=tasks)
    if config.med2vec.path and plan.needs("med2vec"):
        # Read it now: a missing file, an unknown format or a pickle without the opt-in fails before any work.
        validate_embedding_file(config.med2vec.path, config.med2vec.codes_path or None,
                                config.med2vec.allow_pickle, label="med2vec.path")  # fmt: skip
    for arm in plan.neural:  # a user's table file: NaN, a wrong shape or a missing map fail before any work
        if arm.table_from_file:
            validate_embedding_file(arm.code_table, config.med2vec.codes_path or None, config.med2vec.allow_pickle,
                                    label=f"arms.{arm.name}.code_table")  # fmt: skip
    return plan


def stage_config(config: ml_collections.ConfigDict, **overrides: Any) -> ml_collections.ConfigDict:
    """A copy of `config` with dotted overrides (`train.epochs=3`)."""
    c = copy.deepcopy(config)
    for dotted, value in overrides.items():
        node = c
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


class Benchmark:
    """Runs the stages of one benchmark directory; `run()` returns the summary."""

    def __init__(self, config: ml_collections.ConfigDict, out: Path, *, resume: bool):
        self.config = config
        self.plan = validate(config)
        self.out = out
        self.start = time.perf_counter()
        self.started = dt.datetime.now().isoformat(timespec="seconds")
        self.resume = resume
        self.manifest = Manifest(out, config_to_dict(config), resume=resume)
        if resume:
            _check_same_config(self.manifest, config)
        self.programs = ProgramCache()
        self.stages: dict[str, dict[str, Any]] = {}
        self.progress = bool(config.train.progress) and is_writer()
        # The cohorts are cheap to make and decide whether the grid fits: check before anything is written.
        self.pretrain_cohort = task_cohort(config, "mlm")
        self.finetune_cohort = task_cohort(config, "outcome")
        if "outcome_p" not in self.finetune_cohort.labels:  # real data: no generator risk, no ceilings
            self.plan.arms = [a for a in self.plan.arms if a.kind != "oracle"]
        for task in self.plan.tasks:
            eligible = outcome_labels(self.finetune_cohort, task)[1] & self.finetune_cohort.split_mask("train")
            if max(self.plan.sizes) > int(eligible.sum()):
                raise ValueError(f"benchmark.train_sizes: {max(self.plan.sizes)} exceeds the {int(eligible.sum())} "
                                 f"training patients of the {task} task; raise finetune.num_patients")  # fmt: skip

    def say(self, text: str) -> None:
        tqdm.write(f"[{time.perf_counter() - self.start:6.1f}s] {text}")

    def _timed(self, name: str, fn: Any) -> Any:
        cached = self.manifest.done(name)
        if cached is not None:
            self.say(f"{name}: done in an earlier run, skipped")
            self.stages[name] = dict(cached["timing"], skipped=True)
            return cached["result"]
        self.say(f"{name}: running")
        t0, c0 = time.perf_counter(), self.programs.compile_seconds
        result = fn()
        timing = {"wall_s": time.perf_counter() - t0, "compile_s": self.programs.compile_seconds - c0}
        if isinstance(result, dict) and "compile_s" in result:
            timing["compile_s"] = result.pop("compile_s")
        timing["train_s"] = result.pop("train_s", timing["wall_s"]) if isinstance(result, dict) else timing["wall_s"]
        # Train and compile time are parts of the stage's wall time (a stage that reports none trains all of it
        # except its compiles).
        timing["compile_s"] = min(timing["compile_s"], timing["wall_s"])
        timing["train_s"] = min(timing["train_s"], timing["wall_s"] - timing["compile_s"])
        self.manifest.record(name, {"timing": timing, "result": result})
        self.stages[name] = dict(timing, skipped=False)
        self.say(f"{name}: {timing['wall_s']:.1f}s")
        return result

    # cohorts -------------------------------------------------------------------------------------------------
    def cohorts(self) -> dict[str, Any]:
        """Generate (or read) both cohorts and fingerprint them; on resume the fingerprints must match."""
        c = self.config
        fingerprints = {}
        for stream, cohort, section in (("pretrain", self.pretrain_cohort, c.pretrain),
                                        ("finetune", self.finetune_cohort, c.finetune)):  # fmt: skip
            hashes = patient_hashes(cohort)
            if is_writer():
                save_patient_hashes(self.out / "cohorts" / f"{stream}_patient_hashes.npz", hashes)
            fingerprints[stream] = {**cohort_fingerprint(cohort, hashes), "source": c.data.source,
                                    "seed": int(section.seed)}  # fmt: skip
        done = self.manifest.done("cohorts")
        if done is not None:
            for stream in ("pretrain", "finetune"):
                if done["result"][stream]["prefix_hash"] != fingerprints[stream]["prefix_hash"]:
                    raise ValueError(f"resume {self.out}: the {stream} cohort differs from the one this benchmark "
                                     "started with")  # fmt: skip
        return fingerprints

    # pre-training --------------------------------------------------------------------------------------------
    def _pretrain(self, name: str, embeddings_from: str = "", embed_dim: int | None = None,
                  task: str = "mlm") -> dict[str, Any]:  # fmt: skip
        c, directory = self.config, self.out / name
        overrides = {"task": task, "output_dir": str(directory), "resume": "", "init_from": "",
                     "embeddings_from": embeddings_from, "train.epochs": c.benchmark.pretrain_epochs}  # fmt: skip
        if embed_dim is not None:
            overrides["model.embed_dim"] = embed_dim
        if self.resume and (directory / "config.json").is_file():
            overrides["resume"] = str(directory)  # an interrupted pre-training continues where it stopped
            self.say(f"{name}: resuming the interrupted run in {directory}")
        result = train(stage_config(c, **overrides), cohort=self.pretrain_cohort)
        curve = []
        for r in read_jsonl(directory / "metrics.jsonl"):
            if r.get("event") == "train" or (r.get("event") == "eval" and r.get("split") == "val"):
                curve.append({"step": r["step"], "epoch": r["epoch"], "split": "train" if r["event"] == "train"
                              else "val", "loss": r["loss"]})  # fmt: skip
        test = {k: v for k, v in result.test.items() if k != "baselines"}
        label = "frozen Med2Vec table" if embeddings_from else "learned code table"
        return {"label": label if task == "mlm" else f"next-code prediction, {label}",
                "dir": name, "steps": result.steps, "wall_s": result.wall_seconds, "test": test,
                "baselines": result.test.get("baselines", {}), "curve": curve, "compile_s": result.compile_seconds,
                "train_s": result.wall_seconds - result.compile_seconds}  # fmt: skip

    def med2vec(self) -> dict[str, Any]:
        c, vocab = self.config, self.vocab
        if c.med2vec.path:
            path, source = Path(c.med2vec.path).absolute(), "file"
        else:
            cfg = copy.deepcopy(c.med2vec)
            cfg.dim = c.model.embed_dim  # trained here: at the model's width, so no width effect enters
            train_only = self.pretrain_cohort.select(self.pretrain_cohort.split_mask("train"))
            result = train_med2vec(train_only, vocab, cfg, progress=self.progress, log=self.say)
            path, source = self.out / "med2vec" / "med2vec.npz", "trained"
            if is_writer():  # every process trains the same table (seeded); process 0 writes it
                path.parent.mkdir(parents=True, exist_ok=True)
                path = save_med2vec(path, result.params, vocab)["npz"]
            sync("med2vec written")
        table, coverage = self._import(str(path))
        return {"source": source, "path": str(path), "dim": int(table.shape[1]),
                "coverage": {"vocab_share": coverage.vocab_share, "token_share": coverage.token_share,
                             "text": coverage.format()}}  # fmt: skip

    def _import(self, path: str) -> tuple[np.ndarray, Any]:
        c = self.config
        return load_code_table(path, self.vocab, codes_path=c.med2vec.codes_path or None,
                               allow_pickle=c.med2vec.allow_pickle, seed=c.seed,
                               code_counts=vocab_token_counts(self.pretrain_cohort, self.vocab))  # fmt: skip

    # fine-tuning ---------------------------------------------------------------------------------------------
    def _arm_inputs(self, arm: Arm) -> ArmInputs:
        def import_table(source: str) -> np.ndarray:
            return self._import(self.med2vec_path if source == "med2vec" else source)[0]

        return resolve_arm(arm, model_cfg=self.config.model, lora_cfg=self.config.lora, runs=self.runs,
                           learned_table=pretrained_table, import_table=import_table)  # fmt: skip

    def task_cell(self, task: str) -> CellData:
        """The task's data on the fine-tuning cohort, with the pre-training vocabulary, and its ceilings."""
        spec = outcome_task(task)
        data = make_task_data(self.finetune_cohort, "outcome", max_len=self.config.data.max_len, vocab=self.vocab,
                              outcome=task, time_tokens=self.config.data.time_tokens)  # fmt: skip
        labels = data.cohort.labels
        risk = labels.get(spec.risk)
        visible = labels.get(spec.visible_risk)
        val = data.splits["val"][: self.config.benchmark.max_val_patients]
        return CellData(task, data, None if risk is None else np.asarray(risk, np.float64),
                        None if visible is None else np.asarray(visible, np.float64), val)  # fmt: skip

    def finetune(self, cells: list[CellData]) -> dict[str, Any]:
        """Every grid cell, in order. In a job of several processes each cell runs on the one process
        `assign_cells` gives it, on that process's own device, and is written there; after a barrier every
        process reads the cells of the others."""
        c, plan, b = self.config, self.plan, self.config.benchmark
        data_cfg = stage_config(c, **{"data.rows_per_batch": b.finetune_rows_per_batch}).data
        optim_cfg = stage_config(c, **{"optim.schedule": b.finetune_schedule}).optim
        items = [(cell, arm, size) for cell in cells for arm in plan.arms
                 for size in (plan.sizes if arm.kind != "oracle" else [0])]  # fmt: skip
        owner = assign_cells([cell_cost(arm, size, len(plan.replicates), b.finetune_max_steps)
                              for _, arm, size in items], jax.process_count())  # fmt: skip
        records: dict[str, dict[str, Any]] = {}
        mine = [item for i, item in enumerate(items) if owner[i] == jax.process_index()]
        bar = tqdm(mine, desc="fine-tuning", unit="cell", disable=not self.progress, dynamic_ncols=True)
        corpora: dict[str, Any] = {}
        for cell, arm, size in bar:
            key = f"finetune/{cell.name}/{arm.name}/n{size}"
            done = self._cell_done(key, cell, arm, size)
            if done is not None:
                self.say(f"{key}: done in an earlier run, skipped")
                records[key] = done
                continue
            cell_tuning = params = None
            if arm.kind in ("logreg", "trees"):
                cell_runs, cell_tuning = run_baseline_cell(arm.kind, cell, size, plan.replicates, out=self.out,
                                                           arm=arm.name)  # fmt: skip
            elif arm.kind == "oracle":
                cell_runs = run_ceiling_cell(cell, out=self.out, arm=arm.name, visible=arm.ceiling == "visible")
            else:
                if cell.name not in corpora:
                    corpora[cell.name] = to_device(cell.data.corpus, cell.data.labels)
                self.programs.context = f"{cell.name}/{arm.name}/n{size}"
                cell_runs, cell_tuning, params = run_neural_cell(
                    self._arm_inputs(arm), cell, size, plan.replicates, arm.lr_grid, out=self.out,
                    optim_cfg=optim_cfg, data_cfg=data_cfg, max_steps=b.finetune_max_steps,
                    eval_steps=b.finetune_eval_steps, patience=b.finetune_patience, corpus=corpora[cell.name],
                    programs=self.programs,
                )  # fmt: skip
            records[key] = {"runs": cell_runs, "params": params, "tuning": cell_tuning}
            write_json(cell_record_path(self.out, cell.name, arm.name, size), records[key])
            self.manifest.record(key, records[key])
            bar.set_postfix_str(f"{cell.name} {arm.name} n={size}")
        sync("grid cells written")
        runs, tuning, arm_params = [], [], {}
        for cell, arm, size in items:
            key = f"finetune/{cell.name}/{arm.name}/n{size}"
            if key not in records:  # another process's cell
                records[key] = self._cell_done(key, cell, arm, size)
                if records[key] is None:
                    raise RuntimeError(f"{key}: no record after every process finished its cells")
            if self.manifest.done(key) is None:  # another process's, or resumed from its cell.json
                self.manifest.record(key, records[key])
            runs.extend(records[key]["runs"])
            if records[key].get("tuning"):
                tuning.append(records[key]["tuning"])
            arm_params.setdefault(arm.name, records[key].get("params"))
        return {"runs": runs, "tuning": tuning, "params": arm_params, "compiles": self.programs.num_compiles,
                "compile_log": [list(c) for c in self.programs.compiles]}

    def _cell_done(self, key: str, cell: CellData, arm: Arm, size: int) -> dict[str, Any] | None:
        """A finished cell's record: from the manifest, else from the file its process wrote."""
        done = self.manifest.done(key)
        path = cell_record_path(self.out, cell.name, arm.name, size)
        if done is None and path.is_file():
            done = read_json(path, f"benchmark cell record {key}")
        return done

    def probe(self, cell: CellData) -> dict[str, Any]:
        """A linear probe of the frozen MLM encoder on the first task, trained on as many patients as the
        largest labelled set (the first of replicate 0's draw), tuned on the grid's validation patients."""
        from ehrjax.benchmark.grid import replicate_rows
        from ehrjax.eval.probe import run_probe

        run, data = self.runs["mlm"], cell.data
        train = replicate_rows(data.splits["train"], self.plan.replicates[0], max(self.plan.sizes))
        data = dataclasses.replace(data, splits=dict(data.splits, train=train, val=cell.val))
        result = run_probe(run.model_cfg, run.params, data, self.config.data, self.config.seed,
                           n_boot=self.config.benchmark.n_boot, risk=outcome_task(cell.name).risk)  # fmt: skip
        arms = {k: {"auroc": v["auroc"], "ci": [v["ci_low"], v["ci_high"]]} for k, v in result["arms"].items()}
        differences = {k: {"mean": v["delta"], "ci": [v["ci_low"], v["ci_high"]]}
                       for k, v in result["differences"].items()}  # fmt: skip
        return {"task": cell.name, "n_train": int(result["n"]["train"]), "n_val": int(result["n"]["val"]),
                "n_test": int(result["n"]["test"]), "arms": arms, "differences": differences}  # fmt: skip

    # the whole -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        c, plan = self.config, self.plan
        if self.manifest.done("cohorts") is not None:
            self.cohorts()  # a resumed benchmark's cohorts must match the recorded fingerprints
        cohorts = self._timed("cohorts", self.cohorts)
        pre = {"mlm": self._timed("pretrain_mlm", lambda: self._pretrain("pretrain_mlm"))}
        self.runs: dict[str, PretrainedRun] = {"mlm": load_pretrained_run(self.out / "pretrain_mlm", task="mlm")}
        self.vocab: Vocab = self.runs["mlm"].vocab
        if plan.needs("clm"):
            pre["clm"] = self._timed("pretrain_clm", lambda: self._pretrain("pretrain_clm", task="clm"))
            self.runs["clm"] = load_pretrained_run(self.out / "pretrain_clm", task="clm")
            if self.runs["clm"].vocab != self.vocab:
                raise ValueError(f"{self.out / 'pretrain_clm'}: its vocabulary differs from pretrain_mlm's; both are "
                                 "built from the pre-training cohort's training split")  # fmt: skip
        med2vec = None
        if plan.needs("med2vec") or plan.needs("med2vec_mlm"):
            med2vec = self._timed("med2vec", self.med2vec)
            med2vec["wall_s"] = self.stages["med2vec"]["wall_s"]
            self.med2vec_path = med2vec["path"]
            if plan.needs("med2vec_mlm"):
                pre["med2vec_mlm"] = self._timed("pretrain_med2vec_mlm", lambda: self._pretrain(
                    "pretrain_med2vec_mlm", embeddings_from=self.med2vec_path, embed_dim=med2vec["dim"]))  # fmt: skip
                self.runs["med2vec_mlm"] = load_pretrained_run(self.out / "pretrain_med2vec_mlm", task="mlm")
        cells = [self.task_cell(task) for task in plan.tasks]
        grid = self._timed("finetune", lambda: self.finetune(cells))
        probe = None
        if not is_writer():  # the probe and the report are process 0's
            return {}
        if c.benchmark.probe and cells[0].risk is not None:
            probe = self._timed("probe", lambda: self.probe(cells[0]))
        return self.summary(cohorts, pre, med2vec, grid, probe, cells)

    def roles(self) -> dict[str, Any]:
        r = self.config.benchmark.roles
        pairs = [p.split(":") for p in parse_list(r.table_pairs, "benchmark.roles.table_pairs")]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"benchmark.roles.table_pairs={r.table_pairs!r}: expected learned:third_party pairs")
        ceilings = {a.name: {"column": "outcome_p_visible" if a.ceiling == "visible" else "outcome_p",
                             "label": "risk given the visible record" if a.ceiling == "visible" else "true risk"}
                    for a in self.plan.arms if a.kind == "oracle"}  # fmt: skip
        return {"reference": r.reference, "pretrained_lora": r.pretrained_lora,
                "baselines": parse_list(r.baselines, "benchmark.roles.baselines"), "table_pairs": pairs,
                "trainable_contrast": r.trainable_contrast, "ceilings": ceilings}  # fmt: skip

    def summary(self, cohorts: dict, pre: dict, med2vec: dict | None, grid: dict, probe: dict | None,
                cells: list[CellData]) -> dict[str, Any]:  # fmt: skip
        c, plan = self.config, self.plan
        cohorts = copy.deepcopy(cohorts)
        tasks = []
        for cell in cells:
            data, y = cell.data, cell.data.labels[:, 0]
            splits = dict(data.splits, val=cell.val)
            n_test, positives = len(splits["test"]), int(y[splits["test"]].sum())
            tasks.append({
                "name": cell.name, "title": outcome_task(cell.name).title,
                "splits": {k: len(v) for k, v in splits.items()},
                "prevalence": {k: float(y[v].mean()) for k, v in splits.items()},
                "sizing": {"target_half_width": float(c.benchmark.ci_half_width),
                           "expected_half_width": auroc_half_width(0.75, positives, n_test - positives),
                           "n_test": n_test, "n_test_positive": positives},
            })  # fmt: skip
        arms = {}
        for arm in plan.arms:
            entry = {"description": arm.description, "kind": arm.kind, "code_table": arm.code_table,
                     "encoder": arm.encoder, "lora": arm.lora}  # fmt: skip
            if arm.kind == "neural":
                entry["tuning"] = {"param": "learning_rate", "grid": list(arm.lr_grid)}
            params = grid["params"].get(arm.name)
            if arm.kind == "neural" and params:
                embed_dim = (med2vec["dim"] if (med2vec and arm.code_table == "med2vec") else c.model.embed_dim)
                by_label = params.get("by_label", {})
                trainable = set(params.get("trainable_labels", arm.trainable))
                split = {"adapters": by_label.get("lora", 0) if "lora" in trainable else 0,
                         "head": by_label.get("head", 0) if "head" in trainable else 0}
                split["rest"] = int(params["trainable"]) - split["adapters"] - split["head"]
                entry.update(trainable=list(arm.trainable), embed_dim=int(embed_dim), params_total=params["total"],
                             params_trainable=params["trainable"], trainable_pct=params["trainable_pct"],
                             params_split=split)  # fmt: skip
            arms[arm.name] = entry
        summary = {
            "name": c.name, "config": config_to_dict(c), "started": self.started,
            "wall_s": time.perf_counter() - self.start, "device": device_name(), "cuts": cuts_of(c),
            "tasks": tasks, "train_sizes": plan.sizes, "replicates": plan.replicates, "roles": self.roles(),
            "cohorts": cohorts, "stages": self.stages, "pretraining": pre, "arms": arms, "runs": grid["runs"],
            "tuning": grid["tuning"],
            "compiles": {"finetune": grid.get("compiles", 0), "finetune_log": grid.get("compile_log", [])},
        }  # fmt: skip
        if med2vec is not None:
            summary["med2vec"] = med2vec
        if probe is not None:
            summary["probe"] = probe
        return summary


def auroc_half_width(auroc: float, positives: int, negatives: int) -> float:
    """The 95% half-width of one AUROC on a test set of this make-up (Hanley & McNeil's standard error)."""
    if positives <= 0 or negatives <= 0:
        return float("nan")
    q1, q2 = auroc / (2 - auroc), 2 * auroc**2 / (1 + auroc)
    var = (auroc * (1 - auroc) + (positives - 1) * (q1 - auroc**2) + (negatives - 1) * (q2 - auroc**2))
    return float(1.96 * np.sqrt(var / (positives * negatives)))


# `train` settings that say how a job runs, not what it computes: a resume may change them (another cache
# folder, another process count or coordinator; every process of a job has its own process_id).
JOB_KEYS = ("compilation_cache", "distributed", "coordinator_address", "num_processes", "process_id",
            "heartbeat_timeout_s")  # fmt: skip


def _check_same_config(manifest: Manifest, config: ml_collections.ConfigDict) -> None:
    if not manifest.path.is_file():
        raise ValueError(f"resume {manifest.path.parent}: no manifest.json; not a benchmark directory")
    def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
        return dict(cfg, train={k: v for k, v in cfg.get("train", {}).items() if k not in JOB_KEYS})

    saved = comparable(json.loads(manifest.path.read_text())["config"])
    current = comparable(config_to_dict(config))
    ignore = {"resume", "output_dir"}
    diffs = sorted(k for k in set(saved) | set(current) if k not in ignore and saved.get(k) != current.get(k))
    if diffs:
        raise ValueError(f"resume {manifest.path.parent}: the benchmark was started with another config "
                         f"(differs in {', '.join(diffs)})")  # fmt: skip


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        import os

        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return f"{d.device_kind} x {jax.device_count()}"


def cuts_of(config: ml_collections.ConfigDict) -> list[str]:
    """What this config cut, in words (the config's own note)."""
    return [line.strip() for line in str(config.benchmark.cuts).split(";") if line.strip()]
