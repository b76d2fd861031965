"""Atomic file writes: a temporary file in the same folder, then `os.replace`, so a reader (or a crash) never sees
a half-written file under the final name. Every file ehrjax writes goes through here.

Temporary files are named `.<name>.tmp-<pid>-<random><suffix>` (hidden, the writer's process id inside, the
final suffix kept because some writers append one otherwise). A writer killed mid-write leaves one behind; the
next write into the same folder removes those of dead processes (and of an earlier process that had this
process's id), never those of a live writer. Readers skip hidden and temporary files (`visible_files`).
A written file gets the mode an ordinary `open()` would give it (0666 minus the umask), not mkstemp's 0600.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

_STARTED = time.time()  # no temporary file of this process is older than this
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-(?P<token>[0-9a-f]+)(?P<suffix>\.[^.]*)?$")


def check_output_path(path: str | os.PathLike, suffix: str, label: str) -> Path:
    """`path` as a Path; a one-line ValueError naming `label` unless it ends in `suffix` and its folder exists
    (checked before any work, so a typo costs nothing)."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{label} {path}: expected a path ending in {suffix}")
    if not path.parent.is_dir():
        raise ValueError(f"{label} {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise ValueError(f"{label} {path}: is a folder, expected a file path")
    return path


def check_folder_writable(path: str | os.PathLike, label: str) -> Path:
    """`path` as a Path, without creating anything: a one-line ValueError naming `label` unless `path` is a
    folder (or can be created as one: its nearest existing ancestor is a folder this process may write)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{label} {path}: exists and is not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{label} {path}: not writable ({existing} is a file, not a folder)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{label} {path}: not writable (no write permission on {existing})")
    return path


def is_hidden_or_temp(name: str) -> bool:
    """Names readers skip: hidden (`.x`, every temporary file of `atomic_write`) or ending in `.tmp`."""
    return name.startswith(".") or name.endswith(".tmp")


def visible_files(root: str | os.PathLike, pattern: str) -> list[Path]:
    """Sorted files under `root` matching the glob `pattern` (`**/*.parquet`), skipping every path with a hidden
    or temporary part below `root` (a `.x` or `x.tmp` file or folder at any level)."""
    root = Path(root)
    found = []
    for p in root.glob(pattern):
        if p.is_file() and not any(is_hidden_or_temp(part) for part in p.relative_to(root).parts):
            found.append(p)
    return sorted(found)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one we may not signal counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _stale_temps(folder: Path) -> Iterator[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    me = os.getpid()
    for entry in entries:
        m = TEMP_PATTERN.match(entry.name)
        if m is None:
            continue
        pid = int(m["pid"])
        try:
            mtime = entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if (pid == me and mtime < _STARTED) or (pid != me and not pid_alive(pid)):
            yield Path(entry.path)


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files `atomic_write` left in `folder` when its writer was killed (only files of its
    own name pattern whose process is gone); returns what was removed."""
    removed = []
    for path in _stale_temps(Path(folder)):
        try:
            if path.is_dir() and not path.is_symlink():
                import shutil

                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def temp_path(path: str | os.PathLike) -> tuple[Path, int]:
    """A new empty temporary file beside `path` (see the module docstring) and the mode an ordinary new file
    gets there (0666 minus the umask, read from the file itself: no process-wide umask change)."""
    path = Path(path)
    clean_stale_temps(path.parent)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        try:
            mode = os.fstat(fd).st_mode & 0o777
        finally:
            os.close(fd)
        return tmp, mode
    raise FileExistsError(f"{path}: no free temporary name")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` to a temporary path beside `path` (same suffix), then rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp, mode = temp_path(path)
    except OSError as err:
        raise _named(err, path) from err
    try:
        write(tmp)
        os.chmod(tmp, mode)  # a writer may have recreated the file; the mode is the umask's either way
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and (err.filename is None or str(err.filename) == str(tmp)):
            raise _named(err, path) from err
        raise
    return path


def _named(err: OSError, path: Path) -> OSError:
    """`err` naming the final path (a full disk raises from a write call, which names no file)."""
    return OSError(err.errno, err.strerror or str(err), str(path))


def replace_together(files: dict[Path, Callable[[Any], None]]) -> None:
    """Write several files, each to a temporary file (`write(fh)` on a binary handle), then rename them in
    order (the last one last: a reader that checks it sees the others complete)."""
    tmps: dict[Path, tuple[Path, int]] = {}
    try:
        for path, write in files.items():
            tmps[path] = temp_path(path)
            with open(tmps[path][0], "wb") as fh:
                write(fh)
        for path, (tmp, mode) in tmps.items():
            os.chmod(tmp, mode)
            os.replace(tmp, path)
    finally:
        for tmp, _ in tmps.values():
            tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, payload: Any, *, strict: bool = False) -> Path:
    """`payload` as indented JSON. strict: non-finite numbers as null (files for other tools); otherwise they
    stay `NaN`, which Python reads back exactly (a run's own state files, such as a benchmark's manifest)."""
    text = dumps_strict(payload, indent=2) if strict else json.dumps(payload, indent=2, default=json_default)
    return write_text(path, text + "\n")


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


def finite_or_none(value: Any) -> Any:
    """`value` with every NaN/inf float (Python or numpy, nested in dicts, lists, tuples, arrays) as None, numpy
    values as Python ones and paths as strings: what strict JSON can hold."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if isinstance(value, np.ndarray):
        return finite_or_none(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def dumps_strict(payload: Any, **kwargs: Any) -> str:
    """Strict JSON (no bare NaN/Infinity, which most JSON readers reject): non-finite numbers become null."""
    return json.dumps(finite_or_none(payload), allow_nan=False, default=json_default, **kwargs)


def read_json(path: str | os.PathLike, label: str) -> Any:
    """A JSON file's content, or a one-line ValueError naming `label` and the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ValueError(f"{label} {path}: does not exist") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{label} {path}: cannot read ({getattr(err, 'strerror', None) or err})") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{label} {path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err


def os_error_line(err: OSError, fallback: str = "") -> str:
    """An OSError as `PATH: reason` on one line (the path it names, else `fallback`)."""
    where = err.filename if err.filename is not None else fallback
    reason = err.strerror or str(err)
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    return f"{where}: {reason}" if where else reason
