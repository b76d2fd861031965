"""Output heads: masked-code prediction (MLM) and per-patient classification on the pooled `[CLS]`.

Heads take the encoder output already gathered at the positions that carry labels, so the vocabulary
projection runs on the ~15% selected tokens only. Logits are float32 whatever the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """hidden: f[batch, seq, H], positions: int32[batch, M] -> f[batch, M, H]."""
    return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)


class MlmHead(nnx.Module):
    """Dense + GELU + LayerNorm + decoder to the vocabulary. h: f[..., hidden] -> f32[..., vocab].

    Untied (default): `dense` hidden -> hidden, `decoder` hidden -> vocab, a head of its own, so freezing the
    code table leaves the decoder trainable. Tied (`model.tie_mlm`): `dense` maps hidden -> embed_dim and
    the logits are `h @ code_table.T + bias`; the decoder weight is then the `embeddings` partition's code
    table (frozen with it) and only `bias` belongs to the head.
    """

    def __init__(
        self, hidden_dim: int, embed_dim: int, vocab_size: int, *, tied: bool, dtype: jnp.dtype, rngs: nnx.Rngs
    ):
        self.tied = tied
        width = embed_dim if tied else hidden_dim
        self.dense = nnx.Linear(hidden_dim, width, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        if tied:
            self.decoder = nnx.data(None)
            self.bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))
        else:
            self.decoder = nnx.Linear(hidden_dim, vocab_size, dtype=dtype, rngs=rngs)
            self.bias = nnx.data(None)

    def __call__(self, h: jax.Array, code_embed: nnx.Embed | None = None) -> jax.Array:
        h = self.norm(jax.nn.gelu(self.dense(h), approximate=False))
        if not self.tied:
            return self.decoder(h).astype(jnp.float32)
        if code_embed is None:
            raise ValueError("a tied MLM head needs the code embedding table")
        table = code_embed.embedding[...].astype(h.dtype)
        return (h @ table.T).astype(jnp.float32) + self.bias[...]


class ClassifierHead(nnx.Module):
    """BERT pooler (dense + tanh), dropout, linear. cls: f[..., hidden] -> f32[..., num_labels]."""

    def __init__(self, hidden_dim: int, num_labels: int, *, dropout: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.pooler = nnx.Linear(hidden_dim, hidden_dim, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        self.out = nnx.Linear(hidden_dim, num_labels, dtype=dtype, rngs=rngs)

    def __call__(self, cls: jax.Array, *, deterministic: bool = True, rngs: jax.Array | None = None) -> jax.Array:
        h = jnp.tanh(self.pooler(cls))
        h = self.dropout(h, deterministic=deterministic, rngs=rngs)
        return self.out(h).astype(jnp.float32)
