"""Throughput profile of the MLM train step per batching mode and compute dtype.

    python -m ehrjax.profile --config configs/cpu.py [--config.key=value ...]
        [--modes pack,pack_buckets,bucket,pad_max] [--dtypes float32,bfloat16] [--steps N] [--warmup N]
        [--trace DIR] [--ops N] [--out DIR]

Per (mode, dtype): the trainer is built (task `mlm`), every batch shape of the epoch plan is compiled
ahead of time (`lower(...).compile()`, timed on its own), then per shape `warmup` untimed and `steps` timed
steps of the compiled executable, each ended with `block_until_ready` (so a step's time includes its
dispatch). Figures are per epoch: step time per shape is the median of its timed steps, and the epoch time is
sum over shapes of (batches of that shape per epoch x median step time). Bucket mode, with several shapes,
is thus weighted by its real batch mix without running whole epochs; one-shape modes reduce to the median.
Tokens/s, patients/s and FLOP/s divide the epoch's totals by that epoch time.

FLOPs and MFU follow `ehrjax.eval.flops`: MFU = model FLOPs (real tokens, per-patient attention, real MLM
targets at their expected count mask_prob x clinical tokens) / step time / peak; HFU the same with the
hardware FLOPs the step computes (padding, whole-row attention, every MLM slot). Peak: the datasheet
dense peak for the device kind and dtype (TF32 for float32 on GPUs), a measured `jnp.dot` on CPU.

Memory: the compiled executable's `memory_analysis()` (arguments + outputs - aliased (donated) + temporaries,
the largest over shapes; the table's `exe MiB`) and the device's `peak_bytes_in_use` when it reports one (GPU,
not CPU; a process-wide high-water mark, so later runs of one invocation include earlier ones).
Writes `profile.json` and `profile.png` to `--out` (default `results/profile-<config name>-<stamp>/`).
"""

from __future__ import annotations

import copy
import datetime as dt
import itertools
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ehrjax.atomic import atomic_write, check_folder_writable, dumps_strict
from ehrjax.cli import error_line, one_line, parse_flags
from ehrjax.data.batching import MODES
from ehrjax.data.masking import num_mlm_slots
from ehrjax.data.vocab import NUM_SPECIAL
from ehrjax.eval.flops import FlopModel, device_peak, mfu
from ehrjax.eval.op_profile import format_breakdown, op_breakdown
from ehrjax.models.behrt import COMPUTE_DTYPES

DTYPES: tuple[str, ...] = tuple(COMPUTE_DTYPES)


def default_dtypes(device: Any = None) -> tuple[str, ...]:
    """Dtypes profiled when none are asked: float32 on CPU (bf16 is slow there; ask for it), both elsewhere."""
    device = device or jax.devices()[0]
    return ("float32",) if device.platform == "cpu" else ("float32", "bfloat16")


def parse_list(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    """'a,b' -> ('a', 'b'); ValueError naming `flag` for an unknown or empty entry."""
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise ValueError(f"{flag}: unknown or empty {bad or text!r}; expected some of {','.join(allowed)}")
    return items


def _clinical_tokens(corpus: Any, patients: np.ndarray, code_end: int) -> int:
    """Tokens of `patients` that MLM may select: codes, ids in [NUM_SPECIAL, code_end) (no time tokens)."""
    codes = np.asarray(corpus.codes)
    per_token = np.concatenate([[0], np.cumsum((codes >= NUM_SPECIAL) & (codes < code_end), dtype=np.int64)])
    offsets = np.asarray(corpus.offsets, dtype=np.int64)
    return int(np.sum(per_token[offsets[patients + 1]] - per_token[offsets[patients]]))


def _memory(compiled: Any) -> dict[str, int] | None:
    """Sizes from `compiled.memory_analysis()`; `total` = arguments + outputs - aliased + temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    out = {
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "alias_bytes": int(m.alias_size_in_bytes),
        "temp_bytes": int(m.temp_size_in_bytes),
    }
    out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def _xla_cost(compiled: Any) -> dict[str, float | None]:
    """XLA's own estimate for the compiled step: `flops` (every op, not only matmuls: a check on the analytic
    count) and `bytes_accessed` (memory traffic of its fusions; flops / bytes is the arithmetic intensity)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        cost = None
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    cost = cost or {}
    return {key: float(cost[name]) if name in cost else None for key, name in
            (("xla_flops", "flops"), ("xla_bytes_accessed", "bytes accessed"))}  # fmt: skip


