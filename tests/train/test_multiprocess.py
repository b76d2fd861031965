"""Training as a job of 2 local processes (one CPU device each, joined by jax.distributed) against one process
with 2 devices: the same metrics and predictions, one copy of every file, an exact resume after SIGKILL, and
a clear end when one process dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ehrjax.launch import kill, launch, start, wait

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, "-m", "ehrjax.train", "--config", str(ROOT / "configs" / "smoke.py")]
SMALL = ["--config.finetune.num_patients=800", "--config.pretrain.num_patients=800"]


def two_processes(tmp_path: Path, name: str, *args: str, timeout: float = 600) -> Path:
    out = tmp_path / name
    results = launch([*TRAIN, *args, f"--config.output_dir={out}"], 2, timeout=timeout, logs=tmp_path / f"{name}-logs",
                     cwd=ROOT)  # fmt: skip
    assert [r.returncode for r in results] == [0, 0], "\n".join(r.output[-3000:] for r in results)
    return out


def two_devices(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / name
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    done = subprocess.run([*TRAIN, *args, f"--config.output_dir={out}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def evals(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in records(run) if r["event"] == "eval"]


def files(run: Path) -> list[str]:
    """Every file a run wrote outside its checkpoints (Orbax writes those from every process, by design)."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "checkpoints" not in p.parts
                  and p.name != ".ehrjax.lock")  # fmt: skip


def assert_same_run(a: Path, b: Path) -> None:
    ea, eb = evals(a), evals(b)
    assert [(r["split"], r["step"]) for r in ea] == [(r["split"], r["step"]) for r in eb]
    for ra, rb in zip(ea, eb, strict=True):
        for key, value in ra.items():
            if isinstance(value, float):
                assert rb[key] == pytest.approx(value, rel=1e-5), (ra["split"], ra["step"], key)
    assert files(a) == files(b)
    assert len(records(a)) == len(records(b))  # one writer: no record twice


@pytest.mark.slow
def test_two_processes_fine_tune_like_two_devices(tmp_path):
    args = ("--config.task=outcome", "--config.train.epochs=2", *SMALL)
    one = two_devices(tmp_path, "one", *args)
    two = two_processes(tmp_path, "two", *args)
    assert_same_run(one, two)
    a, b = np.load(one / "predictions.npz"), np.load(two / "predictions.npz")
    np.testing.assert_array_equal(a["patient_id"], b["patient_id"])
    np.testing.assert_allclose(a["probability"], b["probability"], rtol=1e-5)


@pytest.mark.slow
def test_two_processes_pretrain_like_two_devices(tmp_path):
    one = two_devices(tmp_path, "one", "--config.task=mlm")
    two = two_processes(tmp_path, "two", "--config.task=mlm")
    assert_same_run(one, two)
    a, b = np.load(one / "export" / "model.npz"), np.load(two / "export" / "model.npz")
    for name in a.files:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)


def _kill_after_first_checkpoint(tmp_path: Path, name: str, args: tuple[str, ...], which: tuple[int, ...],
                                 heartbeat: int = 100) -> tuple[Path, list]:  # fmt: skip
    out = tmp_path / name
    logs = tmp_path / f"{name}-logs"
    procs = start([*TRAIN, *args, f"--config.output_dir={out}", f"--config.train.heartbeat_timeout_s={heartbeat}"],
                  2, logs=logs, cwd=ROOT)  # fmt: skip
    latest = out / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir()):
            break
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
    for i in which:
        kill(procs[i])
    return out, procs


RESUMABLE = ("--config.task=outcome", "--config.train.epochs=3", "--config.train.checkpoint_every=10", *SMALL)


@pytest.mark.slow
def test_resume_after_sigkill_of_both_processes_is_exact(tmp_path):
    full = two_processes(tmp_path, "full", *RESUMABLE)
    killed, _ = _kill_after_first_checkpoint(tmp_path, "killed", RESUMABLE, which=(0, 1))
    results = launch([*TRAIN, *RESUMABLE, f"--config.resume={killed}"], 2, timeout=600, logs=tmp_path / "resume-logs",
                     cwd=ROOT)  # fmt: skip
    assert [r.returncode for r in results] == [0, 0], results[0].output[-3000:]
    a, b = np.load(full / "export" / "model.npz"), np.load(killed / "export" / "model.npz")
    for name in a.files:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert evals(full) == evals(killed)


@pytest.mark.slow
def test_a_killed_process_ends_the_job_and_the_run_resumes(tmp_path):
    killed, procs = _kill_after_first_checkpoint(tmp_path, "killed", RESUMABLE, which=(1,), heartbeat=10)
    started = time.monotonic()
    survivor = wait(procs[:1], tmp_path / "killed-logs", timeout=120)[0]
    assert survivor.returncode != 0 and time.monotonic() - started < 60
    assert "stopped sending heartbeats" in survivor.output
    results = launch([*TRAIN, *RESUMABLE, f"--config.resume={killed}"], 2, timeout=600, logs=tmp_path / "resume-logs",
                     cwd=ROOT)  # fmt: skip
    assert [r.returncode for r in results] == [0, 0], results[0].output[-3000:]
    assert np.isfinite(evals(killed)[-1]["auroc"])
