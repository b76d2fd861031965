"""NaN/inf handling: the step skips a non-finite update; the loop stops naming the step, checkpoints intact."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ehrjax.train.loop as loop
from ehrjax.train.loop import TrainingDiverged, build_trainer, train


def test_step_with_nan_parameters_leaves_the_state_unchanged(smoke_config):
    trainer = build_trainer(smoke_config)
    state = trainer.state
    table = state["params"]["embeddings"]["code"]["embedding"]
    table.set_value(table.get_value().at[5:, 0].set(jnp.nan))  # every clinical code carries a NaN
    before = jax.tree.map(np.asarray, state)
    plan = trainer.train_batcher.plan_epoch(0)
    g, j = (int(x) for x in plan.order[0])
    new_state, sums = trainer.train_step(state, plan.groups[g], jnp.int32(j), jax.random.key(0))
    assert float(sums["nonfinite"]) == 1.0
    assert int(new_state["step"]) == 1
    after = jax.tree.map(np.asarray, new_state)
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_loop_stops_at_the_bad_step_and_keeps_the_last_good_checkpoint(smoke_config, monkeypatch):
    real = loop.make_train_step
    bad_step = 7

    def poisoned(*args, **kwargs):
        step_fn = real(*args, **kwargs)

        def wrapped(state, group, index, key):
            step = int(state["step"])
            state, sums = step_fn(state, group, index, key)
            if step + 1 == bad_step:
                sums = dict(sums, nonfinite=jnp.float32(1.0), loss_sum=jnp.float32(jnp.nan))
            return state, sums

        return wrapped

    monkeypatch.setattr(loop, "make_train_step", poisoned)
    smoke_config.train.log_every = 5
    smoke_config.train.checkpoint_every = 5
    with pytest.raises(TrainingDiverged, match=f"NaN/inf at step {bad_step} "):
        train(smoke_config)
    latest = Path(smoke_config.output_dir) / "checkpoints" / "latest"
    assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [5]
