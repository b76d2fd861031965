"""Dropout with narrow mask bits: the 32-bit mask is nnx.Dropout's; 8/16 bits follow their rounded rate."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ehrjax.config import model_config
from ehrjax.models import Behrt
from ehrjax.models.dropout import Dropout


def test_32_bits_is_nnx_dropout_bit_for_bit():
    x = jax.random.normal(jax.random.key(0), (64, 48))
    key = jax.random.key(3)
    expected = nnx.Dropout(0.1)(x, deterministic=False, rngs=key)
    np.testing.assert_array_equal(Dropout(0.1)(x, deterministic=False, rngs=key), expected)
    np.testing.assert_array_equal(Dropout(0.1)(x, deterministic=True), x)
    np.testing.assert_array_equal(Dropout(0.0)(x, deterministic=False, rngs=key), x)


@pytest.mark.parametrize(("bits", "threshold"), [(8, 26), (16, 6554)])
def test_narrow_bits_keep_draws_at_or_above_the_rounded_rate(bits, threshold):
    x = jnp.ones((256, 512))
    key = jax.random.key(5)
    out = np.asarray(Dropout(0.1, bits)(x, deterministic=False, rngs=key))
    draws = np.asarray(jax.random.bits(key, x.shape, jnp.uint8 if bits == 8 else jnp.uint16))
    keep_prob = 1 - threshold / 2**bits
    np.testing.assert_allclose(out, np.where(draws >= threshold, 1 / keep_prob, 0.0), rtol=1e-6)
    assert abs((out == 0).mean() - threshold / 2**bits) < 0.005  # 131k draws
    assert abs(out.mean() - 1.0) < 0.01  # expectation preserved


def test_bad_bits_name_the_key():
    with pytest.raises(ValueError, match=r"model\.dropout_bits must be one of"):
        Dropout(0.1, 12)
    cfg = model_config("tiny")
    cfg.dropout_bits = 4
    with pytest.raises(ValueError, match=r"model\.dropout_bits"):
        Behrt(cfg, 40, rngs=nnx.Rngs(0))
