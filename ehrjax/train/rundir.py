"""The files of a run: config, vocabulary, metrics log, predictions and exports, written by process 0 only.

Multi-host runs share their output folders, so every writer here is a no-op on processes other than 0. Whole
files are written atomically (a temporary file in the same folder, then `os.replace`): a crash never leaves a
half-written file under the final name. `metrics.jsonl` is appended one complete line at a time; a kill can
still tear its last line, which `read_jsonl` drops (with a warning).

A run or benchmark folder is claimed before anything is written into it: `check_output_folder` refuses a folder
that holds files unless the run resumes it, and `FolderLock` (an advisory `flock` on `.ehrjax.lock` inside it,
holding the owner's process id) refuses a folder another live process is writing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ehrjax.atomic import atomic_write, is_hidden_or_temp, json_default, pid_alive, write_json, write_npz, write_text
from ehrjax.multihost import agree, is_writer

__all__ = [
    "LOCK_NAME",
    "FolderLock",
    "RunLog",
    "atomic_write",
    "check_output_folder",
    "is_writer",
    "predictions_arrays",
    "read_jsonl",
    "write_json",
    "write_npz",
    "write_text",
]

LOCK_NAME = ".ehrjax.lock"


def run_directory(config: Any, stem: str) -> Path:
    """Where a run writes: `config.resume` (continuing a run), else `config.output_dir`, else
    `results/<stem>-<timestamp>` (process 0's time: every process of a job names the same folder)."""
    if config.resume:
        return Path(config.resume)
    if config.output_dir:
        return Path(config.output_dir)
    now = dt.datetime.fromtimestamp(agree(int(time.time())))
    return Path("results") / f"{stem}-{now.strftime('%Y%m%d-%H%M%S')}"


def folder_entries(path: Path) -> list[str]:
    """The names in a folder other than its lock file and the temporary files of killed writers ([] if absent)."""
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if p.name != LOCK_NAME and not is_hidden_or_temp(p.name))


def check_output_folder(path: str | os.PathLike, *, resume: bool, marker: str, what: str) -> Path:
    """The folder a run (`what` = 'run', marker `config.json`) or a benchmark (marker `manifest.json`) writes,
    checked before any work and without touching it: a resume needs the marker; a new run needs a folder that
    does not exist or holds nothing, so a finished run is never overwritten. One-line ValueErrors name it."""
    path = Path(path)
    if resume:
        if not path.is_dir():
            raise ValueError(f"resume {path}: not a folder")
        if not (path / marker).is_file():
            raise ValueError(f"resume {path}: no {marker}; not a {what} folder")
        return path
    if path.exists() and not path.is_dir():
        raise ValueError(f"output_dir {path}: exists and is not a folder")
    entries = folder_entries(path)
    if entries:
        held = f"already holds a {what} ({marker})" if marker in entries else \
            f"is not empty ({len(entries)} entries, e.g. {entries[0]!r})"  # fmt: skip
        raise ValueError(f"output_dir {path}: {held}; continue it with --config.resume={path} or choose a new folder")
    return path


