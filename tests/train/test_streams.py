"""A seed's random streams: parameter init and train steps never share a key."""

import jax
import numpy as np
from flax import nnx

from ehrjax.train.streams import init_rngs, run_key


def _data(key):
    return tuple(np.asarray(jax.random.key_data(key)).tolist())


def test_step_keys_and_init_draws_are_disjoint():
    for seed in (0, 1, 7):
        rngs = init_rngs(seed)
        init = {_data(rngs.params()) for _ in range(200)}
        steps = {_data(jax.random.fold_in(run_key(seed), s)) for s in range(200)}
        assert len(init) == 200 and len(steps) == 200
        assert not init & steps


def test_the_overlap_the_split_removes():
    # An nnx.Rngs seeded with the bare seed draws fold_in(key(seed), i), the very key a step folded from
    # key(seed) used at step i: the reason the streams are split.
    rngs = nnx.Rngs(params=3)
    draws = [_data(rngs.params()) for _ in range(4)]
    assert draws == [_data(jax.random.fold_in(jax.random.key(3), i)) for i in range(4)]
    assert _data(init_rngs(3).params()) not in draws
