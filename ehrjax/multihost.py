"""What a multi-process (multi-controller) JAX job needs beyond one process: host arrays put onto a global
sharding from each process's own share, barriers, values agreed with process 0, and which process writes.

Every process of a job runs the same program over one global `Mesh` (`jax.distributed`). A host array that
every process computes alike (a batch plan, a replicated corpus, initial parameters) becomes a global array
through `put_global`: each process transfers only the shards its own devices hold, and nothing is compared
or exchanged between processes. On one process these are plain `jax.device_put` and no-ops.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding


def is_writer() -> bool:
    """Whether this process writes shared files (process 0 of a multi-process job)."""
    return jax.process_index() == 0


def multiprocess() -> bool:
    return jax.process_count() > 1


def put_global(x: Any, sharding: Sharding | None) -> Any:
    """A pytree of host arrays as arrays on `sharding` (None: uncommitted, on this process's default device).

    Across processes every process passes the same global values (seeded plans, the same corpus) and each
    transfers only the slices its devices hold (`jax.make_array_from_callback`); `jax.device_put` would first
    gather every process's copy to check that they agree."""
    if sharding is None:
        return jax.device_put(x)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)

    def one(leaf: Any) -> jax.Array:
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, x)


def sync(name: str) -> None:
    """A barrier over every process (nothing on one process); `name` identifies it in JAX's error messages."""
    if multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: int) -> int:
    """Process 0's `value` on every process (e.g. a timestamp that names a shared folder)."""
    if not multiprocess():
        return int(value)
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.asarray(value, dtype=np.int64)))
