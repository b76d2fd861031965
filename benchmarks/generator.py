"""Synthetic-generator throughput: patients/s, tokens/s and peak memory per cohort size.

    python benchmarks/generator.py --sizes 10000 100000 1000000

Time is the best of `--repeats` runs; peak memory is traced (tracemalloc sees numpy's allocations) in a
separate run so the tracing does not slow the timed ones. Target: >= 100,000 patients/s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc

from ehrjax.data.synthetic import generate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--stream", default="pretrain")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-noise-codes", type=int, default=1000)
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
