"""A pre-training run directory as inputs for another run: its config, vocabulary and best parameters."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from ehrjax.atomic import read_json
from ehrjax.config import fill_defaults
from ehrjax.data.vocab import Vocab
from ehrjax.models.behrt import Behrt
from ehrjax.train.checkpoint import RunCheckpoints
from ehrjax.train.trainer import unstack


@dataclasses.dataclass(frozen=True)
class PretrainedRun:
    path: Path
    config: dict[str, Any]  # the run's config.json
    vocab: Vocab
    params: nnx.State  # the best (else latest) parameters of its first seed

    @property
    def model_cfg(self) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict(self.config["model"])


def check_run_folder(path: str | os.PathLike, *, label: str = "pre-trained run", task: str | None = None) -> dict:
    """The `config.json` of a run directory, after the cheap checks (run before any work): a folder with a
    readable `config.json` (a JSON object with a `model` section) and `vocab.json` and a `checkpoints/` folder;
    `task`: the run must have trained that task. One-line ValueErrors starting with `label` and the path.
    Keys added to the schema after the run was written read as their defaults (`ehrjax.config.fill_defaults`)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{label} {path}: not a directory")
    for name in ("config.json", "vocab.json"):
        if not (path / name).is_file():
            raise ValueError(f"{label} {path}: no {name}; not an ehrjax run directory")
    config = read_json(path / "config.json", f"{label} {path}: config file")
    if isinstance(config, dict) and task is not None and config.get("task") != task:
        raise ValueError(f"{label} {path}: a run of task {config.get('task')}, expected {task}")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f"{label} {path}: config.json is not a run config (a JSON object with a 'model' section)")
    if not (path / "checkpoints").is_dir():
        raise ValueError(f"{label} {path}: no checkpoints/ folder")
    return fill_defaults(config)


def load_pretrained_run(
    path: str | os.PathLike, *, label: str = "pre-trained run", task: str | None = None
) -> PretrainedRun:
    """Read `config.json`, `vocab.json` and the best (else latest) checkpoint's parameters of a run directory.

    Errors are one line starting with `label` and the path (e.g. `init_from /x: no vocab.json; ...`); `task`:
    the run must have trained that task. Reads only: nothing in the run's folder changes."""
    from ehrjax.models.behrt import validate_model_config

    path = Path(path)
    config = check_run_folder(path, label=label, task=task)
    vocab = Vocab.load(path / "vocab.json")
    model_cfg = ml_collections.ConfigDict(config["model"])
    try:
        validate_model_config(model_cfg)
        template = nnx.eval_shape(lambda: Behrt(model_cfg, len(vocab), mlm_head=True, rngs=nnx.Rngs(params=0)))
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"{label} {path}: config.json holds no usable model section ({err})") from err
    checkpoints = RunCheckpoints(path / "checkpoints", writable=False)
    try:
        if checkpoints.best_step() is None and checkpoints.latest_step() is None:
            raise ValueError(f"{label} {path}: no complete checkpoint in checkpoints/best or checkpoints/latest")
        which = "best" if checkpoints.best_step() is not None else "latest"
        num_seeds = _num_seeds(checkpoints, which, f"{label} {path}")
        # On this process's own device: each process of a job holds the whole run (its grid cells run apart).
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((num_seeds, *x.shape), x.dtype, sharding=local),
            nnx.state(template, nnx.Param),
        )
        expected = (f"the parameters of its config.json's {model_cfg.get('preset', '')} model with "
                    f"{len(vocab)} vocabulary entries and {num_seeds} seed(s)")  # fmt: skip
        params = unstack(checkpoints.restore_params(abstract, which=which, expected=expected), 0)
    finally:
        checkpoints.close()
    return PretrainedRun(path=path, config=config, vocab=vocab, params=params)


def _num_seeds(checkpoints: RunCheckpoints, which: str, where: str) -> int:
    meta = checkpoints.restore_meta(which=which)
    best = meta.get("best")
    if not isinstance(best, list) or not best:
        raise ValueError(f"{where}: checkpoint {which} has no per-seed 'best' list in its meta item")
    return len(best)
