"""The one-call GPU check's driver: every step in its own process, one JSON of what came out.

    bash benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--budget-s S]     # the one command (installs first)
    python benchmarks/gpu_check.py [--dry-run] [--out DIR] [--budget-s S]   # the steps alone

Steps, in order, each a subprocess with its own time cap inside one overall budget (default 420 s, so that
with the install the whole check stays under 8 minutes); a step that fails or runs out of time is recorded
(`status` failed / timeout, exit code, the tail of its log) and the next one runs:

1. `environment`: Python, jax / jaxlib / CUDA plugin versions, the devices, `nvidia-smi` when there is one.
2. `attention`: the Pallas segment-id flash-attention kernel (`model.attention_impl='pallas'`) against the
   masked reference (`jax.nn.dot_product_attention` with the block-diagonal mask, computed in float32 from
   the same bfloat16 inputs), forward and backward (dq, dk, dv of a fixed random weighting of the output), on
   packed rows of the `large` preset's shape (16 rows x 512 tokens, 8 heads of 64) in bfloat16. The XLA path
   in bfloat16 is scored against the same reference: the kernel passes when its relative L2 error is at most
   max(2 x that of XLA-bfloat16, 1%) for the output and every gradient. cuDNN (`implementation='cudnn'`) is
   scored alike (reported, not part of the pass). Median milliseconds of jitted forward and forward+backward
   per implementation.
3. `profile`: `python -m ehrjax.profile --config configs/h100.py --modes pack --dtypes bfloat16` once per
   attention implementation (xla, pallas, cudnn; a process each, so each peak memory is its own), on a
   100,000-patient pre-training cohort: real tokens/s, MFU / HFU, step and compile seconds, the compiled
   step's memory (`memory_analysis()`) and the device's peak bytes in use, from its `profile.json`.
4. `benchmark`: `python -m ehrjax.benchmark --config configs/h100.py` cut down (`BENCHMARK_OVERRIDES`: arms
   logreg, scratch, mlm_lora, oracle; one training size, 1,000; seeds 0,1; 1 pre-training and 3 fine-tuning
   epochs on 50,000 / 8,000-patient cohorts; no probe): per (arm, size) test AUROC with its CI, Brier score,
   stage times, from its `summary.json`.

`--dry-run` runs the same steps on the CPU at smoke size (`configs/smoke.py`, a few hundred patients): the
kernel in Pallas interpret mode on 2 x 32 x 2 x 16 (no kernel timing: the interpreter's time means nothing),
the profile with XLA attention only (Pallas and cuDNN need a GPU; recorded as skipped), the benchmark with
arms logreg, scratch, oracle. It checks that the pipeline runs end to end and that the JSON is complete,
not how fast anything is.

Writes `gpu_check.json` and one log per step (`<step>.log`) under `--out` (default `$OUT`, else
`./gpu_check_out`), and the outputs of the profile and benchmark runs below it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "ehrjax.gpu_check.v1"
SECTIONS: tuple[str, ...] = ("environment", "attention", "profile", "benchmark")
PROFILE_IMPLS: tuple[str, ...] = ("xla", "pallas", "cudnn")
ATTENTION_TOLERANCE = (2.0, 0.01)  # the kernel's relative error <= max(2 x XLA-bf16's, 1%)
DEFAULT_BUDGET_S = 420.0
FALLBACK_WARNING = "using the XLA attention instead"  # ehrjax.models.encoder's warning when pallas cannot run

# (row_len 512 and 8 heads of 64: the `large` preset with configs/h100.py's packed rows)
GPU_ATTENTION_SHAPE = (16, 512, 8, 64)
DRY_ATTENTION_SHAPE = (2, 32, 2, 16)
GPU_PROFILE_OVERRIDES: tuple[str, ...] = ("--config.pretrain.num_patients=100000",)
DRY_PROFILE_OVERRIDES: tuple[str, ...] = ("--config.pretrain.num_patients=400",)
BENCHMARK_OVERRIDES: tuple[str, ...] = (
    "--config.benchmark.arms=logreg,scratch,mlm_lora,oracle",
    "--config.benchmark.train_sizes=1000",
    "--config.benchmark.seeds=0,1",
    "--config.benchmark.pretrain_epochs=1",
    "--config.benchmark.finetune_epochs=3",
    "--config.benchmark.probe=False",
    "--config.benchmark.n_boot=200",
    "--config.pretrain.num_patients=50000",
    "--config.finetune.num_patients=8000",
    "--config.train.max_eval_patients=2000",
)
DRY_BENCHMARK_OVERRIDES: tuple[str, ...] = (
    "--config.benchmark.arms=logreg,scratch,oracle",
    "--config.benchmark.train_sizes=100",
    "--config.benchmark.seeds=0,1",
    "--config.benchmark.pretrain_epochs=1",
    "--config.benchmark.finetune_epochs=1",
    "--config.benchmark.probe=False",
    "--config.benchmark.n_boot=50",
    "--config.pretrain.num_patients=400",
    "--config.finetune.num_patients=600",
    "--config.train.max_eval_patients=200",
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one mode runs: the config, shapes, implementations, overrides and per-step time caps (s)."""

    dry_run: bool
    config: str
    attention_shape: tuple[int, int, int, int]
    attention_interpret: bool
    attention_timed: tuple[str, ...]  # implementations whose jitted time is measured
    attention_scored: tuple[str, ...]  # implementations scored against the reference besides pallas
    profile_impls: tuple[str, ...]  # the others are recorded as skipped
    profile_dtype: str
    profile_steps: int
    profile_warmup: int
    profile_overrides: tuple[str, ...]
    benchmark_overrides: tuple[str, ...]
    caps: dict[str, float]


