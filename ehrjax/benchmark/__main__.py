"""`python -m ehrjax.benchmark [--config configs/cpu.py] [--config.key=value ...]`: the whole study.

    python -m ehrjax.benchmark                                    # the CPU default, minutes on 2 cores
    python -m ehrjax.benchmark --config configs/a40.py
    python -m ehrjax.benchmark --config.benchmark.arms=scratch,mlm_lora --config.benchmark.train_sizes=250,1000
    python -m ehrjax.benchmark --config.resume=results/benchmark-cpu-<stamp>   # continue an interrupted one

Writes `report.md`, `summary.json`, `plots/`, per-run `predictions.npz` and `metrics.jsonl`, the pre-training
runs and exported embeddings under `--config.output_dir` (default `results/benchmark-<config>-<time>/`), and
prints the result table.

An output folder that already holds a benchmark (or anything else) is refused unless the run is its
`--config.resume`; the folder is locked while the benchmark runs (a second benchmark on it is refused, naming
the process), and nothing in it changes before the config has been validated.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from ehrjax.cli import error_line, parse_flags, start_jax

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cpu.py", "Experiment config file (get_config()).")


def output_dir(config) -> Path:
    from ehrjax.train.rundir import run_directory

    return run_directory(config, f"benchmark-{config.name}")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value
        config.get("name")
    except OSError as err:
        print(f"error: config: {error_line(err)}", file=sys.stderr)
        return 2
    try:
        start_jax(config.train)
    except ValueError as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    from ehrjax.benchmark.report import format_results_table, write_report
    from ehrjax.benchmark.stages import Benchmark
    from ehrjax.multihost import is_writer, sync
    from ehrjax.train.checkpoint import check_writable
    from ehrjax.train.fit import TrainingDiverged
    from ehrjax.train.rundir import FolderLock, check_output_folder

    out = output_dir(config).absolute()
    resume = bool(config.resume)
    lock = FolderLock(out) if is_writer() else None
    try:
        # Before Benchmark(): a finished (or any non-empty) folder is only ever continued, never restarted. A
        # resumed folder is locked at once; a new one once validation passed and it is made, then checked again.
        check_output_folder(out, resume=resume, marker="manifest.json", what="benchmark")
        if resume and lock is not None:
            lock.acquire()
        if is_writer():
            check_writable(out)
        sync("benchmark folder checked")  # every process checked it before process 0 makes it
        bench = Benchmark(config, out, resume=resume)  # validates before any work
        if not resume and lock is not None:
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
            check_output_folder(out, resume=False, marker="manifest.json", what="benchmark")
        summary = bench.run()
        if not is_writer():  # its cells are written; process 0 writes the report
            sync("benchmark done")
            return 0
        bench.say("report: writing")
        stats = write_report(summary, out, n_boot=config.benchmark.n_boot)
        sync("benchmark done")
    except (ValueError, TrainingDiverged, OSError) as err:  # OSError: a read-only folder, a full disk
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
    print(format_results_table(stats))
    print(f"report: {out / 'report.md'}")
    return 0


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
