"""Paired comparison of the same arms across two benchmark folders: a feature on (A) against off (B).

    python -m ehrjax.benchmark.report.compare results/with-time-tokens results/without --arms mlm_lora,scratch

Two benchmarks on the same cohorts score the same test patients, and replicate r of an arm draws the same
labelled set in both, so arm X in A and arm X in B pair like two arms of one benchmark: each bootstrap
replicate applies one draw of test patients and replicate indices to both. Per task, every (arm, size) both
folders ran is one comparison, Holm-adjusted together (`ehrjax.eval.stats`), with the verdict rule the
report uses. Ceiling arms (kind `oracle`) are the same columns in both and are left out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ehrjax.benchmark.report.analysis import ALPHA, BOOTSTRAP_SEED, holm_family, paired_comparison
from ehrjax.benchmark.report.load import load
from ehrjax.eval.stats import replicates


def compare_runs(dir_a: str | Path, dir_b: str | Path, arms: list[str] | None = None,
                 n_boot: int = 2000) -> dict[str, Any]:  # fmt: skip
    """{'a', 'b', 'n_boot', 'comparisons': [{'task', 'arm', 'size', 'auroc_a', 'auroc_b', 'mean', 'ci',
    'half_width', 'p', 'replicates', 'family', 'm', 'p_holm', 'verdict'}]}: test AUROC of A minus B per (task,
    arm, size), paired as the report pairs two arms (`analysis.paired_comparison`), one Holm family per task;
    auroc_a, auroc_b: each side's mean over its replicates.

    arms: the arms to compare (default: every non-ceiling arm both ran). One-line ValueErrors when a folder is
    not a benchmark's, when the two scored different test patients, or when nothing pairs.
    """
    from ehrjax.atomic import read_json

    folders = [Path(dir_a), Path(dir_b)]
    summaries = [read_json(d / "summary.json", f"benchmark {d}") for d in folders]
    loaded = [load(s, d) for s, d in zip(summaries, folders, strict=True)]
    kinds = {arm: meta.get("kind") for s in summaries for arm, meta in s.get("arms", {}).items()}
    out: list[dict[str, Any]] = []
    for task in [t for t in loaded[0] if t in loaded[1]]:
        ta, tb = loaded[0][task], loaded[1][task]
        if not (np.array_equal(ta.patient_id, tb.patient_id) and np.array_equal(ta.labels, tb.labels)):
            raise ValueError(f"task {task}: {folders[0]} and {folders[1]} scored different test patients or labels; "
                             "a paired comparison needs the same cohorts")  # fmt: skip
        family = []
        for (arm, size), cell_a in sorted(ta.cells.items()):
            cell_b = tb.cells.get((arm, size))
            if cell_b is None or kinds.get(arm) == "oracle" or (arms is not None and arm not in arms):
                continue
            ra, rb = (replicates(ta.labels, c.test, "auroc", n_boot, BOOTSTRAP_SEED) for c in (cell_a, cell_b))
            pair = paired_comparison(ra, rb, cell_a.replicates, cell_b.replicates)
            if pair is not None:
                family.append({"task": task, "arm": arm, "size": size, "auroc_a": float(ra.point.mean()),
                               "auroc_b": float(rb.point.mean()), **pair})  # fmt: skip
        out += holm_family(task, family)
    if not out:
        raise ValueError(f"{folders[0]} and {folders[1]}: no (task, arm, size) ran in both" +
                         (f" among arms {','.join(arms)}" if arms else ""))  # fmt: skip
    return {"a": str(folders[0]), "b": str(folders[1]), "n_boot": n_boot, "alpha": ALPHA, "comparisons": out}


def format_comparison(result: dict[str, Any]) -> str:
    """The comparisons as a markdown table (one row per task, arm and size)."""
    lines = [f"A = {result['a']}, B = {result['b']}; test AUROC, means over paired replicates; Holm per task.", "",
             "| task | arm | size | A | B | A - B [95% CI] | Holm p | verdict |",
             "|---|---|---:|---:|---:|---|---:|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['task']} | {c['arm']} | {c['size']:,} | {c['auroc_a']:.3f} | {c['auroc_b']:.3f} | "
                     f"{c['mean']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] | {c['p_holm']:.3f} | {c['verdict']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ehrjax.benchmark.report.compare",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("a", type=Path, help="benchmark output folder A (e.g. the feature on)")
    parser.add_argument("b", type=Path, help="benchmark output folder B (e.g. the feature off)")
    parser.add_argument("--arms", default="", help="comma-separated arms (default: every non-ceiling arm)")
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    from ehrjax.atomic import write_json
    from ehrjax.cli import error_line

    try:
        if args.n_boot < 1:
            raise ValueError(f"--n-boot: expected a positive count, got {args.n_boot}")
        result = compare_runs(args.a, args.b, [a for a in args.arms.split(",") if a] or None, args.n_boot)
        if args.out is not None:
            write_json(args.out, result, strict=True)
    except (ValueError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    print(format_comparison(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
