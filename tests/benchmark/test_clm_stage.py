"""The benchmark's CLM pre-training stage: it runs only when an arm starts from a CLM run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ehrjax.benchmark.stages import validate
from ehrjax.config import load_config_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("arms", "needed"),
    [("scratch,mlm_lora", False), ("scratch,clm_lora", True), ("logreg,clm_full", True), ("clm_lora,mlm_full", True)],
)
def test_clm_pretraining_is_needed_only_by_clm_arms(arms, needed):
    config = load_config_file(ROOT / "configs" / "smoke.py")
    config.benchmark.arms = arms
    assert validate(config).needs("clm") is needed


def test_the_cpu_default_runs_no_clm_arm():
    config = load_config_file(ROOT / "configs" / "cpu.py")
    assert {"clm_lora", "clm_full"} <= set(config.arms.keys())
    assert not validate(config).needs("clm")


def test_an_arm_from_two_pretraining_tasks_is_refused():
    config = load_config_file(ROOT / "configs" / "smoke.py")
    config.arms.clm_lora.code_table = "mlm"
    config.benchmark.arms = "clm_lora"
    with pytest.raises(ValueError, match=r"arms\.clm_lora: code_table 'mlm' and encoder 'clm' come from two"):
        validate(config)


@pytest.mark.slow
def test_benchmark_with_clm_arms_pretrains_once_more(tmp_path):
    out = tmp_path / "bench"
    args = ["--config.benchmark.arms=scratch,clm_lora,clm_full", "--config.benchmark.tasks=heart_failure",
            "--config.benchmark.train_sizes=100", "--config.benchmark.replicates=0", "--config.benchmark.probe=False",
            "--config.benchmark.finetune_max_steps=12", "--config.benchmark.n_boot=100",
            "--config.finetune.num_patients=3000", f"--config.output_dir={out}"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "ehrjax.benchmark", "--config", str(ROOT / "configs" / "smoke.py"),
                             *args], capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert {"pretrain_mlm", "pretrain_clm"} <= set(summary["stages"])
    clm = summary["pretraining"]["clm"]
    assert clm["test"]["loss"] < clm["baselines"]["unigram"]["loss"] and clm["baselines"]["bigram"]["k"] > 0
    assert {r["arm"] for r in summary["runs"]} == {"scratch", "clm_lora", "clm_full"}
    assert "MLM and CLM pre-training" in (out / "report.md").read_text()
    assert json.loads((out / "pretrain_clm" / "config.json").read_text())["task"] == "clm"
