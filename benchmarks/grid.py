"""Many runs, one compile: a fine-tuning grid in one process against the same runs as separate `train()` calls.

    python benchmarks/grid.py [--config configs/cpu.py] [--epochs 3] [--sizes 250,1000,2000] [--seeds 0,1,2]

The grid (arms scratch, mlm_emb, mlm_lora, mlm_full x sizes x seeds) builds the task data and uploads the corpus
once, compiles each distinct program once and trains an arm's seeds together. It reports the grid's wall time
against the time spent inside its train and eval steps (the fixed costs left: target ratio <= 1.15), the number of
compiles, and, for the scratch arm, the same runs as separate `ehrjax.train.loop.train` calls (one seed each,
data, checkpoints and exports per call), side by side. A one-epoch MLM pre-training first provides the
pre-trained arms' weights (not timed).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import jax

from ehrjax.benchmark.grid import ArmInputs, CellData, run_neural_cell
from ehrjax.benchmark.stages import parse_list, stage_config
from ehrjax.config import load_config_file
from ehrjax.data.batching import to_device
from ehrjax.data.tasks import build_task_data
from ehrjax.train.arms import arm_from_config, arm_lora_config
from ehrjax.train.loop import pretrained_table, train
from ehrjax.train.pretrained import load_pretrained_run
from ehrjax.train.trainer import ProgramCache


def _steps(data, size: int, rows: int) -> int:
    """Batches per epoch of `size` training patients in fine-tuning batches (for an epoch budget in steps)."""
    from ehrjax.data.batching import DeviceBatcher

    b = DeviceBatcher(data.corpus, row_len=data.corpus.max_len, rows_per_batch=rows,
                      patients=data.splits["train"][:size])  # fmt: skip
    return b.num_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/cpu.py")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--sizes", default="250,1000,2000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default="scratch,mlm_emb,mlm_lora,mlm_full")
    args = parser.parse_args()
    config = load_config_file(args.config)
    config.train.progress = False
    sizes, seeds = parse_list(args.sizes, "--sizes", int), parse_list(args.seeds, "--seeds", int)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train(stage_config(config, task="mlm", **{"train.epochs": 1, "output_dir": str(tmp / "mlm")}))
        run = load_pretrained_run(tmp / "mlm")
        rows = config.benchmark.finetune_rows_per_batch
        finetune = stage_config(config, task="outcome", **{"data.rows_per_batch": rows})

        start = time.perf_counter()
        data = build_task_data(finetune, "outcome", vocab=run.vocab)
        corpus = to_device(data.corpus, data.labels)
        programs, in_steps, cells = ProgramCache(), 0.0, []
        for name in parse_list(args.arms, "--arms"):
            arm = arm_from_config(name, config.arms)
            inputs = ArmInputs(
                arm=arm, model_cfg=config.model, pretrained=run.params if arm.encoder != "random" else None,
                code_table=pretrained_table(run) if arm.code_table == "mlm" and arm.encoder == "random" else None,
                trainable=arm.trainable, lora_cfg=arm_lora_config(arm, config.lora),
            )  # fmt: skip
            for size in sizes:
                cell = CellData("heart_failure", data, None, None, data.splits["val"])
                runs, _, _ = run_neural_cell(
                    inputs, cell, size, seeds, [float(finetune.optim.learning_rate)], out=tmp / "grid",
                    optim_cfg=finetune.optim, data_cfg=finetune.data, max_steps=args.epochs * _steps(data, size, rows),
                    eval_steps=1, patience=args.epochs, corpus=corpus, programs=programs,
                )  # fmt: skip
                r = runs[0]
                in_steps += r["group_train_s"] + r["group_eval_s"]
                cells.append((name, size, r["group_wall_s"], r["group_train_s"], r["group_compile_s"]))
        grid_wall = time.perf_counter() - start

        separate_wall, separate = 0.0, []
        for size in sizes:
            for seed in seeds:
                t0 = time.perf_counter()
                result = train(stage_config(finetune, arm="scratch", seed=seed, **{
                    "train.epochs": args.epochs, "train.patience": args.epochs, "finetune.train_size": size,
                    "init_from": "", "output_dir": str(tmp / f"sep-{size}-{seed}")}))  # fmt: skip
                separate.append((size, seed, time.perf_counter() - t0, result.compile_seconds))
                separate_wall += separate[-1][2]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].platform}; load "
          f"{os.getloadavg()[0]:.1f}; config {args.config}; {args.epochs} epochs; sizes {sizes}; seeds {seeds}")
    print(f"{'cell':<22}{'wall s':>9}{'train s':>9}{'compile s':>11}")
    for name, size, wall, tr, comp in cells:
        print(f"{name + ' n=' + str(size):<22}{wall:>9.1f}{tr:>9.1f}{comp:>11.1f}")
    print(f"grid: {len(cells)} cells x {len(seeds)} seeds in {grid_wall:.1f} s; in train/eval steps {in_steps:.1f} s; "
          f"wall / steps = {grid_wall / in_steps:.3f}; {programs.num_compiles} compiles "
          f"({programs.compile_seconds:.1f} s)")
    scratch = [c for c in cells if c[0] == "scratch"]
    grid_scratch = sum(c[2] for c in scratch)
    print(f"scratch arm: grid {grid_scratch:.1f} s for {len(scratch) * len(seeds)} runs; separate train() calls "
          f"{separate_wall:.1f} s (compile {sum(s[3] for s in separate):.1f} s); separate / grid = "
          f"{separate_wall / grid_scratch:.2f}")


if __name__ == "__main__":
    main()
