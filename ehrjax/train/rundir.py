"""The files of a run: config, vocabulary, metrics log, predictions and exports, written by process 0 only.

Multi-host runs share their output folders, so every writer here is a no-op on processes other than 0. Whole
files are written atomically (a temporary file in the same folder, then `os.replace`): a crash never leaves a
half-written file under the final name. `metrics.jsonl` is appended one complete line at a time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ehrjax.atomic import atomic_write, json_default, write_json, write_npz, write_text

__all__ = ["RunLog", "atomic_write", "is_writer", "predictions_arrays", "write_json", "write_npz", "write_text"]


def run_directory(config: Any, stem: str) -> Path:
    """Where a run writes: `config.resume` (continuing a run), else `config.output_dir`, else
    `results/<stem>-<timestamp>`."""
    if config.resume:
        return Path(config.resume)
    if config.output_dir:
        return Path(config.output_dir)
    return Path("results") / f"{stem}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def is_writer() -> bool:
    """Whether this process writes shared files (process 0 of a multi-host run)."""
    return jax.process_index() == 0


class RunLog:
    """`metrics.jsonl` (one JSON object per line), an optional progress bar and optional TensorBoard scalars.

    resume_step: drop the records past the checkpoint a resumed run continues from.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None, tensorboard: bool = False):
        self.path = Path(path)
        self.writer = is_writer()
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
        if resume_step is not None and self.path.is_file():
            lines = self.path.read_text().splitlines()
            lines = [ln for ln in lines if ln and json.loads(ln).get("step", 0) <= resume_step]
            write_text(self.path, "".join(ln + "\n" for ln in lines))
        elif resume_step is None:
            self.path.unlink(missing_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.writer:
            return
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
