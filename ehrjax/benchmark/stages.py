"""The benchmark's stages, each cached behind the manifest: a rerun with `--config.resume=DIR` skips what is done.

    cohorts -> pretrain_mlm -> med2vec -> pretrain_med2vec_mlm -> finetune (arms x sizes x seeds) -> probe -> report

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

from ehrjax.benchmark.grid import ArmInputs, run_logreg_cell, run_neural_cell, run_oracle_cell
from ehrjax.benchmark.manifest import Manifest, cohort_fingerprint, patient_hashes, save_patient_hashes
from ehrjax.data.batching import to_device
from ehrjax.data.labels import outcome_labels
from ehrjax.data.tasks import TaskData, make_task_data, task_cohort
from ehrjax.data.vocab import Vocab
from ehrjax.embeddings.io import load_code_table, read_code_vectors, vocab_token_counts
from ehrjax.embeddings.med2vec import save_med2vec, train_med2vec
from ehrjax.train.arms import Arm, arm_from_config, arm_lora_config
from ehrjax.train.loop import config_to_dict, pretrained_table, train, validate_cohort_sizes
from ehrjax.train.pretrained import PretrainedRun, load_pretrained_run
from ehrjax.train.trainer import ProgramCache

STAGES: tuple[str, ...] = ("cohorts", "pretrain_mlm", "med2vec", "pretrain_med2vec_mlm", "finetune", "probe",
                           "report")  # fmt: skip


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
    seeds: list[int]

    @property
    def neural(self) -> list[Arm]:
        return [a for a in self.arms if a.kind == "neural"]

    def needs(self, source: str) -> bool:
        """Whether any arm uses a pre-training (`mlm`, `med2vec`, `med2vec_mlm`)."""
        return any(source in (a.code_table, a.encoder) for a in self.neural)


def validate(config: ml_collections.ConfigDict) -> Plan:
    """One-line errors for the benchmark's own settings, before any work."""
    b = config.benchmark
    names = parse_list(b.arms, "benchmark.arms")
    if not names:
        raise ValueError("benchmark.arms is empty; name some of " + ",".join(config.arms.keys()))
    arms = [arm_from_config(n, config.arms) for n in names]
    sizes = sorted(set(parse_list(b.train_sizes, "benchmark.train_sizes", int)))
    seeds = parse_list(b.seeds, "benchmark.seeds", int)
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"benchmark.train_sizes={b.train_sizes!r}: expected positive labelled-set sizes")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"benchmark.seeds={b.seeds!r}: expected distinct integers")
    for key in ("pretrain_epochs", "finetune_epochs", "finetune_patience", "finetune_rows_per_batch", "n_boot"):
        if b[key] <= 0:
            raise ValueError(f"benchmark.{key} must be > 0, got {b[key]}")
    validate_cohort_sizes(config)
    plan = Plan(arms=arms, sizes=sizes, seeds=seeds)
    if config.med2vec.path and plan.needs("med2vec"):
        # Read it now: a missing file, an unknown format or a pickle without the opt-in fails before any work.
        read_code_vectors(config.med2vec.path, codes_path=config.med2vec.codes_path or None,
                          allow_pickle=config.med2vec.allow_pickle)  # fmt: skip
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
        self.manifest = Manifest(out, config_to_dict(config), resume=resume)
        if resume:
            _check_same_config(self.manifest, config)
        self.programs = ProgramCache()
        self.stages: dict[str, dict[str, Any]] = {}
        self.progress = bool(config.train.progress)
        # The cohorts are cheap to make and decide whether the grid fits: check before anything is written.
        self.pretrain_cohort = task_cohort(config, "mlm")
        self.finetune_cohort = task_cohort(config, "outcome")
        if "outcome_p" not in self.finetune_cohort.labels:  # real data: no true risk, no oracle
            self.plan.arms = [a for a in self.plan.arms if a.kind != "oracle"]
        eligible = outcome_labels(self.finetune_cohort)[1] & self.finetune_cohort.split_mask("train")
        if max(self.plan.sizes) > int(eligible.sum()):
            raise ValueError(f"benchmark.train_sizes: {max(self.plan.sizes)} exceeds the {int(eligible.sum())} "
                             "training patients of the outcome task; raise finetune.num_patients")  # fmt: skip

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
            save_patient_hashes(self.out / "cohorts" / f"{stream}_patient_hashes.npz", hashes)
            fingerprints[stream] = {**cohort_fingerprint(cohort, hashes), "source": c.data.get("source", "synthetic"),
                                    "seed": int(section.seed)}  # fmt: skip
        done = self.manifest.done("cohorts")
        if done is not None:
            for stream in ("pretrain", "finetune"):
                if done["result"][stream]["prefix_hash"] != fingerprints[stream]["prefix_hash"]:
                    raise ValueError(f"resume {self.out}: the {stream} cohort differs from the one this benchmark "
                                     "started with")  # fmt: skip
        return fingerprints

    # pre-training --------------------------------------------------------------------------------------------
    def _pretrain(self, name: str, embeddings_from: str = "", embed_dim: int | None = None) -> dict[str, Any]:
        c, directory = self.config, self.out / name
        overrides = {"task": "mlm", "output_dir": str(directory), "resume": "", "init_from": "",
                     "embeddings_from": embeddings_from, "train.epochs": c.benchmark.pretrain_epochs}  # fmt: skip
        if embed_dim is not None:
            overrides["model.embed_dim"] = embed_dim
        if (directory / "config.json").is_file() and (directory / "checkpoints" / "latest").is_dir():
            overrides["resume"] = str(directory)  # an interrupted pre-training continues where it stopped
            self.say(f"{name}: resuming the interrupted run in {directory}")
        result = train(stage_config(c, **overrides), cohort=self.pretrain_cohort)
        curve = []
        for line in (directory / "metrics.jsonl").read_text().splitlines():
            r = json.loads(line)
            if r.get("event") == "train" or (r.get("event") == "eval" and r.get("split") == "val"):
                curve.append({"step": r["step"], "epoch": r["epoch"], "split": "train" if r["event"] == "train"
                              else "val", "loss": r["loss"]})  # fmt: skip
        test = {k: v for k, v in result.test.items() if k != "baselines"}
        return {"label": "learned code table" if not embeddings_from else "frozen Med2Vec table",
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
            (self.out / "med2vec").mkdir(parents=True, exist_ok=True)
            path, source = save_med2vec(self.out / "med2vec" / "med2vec.npz", result.params, vocab)["npz"], "trained"
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
        c = self.config
        model_cfg = c.model
        pretrained = table = None
        if arm.encoder != "random":  # the pre-trained run carries its table (learned, or frozen Med2Vec)
            run = self.runs[arm.encoder]
            pretrained, model_cfg = run.params, run.model_cfg
        elif arm.code_table == "med2vec" or arm.table_from_file:
            table = self._import(self.med2vec_path if arm.code_table == "med2vec" else arm.code_table)[0]
            if table.shape[1] != c.model.embed_dim:  # the table's width; the projection maps it to hidden_dim
                model_cfg = stage_config(c, **{"model.embed_dim": int(table.shape[1])}).model
        elif arm.code_table == "mlm":
            table = pretrained_table(self.runs["mlm"])
        return ArmInputs(arm=arm, model_cfg=model_cfg, pretrained=pretrained, code_table=table,
                         trainable=arm.trainable, lora_cfg=arm_lora_config(arm, c.lora))  # fmt: skip

    def finetune(self, data: TaskData) -> dict[str, Any]:
        c, plan, b = self.config, self.plan, self.config.benchmark
        data_cfg = stage_config(c, **{"data.rows_per_batch": b.finetune_rows_per_batch}).data
        corpus = to_device(data.corpus, data.labels)
        cells = [(arm, size) for arm in plan.arms for size in plan.sizes]
        runs, arm_params = [], {}
        bar = tqdm(cells, desc="fine-tuning", unit="cell", disable=not self.progress, dynamic_ncols=True)
        for arm, size in bar:
            key = f"finetune/{arm.name}/n{size}"
            done = self.manifest.done(key)
            if done is not None:
                self.say(f"{key}: done in an earlier run, skipped")
                runs.extend(done["runs"])
                arm_params.setdefault(arm.name, done.get("params"))
                continue
            if arm.kind == "logreg":
                cell_runs, params = run_logreg_cell(data, size, out=self.out, arm=arm.name), None
            elif arm.kind == "oracle":
                cell_runs, params = run_oracle_cell(data, size, out=self.out, arm=arm.name), None
            else:
                self.programs.context = f"{arm.name}/n{size}"
                cell_runs, params = run_neural_cell(
                    self._arm_inputs(arm), data, size, plan.seeds, out=self.out, optim_cfg=c.optim,
                    data_cfg=data_cfg, epochs=b.finetune_epochs, patience=b.finetune_patience,
                    max_eval_patients=len(data.splits["val"]), corpus=corpus, programs=self.programs,
                )  # fmt: skip
            self.manifest.record(key, {"runs": cell_runs, "params": params})
            runs.extend(cell_runs)
            arm_params.setdefault(arm.name, params)
            bar.set_postfix_str(f"{arm.name} n={size}")
        return {"runs": runs, "params": arm_params, "compiles": self.programs.num_compiles,
                "compile_log": [list(c) for c in self.programs.compiles]}

    def probe(self, data: TaskData) -> dict[str, Any]:
        from ehrjax.eval.probe import run_probe

        run = self.runs["mlm"]
        result = run_probe(run.model_cfg, run.params, data, self.config.data, self.config.seed,
                           n_boot=self.config.benchmark.n_boot)  # fmt: skip
        arms = {k: {"auroc": v["auroc"], "ci": [v["ci_low"], v["ci_high"]]} for k, v in result["arms"].items()}
        return {"n_test": result["n"]["test"], **arms, "differences": result["differences"]}

    # the whole -----------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        c, plan = self.config, self.plan
        if self.manifest.done("cohorts") is not None:
            self.cohorts()  # a resumed benchmark's cohorts must match the recorded fingerprints
        cohorts = self._timed("cohorts", self.cohorts)
        pre = {"mlm": self._timed("pretrain_mlm", lambda: self._pretrain("pretrain_mlm"))}
        self.runs: dict[str, PretrainedRun] = {"mlm": load_pretrained_run(self.out / "pretrain_mlm")}
        self.vocab: Vocab = self.runs["mlm"].vocab
        med2vec = None
        if plan.needs("med2vec") or plan.needs("med2vec_mlm"):
            med2vec = self._timed("med2vec", self.med2vec)
            self.med2vec_path = med2vec["path"]
            if plan.needs("med2vec_mlm"):
                pre["med2vec_mlm"] = self._timed("pretrain_med2vec_mlm", lambda: self._pretrain(
                    "pretrain_med2vec_mlm", embeddings_from=self.med2vec_path, embed_dim=med2vec["dim"]))  # fmt: skip
                self.runs["med2vec_mlm"] = load_pretrained_run(self.out / "pretrain_med2vec_mlm")
        data = make_task_data(self.finetune_cohort, "outcome", max_len=c.data.max_len, vocab=self.vocab)
        grid = self._timed("finetune", lambda: self.finetune(data))
        probe = self._timed("probe", lambda: self.probe(data)) if c.benchmark.probe and "outcome_p" in \
            data.cohort.labels else None  # fmt: skip
        return self.summary(cohorts, pre, med2vec, grid, probe, data)

    def summary(self, cohorts: dict, pre: dict, med2vec: dict | None, grid: dict, probe: dict | None,
                data: TaskData) -> dict[str, Any]:  # fmt: skip
        c, plan = self.config, self.plan
        cohorts = copy.deepcopy(cohorts)
        cohorts["finetune"]["splits"] = {k: len(v) for k, v in data.splits.items()}
        cohorts["finetune"]["prevalence"] = float(data.labels[:, 0].mean())
        arms = {}
        for arm in plan.arms:
            entry = {"description": arm.description, "kind": arm.kind, "code_table": arm.code_table,
                     "encoder": arm.encoder, "lora": arm.lora}  # fmt: skip
            params = grid["params"].get(arm.name)
            if arm.kind == "neural" and params:
                embed_dim = (med2vec["dim"] if (med2vec and arm.code_table == "med2vec") else c.model.embed_dim)
                entry.update(trainable=list(arm.trainable), embed_dim=int(embed_dim), params_total=params["total"],
                             params_trainable=params["trainable"], trainable_pct=params["trainable_pct"])  # fmt: skip
            arms[arm.name] = entry
        summary = {
            "name": c.name, "config": config_to_dict(c), "started": self.started,
            "wall_s": time.perf_counter() - self.start, "device": device_name(), "cuts": cuts_of(c),
            "task": "outcome", "train_sizes": plan.sizes, "seeds": plan.seeds, "cohorts": cohorts,
            "stages": self.stages, "pretraining": pre, "arms": arms, "runs": grid["runs"],
            "compiles": {"finetune": grid.get("compiles", 0), "finetune_log": grid.get("compile_log", [])},
        }  # fmt: skip
        if med2vec is not None:
            summary["med2vec"] = med2vec
        if probe is not None:
            summary["probe"] = probe
        return summary


def _check_same_config(manifest: Manifest, config: ml_collections.ConfigDict) -> None:
    if not manifest.path.is_file():
        raise ValueError(f"resume {manifest.path.parent}: no manifest.json; not a benchmark directory")
    def comparable(cfg: dict[str, Any]) -> dict[str, Any]:  # where the compiled programs are cached is not the study
        return dict(cfg, train={k: v for k, v in cfg.get("train", {}).items() if k != "compilation_cache"})

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
