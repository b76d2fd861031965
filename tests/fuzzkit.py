"""What the fuzz suites check of every hostile input: the error is ONE line naming the input, and nothing in the
folders it touched changed (file names, sizes and modification times)."""

from __future__ import annotations

import os
from pathlib import Path

Snapshot = dict[str, tuple[int, int]]


def snapshot(*folders: str | os.PathLike) -> dict[str, Snapshot | None]:
    """Every file (hidden ones too) under each folder: relative path -> (size, mtime_ns); None if absent."""
    out: dict[str, Snapshot | None] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            out[str(folder)] = None
            continue
        if folder.is_file():
            st = folder.stat()
            out[str(folder)] = {"": (st.st_size, st.st_mtime_ns)}
            continue
        files: Snapshot = {}
        for p in folder.rglob("*"):
            st = p.lstat()
            files[str(p.relative_to(folder)) + ("/" if p.is_dir() else "")] = (
                (st.st_size, st.st_mtime_ns) if not p.is_dir() else (0, 0)
            )
        out[str(folder)] = files
    return out


def assert_one_line(message: str, *needles: str | os.PathLike) -> None:
    """`message` is a single line and names every needle (an input path, a setting)."""
    text = message.strip()
    assert text, "empty error message"
    assert "\n" not in text, f"more than one line: {text!r}"
    assert "Traceback" not in text, text
    for needle in needles:
        assert str(needle) in text, f"{needle!r} not named in {text!r}"
