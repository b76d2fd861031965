"""NaN/inf handling: the step skips a non-finite update; the loop stops naming the step, checkpoints intact."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ehrjax.train.trainer as trainer_module
from ehrjax.train.loop import TrainingDiverged, build_run_trainer, train
from ehrjax.train.trainer import ProgramCache


def nan_table_step(smoke_config, nan_rows: slice, trainable_table: bool = True):
    """One step from a state whose code table carries NaNs in `nan_rows`."""
    trainer = build_run_trainer(smoke_config)[0]
    state = trainer.state
    table = state["params"]["embeddings"]["code"]["embedding"]
    table.set_value(table.get_value().at[:, nan_rows, 0].set(jnp.nan))
    before = jax.tree.map(np.asarray, state)
    row_len, patient, cls = trainer.stacked_plan(0).batch(0)
    new_state, sums = trainer.train_step(row_len)(state, trainer.corpus, patient, cls, trainer.keys(),
                                                  jnp.ones(1, bool))  # fmt: skip
    return before, new_state, sums


def test_step_with_nan_parameters_leaves_the_state_unchanged(smoke_config):
    before, new_state, sums = nan_table_step(smoke_config, slice(5, None))  # every clinical code carries a NaN
    assert float(sums["nonfinite"][0]) == 1.0
    assert int(new_state["step"][0]) == 1
    after = jax.tree.map(np.asarray, new_state)
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loop_stops_at_the_bad_step_and_keeps_the_last_good_checkpoint(smoke_config, monkeypatch):
    real = trainer_module.make_train_step
    bad_step = 7

    def poisoned(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def wrapped(state, *rest):
            step = int(state["step"][0])
            state, sums = step_fn(state, *rest)
            if step + 1 == bad_step:
                sums = dict(sums, nonfinite=jnp.ones(1), loss_sum=jnp.full(1, jnp.nan))
            return state, sums

        wrapped._cache_size = step_fn._cache_size
        return wrapped

    monkeypatch.setattr(trainer_module, "make_train_step", poisoned)
    monkeypatch.setattr(trainer_module, "PROGRAMS", ProgramCache())
    smoke_config.train.log_every = 5
    smoke_config.train.checkpoint_every = 5
    with pytest.raises(TrainingDiverged, match=f"NaN/inf at step {bad_step} "):
        train(smoke_config)
    latest = Path(smoke_config.output_dir) / "checkpoints" / "latest"
    assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [5]
