"""The targets a trainer's pre-training evaluation scores, batch by batch: what the baselines' own batches must
match exactly."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import jax.numpy as jnp
import numpy as np

TARGET_KEYS = ("masked_codes", "positions", "labels", "weights", "segment_ids")


def trainer_targets(trainer, plan) -> Iterator[dict]:
    """The trainer's evaluation targets for each batch of `plan` (a fixed-order `EpochPlan`), in order."""
    for k in range(plan.num_batches):
        g, j = (int(x) for x in plan.order[k])
        group = plan.groups[g]
        yield trainer.mlm_targets_step(group.row_len)(trainer.corpus, group.patient_index[j], group.cls_index[j],
                                                      jnp.int32(k))  # fmt: skip


def assert_same_targets(ours: Iterable[dict], trainer, plan) -> None:
    """Every batch of `ours` equals the trainer's own evaluation batch, key by key (and there are as many)."""
    for batch, theirs in zip(ours, trainer_targets(trainer, plan), strict=True):
        for key in TARGET_KEYS:
            np.testing.assert_array_equal(batch[key], theirs[key])
