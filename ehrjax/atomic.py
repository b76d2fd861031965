"""Atomic file writes: a temporary file in the same folder, then `os.replace`, so a reader (or a crash) never sees
a half-written file under the final name. Every file ehrjax writes goes through here."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def check_output_path(path: str | os.PathLike, suffix: str, label: str) -> Path:
    """`path` as a Path; a one-line ValueError naming `label` unless it ends in `suffix` and its folder exists
    (checked before any work, so a typo costs nothing)."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{label} {path}: expected a path ending in {suffix}")
    if not path.parent.is_dir():
        raise ValueError(f"{label} {path}: folder {path.parent} does not exist")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` to a temporary path beside `path` (same suffix), then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    return write_text(path, json.dumps(payload, indent=2, default=json_default) + "\n")


def write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays))


def json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays and paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
