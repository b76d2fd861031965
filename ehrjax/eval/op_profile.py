"""Where a compiled step's time goes: time per HLO op from a `jax.profiler` trace, grouped by kind.

XLA's CPU runtime records one trace event per executed op (thunk), named after the HLO instruction, on the
threads that ran it. `op_breakdown` traces a few calls of a compiled executable, keeps the events whose names
are instructions of that executable, and adds them up per instruction and per kind:

- `matmul`: dots, and the fusions (XNNPACK / YNNPACK / oneDNN library calls included) that contain one;
- `random bits`: random-bit generation (threefry: dropout and MLM masking) and the masks built from it;
- `softmax / reductions`: fusions with an exponential or a reduce (softmax, layer norm, losses, norms);
- `layout copies`: copies and transposes (head splits and merges, operand layouts for the dots);
- `gather / scatter`, `collectives`, and `element-wise` for the rest.

An op's time is its duration on the thread that ran it. A library call that splits one op over a thread pool
(the XNNPACK / YNNPACK dots) is traced once, on the calling thread, so the times read as wall time per op and
as shares of the step, not as CPU time; ops running side by side would add up to more than the step's wall
time, idle gaps to less. Both sums are reported.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

CATEGORIES: tuple[str, ...] = (
    "matmul", "random bits", "softmax / reductions", "layout copies", "gather / scatter", "collectives", "element-wise",
)  # fmt: skip
_RNG_MARKERS = ("threefry", "random_bits", "_bernoulli", "_uniform", "rng-bit-generator", "dropout")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One instruction of an HLO module: its opcode, result shape, source `op_name` and what it computes."""

    name: str
    opcode: str
    shape: str
    source: str  # the JAX op_name metadata ('' if none)
    body: str  # the instruction's text and, for a fusion, its fused computation's


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
    """Every instruction of an optimised HLO module text (`compiled.as_text()`), by name."""
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m:
                current = computations.setdefault(m.group(1), [])
        elif line.startswith("}"):
            current = None
        else:
            current.append(line)
    ops = {}
    for lines in computations.values():
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, opcode = m.group(1), m.group(2)
            shape = line.split("=", 1)[1].split()[0]
            source = re.search(r'op_name="([^"]*)"', line)
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = line + ("\n" + "\n".join(computations.get(called.group(1), [])) if called else "")
            ops[name] = HloOp(name, opcode, shape, source.group(1) if source else "", body)
    return ops


def categorize(op: HloOp) -> str:
    """The kind of work an instruction does (one of `CATEGORIES`)."""
    text = op.body
    if op.opcode in _COLLECTIVES or any(c + "(" in text or c + "-start(" in text for c in _COLLECTIVES):
        return "collectives"
    if op.opcode in ("dot", "convolution") or " dot(" in text or " convolution(" in text or "$matmul" in text:
        return "matmul"
    if any(marker in text for marker in _RNG_MARKERS):
        return "random bits"
    if " exponential(" in text or " reduce(" in text or op.opcode == "reduce" or "reduce-window(" in text:
        return "softmax / reductions"
    if " gather(" in text or " scatter(" in text or op.opcode in ("gather", "scatter"):
        return "gather / scatter"
    if op.opcode in ("copy", "transpose") or " copy(" in text or " transpose(" in text:
        return "layout copies"
    return "element-wise"


def op_times(run: Callable[[], Any], steps: int, names: set[str]) -> tuple[dict[str, float], float]:
    """Trace `steps` calls of `run` (each synchronised): ({instruction name: seconds per call} for the trace
    events named after an instruction in `names`, wall seconds per call)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                jax.block_until_ready(run())
        wall = (time.perf_counter() - start) / steps
        files = glob.glob(str(Path(tmp) / "**" / "*.xplane.pb"), recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no trace under {tmp}")
        data = jax.profiler.ProfileData.from_file(files[0])
    totals: collections.Counter[str] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in names:
                    totals[event.name] += event.duration_ns
    return {name: ns / 1e9 / steps for name, ns in totals.items()}, wall


def op_breakdown(compiled: Any, run: Callable[[], Any], steps: int = 5, top: int = 20) -> dict[str, Any]:
    """Time per kind and the `top` slowest instructions of `compiled` (a `jax.stages.Compiled`), from `steps`
    traced calls of `run` (which calls it). Seconds are per call; `op_seconds` is their sum over the ops."""
    ops = hlo_ops(compiled.as_text())
    times, wall = op_times(run, steps, set(ops))
    kinds = {name: categorize(ops[name]) for name in times}
    by_kind = dict.fromkeys(CATEGORIES, 0.0)
    for name, seconds in times.items():
        by_kind[kinds[name]] += seconds
    slowest = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    return {
        "wall_seconds": wall,
        "op_seconds": sum(times.values()),
        "categories": by_kind,
        "top": [{"name": n, "kind": kinds[n], "seconds": s, "shape": ops[n].shape, "source": ops[n].source}
                for n, s in slowest],
    }  # fmt: skip


def format_breakdown(b: dict[str, Any]) -> str:
    """Text tables of an `op_breakdown` result."""
    total = max(b["op_seconds"], 1e-12)
    lines = [f"wall {1e3 * b['wall_seconds']:.1f} ms per step (traced); ops {1e3 * total:.1f} ms summed",
             f"{'kind':<22} {'ms/step':>8} {'share':>6}"]  # fmt: skip
    for kind, s in sorted(b["categories"].items(), key=lambda kv: -kv[1]):
        lines.append(f"{kind:<22} {1e3 * s:>8.2f} {s / total:>6.1%}")
    lines.append(f"\n{'op':<32} {'kind':<20} {'ms/step':>8}  {'shape':<28} source")
    for op in b["top"]:
        source = op["source"].rsplit("/", 3)
        lines.append(f"{op['name'][:32]:<32} {op['kind']:<20} {1e3 * op['seconds']:>8.2f}  {op['shape'][:28]:<28} "
                     f"{'/'.join(source[-3:])[:60]}")  # fmt: skip
    return "\n".join(lines)
