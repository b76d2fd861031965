"""The one-call GPU check: argument handling, the step runner, the report's schema, and its CPU dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("bench_gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gc = _load()


def test_arguments(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    args = gc.parse_args([])
    assert (args.dry_run, args.out, args.budget_s, args.part) == (False, "gpu_check_out", gc.DEFAULT_BUDGET_S, None)
    monkeypatch.setenv("OUT", "/somewhere")
    assert gc.parse_args(["--dry-run"]).out == "/somewhere" and gc.parse_args(["--dry-run"]).dry_run
    assert gc.parse_args(["--out", "x", "--budget-s", "60"]).budget_s == 60.0
    for bad in (["--budget-s", "0"], ["--part", "attention"], ["--bogus"]):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)


def test_plans():
    gpu, dry = gc.make_plan(False), gc.make_plan(True)
    assert gpu.config == "configs/h100.py" and gpu.profile_impls == ("xla", "pallas", "cudnn")
    assert gpu.profile_dtype == "bfloat16" and not gpu.attention_interpret and gpu.attention_shape == (16, 512, 8, 64)
    assert "--config.benchmark.seeds=0,1" in gpu.benchmark_overrides
    assert "--config.benchmark.train_sizes=1000" in gpu.benchmark_overrides
    assert dry.config == "configs/smoke.py" and dry.profile_impls == ("xla",) and dry.attention_interpret
    assert dry.attention_timed == ("xla",)  # the interpreter's time is not a kernel time
    # The caps of the GPU steps fit the default budget's 8 minutes with the install.
    assert gc.DEFAULT_BUDGET_S <= 450


def test_shell_argument_handling():
    bad = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown argument --bogus" in bad.stderr
    missing = subprocess.run(["bash", str(SCRIPT), "--out"], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "--out needs a folder" in missing.stderr
    usage = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 0 and "--dry-run" in usage.stdout and "pip download" in usage.stdout


def test_run_step_records_ok_failure_and_timeout(tmp_path):
    ok = gc.run_step([sys.executable, "-c", "print('hello')"], tmp_path / "ok.log", 30)
    assert ok["status"] == "ok" and ok["rc"] == 0 and (tmp_path / "ok.log").read_text() == "hello\n"
    failed = gc.run_step([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "f.log", 30)
    assert failed["status"] == "failed" and failed["rc"] == 3 and "boom" in failed["log_tail"]
    slow = gc.run_step([sys.executable, "-c", "import time; time.sleep(60)"], tmp_path / "t.log", 1)
    assert slow["status"] == "timeout" and slow["wall_s"] < 30
    spent = gc.run_step([sys.executable, "-c", "print(1)"], tmp_path / "s.log", 0)
    assert spent["status"] == "timeout" and spent["rc"] is None


def test_packed_segments():
    seg = gc.packed_segments(16, 512)
    assert seg.shape == (16, 512) and not seg[-1].any()
    for row in seg[:-1]:
        real = row[row > 0]
        assert len(real) > 400 and np.all(np.diff(real) >= 0) and np.all(row[len(real) :] == 0)
        assert np.bincount(real)[1:].max() <= 120
    assert gc.packed_segments(2, 32)[0].max() >= 2  # several patients even in a short row


def minimal_report():
    numbers = {"rel_l2": 0.01, "max_abs": 0.02, "finite": True}
    prof = {"status": "ok", "real_tokens_per_s": 1.0, "mfu": 0.1, "hfu": 0.2, "step_s": 0.5, "compile_s": 3.0,
            "compiled_bytes": None}  # fmt: skip
    return {
        "schema": gc.SCHEMA,
        "environment": {"status": "ok", "jax": "0.0", "backend": "cpu", "device_kind": "cpu"},
        "attention": {
            "status": "ok", "passed": True, "timings": {"xla": {"forward_ms": 1.0, "forward_backward_ms": 2.0}},
            "errors": {i: dict.fromkeys(("out", "dq", "dk", "dv"), numbers) for i in ("xla_bf16", "pallas")},
        },
        "profile": {"xla": prof, "pallas": {"status": "skipped", "reason": "no GPU"}, "cudnn": {"status": "timeout"}},
        "benchmark": {
            "status": "ok", "wall_s": 9.0, "rows": [{"arm": "logreg", "size": 1, "auroc": 0.7, "brier": 0.1}],
        },
    }  # fmt: skip


def test_validate_names_what_is_missing():
    assert gc.validate(minimal_report()) == []
    report = minimal_report()
    del report["benchmark"]
    report["profile"]["xla"]["mfu"] = float("nan")
    report["profile"]["pallas"] = {"status": "skipped"}
    report["attention"]["errors"]["pallas"]["dq"] = {"rel_l2": None, "max_abs": 0.0}
    problems = gc.validate(report)
    assert "missing section 'benchmark'" in problems
    assert "profile.xla.mfu is nan, not a number" in problems
    assert "profile.pallas: skipped without a reason" in problems
    assert "attention.errors.pallas.dq.rel_l2 is None, not a number" in problems


@pytest.mark.slow
def test_dry_run_writes_a_complete_report(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(REPO))
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert gc.validate(report) == [] and report["problems"] == []
    assert report["dry_run"] and report["all_ran"] and report["install"] == "skipped (dry run)"
    assert set(gc.SECTIONS) <= set(report)
    att = report["attention"]
    assert att["status"] == "ok" and att["passed"] and att["interpret"] and att["shape"]["real_tokens"] > 0
    for impl in ("xla_bf16", "pallas"):
        for name in ("out", "dq", "dk", "dv"):
            assert 0 < att["errors"][impl][name]["rel_l2"] < 0.05
    xla = report["profile"]["xla"]
    assert xla["status"] == "ok" and xla["real_tokens_per_s"] > 0 and 0 < xla["mfu"] < 1 and xla["compile_s"] > 0
    assert not xla["fell_back_to_xla"] and xla["compiled_bytes"] > 0
    assert {report["profile"][i]["status"] for i in ("pallas", "cudnn")} == {"skipped"}
    bench = report["benchmark"]
    assert bench["status"] == "ok" and {r["arm"] for r in bench["rows"]} == {"logreg", "scratch", "oracle"}
    assert all(0 <= r["auroc"] <= 1 for r in bench["rows"]) and bench["pretrain_mlm"]["steps"] > 0
    for log in ("environment.log", "attention.log", "profile-xla.log", "benchmark.log", "gpu_check.log"):
        assert (out / log).is_file()
