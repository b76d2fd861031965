"""A fake benchmark output folder in the summary schema the engine writes, from predictions of known quality.

Two tasks, three replicates, two sizes. Every model scores visible_logit + noise, so on the test split:
mlm_lora (noise 0.3) is much better than scratch (2.0); mlm_full is an exact copy of scratch; med2vec_lora is
in between. The baselines are built so validation and test disagree: logreg is the better one on the
validation rows (noise 0.5 there, 2.5 on test), trees on the test rows (1.5 / 1.0). The ceilings are the
columns: outcome_p = sigmoid(visible_logit + hidden frailty), outcome_p_visible = sigmoid(visible_logit).
"""

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest

TASKS = ("heart_failure", "stroke")
REPLICATES = (0, 1, 2)
SIZES = (100, 400)
N_VAL, N_TEST = 200, 1200
N_BOOT = 200
TOTAL = 20_000
# arm -> (kind, (val noise, test noise) or "copy" (of scratch) or a ceiling column, trainable split, steps_to_95)
ARMS = {
    "scratch": ("neural", (2.0, 2.0), {"adapters": 0, "head": 65, "rest": TOTAL - 65}, 60),
    "mlm_lora": ("neural", (0.3, 0.3), {"adapters": 300, "head": 65, "rest": 0}, 20),
    "med2vec_lora": ("neural", (1.0, 1.0), {"adapters": 1335, "head": 65, "rest": 0}, 30),
    "mlm_full": ("neural", "copy", {"adapters": 0, "head": 65, "rest": TOTAL - 65}, 40),
    "logreg": ("logreg", (0.5, 2.5), None, None),
    "trees": ("trees", (1.5, 1.0), None, None),
    "oracle": ("oracle", "outcome_p", None, None),
    "oracle_visible": ("oracle", "outcome_p_visible", None, None),
}
ROLES = {
    "reference": "scratch",
    "pretrained_lora": "mlm_lora",
    "baselines": ["logreg", "trees"],
    "table_pairs": [["mlm_lora", "med2vec_lora"], ["mlm_emb", "med2vec_emb"]],  # the second pair did not run
    "ceilings": {"oracle": "true risk", "oracle_visible": "risk given the visible record"},
    "trainable_contrast": "med2vec_lora",
}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _rel(task, arm, size, rep):
    return f"runs/{task}/{arm}/n{size}/rep{rep}/predictions.npz"


