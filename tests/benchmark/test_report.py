import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ehrjax.benchmark import report
from ehrjax.benchmark.report import UNRESOLVED, compute_stats, format_results_table, write_report

SIZES = (100, 400)
SEEDS = (0, 1, 2)
N_VAL, N_TEST = 100, 1500
N_BOOT = 200
# arm -> (kind, noise sd on the true logit, embed_dim); mlm_emb is written as an exact copy of scratch
ARMS = {
    "scratch": ("neural", 2.0, 64),
    "mlm_emb": ("neural", None, 64),
    "med2vec_emb": ("neural", 2.0, 200),
    "mlm_lora": ("neural", 0.3, 64),
    "med2vec_lora": ("neural", 1.0, 200),
    "logreg": ("logreg", 1.5, 0),
    "oracle": ("oracle", 0.0, 0),
}


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _fake_output(out: Path) -> dict:
    """An output directory as the stages write it, from synthetic predictions of known quality."""
    rng = np.random.default_rng(0)
    n = N_VAL + N_TEST
    true_logit = rng.normal(-1.0, 1.5, n)
    outcome_p = _sigmoid(true_logit)
    label = (rng.random(n) < outcome_p).astype(np.float32)
    split = np.array(["val"] * N_VAL + ["test"] * N_TEST)
    patient_id = rng.permutation(10 * n)[:n].astype(np.int64)
    runs, arms = [], {}
    for arm, (kind, noise, dim) in ARMS.items():
        total = 1000 + 10 * dim
        trainable = {"mlm_lora": 30, "med2vec_lora": 40}.get(arm, total)
        arms[arm] = {"description": f"fake {arm}", "kind": kind, "embed_dim": dim, "params_total": total,
                     "params_trainable": trainable, "trainable_pct": 100 * trainable / total}  # fmt: skip
        for size in SIZES:
            for seed in SEEDS if kind == "neural" else (0,):
                rel = f"runs/{arm}/n{size}/seed{seed}/predictions.npz"
                if noise is None:  # an exact copy of scratch's run
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(out / f"runs/scratch/n{size}/seed{seed}/predictions.npz", out / rel)
                else:
                    logit = true_logit + noise * (1.2 if size == SIZES[0] else 1.0) * rng.normal(size=n)
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    np.savez(out / rel, patient_id=patient_id, split=split, label=label,
                             probability=_sigmoid(logit), logit=np.full(n, np.nan) if kind == "logreg" else logit,
                             outcome_p=outcome_p)  # fmt: skip
                neural = kind == "neural"
                curve = [{"epoch": e, "train_loss": 0.6 - 0.05 * e, "val_loss": 0.62 - 0.03 * e,
                          "val_auroc": 0.6 + 0.03 * e} for e in range(4)] if neural else []  # fmt: skip
                runs.append({"arm": arm, "size": size, "seed": seed, "predictions": rel,
                             "best_epoch": 3 if neural else -1, "epochs_run": 4 if neural else 0,
                             "steps": 40 if neural else 0, "wall_s": 12.0 + seed, "train_s": 8.0, "compile_s": 3.0,
                             "real_tokens_per_s": 5000.0 if neural else 0.0, "curve": curve})  # fmt: skip
    hashes = {k: f"{k}-" + "ab" * 30 for k in ("codes", "visit", "age", "time", "offsets", "patient_id", "split")}
    mlm_curve = [{"step": s, "epoch": s // 50, "split": sp, "loss": 5.0 - s / 50} for s in (0, 50, 100)
                 for sp in ("train", "val")]  # fmt: skip
    baselines = {"unigram": {"loss": 4.9, "top1": 0.05, "top10": 0.3},
                 "copy": {"loss": 4.2, "top1": 0.12, "top10": 0.45, "lambda": 0.6}}  # fmt: skip
    test = {"loss": 3.0, "top1": 0.3, "top10": 0.7, "macro_auroc": 0.9, "macro_ap": 0.4, "macro_pr_auc": 0.38}
    return {
        "name": "fake", "config": {"name": "fake"}, "started": "2026-11-25T17:00:00+00:00", "wall_s": 321.0,
        "device": "cpu (2 cores)", "cuts": ["two sizes instead of five"], "task": "outcome",
        "train_sizes": list(SIZES), "seeds": list(SEEDS),
        "cohorts": {
            "pretrain": {"num_patients": 5000, "source": "synthetic", "seed": 0, "tokens": 90000, "hashes": hashes,
                         "prefix_hash": "cd" * 32},
            "finetune": {"num_patients": 4718, "source": "synthetic", "seed": 0, "tokens": 80000, "hashes": hashes,
                         "prefix_hash": "ef" * 32, "splits": {"train": 3774, "val": 472, "test": 472},
                         "prevalence": 0.21},
        },
        "stages": {name: {"wall_s": 10.0, "compile_s": 2.0, "train_s": 6.0, "skipped": False}
                   for name in ("cohorts", "pretrain_mlm", "med2vec", "pretrain_med2vec_mlm", "finetune")},
        "pretraining": {
            "mlm": {"label": "learned code table", "steps": 100, "wall_s": 30.0, "test": test,
                    "baselines": baselines, "curve": mlm_curve},
            "med2vec_mlm": {"label": "frozen Med2Vec table", "steps": 100, "wall_s": 28.0, "test": test,
                            "baselines": baselines, "curve": mlm_curve},
        },
        "med2vec": {"source": "trained", "path": "med2vec/med2vec.npz", "dim": 200, "wall_s": 5.0,
                    "coverage": {"vocab_share": 0.93, "token_share": 0.99, "text": "matched 930 of 1000 codes"}},
        "arms": arms,
        "runs": runs,
        "probe": {"n_test": 472, "pretrained": {"auroc": 0.7, "ci": [0.65, 0.75]},
                  "random": {"auroc": 0.6, "ci": [0.55, 0.65]}},
    }  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    summary = _fake_output(out)
    stats = write_report(summary, out, n_boot=N_BOOT)
    return out, summary, stats


def _row(stats, arm, size):
    return next(r for r in stats["rows"] if r["arm"] == arm and r["size"] == size)


def test_report_files_are_written(written):
    out, summary, _ = written
    for name in ("data_efficiency", "roc_pr", "training_curves", "mlm_curves", "stage_times"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["stats"]["n_test"] == N_TEST and saved["runs"] == summary["runs"]
    assert "report" in saved["stages"]
    text = (out / "report.md").read_text()
    for link in ("plots/data_efficiency.png", "plots/roc_pr.png", "plots/mlm_curves.png", "plots/stage_times.png"):
        assert f"]({link})" in text
    assert not list(out.glob(".*")) and not list((out / "plots").glob(".*"))  # no temporary files left


def test_every_auroc_is_in_range_and_inside_its_interval(written):
    _, _, stats = written
    assert len(stats["rows"]) == len(ARMS) * len(SIZES)
    for row in stats["rows"]:
        lo, hi = row["auroc_ci"]
        assert 0 <= lo <= row["auroc"] <= hi <= 1, row
        assert row["n_seeds"] == (3 if row["kind"] == "neural" else 1)
        assert 0 < row["brier"] < 1 and 0 < row["ap"] <= 1 and 0 < row["pr_auc"] <= 1
        if row["delta_vs_reference"]:
            d = row["delta_vs_reference"]
            assert d["ci"][0] <= d["mean"] <= d["ci"][1]


def test_an_arm_identical_to_scratch_is_not_resolved(written):
    _, _, stats = written
    for size in SIZES:
        delta = _row(stats, "mlm_emb", size)["delta_vs_reference"]
        assert (delta["mean"], *delta["ci"]) == (0.0, 0.0, 0.0)
        assert delta["verdict"] == UNRESOLVED
        assert _row(stats, "scratch", size)["delta_vs_reference"] is None


def test_a_clearly_better_arm_is_called_better_and_the_oracle_tops_logreg(written):
    _, _, stats = written
    for size in SIZES:
        assert _row(stats, "mlm_lora", size)["delta_vs_reference"]["verdict"] == "better than scratch"
        oracle, logreg = _row(stats, "oracle", size), _row(stats, "logreg", size)
        assert oracle["auroc"] == pytest.approx(stats["oracle"]["auroc"], abs=1e-15) == oracle["oracle_auroc"]
        assert oracle["auroc"] >= logreg["auroc"]
        assert logreg["delta_vs_reference"]["seeds"] == list(SEEDS)  # one-seed logreg broadcast on scratch's seeds
    comparisons = {(c["a"], c["size"]): c for c in stats["comparisons"]}
    assert comparisons[("mlm_lora", SIZES[-1])]["b"] == "med2vec_lora"
    assert comparisons[("mlm_lora", SIZES[-1])]["verdict"] == "better than med2vec_lora"
    assert stats["arms"]["mlm_lora"]["trainable_pct"] == pytest.approx(100 * 30 / 1640)
    assert stats["arms"]["scratch"]["best_epoch_median"] == 3 and stats["arms"]["logreg"]["best_epoch_median"] is None


def test_report_text_answers_the_three_questions(written):
    out, _, stats = written
    text = (out / "report.md").read_text()
    for arm in ARMS:
        assert f"| {arm} |" in text
    for heading in ("### 1. Does pre-training + LoRA", "### 2. Do learned code embeddings", "### 3. Do runs stay"):
        assert heading in text
    assert "**Yes**, mlm_lora beats scratch at n = 100, 400." in text
    assert UNRESOLVED in text and "the first 4,718 patients of a cohort" in text
    assert "embed_dim 64" in text and "embed_dim 200" in text  # the width caution
    assert "two sizes instead of five" in text and "How to read this report" in text
    assert "| mlm (learned code table) | 3.0000 |" in text and "copy baseline, λ = 0.60" in text
    assert "matched 930 of 1000 codes" in text and "| pretrained | 0.700 [0.650, 0.750] |" in text
    assert "| finetune | 4,718 | synthetic | 0 | 80,000 | 3,774 / 472 / 472 | 21.00% |" in text
    table = format_results_table(stats)
    assert "mlm_lora" in table and "better than scratch" in table and "oracle AUROC" in table


def test_statistics_are_deterministic(written):
    out, summary, stats = written
    again = compute_stats(summary, out, n_boot=N_BOOT)
    assert again["rows"] == stats["rows"] and again["comparisons"] == stats["comparisons"]


def _copy_output(written, tmp_path):
    out, summary, _ = written
    target = tmp_path / "bench"
    shutil.copytree(out, target)
    return target, copy.deepcopy(summary)


def test_a_corrupt_predictions_file_fails_clearly_and_leaves_no_report(written, tmp_path):
    out, summary = _copy_output(written, tmp_path)
    assert (out / "report.md").exists()
    rel = "runs/med2vec_emb/n400/seed1/predictions.npz"
    (out / rel).write_bytes(b"not an npz")
    with pytest.raises(ValueError, match=f"predictions {rel}: cannot read"):
        write_report(summary, out, n_boot=N_BOOT)
    assert not (out / "report.md").exists()


def test_a_failing_plot_leaves_no_report_and_no_summary(written, tmp_path, monkeypatch):
    out, summary = _copy_output(written, tmp_path)
    (out / "summary.json").unlink()

    def broken(*args):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report, "_plot_roc_pr", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(summary, out, n_boot=N_BOOT)
    assert not (out / "report.md").exists() and not (out / "summary.json").exists()


def test_runs_on_different_test_patients_are_refused(written, tmp_path):
    out, summary = _copy_output(written, tmp_path)
    rel = "runs/mlm_lora/n100/seed2/predictions.npz"
    arrays = dict(np.load(out / rel))
    arrays["patient_id"] = arrays["patient_id"][::-1].copy()
    np.savez(out / rel, **arrays)
    with pytest.raises(ValueError, match="test patient ids differ"):
        compute_stats(summary, out, n_boot=10)


def test_without_scratch_or_synthetic_data_the_report_says_so(written, tmp_path):
    out, summary = _copy_output(written, tmp_path)
    summary["runs"] = [r for r in summary["runs"] if r["arm"] != "scratch"]
    del summary["arms"]["scratch"]
    summary["cohorts"]["finetune"]["source"] = "meds"
    stats = write_report(summary, out, n_boot=20)
    assert stats["reference"] is None and all(r["delta_vs_reference"] is None for r in stats["rows"])
    text = (out / "report.md").read_text()
    assert "Not answered: arm scratch did not run" in text and "Not by construction here" in text
