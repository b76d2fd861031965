"""BEHRT's input embeddings: code + age + segment + position, summed, LayerNorm, dropout.

Parameters (paths under `embeddings/`): `code/embedding` f32[vocab, embed_dim], `proj/{kernel,bias}`
(only when `embed_dim != hidden_dim`), `age/embedding`, `segment/embedding` f32[2, hidden_dim],
`position/embedding` (only for `model.position == 'learned'`), `norm/{scale,bias}`. The sinusoidal position
table is a constant recomputed at trace time, not a parameter: it is frozen by construction. It is scaled to
the learned tables' init scale (`POSITION_SCALE`): at unit amplitude it is about 50x the code embedding, and
after the LayerNorm the code identity starts as a small perturbation of the position signal.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ehrjax.models.dropout import Dropout

EMBED_STD = 0.02
EMBED_INIT = nnx.initializers.normal(stddev=EMBED_STD)
POSITION_SCALE = EMBED_STD  # see BehrtEmbeddings


@functools.lru_cache(maxsize=16)
def sinusoidal_table(num_positions: int, dim: int) -> np.ndarray:
    """Transformer sinusoids, f32[num_positions, dim]: sin on even features, cos on odd ones."""
    pos = np.arange(num_positions, dtype=np.float64)[:, None]
    freq = np.exp(-np.log(10000.0) * (np.arange(0, dim, 2, dtype=np.float64) / dim))
    table = np.zeros((num_positions, dim), dtype=np.float64)
    table[:, 0::2] = np.sin(pos * freq)
    table[:, 1::2] = np.cos(pos * freq[: dim // 2])
    return table.astype(np.float32)


def num_age_buckets(cfg: ml_collections.ConfigDict) -> int:
    """Rows of the age table: one per `age_bucket_months` up to `max_age_months`, plus headroom."""
    return cfg.max_age_months // cfg.age_bucket_months + 2


class BehrtEmbeddings(nnx.Module):
    """codes, ages, visits: int32[batch, seq] -> f[batch, seq, hidden_dim] in the compute dtype."""

    def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.hidden_dim = cfg.hidden_dim
        self.age_bucket_months = cfg.age_bucket_months
        self.max_visits = cfg.max_visits
        self.position_type = cfg.position
        self.code = nnx.Embed(vocab_size, cfg.embed_dim, embedding_init=EMBED_INIT, rngs=rngs)
        self.proj = nnx.data(None)
        if cfg.embed_dim != cfg.hidden_dim:
            self.proj = nnx.Linear(cfg.embed_dim, cfg.hidden_dim, dtype=dtype, rngs=rngs)
        self.age = nnx.Embed(num_age_buckets(cfg), cfg.hidden_dim, embedding_init=EMBED_INIT, rngs=rngs)
        self.segment = nnx.Embed(2, cfg.hidden_dim, embedding_init=EMBED_INIT, rngs=rngs)
        self.position = nnx.data(None)
        if cfg.position == "learned":
            self.position = nnx.Embed(cfg.max_visits, cfg.hidden_dim, embedding_init=EMBED_INIT, rngs=rngs)
        self.norm = nnx.LayerNorm(cfg.hidden_dim, dtype=dtype, rngs=rngs)
        self.dropout = Dropout(cfg.dropout, cfg.dropout_bits)

    def __call__(
        self,
        codes: jax.Array,
        ages: jax.Array,
        visits: jax.Array,
        *,
        deterministic: bool = True,
        rngs: jax.Array | None = None,
    ) -> jax.Array:
        # Gathers run on the f32 tables; only the gathered rows are cast to the compute dtype.
        x = self.code(codes).astype(self.dtype)
        if self.proj is not None:
            x = self.proj(x)
        age_rows = self.age.num_embeddings
        x = x + self.age(jnp.clip(ages // self.age_bucket_months, 0, age_rows - 1)).astype(self.dtype)
        x = x + self.segment(visits % 2).astype(self.dtype)
        position = jnp.clip(visits, 0, self.max_visits - 1)
        if self.position is None:
            table = jnp.asarray(sinusoidal_table(self.max_visits, self.hidden_dim)) * POSITION_SCALE
            x = x + jnp.take(table, position, axis=0).astype(self.dtype)
        else:
            x = x + self.position(position).astype(self.dtype)
        x = self.norm(x)
        return self.dropout(x, deterministic=deterministic, rngs=rngs)
