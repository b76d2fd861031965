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

from ehrjax.atomic import check_folder_writable

# Config keys that fix the shapes of a checkpoint's arrays: a resume or init with other values is refused.
SHAPE_KEYS = ("model", "lora", "data.num_noise_codes")
ITEMS = ("params", "opt", "meta")


def restore_error(where: Path, step: int, expected: str, err: BaseException) -> ValueError:
    """A failed Orbax restore as one line: the folder, the step, what was expected and the first line of the cause
    (Orbax's own messages print whole tree structures)."""
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    if len(first) > 160:
        first = first[:157] + "..."
    return ValueError(f"checkpoint {where} step {step}: cannot restore {expected} ({type(err).__name__}: {first})")


def _barriers(prefix: str) -> ocp.options.MultiprocessingOptions:
    return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix)


class RunCheckpoints:
    """The `latest` and `best` checkpoint managers of one run directory.

    writable=False reads another run's checkpoints: nothing is created there and none of its temporary folders
    (a save in progress) is cleaned up."""

    def __init__(self, directory: str | os.PathLike, *, writable: bool = True):
        self.directory = Path(directory).absolute()
        common = dict(enable_async_checkpointing=writable, cleanup_tmp_directories=writable, create=writable)
        # Across processes each manager's barriers get their own names: `latest` and `best` often save at the
        # same step, and Orbax names a save's barriers by its step alone.
        self._latest = ocp.CheckpointManager(
            self.directory / "latest",
            options=ocp.CheckpointManagerOptions(max_to_keep=2, multiprocessing_options=_barriers("latest"), **common),
            item_names=ITEMS,
        )
        self._best = ocp.CheckpointManager(
            self.directory / "best",
            options=ocp.CheckpointManagerOptions(max_to_keep=1, multiprocessing_options=_barriers("best"), **common),
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

    def restore(
        self, abstract_state: Any, *, which: str = "latest", expected: str = "the run's training state"
    ) -> tuple[Any, dict]:
        """(state, meta) of the newest checkpoint of `which` ('latest' | 'best'); abstract_state has the
        structure, shapes, dtypes (and shardings) of {'params', 'opt_state', 'step'}. A checkpoint that does
        not fit is a one-line ValueError naming the folder and `expected`."""
        manager, step = self._manager(which)
        opt = {"opt_state": abstract_state["opt_state"], "step": abstract_state["step"]}
        try:
            restored = manager.restore(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state["params"]),
                    opt=ocp.args.StandardRestore(opt),
                    meta=ocp.args.JsonRestore(),
                ),
            )
        except Exception as err:  # Orbax, tensorstore and JAX raise many kinds
            raise restore_error(self.directory / which, step, expected, err) from err
        if not isinstance(restored.meta, dict):
            raise ValueError(f"checkpoint {self.directory / which} step {step}: its meta item is not a JSON object")
        return {"params": restored.params, **restored.opt}, dict(restored.meta)

    def restore_params(self, abstract_params: Any, *, which: str = "best", expected: str = "the parameters") -> Any:
        """The parameters alone of the newest checkpoint of `which` (errors as in `restore`)."""
        manager, step = self._manager(which)
        try:
            args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
            return manager.restore(step, args=args).params
        except Exception as err:
            raise restore_error(self.directory / which, step, expected, err) from err

    def restore_meta(self, *, which: str = "latest") -> dict[str, Any]:
        """The JSON meta item alone of the newest checkpoint of `which`."""
        manager, step = self._manager(which)
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as err:
            raise restore_error(self.directory / which, step, "its meta item (JSON)", err) from err
        if not isinstance(meta, dict):
            raise ValueError(f"checkpoint {self.directory / which} step {step}: its meta item is not a JSON object")
        return dict(meta)

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
    """Fail before training if the run directory cannot be created/written or its disk is nearly full; creates
    nothing (the folder is made once everything is validated)."""
    path = check_folder_writable(directory, "output directory")
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < min_free_bytes:
        raise ValueError(
            f"output directory {path}: only {free / 2**20:.0f} MiB free, need {min_free_bytes / 2**20:.0f}"
        )
