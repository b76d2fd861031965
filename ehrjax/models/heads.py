"""Output heads: masked-code prediction (MLM) and per-patient classification on the pooled `[CLS]`.

Heads take the encoder output already gathered at the positions that carry labels, so the vocabulary
projection runs on the ~15% selected tokens only. Logits are float32 whatever the compute dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ehrjax.data.vocab import NUM_SPECIAL
from ehrjax.models.embeddings import EMBED_STD


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """hidden: f[batch, seq, H], positions: int32[batch, M] -> f[batch, M, H]."""
    return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)


class CopyHead(nnx.Module):
    """Pointer-generator mixture over the masked position's own patient: p = g p_copy + (1 - g) p_vocab.

    p_copy puts attention mass (a query from the target's hidden state, keys from every position) on the
    clinical codes visible in the same segment (patient), so a code the patient already has can be predicted
    with no per-code weight: the vocabulary decoder alone learns to copy a code only from examples of that
    code, which the long tail of rare codes does not provide in a short pre-training. g = sigmoid(gate(h)).
    `causal` (next-code prediction): only the codes at or before the target's position are visible, so the
    next code itself is never pointed at.
    """

    def __init__(self, hidden_dim: int, *, dtype: jnp.dtype, causal: bool = False, rngs: nnx.Rngs):
        self.causal = causal
        self.query = nnx.Linear(hidden_dim, hidden_dim, dtype=dtype, rngs=rngs)
        self.key = nnx.Linear(hidden_dim, hidden_dim, use_bias=False, dtype=dtype, rngs=rngs)
        self.gate = nnx.Linear(hidden_dim, 1, dtype=dtype, rngs=rngs)

    def copy_distribution(
        self, h: jax.Array, hidden: jax.Array, positions: jax.Array, codes: jax.Array, segment_ids: jax.Array,
        vocab_size: int,
    ) -> jax.Array:  # fmt: skip
        """h: f[B, M, H] at the targets; hidden: f[B, L, H]; positions: int32[B, M]; codes, segment_ids:
        int32[B, L] (the masked input) -> f32[B, M, vocab]: rows sum to 1, or to 0 where the target's patient
        shows no clinical code. Special tokens ([MASK], [UNK], ...) and other patients get no mass."""
        scores = jnp.einsum("bmh,blh->bml", self.query(h), self.key(hidden), preferred_element_type=jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(h.shape[-1]))
        own = jnp.take_along_axis(segment_ids, positions, axis=1)
        visible = (segment_ids[:, None, :] == own[:, :, None]) & (codes >= NUM_SPECIAL)[:, None, :]
        if self.causal:
            visible &= jnp.arange(codes.shape[1])[None, None, :] <= positions[:, :, None]
        # A finite fill keeps rows with nothing visible (empty rows, padding slots) free of NaN gradients.
        weights = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1)
        weights = jnp.where(visible, weights, 0.0)
        # Scatter-add each position's weight onto its code: B x M x L updates, where a one-hot product builds
        # f32[B, L, vocab] and spends 2 B M L vocab FLOPs (6% of the CPU MLM step's op time; gigabytes at GPU
        # vocabularies). The step is 3% faster with the scatter on configs/cpu.py.
        b, m, _ = weights.shape
        rows, slots = jnp.arange(b)[:, None, None], jnp.arange(m)[None, :, None]
        return jnp.zeros((b, m, vocab_size), jnp.float32).at[rows, slots, codes[:, None, :]].add(weights)

    def __call__(
        self, h: jax.Array, hidden: jax.Array, positions: jax.Array, codes: jax.Array, segment_ids: jax.Array,
        vocab_logits: jax.Array,
    ) -> jax.Array:  # fmt: skip
        """Log-probabilities f32[B, M, vocab] of the mixture (normalised: usable as logits)."""
        p_copy = self.copy_distribution(h, hidden, positions, codes, segment_ids, vocab_logits.shape[-1])
        has_copy = jnp.sum(p_copy, axis=-1, keepdims=True) > 0
        gate = self.gate(h).astype(jnp.float32)
        log_g = jnp.where(has_copy, jax.nn.log_sigmoid(gate), -jnp.inf)
        log_1mg = jnp.where(has_copy, jax.nn.log_sigmoid(-gate), 0.0)
        # The tiny floor keeps log finite for codes without copy mass (their gradient through it is ~0).
        return jnp.logaddexp(log_g + jnp.log(p_copy + 1e-30), log_1mg + jax.nn.log_softmax(vocab_logits, axis=-1))


class MlmHead(nnx.Module):
    """Dense + GELU + LayerNorm + decoder to the vocabulary. h: f[..., hidden] -> f32[..., vocab].

    Untied (default): `dense` hidden -> hidden, `decoder` hidden -> vocab, a head of its own, so freezing the
    code table leaves the decoder trainable. Tied (`model.tie_mlm`): `dense` maps hidden -> embed_dim and
    the logits are `h @ code_table.T + bias`; the decoder weight is then the `embeddings` partition's code
    table (frozen with it) and only `bias` belongs to the head. With `copy` (`model.mlm_copy`) a `CopyHead`
    mixes a pointer to the patient's own visible codes into the prediction (`Behrt.mlm_logits` applies it);
    `causal`: to the codes at or before the position only (next-code prediction).
    """

    def __init__(
        self,
        hidden_dim: int,
        embed_dim: int,
        vocab_size: int,
        *,
        tied: bool,
        copy: bool = False,
        causal: bool = False,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        self.tied = tied
        # Tied logits h . e_c start at std ~ EMBED_STD * sqrt(embed_dim) (0.16 for 64) since h is LayerNormed
        # and the table is drawn at EMBED_STD; rescaled to unit std like the untied decoder's.
        self.logit_scale = 1.0 / (EMBED_STD * math.sqrt(embed_dim)) if tied else 1.0
        width = embed_dim if tied else hidden_dim
        self.dense = nnx.Linear(hidden_dim, width, dtype=dtype, rngs=rngs)
        self.norm = nnx.LayerNorm(width, dtype=dtype, rngs=rngs)
        if tied:
            self.decoder = nnx.data(None)
            self.bias = nnx.Param(jnp.zeros((vocab_size,), jnp.float32))
        else:
            self.decoder = nnx.Linear(hidden_dim, vocab_size, dtype=dtype, rngs=rngs)
            self.bias = nnx.data(None)
        self.copy = CopyHead(hidden_dim, dtype=dtype, causal=causal, rngs=rngs) if copy else nnx.data(None)

    def __call__(self, h: jax.Array, code_embed: nnx.Embed | None = None) -> jax.Array:
        h = self.norm(jax.nn.gelu(self.dense(h), approximate=False))
        if not self.tied:
            return self.decoder(h).astype(jnp.float32)
        if code_embed is None:
            raise ValueError("a tied MLM head needs the code embedding table")
        table = code_embed.embedding[...].astype(h.dtype)
        return (h @ table.T).astype(jnp.float32) * self.logit_scale + self.bias[...]


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
