"""Pre-LN transformer encoder with a block-diagonal (per-patient) attention mask.

Attention (`model.attention_impl`): `xla` / `cudnn` / None go to `jax.nn.dot_product_attention` with the dense
block-diagonal mask built from the segment ids; `pallas` runs the Pallas Triton flash-attention kernel
(`jax.experimental.pallas.ops.gpu.attention.mha`), which takes the segment ids themselves and never builds the
[seq, seq] mask or score tensors in memory. It runs on GPUs only: on another platform the model warns once and
uses the `xla` path instead (or the kernel in Pallas interpret mode with `model.attention_interpret`, slow, for
tests). Neither fused path has attention dropout: training with `attention_dropout > 0` takes an explicit XLA
softmax-dropout path, so `validate_model_config` refuses that rate with `cudnn` or `pallas`.

A causal encoder (`causal=True`, built for next-code pre-training, `task=clm`) lets a token see only the tokens of
its own segment at or before it: the block-diagonal mask's lower triangle on the XLA paths, `causal=True` for
the Pallas kernel. Every other model is bidirectional.

Layers live at `encoder/layers/<i>/...` (a list) or, with `model.scan_layers`, once at `encoder/layers/...`
with a leading layer axis on every parameter, applied by `nnx.scan` so compile time does not grow with
depth. `stack_layers` / `unstack_layers` convert a parameter state between the two layouts.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ehrjax.models.dropout import Dropout
from ehrjax.models.lora import LoRADense


def attention_mask(segment_ids: jax.Array, causal: bool = False) -> jax.Array:
    """segment_ids: int32[batch, seq] (0 = padding) -> bool[batch, 1, seq, seq].

    A token attends to the tokens of its own segment (patient); `causal`: to those at or before it only.
    Segments are contiguous, so the row-wide lower triangle is causal within each segment. Padding forms a
    segment of its own, so padding queries have a non-empty row (no NaN) while real tokens never see padding.
    """
    mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if causal:
        seq = segment_ids.shape[1]
        mask &= jnp.tril(jnp.ones((seq, seq), dtype=bool))
    return mask


def pallas_supports(seq: int) -> bool:
    """Whether the Pallas Triton kernel takes rows of `seq` tokens: its blocks are min(128, seq) (queries
    and keys) and 32 (backward) tokens, powers of two of at least 16 for Triton, dividing `seq`."""
    return (16 <= seq <= 128 and seq & (seq - 1) == 0) or (seq > 128 and seq % 128 == 0)


def segment_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    *,
    implementation: str | None = "xla",
    interpret: bool = False,
    causal: bool = False,
) -> jax.Array:
    """Softmax attention within segments, no dropout. q, k, v: f[batch, seq, heads, head_dim]; segment_ids:
    int32[batch, seq] (0 = padding, a segment of its own) -> f[batch, seq, heads, head_dim].

    `implementation`: `pallas` runs the Pallas Triton flash-attention kernel (a GPU, or `interpret=True` on any
    platform); anything else is passed to `jax.nn.dot_product_attention` with `attention_mask(segment_ids,
    causal)`. `causal`: a query sees the keys of its segment at or before it (next-code pre-training).
    """
    if implementation == "pallas":
        from jax.experimental.pallas.ops.gpu.attention import mha

        seq = q.shape[1]
        if not pallas_supports(seq):
            raise ValueError(
                f"model.attention_impl='pallas' needs rows of a power of two >= 16 tokens up to 128, or a multiple "
                f"of 128; got {seq} (data.row_len / bucket or pack row lengths)"
            )
        scale = float(q.shape[-1]) ** -0.5
        return mha(q, k, v, segment_ids.astype(jnp.int32), sm_scale=scale, causal=causal, interpret=interpret)
    mask = attention_mask(segment_ids, causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def resolve_attention_impl(implementation: str | None, interpret: bool = False) -> str | None:
    """The implementation to run: `pallas` needs a GPU (or interpret mode); elsewhere it is `xla`, logged once."""
    if implementation == "pallas" and not interpret and jax.default_backend() != "gpu":
        _warn_pallas_fallback(jax.default_backend())
        return "xla"
    return implementation


@functools.cache
def _warn_pallas_fallback(backend: str) -> None:
    logging.getLogger(__name__).warning(
        "model.attention_impl='pallas' needs a GPU (backend here: %s); using the XLA attention instead", backend
    )


def split_key(key: jax.Array | None, num: int) -> list[jax.Array | None]:
    """`num` independent keys from `key`, or `num` Nones in deterministic mode."""
    if key is None:
        return [None] * num
    return list(jax.random.split(key, num))


class SelfAttention(nnx.Module):
    """Multi-head self-attention within segments (`causal`: on the earlier tokens of the segment only).
    x: f[batch, seq, hidden], segment_ids: int32[batch, seq]."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, dtype: jnp.dtype, causal: bool = False, rngs: nnx.Rngs):
        hidden = cfg.hidden_dim
        self.causal = causal
        self.num_heads = cfg.num_heads
        self.head_dim = hidden // cfg.num_heads
        self.interpret = bool(cfg.attention_interpret)
        self.implementation = resolve_attention_impl(cfg.attention_impl, self.interpret)
        self.q = LoRADense(hidden, hidden, target="q", dtype=dtype, rngs=rngs)
        # No key bias: it adds q.b_k to every logit of a query, which softmax ignores, so its gradient is
        # rounding noise that Adam would turn into updates of full learning-rate size.
        self.k = LoRADense(hidden, hidden, target="k", use_bias=False, dtype=dtype, rngs=rngs)
        self.v = LoRADense(hidden, hidden, target="v", dtype=dtype, rngs=rngs)
        self.o = LoRADense(hidden, hidden, target="o", dtype=dtype, rngs=rngs)
        self.attn_dropout = Dropout(cfg.attention_dropout, cfg.dropout_bits)

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array, *, deterministic: bool = True, rngs: jax.Array | None = None
    ) -> jax.Array:
        batch, seq, _ = x.shape
        kq, kk, kv, ko, kp = split_key(rngs, 5)
        heads = (batch, seq, self.num_heads, self.head_dim)
        q = self.q(x, deterministic=deterministic, rngs=kq).reshape(heads)
        k = self.k(x, deterministic=deterministic, rngs=kk).reshape(heads)
        v = self.v(x, deterministic=deterministic, rngs=kv).reshape(heads)
        if deterministic or self.attn_dropout.rate == 0.0:
            out = segment_attention(
                q, k, v, segment_ids, implementation=self.implementation, interpret=self.interpret,
                causal=self.causal,
            )  # fmt: skip
        else:
            out = self._attention_with_dropout(q, k, v, attention_mask(segment_ids, self.causal), kp)
        return self.o(out.reshape(batch, seq, -1), deterministic=deterministic, rngs=ko)

    def _attention_with_dropout(
        self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, key: jax.Array
    ) -> jax.Array:
        """The XLA attention with dropout on the probabilities (jax.nn.dot_product_attention has none)."""
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits / jnp.sqrt(jnp.float32(self.head_dim))
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1)
        probs = self.attn_dropout(probs, deterministic=False, rngs=key).astype(v.dtype)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class EncoderLayer(nnx.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP. x: f[batch, seq, hidden], segment_ids:
    int32[batch, seq]."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, dtype: jnp.dtype, causal: bool = False, rngs: nnx.Rngs):
        hidden = cfg.hidden_dim
        self.attn_norm = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
        self.attn = SelfAttention(cfg, dtype=dtype, causal=causal, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(hidden, dtype=dtype, rngs=rngs)
        self.mlp_in = LoRADense(hidden, cfg.mlp_dim, target="mlp_in", dtype=dtype, rngs=rngs)
        self.mlp_out = LoRADense(cfg.mlp_dim, hidden, target="mlp_out", dtype=dtype, rngs=rngs)
        self.dropout = Dropout(cfg.dropout, cfg.dropout_bits)

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array, *, deterministic: bool = True, rngs: jax.Array | None = None
    ) -> jax.Array:
        k_attn, k_res1, k_in, k_out, k_res2 = split_key(rngs, 5)
        h = self.attn(self.attn_norm(x), segment_ids, deterministic=deterministic, rngs=k_attn)
        x = x + self.dropout(h, deterministic=deterministic, rngs=k_res1)
        h = self.mlp_in(self.mlp_norm(x), deterministic=deterministic, rngs=k_in)
        h = jax.nn.gelu(h, approximate=False)
        h = self.mlp_out(h, deterministic=deterministic, rngs=k_out)
        return x + self.dropout(h, deterministic=deterministic, rngs=k_res2)


class Encoder(nnx.Module):
    """`num_layers` pre-LN layers and a final LayerNorm. x: f[batch, seq, hidden] -> same shape; segment_ids:
    int32[batch, seq] (0 = padding), the block-diagonal attention pattern (`causal`: its lower triangle)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, dtype: jnp.dtype, causal: bool = False, rngs: nnx.Rngs):
        self.num_layers = cfg.num_layers
        self.scan_layers = bool(cfg.scan_layers)
        if self.scan_layers:

            @nnx.split_rngs(splits=cfg.num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def stacked(rngs: nnx.Rngs) -> EncoderLayer:
                return EncoderLayer(cfg, dtype=dtype, causal=causal, rngs=rngs)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([EncoderLayer(cfg, dtype=dtype, causal=causal, rngs=rngs)
                                    for _ in range(cfg.num_layers)])  # fmt: skip
        self.final_norm = nnx.LayerNorm(cfg.hidden_dim, dtype=dtype, rngs=rngs)

    def __call__(
        self, x: jax.Array, segment_ids: jax.Array, *, deterministic: bool = True, rngs: jax.Array | None = None
    ) -> jax.Array:
        if self.scan_layers:
            keys = None if rngs is None else jax.random.split(rngs, self.num_layers)

            @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
            def body(x: jax.Array, layer: EncoderLayer, key: jax.Array | None) -> jax.Array:
                return layer(x, segment_ids, deterministic=deterministic, rngs=key)

            x = body(x, self.layers, keys)
        else:
            for layer, key in zip(self.layers, split_key(rngs, self.num_layers), strict=True):
                x = layer(x, segment_ids, deterministic=deterministic, rngs=key)
        return self.final_norm(x)


def _layers_prefix(path: tuple) -> bool:
    return len(path) >= 2 and path[0] == "encoder" and path[1] == "layers"


def stack_layers(state: nnx.State) -> nnx.State:
    """Convert a state from the list layout (`encoder/layers/<i>/...`) to the scan layout (stacked)."""
    groups: dict[tuple, dict[int, nnx.Variable]] = defaultdict(dict)
    out = []
    for path, var in nnx.to_flat_state(state):
        if _layers_prefix(path):
            groups[path[3:]][int(path[2])] = var
        else:
            out.append((path, var))
    for rest, per_layer in groups.items():
        if sorted(per_layer) != list(range(len(per_layer))):
            raise ValueError(f"encoder/layers/*/{'/'.join(map(str, rest))}: layers {sorted(per_layer)} not 0..n-1")
        values = [per_layer[i][...] for i in range(len(per_layer))]
        out.append((("encoder", "layers", *rest), per_layer[0].replace(jnp.stack(values))))
    return nnx.from_flat_state(out)


def unstack_layers(state: nnx.State) -> nnx.State:
    """Convert a state from the scan layout (leading layer axis) to the list layout."""
    out = []
    for path, var in nnx.to_flat_state(state):
        if _layers_prefix(path):
            value = var[...]
            out.extend(((*path[:2], i, *path[2:]), var.replace(value[i])) for i in range(value.shape[0]))
        else:
            out.append((path, var))
    return nnx.from_flat_state(out)
