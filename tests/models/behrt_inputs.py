"""Shared builders: BEHRT token rows from per-patient visit lists, packed or one patient per row."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ehrjax.data.vocab import CLS, SEP

VOCAB_SIZE = 40

Patient = Sequence[Sequence[int]]  # visits, each a list of clinical code ids


def patient_tokens(visits: Patient, age0: int) -> tuple[list[int], list[int], list[int]]:
    """`[CLS] v1 [SEP] v2 [SEP] ...` with ages (months, one year per visit) and visit indices."""
    codes, ages, visit_idx = [CLS], [age0], [0]
    for v, visit in enumerate(visits):
        for c in [*visit, SEP]:
            codes.append(c)
            ages.append(age0 + 12 * v)
            visit_idx.append(v)
    return codes, ages, visit_idx


def pack_rows(rows: Sequence[Sequence[tuple[Patient, int]]], row_len: int) -> tuple[dict, np.ndarray, list]:
    """rows of (patient, age0) -> (batch of int32[len(rows), row_len], cls_index int32[B, S], spans).

    spans[r][s] = (start, stop) token range of patient s of row r.
    """
    n_slots = max(len(r) for r in rows)
    arrays = {k: np.zeros((len(rows), row_len), np.int32) for k in ("codes", "ages", "visits", "segment_ids")}
    cls_index = np.zeros((len(rows), n_slots), np.int32)
    spans = []
    for r, patients in enumerate(rows):
        start, row_spans = 0, []
        for s, (visits, age0) in enumerate(patients):
            codes, ages, vis = patient_tokens(visits, age0)
            stop = start + len(codes)
            assert stop <= row_len
            arrays["codes"][r, start:stop] = codes
            arrays["ages"][r, start:stop] = ages
            arrays["visits"][r, start:stop] = vis
            arrays["segment_ids"][r, start:stop] = s + 1
            cls_index[r, s] = start
            row_spans.append((start, stop))
            start = stop
        spans.append(row_spans)
    return {k: jnp.asarray(v) for k, v in arrays.items()}, jnp.asarray(cls_index), spans


PATIENT_A = ([[5, 6, 7], [8], [9, 10]], 600)  # 10 tokens
PATIENT_B = ([[11, 12], [13, 14, 15]], 240)  # 8 tokens
PATIENT_C = ([[16], [17], [18], [19, 20]], 900)  # 10 tokens


def random_batch(seed: int, batch: int, seq: int, vocab_size: int = VOCAB_SIZE) -> dict:
    """A batch of random tokens with two segments per row and trailing padding."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, seq), np.int32)
    seg[:, : seq // 2] = 1
    seg[:, seq // 2 : seq - 3] = 2
    return {
        "codes": jnp.asarray(np.where(seg > 0, rng.integers(5, vocab_size, (batch, seq)), 0), jnp.int32),
        "ages": jnp.asarray(np.where(seg > 0, rng.integers(0, 1400, (batch, seq)), 0), jnp.int32),
        "visits": jnp.asarray(np.where(seg > 0, rng.integers(0, 6, (batch, seq)), 0), jnp.int32),
        "segment_ids": jnp.asarray(seg),
    }


INPUTS = ("codes", "ages", "visits", "segment_ids")


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, batch, positions, cls_index):
    model = nnx.merge(graphdef, state)
    hidden = model.encode(*(batch[k] for k in INPUTS))
    mlm = None if positions is None else model.mlm_logits(hidden, positions)
    cls = None if cls_index is None else model.classify(hidden, cls_index)
    return hidden, mlm, cls


def forward(model, batch: dict, positions=None, cls_index=None):
    """Deterministic (hidden, mlm logits or None, class logits or None), jitted: eager dispatch is slow."""
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, batch, positions, cls_index)


def encode(model, batch: dict) -> jax.Array:
    return forward(model, batch)[0]