def _write_task(out: Path, task: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    n = N_VAL + N_TEST
    visible = rng.normal(-1.2, 1.3, n)
    outcome_p = _sigmoid(visible + rng.normal(0, 1.0, n))
    outcome_p_visible = _sigmoid(visible)
    label = (rng.random(n) < outcome_p).astype(np.float32)
    split = np.array(["val"] * N_VAL + ["test"] * N_TEST)
    patient_id = rng.permutation(10 * n)[:n].astype(np.int64)
    columns = {"outcome_p": outcome_p, "outcome_p_visible": outcome_p_visible}
    runs = []
    for arm, (kind, how, _, to95) in ARMS.items():
        for size in SIZES:
            for rep in REPLICATES:
                rel = _rel(task, arm, size, rep)
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                if how == "copy":
                    shutil.copy(out / _rel(task, "scratch", size, rep), out / rel)
                else:
                    if how in columns:
                        probability = columns[how]
                    else:
                        scale = np.where(split == "val", how[0], how[1]) * (1.2 if size == SIZES[0] else 1.0)
                        probability = _sigmoid(visible + scale * rng.normal(size=n))
                    logit = np.log(probability / (1 - probability)) if kind == "neural" else np.full(n, np.nan)
                    np.savez(out / rel, patient_id=patient_id, split=split, label=label, probability=probability,
                             logit=logit, outcome_p=outcome_p, outcome_p_visible=outcome_p_visible)  # fmt: skip
                neural = kind == "neural"
                curve = [{"epoch": e, "step": 10 * e, "seconds": 1.5 * e, "train_loss": 0.6 - 0.05 * e,
                          "val_loss": 0.62 - 0.03 * e, "val_auroc": 0.6 + 0.03 * e} for e in range(1, 5)]  # fmt: skip
                runs.append({
                    "task": task, "arm": arm, "size": size, "replicate": rep, "seed": rep, "predictions": rel,
                    "hparam": {"learning_rate": 3e-4} if neural else {"C": 1.0} if kind == "logreg" else {},
                    "best_epoch": 4 if neural else None, "epochs_run": 4 if neural else None,
                    "steps": 40 if neural else None, "steps_to_95": to95 + rep if neural else None,
                    "seconds_to_95": 0.1 * to95 if neural else None, "val_loss": 0.5, "val_auroc": 0.7,
                    "wall_s": 12.0 + rep, "train_s": 8.0, "compile_s": 3.0,
                    "real_tokens_per_s": 5000.0 if neural else None, "curve": curve if neural else [],
                })  # fmt: skip
    return runs


def build(out: Path) -> dict:
    runs = []
    for i, task in enumerate(TASKS):
        runs += _write_task(out, task, seed=i)
    arms = {}
    for arm, (kind, _, split, _) in ARMS.items():
        trainable = sum(split.values()) if split else None
        arms[arm] = {"description": f"fake {arm}", "kind": kind, "code_table": "mlm" if "mlm" in arm else None,
                     "encoder": "pretrained", "lora": "lora" in arm, "trainable": [],
                     "embed_dim": 64 if split else None,
                     "params_total": TOTAL if split else None, "params_trainable": trainable,
                     "trainable_pct": 100 * trainable / TOTAL if split else None, "params_split": split,
                     "tuning": {"param": "learning_rate", "grid": [1e-4, 3e-4, 1e-3]}}  # fmt: skip
    tuning = [{"task": t, "arm": a, "size": s, "param": "learning_rate", "candidates": [1e-4, 3e-4, 1e-3],
               "val_loss": [0.52, 0.48, 0.5], "val_auroc": [0.7, 0.72, 0.71], "chosen": 3e-4}
              for t in TASKS for a in ARMS if ARMS[a][0] == "neural" for s in SIZES]  # fmt: skip
    mlm_curve = [{"step": s, "epoch": s // 50, "split": sp, "loss": 5.0 - s / 50} for s in (0, 50, 100)
                 for sp in ("train", "val")]  # fmt: skip
    baselines = {"unigram": {"loss": 4.9, "top1": 0.05, "top10": 0.3},
                 "copy": {"loss": 4.2, "top1": 0.12, "top10": 0.45, "lambda": 0.6}}  # fmt: skip
    test = {"loss": 3.0, "top1": 0.3, "top10": 0.7, "macro_auroc": 0.9, "macro_ap": 0.4, "macro_pr_auc": 0.38}
    positives = {t: int(np.load(out / _rel(t, "scratch", SIZES[0], 0))["label"][N_VAL:].sum()) for t in TASKS}
    return {
        "name": "fake", "config": {"name": "fake"}, "started": "2026-11-25T17:00:00+00:00", "wall_s": 321.0,
        "device": "cpu (2 cores)", "cuts": ["two sizes instead of five"],
        "tasks": [{"name": t, "title": f"{t.replace('_', ' ')} within 365 days", "description": f"fake {t} task",
                   "splits": {"train": 3000, "val": N_VAL, "test": N_TEST},
                   "prevalence": {"train": 0.25, "val": 0.25, "test": 0.25},
                   "sizing": {"target_half_width": 0.05, "expected_half_width": 0.04, "n_test": N_TEST,
                              "n_test_positive": positives[t]}} for t in TASKS],
        "train_sizes": list(SIZES), "replicates": list(REPLICATES), "roles": copy.deepcopy(ROLES), "arms": arms,
        "runs": runs, "tuning": tuning,
        "pretraining": {
            "mlm": {"label": "learned code table", "steps": 100, "wall_s": 30.0, "test": test,
                    "baselines": baselines, "curve": mlm_curve},
            "med2vec_mlm": {"label": "frozen Med2Vec table", "steps": 100, "wall_s": 28.0, "test": test,
                            "baselines": baselines, "curve": mlm_curve},
        },
        "med2vec": {"source": "trained", "path": "med2vec/med2vec.npz", "dim": 200, "wall_s": 5.25,
                    "coverage": {"vocab_share": 0.93, "token_share": 0.99, "text": "matched 930 of 1000 codes"}},
        "probe": {"n_train": 800, "n_test": 400,
                  "arms": {"pretrained": {"auroc": 0.7, "ci": [0.65, 0.75]},
                           "random": {"auroc": 0.6, "ci": [0.55, 0.65]}},
                  "differences": {"pretrained - random": {"mean": 0.1, "ci": [0.04, 0.16]}}},
        "stages": {name: {"wall_s": 10.0, "compile_s": 2.0, "train_s": 6.0, "skipped": False}
                   for name in ("cohorts", "pretrain_mlm", "med2vec", "pretrain_med2vec_mlm", "finetune", "probe")},
        "compiles": {"finetune": 5, "finetune_log": [["scratch", 1.5, "n100"], ["mlm_lora", 2.0, "n100"]]},
    }  # fmt: skip


@pytest.fixture(scope="session")
def fake(tmp_path_factory):
    """(out_dir, summary) of a fake output folder; do not modify it: copy it with `copy_fake`."""
    out = tmp_path_factory.mktemp("bench")
    return out, build(out)


@pytest.fixture(scope="session")
def written(fake):
    """(out_dir, summary, stats) after write_report on the fake folder."""
    from ehrjax.benchmark.report import write_report

    out, summary = fake
    summary = copy.deepcopy(summary)
    stats = write_report(summary, out, n_boot=N_BOOT)
    return out, summary, stats


@pytest.fixture
def copy_fake(fake, tmp_path):
    """A fresh copy (out_dir, summary) of the fake folder that a test may change."""

    def make():
        out, summary = fake
        target = tmp_path / "bench"
        shutil.copytree(out, target, ignore=shutil.ignore_patterns("plots", "report.md", "summary.json"))
        return target, copy.deepcopy(summary)

    return make