def _peak_bytes_in_use(device: Any) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _time_shape(
    trainer: Any, state: Any, group: Any, count: int, warmup: int, steps: int
) -> tuple[Any, Any, list[float], dict[str, float]]:
    """Compile the step for one batch shape, run `warmup` + `steps` steps over the group's batches (each
    synchronised). group: (row_len, patient_index [nb, S, rows, slots], cls_index) of a stacked plan.
    Returns (state, executable, timed step seconds, {compile_s, overflow, weight, real_tokens})."""
    row_len, patient, cls = group
    keys, active = trainer.keys(), jnp.ones(trainer.num_seeds, bool)
    t0 = time.perf_counter()
    compiled = trainer.train_step(row_len).jitted.lower(state, trainer.corpus, patient[0], cls[0], keys,
                                                        active).compile()  # fmt: skip
    totals = {"compile_s": time.perf_counter() - t0, "overflow": 0.0, "weight": 0.0, "real_tokens": 0.0}
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, sums = compiled(state, trainer.corpus, patient[i % count], cls[i % count], keys, active)
        jax.block_until_ready((state, sums))
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
            sums = jax.device_get(sums)
            for name in ("overflow", "weight", "real_tokens"):
                totals[name] += float(np.sum(sums[name]))
    return state, compiled, times, totals


