"""The smoke benchmark as a job of 2 local processes against one process with 2 devices: pre-training
data-parallel, grid cells spread over the processes, the same numbers, one copy of every file, and a resume
after one process is killed that skips the cells either process finished."""

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
BENCH = [sys.executable, "-m", "ehrjax.benchmark", "--config", str(ROOT / "configs" / "smoke.py"),
         "--config.benchmark.arms=logreg,scratch,mlm_lora,med2vec_lora,oracle", "--config.benchmark.n_boot=100",
         "--config.train.progress=False"]  # fmt: skip

pytestmark = pytest.mark.slow


def run_one_process(out: Path) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    done = subprocess.run([*BENCH, f"--config.output_dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def run_two_processes(out: Path, logs: Path, *, resume: bool = False) -> str:
    """Process 0's and 1's output, joined."""
    where = f"--config.resume={out}" if resume else f"--config.output_dir={out}"
    results = launch([*BENCH, where], 2, timeout=900, logs=logs, cwd=ROOT)
    assert [r.returncode for r in results] == [0, 0], "\n".join(r.output[-3000:] for r in results)
    return "\n".join(r.output for r in results)


def outputs(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "checkpoints" not in p.parts
                  and p.name != ".ehrjax.lock")  # fmt: skip


def numbers(out: Path) -> dict:
    """Every run's test and validation predictions, and the summary's statistics without its timings."""
    summary = json.loads((out / "summary.json").read_text())
    predictions = {r["predictions"]: np.load(out / r["predictions"])["probability"] for r in summary["runs"]}
    return {"predictions": predictions, "stats": summary.get("stats", {})}


def timing(key: str) -> bool:
    """Keys that hold times or compile counts, which differ between any two runs."""
    return any(w in key for w in ("_s_", "second", "wall", "compile", "per_s", "_time")) or key.endswith("_s")


def assert_close(a, b, path="summary") -> None:
    if isinstance(a, dict):
        assert sorted(a) == sorted(b), path
        for k in a:
            if not timing(k):
                assert_close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float | np.ndarray):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=path)
    else:
        assert a == b, path


def test_two_processes_give_the_one_process_numbers_and_files(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    start_one = time.perf_counter()
    run_one_process(one)
    one_s = time.perf_counter() - start_one
    start_two = time.perf_counter()
    run_two_processes(two, tmp_path / "logs")
    print(f"\nsmoke benchmark: 1 process x 2 devices {one_s:.0f} s, 2 processes x 1 device "
          f"{time.perf_counter() - start_two:.0f} s")  # fmt: skip
    assert outputs(one) == outputs(two)
    assert_close(numbers(one), numbers(two))
    manifest = json.loads((two / "manifest.json").read_text())
    cells = [k for k in manifest["stages"] if k.startswith("finetune/")]
    assert cells and all((two / "runs" / k.split("/", 1)[1] / "cell.json").is_file() for k in cells)


def test_a_killed_process_ends_the_benchmark_and_it_resumes(tmp_path):
    out, logs = tmp_path / "bench", tmp_path / "logs"
    procs = start([*BENCH, f"--config.output_dir={out}", "--config.train.heartbeat_timeout_s=10"], 2, logs=logs,
                  cwd=ROOT)  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if len(list(out.glob("runs/*/*/*/cell.json"))) >= 2:
            break
        time.sleep(0.1)
    assert all(p.poll() is None for p in procs), "the benchmark ended before it could be killed"
    kill(procs[1])
    survivor = wait(procs[:1], logs, timeout=120)[0]
    assert survivor.returncode != 0
    finished = len(list(out.glob("runs/*/*/*/cell.json")))
    resumed = run_two_processes(out, tmp_path / "logs2", resume=True)
    assert resumed.count("done in an earlier run, skipped") >= finished
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()
