"""Inverted dropout whose mask costs `bits` random bits per element.

`jax.random.bernoulli` (what `nnx.Dropout` uses) draws a 32-bit uniform per element; with JAX's default
threefry generator those bits are a long chain of integer ops per word, a large part of a small model's step on
a CPU. `bits=8` or `16` draws `jax.random.bits` of that width instead (threefry packs 4 or 2 of them per 32-bit
word) and keeps an element when its draw is >= round(rate * 2**bits): the rate is then rounded to a multiple of
2**-bits (0.1 -> 26/256 = 0.1016 with 8 bits, 6554/65536 with 16) and the kept values are scaled by the exact
1 / keep probability, so the expectation is preserved. `bits=32` is `nnx.Dropout`'s mask, bit for bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

DROPOUT_BITS: tuple[int, ...] = (32, 16, 8)


class Dropout(nnx.Module):
    """x: any shape -> same shape; zero with probability `rate`, else x / keep probability (training only)."""

    def __init__(self, rate: float, bits: int = 32):
        if bits not in DROPOUT_BITS:
            raise ValueError(f"model.dropout_bits must be one of {DROPOUT_BITS}, got {bits!r}")
        self.rate = rate
        self.bits = bits

    def __call__(self, x: jax.Array, *, deterministic: bool, rngs: jax.Array | None = None) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        if rngs is None:
            raise ValueError("dropout with deterministic=False needs a key")
        if self.bits == 32:
            keep_prob = 1.0 - self.rate
            keep = jax.random.bernoulli(rngs, p=keep_prob, shape=x.shape)
        else:
            dtype = jnp.uint8 if self.bits == 8 else jnp.uint16
            threshold = round(self.rate * 2**self.bits)
            keep_prob = 1.0 - threshold / 2**self.bits
            keep = jax.random.bits(rngs, x.shape, dtype) >= jnp.asarray(threshold, dtype)
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
