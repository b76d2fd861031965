"""Train-step variants side by side in one process, taking turns: ratios that survive a shared machine's load.

    python benchmarks/ab_step.py --config configs/cpu.py \
        --variant base= --variant no_dropout=model.dropout=0,model.attention_dropout=0 \
        --variant rbg=prng:rbg --rounds 3 --steps 4

Each `--variant NAME=SETTINGS` is the config (`--config`, MLM task) with comma-separated `section.key=value`
overrides (values parsed as Python literals where they parse, else kept as strings) and optionally
`prng:IMPL`, the PRNG implementation of the step's key (`threefry2x32`, `rbg`, `unsafe_rbg`: every dropout mask
of the step is drawn from it). Every variant's trainer is built and its step compiled ahead of time for every
batch shape of its epoch plan (the compile time is printed); then for `--rounds` rounds each variant runs
`--steps` steps per shape in turn (after `--warmup` untimed steps in the first round), each ended with
`block_until_ready`. Per variant and round: the epoch-weighted step time (as `ehrjax.profile`: per shape the
median step time weighted by that shape's batches per epoch) and real tokens/s; the summary gives each
variant's real tokens/s over all rounds (per shape the median of all its timed steps) and its ratio to the
first variant, and the same from the process's CPU time per step (user + system of all its threads,
`time.process_time`): on a machine shared with other jobs wall time swings with their load, while CPU time
per step measures the work itself (it also counts any busy-waiting of XLA's thread pool). Process-wide
settings (`XLA_FLAGS`, `JAX_DEFAULT_PRNG_IMPL`) need one process per setting.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp

from ehrjax.config import load_config_file


def parse_variant(text: str) -> tuple[str, dict[str, Any], str | None]:
    """'name=a.b=1,c.d=x,prng:rbg' -> ('name', {'a.b': 1, 'c.d': 'x'}, 'rbg')."""
    name, _, settings = text.partition("=")
    if not name:
        raise ValueError(f"--variant {text!r}: expected NAME=SETTINGS")
    overrides: dict[str, Any] = {}
    prng = None
    for item in filter(None, (s.strip() for s in settings.split(","))):
        if item.startswith("prng:"):
            prng = item[len("prng:") :]
            continue
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--variant {name}: {item!r} is not section.key=value")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return name, overrides, prng


def build(config: Any, overrides: dict[str, Any], prng: str | None, warmup: int) -> dict[str, Any]:
    """The variant's trainer, epoch plan, key and per-shape compiled steps (after `warmup` steps each)."""
    from ehrjax.train.loop import build_run_trainer

    cfg = copy.deepcopy(config)
    cfg.task, cfg.train.progress = "mlm", False
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        cfg[section][name] = value
    trainer = build_run_trainer(cfg)[0]
    plan = trainer.stacked_plan(0)
    keys = jnp.stack([jax.random.key(s, impl=prng) if prng else jax.random.key(s) for s in trainer.seeds])
    active = jnp.ones(trainer.num_seeds, bool)
    state = trainer.state
    compiled, compile_s = [], 0.0
    for row_len, patient, cls in plan.groups:
        t0 = time.perf_counter()
        step = trainer.train_step(row_len).jitted.lower(state, trainer.corpus, patient[0], cls[0], keys,
                                                        active).compile()  # fmt: skip
        compile_s += time.perf_counter() - t0
        for i in range(warmup):
            state, _ = step(state, trainer.corpus, patient[i % len(patient)], cls[i % len(patient)], keys, active)
        jax.block_until_ready(state)
        compiled.append(step)
    batcher = trainer.train_batchers[0]
    return {"cfg": cfg, "batcher": batcher, "plan": plan, "keys": keys, "active": active, "state": state,
            "compiled": compiled, "corpus": trainer.corpus, "compile_s": compile_s,
            "times": [[] for _ in plan.groups], "cpu": [[] for _ in plan.groups]}  # fmt: skip


def run_round(v: dict[str, Any], steps: int, first_step: int) -> tuple[list[list[float]], list[list[float]]]:
    """`steps` synchronised steps per shape; returns the wall and the CPU seconds of each step per shape."""
    walls, cpus = [], []
    for g, ((_, patient, cls), step) in enumerate(zip(v["plan"].groups, v["compiled"], strict=True)):
        wall, cpu = [], []
        for i in range(steps):
            j = (first_step + i) % len(patient)
            t0, c0 = time.perf_counter(), time.process_time()
            v["state"], sums = step(v["state"], v["corpus"], patient[j], cls[j], v["keys"], v["active"])
            jax.block_until_ready((v["state"], sums))
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        v["times"][g] += wall
        v["cpu"][g] += cpu
        walls.append(wall)
        cpus.append(cpu)
    return walls, cpus


def tokens_per_s(v: dict[str, Any], times: list[list[float]]) -> tuple[float, float]:
    """(epoch-weighted step seconds, real tokens/s) from step times per shape."""
    counts = v["batcher"].group_batches
    epoch_s = sum(c * statistics.median(t) for c, t in zip(counts, times, strict=True))
    return epoch_s / sum(counts), v["batcher"].num_real_tokens / epoch_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cpu.py")
    parser.add_argument("--variant", action="append", required=True, help="NAME=section.key=value,...,prng:IMPL")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per shape per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per shape after compiling")
    args = parser.parse_args()
    config = load_config_file(args.config)
    variants = {}
    for text in args.variant:
        name, overrides, prng = parse_variant(text)
        variants[name] = build(config, overrides, prng, args.warmup)
        batcher = variants[name]["batcher"]
        pairs = zip(batcher.group_batches, batcher.shapes, strict=True)
        shapes = ", ".join(f"{n}x{rows}x{length}" for n, (rows, length) in pairs)
        print(
            f"{name}: {overrides} prng={prng or 'default'}; compile {variants[name]['compile_s']:.1f} s; "
            f"batches x rows x row_len per epoch: {shapes}; efficiency {batcher.efficiency:.3f}",
            flush=True,
        )
    print(f"{'round':>5} {'load':>5} " + " ".join(f"{n + ' ms':>14} {'cpu ms':>8}" for n in variants))
    for r in range(args.rounds):
        load = os.getloadavg()[0]
        cells = []
        for v in variants.values():
            walls, cpus = run_round(v, args.steps, 1000 + r * args.steps)
            cells.append(f"{1e3 * tokens_per_s(v, walls)[0]:>14.1f} {1e3 * tokens_per_s(v, cpus)[0]:>8.1f}")
        print(f"{r:>5} {load:>5.2f} " + " ".join(cells), flush=True)
    base = base_cpu = None
    print(f"all rounds (load now {os.getloadavg()[0]:.2f}); CPU tokens/s = real tokens per CPU-second:")
    for name, v in variants.items():
        step_s, rate = tokens_per_s(v, v["times"])
        cpu_s, cpu_rate = tokens_per_s(v, v["cpu"])
        base, base_cpu = base or rate, base_cpu or cpu_rate
        print(
            f"  {name:<20} step {1e3 * step_s:8.1f} ms  real tokens/s {rate:>9,.0f}  ratio {rate / base:.3f}   "
            f"CPU {1e3 * cpu_s:8.1f} ms/step  CPU tokens/s {cpu_rate:>9,.0f}  ratio {cpu_rate / base_cpu:.3f}"
        )


if __name__ == "__main__":
    main()
