"""A pre-training run directory as inputs for another run: its config, vocabulary and best parameters."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

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


def load_pretrained_run(
    path: str | os.PathLike, *, label: str = "pre-trained run", task: str | None = None
) -> PretrainedRun:
    """Read `config.json`, `vocab.json` and the best (else latest) checkpoint's parameters of a run directory.

    Errors are one line starting with `label` and the path (e.g. `init_from /x: no vocab.json; ...`); `task`:
    the run must have trained that task."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{label} {path}: not a directory")
    for name in ("config.json", "vocab.json"):
        if not (path / name).is_file():
            raise ValueError(f"{label} {path}: no {name}; not an ehrjax run directory")
    config = json.loads((path / "config.json").read_text())
    if task is not None and config.get("task") != task:
        raise ValueError(f"{label} {path}: a {config.get('task')!r} run; expected a {task!r} run")
    if not (path / "checkpoints").is_dir():
        raise ValueError(f"{label} {path}: no checkpoints/ folder")
    vocab = Vocab.load(path / "vocab.json")
    model_cfg = ml_collections.ConfigDict(config["model"])
    template = nnx.eval_shape(lambda: Behrt(model_cfg, len(vocab), mlm_head=True, rngs=nnx.Rngs(params=0)))
    checkpoints = RunCheckpoints(path / "checkpoints")
    try:
        which = "best" if checkpoints.best_step() is not None else "latest"
        num_seeds = _num_seeds(checkpoints, which)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((num_seeds, *x.shape), x.dtype), nnx.state(template, nnx.Param)
        )
        params = unstack(checkpoints.restore_params(abstract, which=which), 0)
    finally:
        checkpoints.close()
    return PretrainedRun(path=path, config=config, vocab=vocab, params=params)


def _num_seeds(checkpoints: RunCheckpoints, which: str) -> int:
    manager, step = checkpoints._manager(which)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    return len(meta["best"])
