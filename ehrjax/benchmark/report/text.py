"""Number formatting and markdown tables shared by the report's sections: a value that was not computed or
does not apply is written "n/a", never a dash."""

from __future__ import annotations

import math
from typing import Any

NA = "n/a"


def f(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return NA
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def ci(mean: float | None, bounds: list[float] | None, digits: int = 3, signed: bool = False) -> str:
    if mean is None or bounds is None:
        return NA
    return f"{f(mean, digits, signed)} [{f(bounds[0], digits, signed)}, {f(bounds[1], digits, signed)}]"


def count(value: float | None) -> str:
    return NA if value is None else f"{int(value):,}"


def seconds(value: float | None) -> str:
    return NA if value is None else f"{value:,.1f}"


def pct(value: float | None, digits: int = 2) -> str:
    return NA if value is None else f"{value:.{digits}f}%"


def sizes_text(sizes: list[int]) -> str:
    return ", ".join(f"{s:,}" for s in sizes)


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def num(value: Any) -> str:
    """A hyperparameter value: floats in 3 significant digits, integers and names as they are."""
    if value is None:
        return NA
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def hparam(value: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {num(v)}" for k, v in (value or {}).items()) or NA


def row(task: dict[str, Any], arm: str, size: int) -> dict[str, Any] | None:
    return next((r for r in task["rows"] if r["arm"] == arm and r["size"] == size), None)


def delta(c: dict[str, Any] | None) -> str:
    return NA if c is None else ci(c["mean"], c["ci"], signed=True)