def profile_mode(
    config: ml_collections.ConfigDict,
    mode: str,
    dtype: str = "float32",
    steps: int = 10,
    *,
    warmup: int = 2,
    trace_dir: str | os.PathLike | None = None,
    trace_steps: int = 3,
    ops_top: int = 0,
) -> dict[str, Any]:
    """Profile the MLM train step of `config` with `data.batching = mode` and `model.dtype = dtype`.

    Runs `warmup` + `steps` steps per batch shape (see the module docstring) and returns a JSON-able dict:
    settings, per-shape figures (`shapes`), epoch-weighted step time (`step_s`, `step_min_s`, `step_max_s`),
    `real_tokens_per_s`, `computed_tokens_per_s`, `efficiency`, `patients_per_s`, `num_shapes`,
    `compile_s`, FLOPs per step (model / hardware / XLA), `peak_flops`, `mfu`, `hfu` and `memory`.
    `ops_top > 0` adds `ops`: where the time of the first shape's step goes (`ehrjax.eval.op_profile`), by
    kind of op and its `ops_top` slowest instructions, from `trace_steps` traced steps.
    """
    from ehrjax.train.loop import build_run_trainer

    if mode not in MODES:
        raise ValueError(f"mode {mode!r} unknown; expected one of {MODES}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} unknown; expected one of {DTYPES}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    cfg = copy.deepcopy(config)
    cfg.task, cfg.data.batching, cfg.model.dtype, cfg.train.progress = "mlm", mode, dtype, False
    t0 = time.perf_counter()
    trainer = build_run_trainer(cfg)[0]
    build_s = time.perf_counter() - t0
    batcher = trainer.train_batchers[0]
    plan = trainer.stacked_plan(0)
    state = trainer.state
    device = jax.devices()[0]

    shapes: list[dict[str, Any]] = []
    executables = []
    timed = {"overflow": 0.0, "weight": 0.0, "real_tokens": 0.0}
    for group, (rows, row_len), count in zip(plan.groups, batcher.shapes, batcher.group_batches, strict=True):
        state, compiled, times, totals = _time_shape(trainer, state, group, count, warmup, steps)
        executables.append(compiled)
        timed = {k: v + totals[k] for k, v in timed.items()}
        shapes.append({
            "rows": rows, "row_len": row_len, "batches_per_epoch": count, "compile_s": totals["compile_s"],
            "step_s": statistics.median(times), "step_min_s": min(times), "step_max_s": max(times),
            "mlm_slots_per_row": num_mlm_slots(row_len, cfg.data.mask_prob, cfg.data.mlm_slot_factor),
            "memory": _memory(compiled), **_xla_cost(compiled),
        })  # fmt: skip

    (_, patient, cls), count = plan.groups[0], batcher.group_batches[0]
    keys, active = trainer.keys(), jnp.ones(trainer.num_seeds, bool)

    def first_shape_step(i: int) -> Any:
        """Step i of the first shape's compiled program (its batches in turn), for the traces below."""
        nonlocal state
        state, sums = executables[0](state, trainer.corpus, patient[i % count], cls[i % count], keys, active)
        return state, sums

    if trace_dir is not None:
        with jax.profiler.trace(str(Path(trace_dir) / f"{mode}-{dtype}")):
            for i in range(trace_steps):
                out = first_shape_step(i)
            jax.block_until_ready(out)

    ops = None
    if ops_top > 0:
        calls = itertools.count()
        ops = op_breakdown(executables[0], lambda: first_shape_step(next(calls)), steps=max(trace_steps, 1),
                           top=ops_top)  # fmt: skip

    num_batches = batcher.num_batches
    epoch_s = sum(s["batches_per_epoch"] * s["step_s"] for s in shapes)
    flop_model = FlopModel.from_config(cfg.model, len(trainer.data.vocab))
    lengths = batcher.lengths.astype(np.int64)
    targets = cfg.data.mask_prob * _clinical_tokens(trainer.data.corpus, batcher.patients, trainer.data.vocab.code_end)
    model_flops = flop_model.model_flops(int(lengths.sum()), int(np.sum(lengths**2)), targets)
    hardware_flops = sum(
        s["batches_per_epoch"] * flop_model.hardware_flops(s["rows"], s["row_len"], s["mlm_slots_per_row"])
        for s in shapes
    )
    peak, peak_source = device_peak(dtype, device, cfg.profile.peak_matmul_size)
    step_s = epoch_s / num_batches
    memories = [s["memory"]["total_bytes"] for s in shapes if s["memory"]]

    def weighted(key: str) -> float | None:
        if any(s[key] is None for s in shapes):
            return None
        return sum(s["batches_per_epoch"] * s[key] for s in shapes) / num_batches

    return {
        "config": cfg.name, "mode": mode, "dtype": dtype, "preset": cfg.model.preset,
        "device": str(device), "device_kind": device.device_kind, "platform": device.platform,
        "steps": steps, "warmup": warmup, "build_s": build_s,
        "num_shapes": len(shapes), "shapes": shapes, "batches_per_epoch": num_batches,
        "compile_s": sum(s["compile_s"] for s in shapes),
        "step_s": step_s, "step_min_s": weighted("step_min_s"), "step_max_s": weighted("step_max_s"),
        "steps_per_s": 1.0 / step_s,
        "real_tokens_per_s": batcher.num_real_tokens / epoch_s,
        "computed_tokens_per_s": batcher.computed_tokens / epoch_s,
        "efficiency": batcher.efficiency,
        "patients_per_s": len(batcher.patients) / epoch_s,
        "model_flops_per_step": model_flops / num_batches,
        "hardware_flops_per_step": hardware_flops / num_batches,
        "xla_flops_per_step": weighted("xla_flops"),
        "xla_bytes_accessed_per_step": weighted("xla_bytes_accessed"),
        "model_flops_per_s": model_flops / epoch_s,
        "peak_flops": peak, "peak_source": peak_source,
        "mfu": mfu(model_flops / num_batches, step_s, peak),
        "hfu": mfu(hardware_flops / num_batches, step_s, peak),
        "mlm_targets_per_real_token": {"expected": targets / batcher.num_real_tokens,
                                       "timed": timed["weight"] / max(timed["real_tokens"], 1.0)},
        "mlm_overflow": timed["overflow"],
        "memory": {"compiled_bytes": max(memories) if memories else None,
                   "peak_bytes_in_use": _peak_bytes_in_use(device)},
        "ops": ops,
    }  # fmt: skip


def format_table(results: list[dict[str, Any]]) -> str:
    """Aligned text table of `profile_mode` results."""
    head = (
        f"{'mode':<12} {'dtype':<9} {'shapes':>6} {'compile s':>9} {'step ms':>8} {'min':>7} {'max':>7} "
        f"{'real tok/s':>11} {'slots/s':>10} {'eff.':>6} {'patients/s':>10} {'GFLOP/step':>10} {'MFU':>7} "
        f"{'HFU':>7} {'exe MiB':>8}"
    )
    lines = [head]
    for r in results:
        mem = r["memory"]["compiled_bytes"] or 0
        lines.append(
            f"{r['mode']:<12} {r['dtype']:<9} {r['num_shapes']:>6d} {r['compile_s']:>9.1f} {1e3 * r['step_s']:>8.1f} "
            f"{1e3 * r['step_min_s']:>7.1f} {1e3 * r['step_max_s']:>7.1f} {r['real_tokens_per_s']:>11,.0f} "
            f"{r['computed_tokens_per_s']:>10,.0f} {r['efficiency']:>6.3f} {r['patients_per_s']:>10,.1f} "
            f"{r['model_flops_per_step'] / 1e9:>10.2f} {r['mfu']:>7.2%} {r['hfu']:>7.2%} {mem / 2**20:>8.1f}"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Bars of real and computed tokens/s per (mode, dtype), and MFU, to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['mode']}\n{r['dtype']}" for r in results]
    x = np.arange(len(results))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(4 + 1.6 * len(results), 4))
    ax1.bar(x - 0.2, [r["real_tokens_per_s"] for r in results], 0.4, label="real tokens/s")
    ax1.bar(x + 0.2, [r["computed_tokens_per_s"] for r in results], 0.4, label="computed slots/s")
    ax1.set_xticks(x, labels)
    ax1.set_ylabel("tokens / s")
    ax1.legend()
    ax2.bar(x, [100 * r["mfu"] for r in results], 0.5, color="tab:green")
    ax2.set_xticks(x, labels)
    ax2.set_ylabel("MFU (%)")
    device = results[0]["device_kind"] if results else ""
    fig.suptitle(f"ehrjax MLM train step, {results[0]['config'] if results else ''} on {device}")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def write_outputs(results: list[dict[str, Any]], out: Path, meta: dict[str, Any]) -> None:
    """`profile.json` ({'meta', 'results'}) and `profile.png` under `out`, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    text = dumps_strict({"meta": meta, "results": results}, indent=2)
    atomic_write(out / "profile.json", lambda p: p.write_text(text))
    atomic_write(out / "profile.png", lambda p: plot(results, p))


# ------------------------------------------------------------------------------------------------- CLI

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    _FLAGS["config"] = config_flags.DEFINE_config_file("config", "configs/cpu.py", "Config file (get_config()).")
    _FLAGS["modes"] = flags.DEFINE_string("modes", None, f"comma-separated batching modes ({','.join(MODES)}).")
    _FLAGS["dtypes"] = flags.DEFINE_string("dtypes", None, "comma-separated compute dtypes (default: per device).")
    _FLAGS["steps"] = flags.DEFINE_integer("steps", None, "timed steps per batch shape (config.profile.steps).")
    _FLAGS["warmup"] = flags.DEFINE_integer("warmup", None, "untimed steps per shape (config.profile.warmup).")
    _FLAGS["trace"] = flags.DEFINE_string("trace", None, "write a jax.profiler trace of a few steps per run here.")
    _FLAGS["out"] = flags.DEFINE_string("out", None, "output directory (default results/profile-<config>-<stamp>/).")
    _FLAGS["ops"] = flags.DEFINE_integer("ops", 0, "also show where the step time goes: op kinds, the N slowest.")


def main(argv: list[str]) -> int:
    """The CLI after flag parsing; returns the exit status (2: a one-line configuration error)."""
    if len(argv) > 1:
        print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
        return 2
    try:
        config = _FLAGS["config"].value
        config.get("name")  # a config file that failed to load raises here
        settings = config.profile
        modes = parse_list(_FLAGS["modes"].value or settings.modes, MODES, "--modes")
        dtypes_text = _FLAGS["dtypes"].value
        dtypes = parse_list(dtypes_text, DTYPES, "--dtypes") if dtypes_text else default_dtypes()
        steps = settings.steps if _FLAGS["steps"].value is None else _FLAGS["steps"].value
        warmup = settings.warmup if _FLAGS["warmup"].value is None else _FLAGS["warmup"].value
        if steps < 1 or warmup < 0:
            raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = Path(_FLAGS["out"].value or Path("results") / f"profile-{config.name}-{stamp}")
        check_folder_writable(out, "--out")  # before the profiling, not after it
        if _FLAGS["trace"].value:
            check_folder_writable(_FLAGS["trace"].value, "--trace")
    except (OSError, ValueError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    results = []
    for mode in modes:
        for dtype in dtypes:
            print(f"profiling {mode} {dtype} ...", flush=True)
            try:
                results.append(
                    profile_mode(config, mode, dtype, steps, warmup=warmup, trace_dir=_FLAGS["trace"].value,
                                 trace_steps=settings.trace_steps, ops_top=_FLAGS["ops"].value)
                )  # fmt: skip
            except ValueError as err:
                print(f"error: {one_line(err)}", file=sys.stderr)
                return 2
    meta = {"config": config.name, "argv": sys.argv, "stamp": stamp, "jax": jax.__version__,
            "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
            "load_average": os.getloadavg()}  # fmt: skip
    print(format_table(results))
    for r in results:
        if r["ops"]:
            shape = r["shapes"][0]
            print(f"\nwhere the time goes: {r['mode']} {r['dtype']}, {shape['rows']} x {shape['row_len']} step")
            print(format_breakdown(r["ops"]))
    try:
        write_outputs(results, out, meta)
    except OSError as err:  # a folder made read-only meanwhile, a full disk
        print(f"error: --out {out}: {error_line(err)}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0


def run() -> None:
    from absl import app

    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
