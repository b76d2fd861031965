"""The training loop's real tokens/s against the bare jitted step's, on the same batches, in one run.

    python benchmarks/train_loop.py --config configs/cpu.py --epochs 2

The loop figure is its own measurement (log windows after the first, which holds the compile; evaluation
and checkpoint writes excluded, host syncs at log points and checkpoint copies included). The bare figure
runs the same compiled step over the same epoch plans back to back and syncs once per epoch.
Target: the loop keeps >= 90% of the bare step's throughput on CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

import jax
import jax.numpy as jnp

from ehrjax.config import load_config_file
from ehrjax.train.loop import build_run_trainer, train


def bare_tokens_per_s(config, epochs: int) -> tuple[float, float]:
    trainer = build_run_trainer(config)[0]
    state, keys, active = trainer.state, trainer.keys(), jnp.ones(trainer.num_seeds, bool)
    tokens, seconds = 0.0, 0.0
    for epoch in range(epochs + 1):  # epoch 0 warms up (compile), then timed epochs
        plan = trainer.stacked_plan(epoch)
        start = time.perf_counter()
        sums = []
        for k in range(plan.num_batches):
            row_len, patient, cls = plan.batch(k)
            state, out = trainer.train_step(row_len)(state, trainer.corpus, patient, cls, keys, active)
            sums.append(out["real_tokens"])
        total = float(sum(x.sum() for x in jax.device_get(sums)))
        if epoch:
            tokens, seconds = tokens + total, seconds + time.perf_counter() - start
    return tokens / seconds, trainer.train_batchers[0].efficiency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cpu.py")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--task", default="mlm")
    args = parser.parse_args()
    config = load_config_file(args.config)
    config.task = args.task
    config.train.epochs = args.epochs + 1
    config.train.patience = args.epochs + 1
    config.train.progress = False

    bare, efficiency = bare_tokens_per_s(config, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        config.output_dir = os.path.join(tmp, "run")
        result = train(config)
    loop = result.real_tokens_per_s
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}; config {args.config}, "
          f"task {args.task}, {config.data.batching} batching (efficiency {efficiency:.3f})")  # fmt: skip
    print(f"{'':<10}{'real tokens/s':>15}")
    print(f"{'bare step':<10}{bare:>15,.0f}")
    print(f"{'loop':<10}{loop:>15,.0f}")
    print(f"loop / bare = {loop / bare:.3f}")


if __name__ == "__main__":
    main()
