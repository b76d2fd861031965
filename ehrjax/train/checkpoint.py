"""Orbax checkpoints of a run: `latest` (every N steps, for resume) and `best` (by validation metric).

Each checkpoint holds three items: `params` (the model parameters), `opt` (optimiser state and step) and
`meta` (JSON: epoch, position in the epoch, early-stopping state, the run's config). Parameters are an item
of their own so that a fine-tuning run restores them without knowing the pre-training optimiser. Saves are
asynchronous and commit atomically, so a run killed mid-save resumes from the last complete checkpoint.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

# Config keys that fix the shapes of a checkpoint's arrays: a resume or init with other values is refused.
SHAPE_KEYS = ("model", "lora", "data.num_noise_codes")
ITEMS = ("params", "opt", "meta")


class RunCheckpoints:
    """The `latest` and `best` checkpoint managers of one run directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).absolute()
        common = dict(enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True)
        self._latest = ocp.CheckpointManager(
            self.directory / "latest",
            options=ocp.CheckpointManagerOptions(max_to_keep=2, **common),
            item_names=ITEMS,
        )
        self._best = ocp.CheckpointManager(
            self.directory / "best",
            options=ocp.CheckpointManagerOptions(max_to_keep=1, **common),
            item_names=ITEMS,
        )

    @staticmethod
    def _args(state: Any, meta: dict[str, Any]) -> ocp.args.Composite:
        """state: {'params', 'opt_state', 'step'}."""
        opt = {"opt_state": state["opt_state"], "step": state["step"]}
        return ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]), opt=ocp.args.StandardSave(opt), meta=ocp.args.JsonSave(meta)
        )

    def save_latest(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._latest.save(step, args=self._args(state, meta), force=True)

    def save_best(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        self._best.save(step, args=self._args(state, meta), force=True)

    def latest_step(self) -> int | None:
        return self._latest.latest_step()

    def best_step(self) -> int | None:
        return self._best.latest_step()

    def _manager(self, which: str) -> tuple[ocp.CheckpointManager, int]:
        manager = self._latest if which == "latest" else self._best
        step = manager.latest_step()
        if step is None:
            raise ValueError(f"checkpoint directory {self.directory / which}: no complete checkpoint")
        return manager, step

    def restore(self, abstract_state: Any, *, which: str = "latest") -> tuple[Any, dict]:
        """(state, meta) of the newest checkpoint of `which` ('latest' | 'best'); abstract_state has the
        structure, shapes, dtypes (and shardings) of {'params', 'opt_state', 'step'}."""
        manager, step = self._manager(which)
        opt = {"opt_state": abstract_state["opt_state"], "step": abstract_state["step"]}
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state["params"]),
                opt=ocp.args.StandardRestore(opt),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return {"params": restored.params, **restored.opt}, dict(restored.meta)

    def restore_params(self, abstract_params: Any, *, which: str = "best") -> Any:
        """The parameters alone of the newest checkpoint of `which`."""
        manager, step = self._manager(which)
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))).params

    def wait(self) -> None:
        self._latest.wait_until_finished()
        self._best.wait_until_finished()

    def close(self) -> None:
        self._latest.close()
        self._best.close()


def config_mismatch(saved: dict[str, Any], current: dict[str, Any], keys: tuple[str, ...] = SHAPE_KEYS) -> list[str]:
    """The dotted config keys among `keys` whose values differ between two config dicts."""

    def get(tree: dict[str, Any], dotted: str) -> Any:
        for part in dotted.split("."):
            tree = tree.get(part, {}) if isinstance(tree, dict) else {}
        return tree

    def flatten(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for k, v in value.items():
                out.update(flatten(v, f"{prefix}.{k}"))
            return out
        return {prefix: list(value) if isinstance(value, tuple) else value}

    diffs = []
    for key in keys:
        a, b = flatten(get(saved, key), key), flatten(get(current, key), key)
        diffs.extend(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
    return diffs


def check_writable(directory: str | os.PathLike, min_free_bytes: int = 50 * 2**20) -> None:
    """Fail before training if the run directory cannot be created/written or its disk is nearly full."""
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"output directory {path}: not writable ({err.strerror or err})") from err
    free = shutil.disk_usage(path).free
    if free < min_free_bytes:
        raise ValueError(
            f"output directory {path}: only {free / 2**20:.0f} MiB free, need {min_free_bytes / 2**20:.0f}"
        )
