import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ehrjax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, timeout=600, env=None):
    return subprocess.run(
        [sys.executable, "-m", "ehrjax.train", "--config", str(ROOT / "configs" / "smoke.py"), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )  # fmt: skip


def test_mlm_run_writes_everything_and_keeps_nothing_frozen_by_mistake(smoke_config):
    smoke_config.train.epochs = 1
    smoke_config.train.tensorboard = True
    result = train(smoke_config)
    run = Path(result.workdir)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    for name in ("config.json", "vocab.json", "metrics.jsonl", "export/code_embeddings.npz",
                 "export/code_embeddings.safetensors", "export/vocab.json", "export/model.safetensors"):  # fmt: skip
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[-1]["split"] == "test"
    assert any(r["event"] == "train" and r["real_tokens_per_s"] > 0 for r in records)
    assert result.params["trainable_pct"] == 100.0
    table = np.load(run / "export" / "code_embeddings.npz")["code_embeddings"]
    assert table.shape[0] == len(json.loads((run / "vocab.json").read_text())["codes"])


def test_resume_with_another_model_config_is_refused(smoke_config):
    smoke_config.train.epochs = 1
    result = train(smoke_config)
    out = run_cli(f"--config.resume={result.workdir}", "--config.model.hidden_dim=64")
    assert out.returncode == 2
    assert "different config" in out.stderr and "model.hidden_dim" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unwritable_output_directory_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = run_cli(f"--config.output_dir={blocker}/run")
    assert out.returncode == 2 and "not writable" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unknown_config_key_names_the_key():
    out = run_cli("--config.train.epochz=3")
    assert out.returncode == 2 and "epochz" in out.stderr


def test_exact_resume_after_sigkill(tmp_path):
    common = ["--config.train.epochs=4", "--config.train.checkpoint_every=10", "--config.train.log_every=5"]
    full = run_cli(*common, f"--config.output_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr

    killed_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ehrjax.train", "--config", str(ROOT / "configs" / "smoke.py"), *common,
           f"--config.output_dir={killed_dir}"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed_dir / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in latest.glob("*") if p.name.isdigit()] if latest.is_dir() else []
        if steps:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = max(int(p.name) for p in latest.glob("*") if p.name.isdigit())
    steps_per_epoch = json.loads((killed_dir / "metrics.jsonl").read_text().splitlines()[0])["batching"][
        "steps_per_epoch"
    ]
    print(f"\nkilled after checkpoint step {killed_at} ({steps_per_epoch} steps per epoch)")

    resumed = run_cli(*common, f"--config.resume={killed_dir}")
    assert resumed.returncode == 0, resumed.stderr
    a = np.load(tmp_path / "full" / "export" / "model.npz")
    b = np.load(killed_dir / "export" / "model.npz")
    assert sorted(a.files) == sorted(b.files)
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    full_records = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    resumed_records = [json.loads(x) for x in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    evals = lambda rs: [(r["step"], r["loss"]) for r in rs if r["event"] == "eval"]
    assert evals(full_records) == evals(resumed_records)


def test_time_token_runs_pretrain_and_finetune_end_to_end(smoke_config, tmp_path):
    from ehrjax.data.vocab import TIME_TOKENS

    smoke_config.data.time_tokens = True
    smoke_config.train.epochs = 1
    mlm = train(smoke_config)
    codes = json.loads((Path(mlm.workdir) / "vocab.json").read_text())["codes"]
    assert tuple(codes[-len(TIME_TOKENS):]) == TIME_TOKENS
    assert np.isfinite(mlm.test["loss"])

    tune = smoke_config.copy_and_resolve_references()
    tune.task, tune.arm, tune.init_from = "outcome", "mlm_lora", str(mlm.workdir)
    tune.output_dir = str(tmp_path / "tune")
    result = train(tune)
    assert np.isfinite(result.test["loss"]) and 0 <= result.test["auroc"] <= 1

    tune.data.time_tokens, tune.output_dir = False, str(tmp_path / "tune_off")
    with pytest.raises(ValueError, match=r"data\.time_tokens: False, but the vocabulary holds time tokens"):
        train(tune)
