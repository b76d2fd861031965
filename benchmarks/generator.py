"""Synthetic-generator throughput: patients/s, tokens/s and peak memory per cohort size.

    python benchmarks/generator.py --sizes 10000 100000 1000000
    python benchmarks/generator.py --whole-process 1000000 --workers 1 2 --rounds 2
    git worktree add /tmp/before <commit> && \
        python benchmarks/generator.py --whole-process 1000000 --workers 2 --rounds 3 --baseline /tmp/before

`--whole-process N` times the CLI end to end instead (`python -m ehrjax.data.synthetic --num-patients N
--seed 0 --stream pretrain --out <tmp>.npz`: interpreter start, imports, generation, the .npz write and the
summary), once per `--workers` value per round, the values taking turns so load drift hits them alike; it
prints wall seconds, the child's CPU seconds (user + system) and the 1-minute load average before each run.
`--baseline DIR` (a checkout of another commit) adds, in every round, the same runs of that checkout's CLI
(`before` rows), and at the end compares the two cohorts file against file, array by array, byte for byte.

Time is the best of `--repeats` runs; peak memory is traced (tracemalloc sees numpy's allocations) in a
separate run so the tracing does not slow the timed ones. Targets on 2 CPU cores: >= 100,000 patients/s in
process; >= 150,000 patients/s for the whole process at 1,000,000 patients.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from ehrjax.data.synthetic import generate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--stream", default="pretrain")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-noise-codes", type=int, default=1000)
    parser.add_argument("--whole-process", type=int, default=0, metavar="N", help="time the CLI at N patients")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--workers values (whole process)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over --workers (whole process)")
    parser.add_argument("--baseline", type=Path, default=None, help="checkout of another commit to run beside")
    args = parser.parse_args()
    if args.whole_process:
        whole_process(args.whole_process, args.stream, args.workers, args.rounds, args.baseline)
        return

    generate_cohort(1000, 0, args.stream, args.num_noise_codes)  # warm caches and imports
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; stream {args.stream}")
    print(f"{'patients':>10} {'tokens':>12} {'seconds':>8} {'patients/s':>12} {'tokens/s':>12} {'peak MiB':>9}")
    for n in args.sizes:
        times = []
        for _ in range(args.repeats if n <= 100_000 else 1):
            start = time.perf_counter()
            cohort = generate_cohort(n, 0, args.stream, args.num_noise_codes)
            times.append(time.perf_counter() - start)
        tokens = cohort.num_tokens
        del cohort
        tracemalloc.start()
        generate_cohort(n, 0, args.stream, args.num_noise_codes)
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
        best = min(times)
        print(f"{n:>10,} {tokens:>12,} {best:>8.2f} {n / best:>12,.0f} {tokens / best:>12,.0f} {peak:>9.0f}")


def whole_process(n: int, stream: str, workers: list[int], rounds: int, baseline: Path | None = None) -> None:
    """Wall and CPU seconds of the generator CLI at `n` patients per workers value (and checkout), alternating."""
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {os.cpu_count()} cores; stream {stream}, {n:,} patients")
    print(f"{'round':>5} {'code':>6} {'workers':>7} {'load':>5} {'wall s':>7} {'cpu s':>6} {'patients/s':>11}")
    trees = [("this", Path(__file__).resolve().parents[1])]
    if baseline is not None:
        if not (baseline / "ehrjax" / "data" / "synthetic.py").is_file():
            raise SystemExit(f"--baseline {baseline}: expected a checkout of this repository")
        trees.insert(0, ("before", baseline.resolve()))
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for w in workers:
                for name, tree in trees:
                    out = Path(tmp) / f"{name}.npz"
                    out.unlink(missing_ok=True)  # every run writes a new file (replacing one costs an unlink)
                    load = os.getloadavg()[0]
                    before = resource.getrusage(resource.RUSAGE_CHILDREN)
                    start = time.perf_counter()
                    cmd = [sys.executable, "-m", "ehrjax.data.synthetic", "--num-patients", str(n), "--seed", "0",
                           "--stream", stream, "--out", str(out), "--workers", str(w)]  # fmt: skip
                    subprocess.run(cmd, check=True, capture_output=True, cwd=tree,
                                   env=dict(os.environ, PYTHONPATH=str(tree)))  # fmt: skip
                    wall = time.perf_counter() - start
                    after = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
                    row = f"{r:>5} {name:>6} {w:>7} {load:>5.2f} {wall:>7.2f} {cpu:>6.2f} {n / wall:>11,.0f}"
                    print(row, flush=True)
        if baseline is not None:
            compare_files(Path(tmp) / "before.npz", Path(tmp) / "this.npz")


def compare_files(a: Path, b: Path) -> None:
    """Print whether two cohort files hold the same arrays, byte for byte."""
    with np.load(a) as x, np.load(b) as y:
        if sorted(x.files) != sorted(y.files):
            print(f"cohorts differ: arrays {sorted(x.files)} vs {sorted(y.files)}")
            return
        differ = [k for k in x.files if x[k].dtype != y[k].dtype or x[k].tobytes() != y[k].tobytes()]
    print(f"cohorts {'IDENTICAL' if not differ else 'DIFFER'}: {len(x.files)} arrays compared byte for byte"
          + (f"; differing: {', '.join(differ)}" if differ else ""))  # fmt: skip


if __name__ == "__main__":
    main()