class FolderLock:
    """An advisory lock on a folder: `flock(LOCK_EX | LOCK_NB)` on `<folder>/.ehrjax.lock`, which holds the
    owner's pid and host. The kernel releases it when the owner exits, however it exits; a lock file left by a
    dead process is taken over (a warning names it). `acquire()` raises a one-line ValueError naming the folder
    and the pid of a live owner. A context manager; `release()` removes the file."""

    def __init__(self, folder: str | os.PathLike, label: str = "output_dir"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.label = label
        self._fd: int | None = None

    def _owner(self) -> tuple[int | None, str]:
        try:
            lines = self.path.read_text().split()
        except OSError:
            return None, ""
        pid = int(lines[0]) if lines and lines[0].isdigit() else None
        return pid, lines[1] if len(lines) > 1 else ""

    def acquire(self) -> FolderLock:
        if self._fd is not None:
            return self
        for _ in range(50):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise ValueError(f"{self.label} {self.folder}: cannot lock {self.path.name} "
                                     f"({err.strerror})") from err  # fmt: skip
                pid, host = self._owner()
                if pid is None:  # the owner has not written its pid yet
                    time.sleep(0.02)
                    continue
                if host == socket.gethostname() and not pid_alive(pid):  # a process that kept the lock open
                    self.path.unlink(missing_ok=True)  # (a descendant): the file, not the folder, is stale
                    continue
                where = f" on {host}" if host and host != socket.gethostname() else ""
                raise ValueError(f"{self.label} {self.folder}: in use by process {pid}{where} (lock file "
                                 f"{self.path.name}); wait for it to finish or stop it") from None  # fmt: skip
            try:  # the lock is ours if the file we locked is still the one at the path
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            pid, _ = self._owner()
            if pid is not None and pid != os.getpid():
                print(f"warning: {self.label} {self.folder}: took over the lock of process {pid}, which is gone",
                      file=sys.stderr)  # fmt: skip
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self._fd = fd
            return self
        pid, _ = self._owner()
        raise ValueError(f"{self.label} {self.folder}: in use (lock file {self.path.name}, process {pid})")

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # before unlocking: a waiting process then sees another file and retries
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file. A torn last line (a writer killed mid-line) is dropped with a warning;
    a bad line elsewhere is a one-line ValueError naming the file and the line number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from err
    lines = text.split("\n")
    records = []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as err:
            if all(not rest.strip() for rest in lines[k + 1 :]):
                print(f"warning: {path}: dropped its torn last line {k + 1}", file=sys.stderr)
                break
            raise ValueError(f"{path}: line {k + 1} is not a JSON object ({err})") from err
        records.append(record)
    return records


class RunLog:
    """`metrics.jsonl` (one JSON object per line), an optional progress bar and optional TensorBoard scalars.

    resume_step: drop the records past the checkpoint a resumed run continues from. owner: whether this
    process writes the log (default: process 0 only; a benchmark grid cell's log is its own process's).
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = False,
                 owner: bool | None = None):  # fmt: skip
        self.path = Path(path)
        self.writer = is_writer() if owner is None else owner
        self._tb = None
        self._bar = None
        if not self.writer:
            return
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as err:
                raise ValueError(
                    "train.tensorboard=True needs tensorboardX: pip install 'ehrjax[tensorboard]'"
                ) from err
            self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
        # The log is read (a bad line fails now) but rewritten only at the first record, so a run that fails
        # before logging anything (a checkpoint that does not restore) leaves the file as it was.
        self._pending: str | None = None
        if resume_step is not None and self.path.is_file():
            kept = [r for r in read_jsonl(self.path) if _step(r) <= resume_step]
            self._pending = "".join(json.dumps(r, default=json_default) + "\n" for r in kept)
        elif resume_step is None:
            self._pending = ""

    def _start(self) -> None:
        if self._pending is not None:
            if self._pending or self.path.exists():
                write_text(self.path, self._pending)
            self._pending = None

    def log(self, record: dict[str, Any]) -> None:
        """Append one record as one line (one `write`)."""
        if not self.writer:
            return
        self._start()
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record, default=json_default) + "\n")
        if self._tb is not None and record.get("event") in ("train", "eval"):
            tag = record["event"] if record["event"] == "train" else record["split"]
            for key, value in record.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self._tb.add_scalar(f"{tag}/{key}", value, record["step"])

    def open_progress(self, total: int, initial: int, enabled: bool) -> None:
        if enabled and self.writer:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def advance(self, n: int, postfix: dict[str, str] | None = None) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix)

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_progress()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _step(record: dict[str, Any]) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, int | float) and not isinstance(step, bool) else 0


def predictions_arrays(
    patient_id: np.ndarray,
    split: np.ndarray,
    label: np.ndarray,
    probability: np.ndarray,
    logit: np.ndarray | None = None,
    outcome_p: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The arrays of a `predictions.npz`: patient_id int64[n], split <U5[n], label f32[n, ...],
    probability f64[n, ...], logit f64[n, ...] (NaN when the arm has none), outcome_p f64[n] (NaN when
    unknown). Every metric of a run can be recomputed from this file alone."""
    n = len(patient_id)
    probability = np.asarray(probability, dtype=np.float64)
    return {
        "patient_id": np.asarray(patient_id, dtype=np.int64),
        "split": np.asarray(split, dtype="<U5"),
        "label": np.asarray(label, dtype=np.float32),
        "probability": probability,
        "logit": np.full(probability.shape, np.nan) if logit is None else np.asarray(logit, dtype=np.float64),
        "outcome_p": np.full(n, np.nan) if outcome_p is None else np.asarray(outcome_p, dtype=np.float64),
    }
