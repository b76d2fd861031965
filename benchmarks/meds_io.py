"""MEDS reader throughput and memory: write synthetic cohorts as MEDS, then time `read_meds` and take its peak RSS.

    python benchmarks/meds_io.py --sizes 100000 1000000 --out /tmp/meds_bench

For each size: the `pretrain` cohort is generated and written once (`write_meds`, timed), then each read runs
in a fresh process (`--read DIR`) that reports its wall time and peak resident memory (`VmHWM` of
/proc/self/status, imports included; the RSS after imports is printed too. `ru_maxrss` would not do: it
survives `execve`, so the child would report the parent's size at the fork). Events are MEDS rows read
(birth and sex rows included); tokens are the cohort's clinical-code tokens. Targets (1e6 subjects): peak
< 2 GB, >= 1M events/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (`VmRSS`: now, `VmHWM`: peak since exec), in MiB."""
    with open("/proc/self/status") as fh:
        line = next(line for line in fh if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def read_once(meds_dir: str) -> dict:
    import numpy as np  # noqa: F401  (imports counted in the baseline, not in the read)
    import pyarrow.parquet as pq

    from ehrjax.data.meds import read_meds

    baseline = _status_mib("VmRSS")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in Path(meds_dir, "data").glob("*.parquet"))
    start = time.perf_counter()
    cohort = read_meds(meds_dir)
    seconds = time.perf_counter() - start
    peak = _status_mib("VmHWM")
    return dict(subjects=len(cohort), tokens=cohort.num_tokens, rows=rows, seconds=seconds,
                peak_mib=peak, baseline_mib=baseline)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--out", type=Path, default=Path("/tmp/meds_bench"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=50_000)
    parser.add_argument("--keep", action="store_true", help="keep the written datasets")
    parser.add_argument("--read", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        print(json.dumps(read_once(args.read)))
        return

    from ehrjax.data.meds import write_meds
    from ehrjax.data.synthetic import generate_cohort

    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load {os.getloadavg()}")
    print(f"{'subjects':>10} {'rows':>12} {'tokens':>12} {'write s':>8} {'read s':>7} {'rows/s':>11} "
          f"{'tokens/s':>11} {'peak MiB':>9} {'after imports MiB':>18}")  # fmt: skip
    for n in args.sizes:
        root = args.out / f"meds_{n}"
        shutil.rmtree(root, ignore_errors=True)
        cohort = generate_cohort(n, 0, "pretrain", 1000)
        start = time.perf_counter()
        write_meds(cohort, root, shard_size=args.shard_size)
        write_s = time.perf_counter() - start
        del cohort
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, __file__, "--read", str(root)], capture_output=True, text=True,
                                 check=True)  # fmt: skip
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["seconds"])
        peak = max(r["peak_mib"] for r in runs)
        print(f"{n:>10,} {best['rows']:>12,} {best['tokens']:>12,} {write_s:>8.1f} {best['seconds']:>7.2f} "
              f"{best['rows'] / best['seconds']:>11,.0f} {best['tokens'] / best['seconds']:>11,.0f} {peak:>9.0f} "
              f"{best['baseline_mib']:>18.0f}")  # fmt: skip
        print(f"  load after: {os.getloadavg()}", flush=True)
        if not args.keep:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
