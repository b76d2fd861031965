"""Masked-code selection for MLM pre-training, drawn inside the jitted step from a PRNG key.

BERT's recipe with CORE-BEHRT's fix: `mask_prob` of the clinical tokens are selected, never a special token
(`[PAD]`, `[CLS]`, `[SEP]`, `[MASK]`, `[UNK]`). `[UNK]` stays visible as context but is never a target: it
is a catch-all for codes outside the vocabulary, and predicting it teaches nothing. Of the selected tokens
80% become `[MASK]`, 10% a random clinical code (ids `NUM_SPECIAL .. vocab_size - 1`) and 10% stay. The
selected positions are gathered into `num_slots` fixed slots per row (first in position order), so the
vocabulary projection runs only there; selections beyond the slots are left unmasked and counted as overflow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ehrjax.data.vocab import MASK, NUM_SPECIAL


def num_mlm_slots(row_len: int, mask_prob: float = 0.15, slot_factor: float = 1.5) -> int:
    """Masked-position slots per row: `ceil(slot_factor * mask_prob * row_len)`, at most `row_len`."""
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"data.mask_prob must be in (0, 1), got {mask_prob}")
    if slot_factor <= 0:
        raise ValueError(f"data.mlm_slot_factor must be > 0, got {slot_factor}")
    return max(1, min(row_len, math.ceil(slot_factor * mask_prob * row_len)))


def mask_tokens(
    key: jax.Array,
    codes: jax.Array,
    *,
    vocab_size: int,
    mask_prob: float = 0.15,
    num_slots: int,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Select and corrupt MLM targets in `codes` int32[B, L].

    vocab_size: the end of the clinical code ids (`Vocab.code_end`: ids from it on are time tokens, which stay
    visible as context and are never selected or drawn as random codes).

    Returns masked_codes int32[B, L]; mlm_positions int32[B, M] (0 in empty slots); mlm_labels int32[B, M]
    (the original codes, `[PAD]` in empty slots); mlm_weights float32[B, M] (1 for a filled slot); overflow
    int32[] (selections dropped for want of slots, left unmasked). M = `num_slots`.
    """
    if vocab_size <= NUM_SPECIAL:
        raise ValueError(f"vocab_size must exceed the {NUM_SPECIAL} special tokens, got {vocab_size}")
    if not 0.0 < mask_prob < 1.0:
        raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    batch, length = codes.shape
    # One draw of random words: selection, action (mask / random / keep) and the random code. Comparing raw
    # uint32 words with scaled thresholds avoids three separate PRNG calls (which dominate compile time).
    select_bits, action_bits, code_bits = jax.random.bits(key, (3, batch, length), jnp.uint32)
    scale = float(2**32)
    selected = (codes >= NUM_SPECIAL) & (codes < vocab_size) & (select_bits < jnp.uint32(mask_prob * scale))
    rank = jnp.cumsum(selected, axis=1, dtype=jnp.int32) - 1
    kept = selected & (rank < num_slots)
    overflow = jnp.sum(selected & ~kept, dtype=jnp.int32)

    random_codes = NUM_SPECIAL + (code_bits % jnp.uint32(vocab_size - NUM_SPECIAL)).astype(codes.dtype)
    corrupted = jnp.where(
        action_bits < jnp.uint32(0.8 * scale),
        MASK,
        jnp.where(action_bits < jnp.uint32(0.9 * scale), random_codes, codes),
    )
    masked_codes = jnp.where(kept, corrupted, codes)

    rows = jnp.arange(batch)[:, None]
    slot = jnp.where(kept, rank, num_slots)  # out of range: dropped by the scatter
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), codes.shape)
    mlm_positions = jnp.zeros((batch, num_slots), jnp.int32).at[rows, slot].set(positions, mode="drop")
    mlm_weights = jnp.zeros((batch, num_slots), jnp.float32).at[rows, slot].set(1.0, mode="drop")
    mlm_labels = jnp.where(mlm_weights > 0, jnp.take_along_axis(codes, mlm_positions, axis=1), 0)
    return masked_codes, mlm_positions, mlm_labels.astype(jnp.int32), mlm_weights, overflow
