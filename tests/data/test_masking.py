import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ehrjax.data.masking import mask_tokens, num_mlm_slots
from ehrjax.data.vocab import CLS, MASK, NUM_SPECIAL, PAD, SEP, UNK

VOCAB_SIZE = 2000


def packed_codes(rows: int = 64, row_len: int = 128, seed: int = 0) -> np.ndarray:
    """Rows that look packed: [CLS] codes [SEP] ... per patient, some [UNK]s, then padding."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(NUM_SPECIAL, VOCAB_SIZE, (rows, row_len)).astype(np.int32)
    codes[rng.random((rows, row_len)) < 0.15] = SEP
    codes[rng.random((rows, row_len)) < 0.05] = CLS
    codes[rng.random((rows, row_len)) < 0.03] = UNK
    codes[:, 0] = CLS
    codes[:, row_len - row_len // 8 :] = PAD
    return codes


@functools.partial(jax.jit, static_argnames="num_slots")
def many_masks(keys: jax.Array, codes: jax.Array, num_slots: int):
    """mask_tokens for each key (vmapped), as a training step would draw it."""
    return jax.vmap(lambda k: mask_tokens(k, codes, vocab_size=VOCAB_SIZE, num_slots=num_slots))(keys)


def test_masking_statistics():
    codes = packed_codes()
    num_slots = num_mlm_slots(codes.shape[1], 0.15, 1.5)
    keys = jax.random.split(jax.random.key(0), 200)
    masked, positions, labels, weights, overflow = jax.device_get(many_masks(keys, jnp.asarray(codes), num_slots))

    candidates = codes >= NUM_SPECIAL
    rows = np.arange(codes.shape[0])[None, :, None]
    filled = weights > 0
    assert int(overflow.sum()) == 0  # 1.5x headroom: no overflow expected at this size
    selected = np.zeros(masked.shape, dtype=bool)
    selected[np.arange(len(keys))[:, None, None], rows, positions] = filled
    rate = selected.sum() / (candidates.sum() * len(keys))
    assert abs(rate - 0.15) < 0.003

    # Specials (PAD, CLS, SEP, MASK, UNK) are never selected and never changed.
    assert not (selected & ~candidates[None]).any()
    np.testing.assert_array_equal(
        masked[:, ~candidates], np.broadcast_to(codes[~candidates], masked[:, ~candidates].shape)
    )
    # Labels are the original codes at the selected positions; unselected positions carry nothing.
    np.testing.assert_array_equal(labels[filled], np.broadcast_to(codes, masked.shape)[selected])
    assert (labels[~filled] == 0).all() and (positions[~filled] == 0).all()
    assert (masked[~selected] == np.broadcast_to(codes, masked.shape)[~selected]).all()

    new = masked[selected]
    old = np.broadcast_to(codes, masked.shape)[selected]
    to_mask = np.mean(new == MASK)
    unchanged = np.mean(new == old)
    random = np.mean((new != MASK) & (new != old))
    assert abs(to_mask - 0.8) < 0.01
    assert abs(unchanged - 0.1) < 0.01
    assert abs(random - 0.1) < 0.01
    assert (new[new != MASK] >= NUM_SPECIAL).all() and (new < VOCAB_SIZE).all()  # random codes are clinical
    # Filled slots come first and hold increasing positions.
    assert (np.diff(filled.astype(int), axis=-1) <= 0).all()
    assert all(
        (np.diff(p[f]) > 0).all()
        for p, f in zip(positions.reshape(-1, num_slots), filled.reshape(-1, num_slots), strict=True)
    )


def test_masks_differ_between_keys_and_repeat_for_a_key():
    codes = jnp.asarray(packed_codes(8, 64))
    fn = jax.jit(functools.partial(mask_tokens, vocab_size=VOCAB_SIZE, num_slots=16))
    a = fn(jax.random.key(1), codes)
    b = fn(jax.random.key(2), codes)
    c = fn(jax.random.key(1), codes)
    assert not np.array_equal(a[1], b[1])
    for x, y in zip(a, c, strict=True):
        np.testing.assert_array_equal(x, y)


def test_overflow_is_counted_and_dropped_from_the_loss():
    # Every clinical position is (almost surely) selected; 3 slots per row hold the first three.
    codes = np.asarray([[CLS, 10, 11, 12, 13, 14, SEP, PAD], [CLS, 20, SEP, PAD, PAD, PAD, PAD, PAD]], np.int32)
    masked, positions, labels, weights, overflow = mask_tokens(
        jax.random.key(0), jnp.asarray(codes), vocab_size=VOCAB_SIZE, mask_prob=0.99999, num_slots=3
    )
    assert int(overflow) == 2  # positions 4 and 5 of row 0
    np.testing.assert_array_equal(positions, [[1, 2, 3], [1, 0, 0]])
    np.testing.assert_array_equal(labels, [[10, 11, 12], [20, 0, 0]])
    np.testing.assert_array_equal(weights, [[1, 1, 1], [1, 0, 0]])
    # Overflowed selections stay visible: they are not in the loss.
    np.testing.assert_array_equal(masked[0, 4:], codes[0, 4:])
    assert masked.dtype == jnp.int32 and positions.dtype == jnp.int32 and labels.dtype == jnp.int32
    assert weights.dtype == jnp.float32 and overflow.dtype == jnp.int32


def test_slot_count_and_bad_input():
    assert num_mlm_slots(256, 0.15, 1.5) == 58
    assert num_mlm_slots(16, 0.15, 1.5) == 4
    assert num_mlm_slots(4, 0.9, 3.0) == 4
    codes = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match="vocab_size"):
        mask_tokens(jax.random.key(0), codes, vocab_size=NUM_SPECIAL, num_slots=2)
    with pytest.raises(ValueError, match="mask_prob"):
        mask_tokens(jax.random.key(0), codes, vocab_size=10, mask_prob=1.0, num_slots=2)
    with pytest.raises(ValueError, match="num_slots"):
        mask_tokens(jax.random.key(0), codes, vocab_size=10, num_slots=0)
    with pytest.raises(ValueError, match=r"data\.mask_prob"):
        num_mlm_slots(16, 0.0)
