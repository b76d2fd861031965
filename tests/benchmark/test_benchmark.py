"""`python -m ehrjax.benchmark` end to end on the smoke config, its one-line config errors, and resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
# Small enough for CI: one pre-training epoch, a short fine-tuning budget, two replicates, two sizes, both tasks,
# the arms of every kind (neural, logistic regression, trees, both ceilings).
QUICK = ("--config.benchmark.train_sizes=100,300", "--config.benchmark.replicates=0,1",
         "--config.benchmark.pretrain_epochs=1", "--config.benchmark.finetune_max_steps=24",
         "--config.benchmark.arms=logreg,trees,scratch,mlm_lora,med2vec_lora,mlm_full,oracle,oracle_visible",
         "--config.benchmark.n_boot=100", "--config.finetune.num_patients=3000",
         "--config.train.progress=False")  # fmt: skip


def run_benchmark(*args, timeout=900):
    return subprocess.run(
        [sys.executable, "-m", "ehrjax.benchmark", "--config", str(ROOT / "configs" / "smoke.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("--config.benchmark.arms=scratch,nonsense", "arm 'nonsense' unknown"),
        ("--config.benchmark.trainsizes=100", "trainsizes"),
        ("--config.benchmark.train_sizes=100,99999", "exceeds the"),
        ("--config.med2vec.path=/nonexistent/m.npz", "does not exist"),
    ],
)
def test_bad_config_is_one_line_before_any_work(tmp_path, arg, needle):
    out = tmp_path / "bench"
    result = run_benchmark(arg, f"--config.output_dir={out}", timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_a_pickled_code_map_needs_the_opt_in(tmp_path):
    import pickle

    table = tmp_path / "m.npz"
    rng = np.random.default_rng(0)
    np.savez(table, W_emb=rng.normal(size=(3, 4)), b_emb=np.zeros(4), W_hidden=np.zeros((4, 4)), b_hidden=np.zeros(4),
             W_output=np.zeros((4, 3)), b_output=np.zeros(3))  # fmt: skip
    (tmp_path / "m.types").write_bytes(pickle.dumps({"D_1": 0, "D_2": 1, "D_3": 2}))
    result = run_benchmark(f"--config.med2vec.path={table}", f"--config.output_dir={tmp_path / 'bench'}", timeout=300)
    assert result.returncode == 2 and "allow_pickle" in result.stderr, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "out"
    result = run_benchmark(*QUICK, f"--config.output_dir={out}")
    assert result.returncode == 0, result.stderr[-4000:]
    return out, result.stdout


def test_smoke_benchmark_writes_a_sane_report(smoke_run):
    out, stdout = smoke_run
    for name in ("report.md", "summary.json", "manifest.json", "plots/heart_failure/data_efficiency.png",
                 "plots/renal_decline/roc_pr.png",
                 "pretrain_mlm/metrics.jsonl", "pretrain_med2vec_mlm/export/code_embeddings.npz"):  # fmt: skip
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    tasks = summary["stats"]["tasks"]
    assert [t["name"] for t in tasks] == ["heart_failure", "renal_decline"]
    arms = set(summary["config"]["benchmark"]["arms"].split(",")) - {"oracle", "oracle_visible"}
    for task in tasks:
        rows = task["rows"]
        assert {r["arm"] for r in rows} == arms
        for row in rows:
            for metric in ("auroc", "ap", "pr_auc", "brier"):
                lo, hi = row[f"{metric}_ci"]
                assert 0.0 <= lo <= row[metric] <= hi <= 1.0, (metric, row)
        true_hi = task["ceilings"]["outcome_p"]["auroc_ci"][1]
        for row in rows:  # leakage canary: no model beats the true risk beyond the noise of the test set
            assert row["auroc"] <= true_hi, row
        by = {(r["arm"], r["size"]): r["auroc"] for r in rows}
        for size in (100, 300):
            assert task["ceilings"]["outcome_p_visible"]["auroc"] >= by[("logreg", size)] - 0.05
        assert not task["above_true_risk"]
    mlm = summary["pretraining"]["mlm"]
    assert mlm["test"]["loss"] > 0 and {"unigram", "copy"} <= set(mlm["baselines"])
    report_md = (out / "report.md").read_text()
    assert "Med2Vec" in report_md and "AUROC" in stdout and "—" not in report_md
    # every fine-tuning run left predictions whose AUROC the report recomputes from the file
    runs = [r for r in summary["runs"] if r["arm"] == "scratch"]
    assert len(runs) == 2 * 2 * 2 and all((out / r["predictions"]).is_file() for r in runs)
    # a learning rate was chosen from the arm's grid per task and size
    tuning = [t for t in summary["tuning"] if t["arm"] == "mlm_lora"]
    assert len(tuning) == 4 and all(t["chosen"] in t["candidates"] and len(t["candidates"]) >= 3 for t in tuning)
    # replicates draw different labelled sets, nested over sizes
    from ehrjax.benchmark.grid import replicate_rows

    pool = np.arange(1000)
    assert set(replicate_rows(pool, 0, 100)) <= set(replicate_rows(pool, 0, 300))
    assert set(replicate_rows(pool, 0, 100)) != set(replicate_rows(pool, 1, 100))
    # one compile per distinct program and shape, whatever the size, task or learning rate
    assert summary["compiles"]["finetune"] <= 3 * 4


def test_cohort_manifest_compares_prefixes(smoke_run, tmp_path):
    out, _ = smoke_run
    from ehrjax.benchmark.manifest import compare_prefixes

    same = compare_prefixes(out, out)
    assert same["pretrain"]["identical"] and same["finetune"]["identical"]


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_summary(smoke_run, tmp_path):
    """Kill the benchmark mid-grid, resume it: finished stages are skipped and the numbers equal the
    uninterrupted run's."""
    reference, _ = smoke_run
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ehrjax.benchmark", "--config", str(ROOT / "configs" / "smoke.py"), *QUICK,
           f"--config.output_dir={out}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and not list((out / "runs").glob("*/*/n100/rep0/predictions.npz")):
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "report.md").exists()
    resumed = run_benchmark(*QUICK, f"--config.resume={out}")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "skipped" in resumed.stdout + resumed.stderr
    a = [r for t in json.loads((reference / "summary.json").read_text())["stats"]["tasks"] for r in t["rows"]]
    b = [r for t in json.loads((out / "summary.json").read_text())["stats"]["tasks"] for r in t["rows"]]
    assert [(r["arm"], r["size"], r["auroc"]) for r in a] == [(r["arm"], r["size"], r["auroc"]) for r in b]


def test_resume_ignores_the_compilation_cache_folder_but_not_the_study(tmp_path):
    """Where compiled programs are cached is not part of the study: a resume may add or move the cache."""
    from ehrjax.benchmark.manifest import Manifest
    from ehrjax.benchmark.stages import _check_same_config
    from ehrjax.config import load_config_file
    from ehrjax.train.loop import config_to_dict

    config = load_config_file(ROOT / "configs" / "smoke.py")
    saved = config_to_dict(config)
    del saved["train"]["compilation_cache"]  # a benchmark started before the key existed
    (tmp_path / "manifest.json").write_text(json.dumps({"config": saved, "stages": {}}))
    manifest = Manifest(tmp_path, saved, resume=True)
    config.train.compilation_cache = str(tmp_path / "cache")
    _check_same_config(manifest, config)
    config.seed = 7
    with pytest.raises(ValueError, match="another config"):
        _check_same_config(manifest, config)
