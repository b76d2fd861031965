"""The smoke benchmark as one process and as a job of N local processes, in one run: wall times side by side and
whether every prediction agrees.

    python benchmarks/multiprocess.py --processes 2 --pin-cores

The single process sees N CPU devices (`--xla_force_host_platform_device_count`), so its pre-training is data
parallel over the same number of devices as the job's; the job's processes see one device each (and, with
`--pin-cores`, one core each). Both write a full study folder; the script compares every run's
`predictions.npz` and prints the largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ehrjax.launch import launch

ROOT = Path(__file__).resolve().parents[1]


def predictions(out: Path) -> dict[str, np.ndarray]:
    summary = json.loads((out / "summary.json").read_text())
    return {r["predictions"]: np.load(out / r["predictions"])["probability"] for r in summary["runs"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "smoke.py"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--pin-cores", action="store_true")
    parser.add_argument("--out", default="", help="a folder for both studies (default: a temporary one)")
    parser.add_argument("overrides", nargs="*", help="--config.key=value flags for both runs")
    args = parser.parse_args()
    base = Path(args.out or tempfile.mkdtemp(prefix="ehrjax-mp-"))
    command = [sys.executable, "-m", "ehrjax.benchmark", "--config", args.config, "--config.train.progress=False",
               *args.overrides]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.processes}")  # fmt: skip
    start = time.perf_counter()
    one = subprocess.run([*command, f"--config.output_dir={base / 'one'}"], env=env, capture_output=True, text=True)
    one_s = time.perf_counter() - start
    if one.returncode:
        print(one.stderr[-3000:], file=sys.stderr)
        return 1
    start = time.perf_counter()
    results = launch([*command, f"--config.output_dir={base / 'job'}"], args.processes, logs=base / "logs",
                     pin_cores=args.pin_cores)  # fmt: skip
    job_s = time.perf_counter() - start
    if any(r.returncode for r in results):
        print("\n".join(r.output[-3000:] for r in results), file=sys.stderr)
        return 1
    a, b = predictions(base / "one"), predictions(base / "job")
    same = sorted(a) == sorted(b)
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a) if same else float("nan")
    equal = sum(np.array_equal(a[k], b[k]) for k in a) if same else 0
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    print(f"1 process x {args.processes} devices: {one_s:7.1f} s")
    print(f"{args.processes} processes x 1 device{' (pinned)' if args.pin_cores else ''}: {job_s:7.1f} s "
          f"({job_s / one_s:.2f}x)")  # fmt: skip
    print(f"predictions: {len(a)} runs, {equal} bitwise equal, largest difference {worst:.3g}")
    print(f"folders: {base}")
    return 0 if same and worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
