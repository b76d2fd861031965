"""The random streams of one training seed, split from one root key so that no two uses share a key.

`key(seed)` is the root. `fold_in(root, INIT_STREAM)` seeds the parameter draw (`nnx.Rngs(params=...)`, which
folds in its own draw counter), and `fold_in(root, STEP_STREAM)` is the run key whose `fold_in(., step)` draws
step `step`'s MLM masks and dropout. Folding the step or draw index into the root itself would give step s
the key of init draw s. Data order is a NumPy generator of the seed, a stream of its own.
"""

from __future__ import annotations

import jax
from flax import nnx

INIT_STREAM = 0
STEP_STREAM = 1


def init_rngs(seed: int) -> nnx.Rngs:
    """The parameter-initialisation streams of training seed `seed`."""
    return nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), INIT_STREAM))


def run_key(seed: int) -> jax.Array:
    """The run key of training seed `seed`: a train step folds its step index into it."""
    return jax.random.fold_in(jax.random.key(seed), STEP_STREAM)