def make_plan(dry_run: bool) -> Plan:
    if dry_run:
        return Plan(True, "configs/smoke.py", DRY_ATTENTION_SHAPE, True, ("xla",), (), ("xla",), "float32", 2, 1,
                    DRY_PROFILE_OVERRIDES, DRY_BENCHMARK_OVERRIDES,
                    {"environment": 60, "attention": 120, "profile": 120, "benchmark": 240})  # fmt: skip
    return Plan(False, "configs/h100.py", GPU_ATTENTION_SHAPE, False, ("xla", "pallas", "cudnn"), ("cudnn",),
                PROFILE_IMPLS, "bfloat16", 10, 2, GPU_PROFILE_OVERRIDES, BENCHMARK_OVERRIDES,
                {"environment": 60, "attention": 60, "profile": 80, "benchmark": 240})  # fmt: skip


# ------------------------------------------------------------------------------------------- running steps


def child_env() -> dict[str, str]:
    """The environment of every step: this checkout first on PYTHONPATH (the check runs the code it sits in,
    installed or not)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH", "")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def tail(path: Path, chars: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def run_step(command: Sequence[str], log: Path, timeout_s: float) -> dict[str, Any]:
    """Run `command` in the repository root with stdout and stderr to `log`, at most `timeout_s` seconds (its
    process group is ended then). Returns {'status': ok | failed | timeout, 'rc', 'wall_s', 'log', 'command'}
    and, unless ok, 'log_tail'."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        if timeout_s <= 0:
            sink.write("not run: the check's time budget was spent\n")
            return {"status": "timeout", "rc": None, "wall_s": 0.0, "log": log.name, "command": list(command),
                    "log_tail": "not run: the check's time budget was spent"}  # fmt: skip
        proc = subprocess.Popen(list(command), cwd=REPO, env=child_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            _end_group(proc)
            rc, status = proc.returncode, "timeout"
    out = {"status": status, "rc": rc, "wall_s": time.perf_counter() - start, "log": log.name,
           "command": list(command)}  # fmt: skip
    if status != "ok":
        out["log_tail"] = tail(log)
    return out


def _end_group(proc: subprocess.Popen) -> None:
    """End the step's own process group: SIGTERM, then SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class Budget:
    """The overall deadline: a step gets min(its cap, what is left)."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def cap(self, seconds: float) -> float:
        return max(0.0, min(seconds, self.deadline - time.perf_counter()))


# ------------------------------------------------------------------------------------------- the parts run here


def environment_part() -> dict[str, Any]:
    """Versions and devices (run in its own process: importing jax on a GPU claims its memory)."""
    from importlib import metadata

    import jax

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    devices = jax.devices()
    out: dict[str, Any] = {
        "python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "jax": jax.__version__, "jaxlib": version("jaxlib"),
        "plugins": {d: version(d) for d in ("jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
                                            "jax-cuda12-pjrt") if version(d)},
        "flax": version("flax"), "optax": version("optax"), "ehrjax_from": str(Path(__import__("ehrjax").__file__)),
        "backend": jax.default_backend(), "platform": devices[0].platform, "device_kind": devices[0].device_kind,
        "devices": [str(d) for d in devices],
    }  # fmt: skip
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        out["nvidia_smi"] = smi.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        out["nvidia_smi"] = None
    return out


def packed_segments(rows: int, seq: int, seed: int = 0):
    """int32[rows, seq] segment ids of packed rows: patients of 3 to min(120, seq / 3) tokens back to back
    while they fit, then padding (0); the last row is padding only (an empty row of an epoch's last batch)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    longest = max(4, min(120, seq // 3))
    seg = np.zeros((rows, seq), np.int32)
    for r in range(rows - 1):
        pos, s = 0, 1
        while True:
            n = int(rng.integers(3, longest + 1))
            if pos + n > seq:
                break
            seg[r, pos : pos + n] = s
            pos, s = pos + n, s + 1
    return seg


def attention_part(shape: Sequence[int], interpret: bool, timed: Sequence[str], scored: Sequence[str],
                   reps: int = 20) -> dict[str, Any]:  # fmt: skip
    """The kernel against the masked reference, forward and backward, in bfloat16 (module docstring)."""
    import statistics

    import jax
    import jax.numpy as jnp
    import numpy as np

    from ehrjax.models.encoder import segment_attention

    batch, seq, heads, head_dim = shape
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(keys[i], (batch, seq, heads, head_dim), jnp.float32).astype(jnp.bfloat16)
               for i in range(3))  # fmt: skip
    weights = jax.random.normal(keys[3], (batch, seq, heads, head_dim), jnp.float32)
    seg = jnp.asarray(packed_segments(batch, seq))

    def loss(impl: str, q, k, v):
        out = segment_attention(q, k, v, seg, implementation=impl, interpret=interpret and impl == "pallas")
        return jnp.sum(weights * out.astype(jnp.float32))

    def forward_backward(impl: str, q, k, v):
        fwd = segment_attention(q, k, v, seg, implementation=impl, interpret=interpret and impl == "pallas")
        grads = jax.grad(lambda *a: loss(impl, *a), argnums=(0, 1, 2))(q, k, v)
        return (fwd, *grads)

    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):  # no TF32 in the reference on GPUs
        reference = [np.asarray(x, np.float64) for x in jax.jit(lambda *a: forward_backward("xla", *a))(*f32)]
    names = ("out", "dq", "dk", "dv")

    def score(impl: str) -> dict[str, Any]:
        try:
            got = jax.jit(lambda *a: forward_backward(impl, *a))(q, k, v)
            got = [np.asarray(x.astype(jnp.float32), np.float64) for x in got]
        except Exception as err:  # a kernel that does not lower or run here: recorded, not fatal
            return {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}
        out = {}
        for name, a, b in zip(names, got, reference, strict=True):
            out[name] = {"rel_l2": float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)),
                         "max_abs": float(np.max(np.abs(a - b))), "finite": bool(np.isfinite(a).all())}  # fmt: skip
        return out

    errors = {"xla_bf16": score("xla"), "pallas": score("pallas")}
    for impl in scored:
        errors[impl] = score(impl)
    factor, floor = ATTENTION_TOLERANCE
    passed = (
        "error" not in errors["pallas"]
        and "error" not in errors["xla_bf16"]
        and all(
            errors["pallas"][n]["finite"]
            and errors["pallas"][n]["rel_l2"] <= max(factor * errors["xla_bf16"][n]["rel_l2"], floor)
            for n in names
        )
    )

    timings: dict[str, Any] = {}
    for impl in timed:
        try:
            fwd = jax.jit(lambda q, k, v, impl=impl: segment_attention(q, k, v, seg, implementation=impl))
            both = jax.jit(lambda q, k, v, impl=impl: forward_backward(impl, q, k, v))
            row = {}
            for label, fn in (("forward_ms", fwd), ("forward_backward_ms", both)):
                jax.block_until_ready(fn(q, k, v))
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(q, k, v))
                    times.append(1e3 * (time.perf_counter() - t0))
                row[label] = statistics.median(times)
            timings[impl] = row
        except Exception as err:
            timings[impl] = {"error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}"}
    real = int(np.sum(np.asarray(seg) > 0))
    return {
        "shape": {"batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim, "real_tokens": real},
        "dtype": "bfloat16", "reference": "xla masked attention in float32 on the same bfloat16 inputs",
        "interpret": interpret, "tolerance": {"factor_of_xla_bf16": factor, "floor": floor},
        "errors": errors, "passed": bool(passed), "timings": timings, "timing_reps": reps,
        "timings_note": None if not interpret else "pallas runs in interpret mode here: its time is not measured",
    }  # fmt: skip


# ------------------------------------------------------------------------------------------- reading the outputs


def summarise_profile(profile_json: dict[str, Any], log_text: str = "") -> dict[str, Any]:
    """The figures of one `ehrjax.profile` run (its single (mode, dtype) result)."""
    r = profile_json["results"][0]
    return {
        "mode": r["mode"], "dtype": r["dtype"], "preset": r["preset"], "device_kind": r["device_kind"],
        "platform": r["platform"], "real_tokens_per_s": r["real_tokens_per_s"],
        "computed_tokens_per_s": r["computed_tokens_per_s"], "efficiency": r["efficiency"],
        "step_s": r["step_s"], "compile_s": r["compile_s"], "build_s": r["build_s"], "num_shapes": r["num_shapes"],
        "mfu": r["mfu"], "hfu": r["hfu"], "peak_flops": r["peak_flops"], "peak_source": r["peak_source"],
        "model_flops_per_step": r["model_flops_per_step"],
        "compiled_bytes": r["memory"]["compiled_bytes"], "peak_bytes_in_use": r["memory"]["peak_bytes_in_use"],
        "fell_back_to_xla": FALLBACK_WARNING in log_text,
    }  # fmt: skip


def summarise_benchmark(summary: dict[str, Any]) -> dict[str, Any]:
    """Per (arm, size) test AUROC, CI and Brier score, stage times and the pre-training run of `summary.json`."""
    stats = summary["stats"]
    rows = [{k: row[k] for k in ("arm", "size", "n_seeds", "auroc", "auroc_ci", "brier", "wall_s", "compile_s")}
            for row in stats["rows"]]  # fmt: skip
    mlm = summary.get("pretraining", {}).get("mlm", {})
    return {
        "device": summary["device"], "wall_s": summary["wall_s"], "train_sizes": summary["train_sizes"],
        "seeds": summary["seeds"], "n_test": stats["n_test"], "rows": rows,
        "stages": {name: {k: stage[k] for k in ("wall_s", "compile_s", "train_s")}
                   for name, stage in summary["stages"].items()},
        "pretrain_mlm": {"steps": mlm.get("steps"), "wall_s": mlm.get("wall_s"),
                         "test_loss": mlm.get("test", {}).get("loss")},
        "real_tokens_per_s": {a: v["real_tokens_per_s_mean"] for a, v in stats["arms"].items()
                              if v.get("real_tokens_per_s_mean") is not None},
    }  # fmt: skip


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def validate(report: dict[str, Any]) -> list[str]:
    """What is missing or not a number where one is expected; [] for a complete report. A skipped section
    needs its reason; a failed one its status only."""
    problems = [f"missing section {s!r}" for s in SECTIONS if s not in report]
    if report.get("schema") != SCHEMA:
        problems.append(f"schema is {report.get('schema')!r}, expected {SCHEMA!r}")

    def ok(section: dict[str, Any], where: str) -> bool:
        if section.get("status") not in ("ok", "failed", "timeout", "skipped"):
            problems.append(f"{where}: status {section.get('status')!r}")
            return False
        if section["status"] == "skipped" and not section.get("reason"):
            problems.append(f"{where}: skipped without a reason")
        return section["status"] == "ok"

    def numbers(d: dict[str, Any], keys: Sequence[str], where: str) -> None:
        problems.extend(f"{where}.{k} is {d.get(k)!r}, not a number" for k in keys if not _number(d.get(k)))

    env = report.get("environment", {})
    if ok(env, "environment"):
        for k in ("jax", "backend", "device_kind"):
            if not env.get(k):
                problems.append(f"environment.{k} is empty")
    att = report.get("attention", {})
    if ok(att, "attention"):
        if not isinstance(att.get("passed"), bool):
            problems.append("attention.passed is not a boolean")
        for impl in ("xla_bf16", "pallas"):
            for name in ("out", "dq", "dk", "dv"):
                numbers(att.get("errors", {}).get(impl, {}).get(name, {}), ("rel_l2", "max_abs"),
                        f"attention.errors.{impl}.{name}")  # fmt: skip
        for impl, row in att.get("timings", {}).items():
            if "error" not in row:
                numbers(row, ("forward_ms", "forward_backward_ms"), f"attention.timings.{impl}")
    prof = report.get("profile", {})
    for impl in PROFILE_IMPLS:
        if impl not in prof:
            problems.append(f"profile: no entry for {impl!r}")
        elif ok(prof[impl], f"profile.{impl}"):
            numbers(prof[impl], ("real_tokens_per_s", "mfu", "hfu", "step_s", "compile_s"), f"profile.{impl}")
            if prof[impl].get("compiled_bytes") is not None:
                numbers(prof[impl], ("compiled_bytes",), f"profile.{impl}")
    bench = report.get("benchmark", {})
    if ok(bench, "benchmark"):
        numbers(bench, ("wall_s",), "benchmark")
        if not bench.get("rows"):
            problems.append("benchmark.rows is empty")
        for row in bench.get("rows", []):
            numbers(row, ("auroc", "brier"), f"benchmark.rows[{row.get('arm')}, {row.get('size')}]")
    return problems


# ------------------------------------------------------------------------------------------- the check


def _part(name: str, out: Path, plan: Plan, budget: Budget) -> dict[str, Any]:
    """Run the in-file part `name` (environment or attention) in its own process; its JSON plus the step."""
    result = out / f"{name}.part.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(result)]
    if plan.dry_run:
        command.append("--dry-run")
    step = run_step(command, out / f"{name}.log", budget.cap(plan.caps[name]))
    if step["status"] == "ok":
        step.update(json.loads(result.read_text()))
        result.unlink()
    return step


def _profile(impl: str, out: Path, plan: Plan, budget: Budget) -> dict[str, Any]:
    if impl not in plan.profile_impls:
        return {"status": "skipped", "reason": f"dry run on {platform.machine()} CPU: {impl} attention needs a GPU"}
    folder = out / f"profile-{impl}"
    command = [sys.executable, "-m", "ehrjax.profile", "--config", plan.config, "--modes", "pack",
               "--dtypes", plan.profile_dtype, "--steps", str(plan.profile_steps), "--warmup", str(plan.profile_warmup),
               "--out", str(folder), f"--config.model.attention_impl={impl}", *plan.profile_overrides]  # fmt: skip
    log = out / f"profile-{impl}.log"
    step = run_step(command, log, budget.cap(plan.caps["profile"]))
    if step["status"] == "ok":
        step.update(summarise_profile(json.loads((folder / "profile.json").read_text()), tail(log, 10**6)))
    return {"attention_impl": impl, **step}


def _benchmark(out: Path, plan: Plan, budget: Budget) -> dict[str, Any]:
    folder = out / "benchmark"
    command = [sys.executable, "-m", "ehrjax.benchmark", "--config", plan.config, *plan.benchmark_overrides,
               f"--config.output_dir={folder}"]  # fmt: skip
    step = run_step(command, out / "benchmark.log", budget.cap(plan.caps["benchmark"]))
    if step["status"] == "ok":
        step.update(summarise_benchmark(json.loads((folder / "summary.json").read_text())))
    return step


def run_check(out: Path, dry_run: bool, budget_s: float, install: str) -> dict[str, Any]:
    plan, budget = make_plan(dry_run), Budget(budget_s)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {
        "schema": SCHEMA, "dry_run": dry_run, "started": dt.datetime.now().isoformat(timespec="seconds"),
        "config": plan.config, "budget_s": budget_s, "install": install, "host": platform.node(),
    }  # fmt: skip
    order = [("environment", lambda: _part("environment", out, plan, budget)),
             ("attention", lambda: _part("attention", out, plan, budget))]  # fmt: skip
    order += [(f"profile.{impl}", lambda impl=impl: _profile(impl, out, plan, budget)) for impl in PROFILE_IMPLS]
    order.append(("benchmark", lambda: _benchmark(out, plan, budget)))
    report["profile"] = {}
    for name, step in order:
        print(f"gpu_check: {name} ...", flush=True)
        result = step()
        print(f"gpu_check: {name}: {result['status']} ({result.get('wall_s', 0.0):.1f} s)", flush=True)
        if name.startswith("profile."):
            report["profile"][name.split(".", 1)[1]] = result
        else:
            report[name] = result
        write_json(out / "gpu_check.json", report)  # what is done so far survives a kill
    report["wall_s"] = time.perf_counter() - start
    steps = [report["environment"], report["attention"], *report["profile"].values(), report["benchmark"]]
    report["all_ran"] = all(s["status"] in ("ok", "skipped") for s in steps)
    report["attention_passed"] = report["attention"].get("passed")
    report["problems"] = validate(report)
    write_json(out / "gpu_check.json", report)
    return report


def write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str, allow_nan=True))
    tmp.replace(path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The one-call GPU check (see the module docstring).")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at smoke size")
    p.add_argument("--out", default=None, help="output folder (default $OUT, else ./gpu_check_out)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="overall time budget of the steps")
    p.add_argument("--install", default="not run", help="what the install step did (set by gpu_check.sh)")
    p.add_argument("--part", choices=("environment", "attention"), help=argparse.SUPPRESS)
    p.add_argument("--part-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.part and not args.part_out:
        p.error("--part needs --part-out")
    if args.out is None:
        args.out = os.environ.get("OUT") or "gpu_check_out"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        plan = make_plan(args.dry_run)
        if args.part == "environment":
            result = environment_part()
        else:
            result = attention_part(plan.attention_shape, plan.attention_interpret, plan.attention_timed,
                                    plan.attention_scored)  # fmt: skip
        write_json(Path(args.part_out), result)
        return 0
    out = Path(args.out).absolute()
    report = run_check(out, args.dry_run, args.budget_s, args.install)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} ({report['wall_s']:.0f} s); attention passed: "
          f"{report['attention_passed']}; all steps ran: {report['all_ran']}")  # fmt: skip
    for problem in report["problems"]:
        print(f"gpu_check: problem: {problem}", file=sys.stderr)
    return 0 if report["all_ran"] and not report["problems"] and report["attention_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
