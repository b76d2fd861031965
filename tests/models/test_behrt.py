"""BEHRT forward: packing and padding invariance, scan layout, dtypes, dropout, heads, the pure apply path."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from behrt_inputs import INPUTS, PATIENT_A, PATIENT_B, PATIENT_C, VOCAB_SIZE, encode, forward, pack_rows, random_batch
from flax import nnx

from ehrjax.models import Behrt, attention_mask, classify_apply, mlm_apply, stack_layers, unstack_layers
from ehrjax.models.encoder import _warn_pallas_fallback, pallas_supports, segment_attention


def test_attention_mask_is_block_diagonal_and_padding_rows_are_not_empty():
    seg = jnp.array([[1, 1, 2, 2, 2, 0, 0]])
    mask = np.asarray(attention_mask(seg))[0, 0]
    assert mask.shape == (7, 7)
    assert mask[0, 1] and not mask[0, 2] and not mask[1, 5]
    assert mask[2:5, 2:5].all() and not mask[2:5, :2].any()
    assert mask.any(axis=-1).all()  # every query, padding included, attends to something


def test_shapes_dtypes_and_finite_padding(tiny_cfg):
    model = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=3, rngs=nnx.Rngs(0))
    batch, cls_index, _ = pack_rows([[PATIENT_A, PATIENT_B], [PATIENT_C]], row_len=24)
    hidden, logits, cls_logits = forward(model, batch, jnp.array([[1, 2, 3], [4, 5, 0]]), cls_index)
    assert hidden.shape == (2, 24, tiny_cfg.hidden_dim)
    assert bool(jnp.isfinite(hidden).all())
    assert logits.shape == (2, 3, VOCAB_SIZE) and logits.dtype == jnp.float32
    assert cls_logits.shape == (2, 2, 3) and cls_logits.dtype == jnp.float32


def test_packing_equivalence(tiny_cfg):
    """Two patients packed in one row give the same per-patient outputs as each alone in a padded row."""
    model = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=2, rngs=nnx.Rngs(1))
    packed, packed_cls, packed_spans = pack_rows([[PATIENT_A, PATIENT_B]], row_len=24)
    alone, alone_cls, alone_spans = pack_rows([[PATIENT_A], [PATIENT_B]], row_len=24)
    h_packed, _, c_packed = forward(model, packed, cls_index=packed_cls)
    h_alone, _, c_alone = forward(model, alone, cls_index=alone_cls)
    for s in range(2):
        start, stop = packed_spans[0][s]
        a_start, a_stop = alone_spans[s][0]
        np.testing.assert_allclose(h_packed[0, start:stop], h_alone[s, a_start:a_stop], atol=1e-5)
    np.testing.assert_allclose(c_packed[0], c_alone[:, 0], atol=1e-5)  # [2 slots] vs [2 rows]


def test_padding_invariance(tiny_cfg):
    model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(2))
    short, _, spans = pack_rows([[PATIENT_A, PATIENT_C]], row_len=24)
    long, _, _ = pack_rows([[PATIENT_A, PATIENT_C]], row_len=32)
    stop = spans[0][-1][1]
    positions = jnp.array([[1, 5, 12]])
    h_short, mlm_short, _ = forward(model, short, positions)
    h_long, mlm_long, _ = forward(model, long, positions)
    np.testing.assert_allclose(h_short[:, :stop], h_long[:, :stop], atol=1e-5)
    np.testing.assert_allclose(mlm_short, mlm_long, atol=1e-5)


@pytest.mark.parametrize("position", ["sinusoidal", "learned"])
def test_scan_layers_matches_layer_list(tiny_cfg, position):
    tiny_cfg.position = position
    model = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=1, rngs=nnx.Rngs(3))
    tiny_cfg.scan_layers = True
    scanned = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=1, rngs=nnx.Rngs(4))
    params = nnx.state(model, nnx.Param)
    stacked = stack_layers(params)
    assert stacked["encoder"]["layers"]["attn"]["q"]["kernel"].shape == (tiny_cfg.num_layers, 32, 32)
    nnx.update(scanned, stacked)
    batch = random_batch(0, batch=2, seq=24)
    np.testing.assert_allclose(encode(model, batch), encode(scanned, batch), atol=1e-5)
    round_trip = unstack_layers(nnx.state(scanned, nnx.Param))
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(params), nnx.to_flat_state(round_trip), strict=True):
        assert p1 == p2
        np.testing.assert_array_equal(v1[...], v2[...])


def test_scan_layers_dropout_runs_and_is_keyed(tiny_cfg):
    tiny_cfg.scan_layers = True
    model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(0))
    batch = random_batch(1, batch=2, seq=24)
    graphdef, state = nnx.split(model)
    run = jax.jit(
        lambda state, key: nnx.merge(graphdef, state).encode(*(batch[k] for k in INPUTS), deterministic=False, rngs=key)
    )
    a, b, c = (run(state, jax.random.key(i)) for i in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_dropout_needs_rngs_and_accepts_nnx_rngs(tiny_cfg):
    model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(0))
    batch = random_batch(2, batch=2, seq=24)
    args = [batch[k] for k in INPUTS]
    with pytest.raises(ValueError, match="needs rngs"):
        model.encode(*args, deterministic=False)
    run = nnx.jit(lambda model, rngs: model.encode(*args, deterministic=False, rngs=rngs))
    a, b = run(model, nnx.Rngs(dropout=7)), run(model, nnx.Rngs(dropout=7))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, encode(model, batch))


def test_attention_dropout_path_matches_fused_path_without_dropout(tiny_cfg):
    """The explicit attention used for attention dropout equals jax.nn.dot_product_attention at rate 0."""
    model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(5))
    attn = model.encoder.layers[0].attn
    seg = jnp.array([[1] * 4 + [2] * 4 + [0] * 2, [1] * 7 + [0] * 3])
    mask = attention_mask(seg)
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 10, 2, 16)) for i in range(3))
    fused = jax.nn.dot_product_attention(q, k, v, mask=mask)
    attn.attn_dropout.rate = 0.0
    explicit = attn._attention_with_dropout(q, k, v, mask, jax.random.key(0))
    np.testing.assert_allclose(fused, explicit, atol=1e-5)


def test_bfloat16_compute_close_to_float32(tiny_cfg):
    model = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=2, rngs=nnx.Rngs(6))
    tiny_cfg.dtype = "bfloat16"
    model_bf16 = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=2, rngs=nnx.Rngs(6))
    for (_, v32), (_, v16) in zip(
        nnx.to_flat_state(nnx.state(model, nnx.Param)), nnx.to_flat_state(nnx.state(model_bf16, nnx.Param)), strict=True
    ):
        assert v16.dtype == jnp.float32  # params stay float32
        np.testing.assert_array_equal(v32[...], v16[...])  # same seed, same weights
    batch = random_batch(3, batch=2, seq=24)
    positions, cls_index = jnp.array([[0, 3, 9], [2, 4, 11]]), jnp.array([[0, 12], [0, 12]])
    h32, l32, c32 = forward(model, batch, positions, cls_index)
    h16, l16, c16 = forward(model_bf16, batch, positions, cls_index)
    assert h16.dtype == jnp.bfloat16
    np.testing.assert_allclose(h16.astype(jnp.float32), h32, atol=0.1, rtol=0.05)
    # ... and the compute really is bf16: rounding shows, and the encoder's matmuls take bf16 operands
    assert float(jnp.abs(h16.astype(jnp.float32) - h32).max()) > 1e-4
    jaxpr = jax.make_jaxpr(lambda b: forward(model_bf16, b, positions, cls_index)[0])(batch)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    dots += [e for eq in jaxpr.jaxpr.eqns for sub in eq.params.values() if hasattr(sub, "jaxpr")
             for e in getattr(sub.jaxpr, "eqns", []) if e.primitive.name == "dot_general"]  # fmt: skip
    assert dots and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in dots)
    assert l16.dtype == jnp.float32 and c16.dtype == jnp.float32
    np.testing.assert_allclose(l16, l32, atol=0.1, rtol=0.05)
    np.testing.assert_allclose(c16, c32, atol=0.1, rtol=0.05)


def test_mlm_logits_gather_then_project(tiny_cfg):
    model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(7))
    positions = jnp.array([[3, 0, 7], [15, 1, 1]])
    hidden, logits, _ = forward(model, random_batch(4, batch=2, seq=24), positions)
    full = model.mlm_head(hidden)  # every position, for reference
    expected = jnp.take_along_axis(full, positions[..., None], axis=1)
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_tied_mlm_head_uses_the_code_table(tiny_cfg):
    tiny_cfg.tie_mlm = True
    model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(8))
    params = nnx.state(model, nnx.Param)
    head = params["mlm_head"]
    assert "decoder" not in head and head["bias"].shape == (VOCAB_SIZE,)
    assert head["dense"]["kernel"].shape == (tiny_cfg.hidden_dim, tiny_cfg.embed_dim)
    batch, positions = random_batch(5, batch=2, seq=24), jnp.array([[1, 2], [3, 4]])
    hidden, before, _ = forward(model, batch, positions)
    model.embeddings.code.embedding[...] = model.embeddings.code.embedding[...] * 2.0
    assert not np.allclose(before, model.mlm_logits(hidden, positions))


def test_pure_apply_under_jit_matches_module_calls(tiny_cfg):
    model = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=1, rngs=nnx.Rngs(9))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert len(jax.tree.leaves(rest)) == 0  # no RNG or other mutable state in the model
    batch, cls_index, _ = pack_rows([[PATIENT_A, PATIENT_B]], row_len=24)
    positions = jnp.array([[1, 2, 12]])

    @jax.jit
    def both(params, rest, batch):
        mlm = mlm_apply(graphdef, params, rest, batch, positions)
        return mlm, classify_apply(graphdef, params, rest, batch, cls_index)

    mlm, cls = both(params, rest, batch)
    _, expected_mlm, expected_cls = forward(model, batch, positions, cls_index)
    np.testing.assert_allclose(mlm, expected_mlm, atol=1e-5)
    np.testing.assert_allclose(cls, expected_cls, atol=1e-5)


def test_ages_and_visits_beyond_tables_are_clipped(tiny_cfg):
    model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(10))
    batch = random_batch(6, batch=2, seq=24)
    batch["ages"] = batch["ages"] + 10**6
    batch["visits"] = batch["visits"] + 10**6
    assert bool(jnp.isfinite(encode(model, batch)).all())


def _segment_case(seed: int, batch: int = 2, seq: int = 32, heads: int = 2, head_dim: int = 16):
    """q, k, v f32[batch, seq, heads, head_dim] and packed segment ids (two patients, then padding)."""
    q, k, v = (jax.random.normal(jax.random.key(seed + i), (batch, seq, heads, head_dim)) for i in range(3))
    seg = np.zeros((batch, seq), np.int32)
    seg[0, :10], seg[0, 10:22] = 1, 2
    seg[1, :29] = 1
    return q, k, v, jnp.asarray(seg)


def test_pallas_kernel_matches_xla_attention_in_interpret_mode():
    """The Triton flash-attention kernel with segment ids, run by the Pallas interpreter on the CPU."""
    q, k, v, seg = _segment_case(0)
    fused = segment_attention(q, k, v, seg, implementation="pallas", interpret=True)
    xla = segment_attention(q, k, v, seg, implementation="xla")
    np.testing.assert_allclose(fused, xla, atol=2e-6)
    # Segments do not see each other: changing patient 2's values leaves patient 1's outputs alone.
    v2 = v.at[0, 10:22].set(0.0)
    again = segment_attention(q, k, v2, seg, implementation="pallas", interpret=True)
    np.testing.assert_array_equal(again[0, :10], fused[0, :10])
    assert not np.allclose(again[0, 10:22], fused[0, 10:22])


@pytest.mark.slow
def test_pallas_kernel_gradients_match_xla_in_interpret_mode():
    """The kernel's own (Triton) backward pass against autodiff of the XLA attention."""
    q, k, v, seg = _segment_case(1)
    weights = jax.random.normal(jax.random.key(9), q.shape)

    def loss(impl, q, k, v):
        kw = dict(implementation=impl, interpret=impl == "pallas")
        return jnp.sum(weights * segment_attention(q, k, v, seg, **kw))

    fused = jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2))(q, k, v)
    xla = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", fused, xla, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.slow
def test_behrt_with_the_pallas_kernel_matches_xla(tiny_cfg):
    tiny_cfg.attention_dropout = 0.0
    reference = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(3))
    tiny_cfg.attention_impl, tiny_cfg.attention_interpret = "pallas", True
    model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(3))
    assert model.encoder.layers[0].attn.implementation == "pallas"
    batch = random_batch(4, batch=2, seq=32)
    np.testing.assert_allclose(encode(model, batch), encode(reference, batch), atol=1e-5)


def test_pallas_falls_back_to_xla_off_gpu_with_a_warning(tiny_cfg, caplog):
    tiny_cfg.attention_dropout = 0.0
    tiny_cfg.attention_impl = "pallas"
    _warn_pallas_fallback.cache_clear()
    with caplog.at_level(logging.WARNING):
        model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(3))
    assert model.encoder.layers[0].attn.implementation == "xla"
    assert "needs a GPU" in caplog.text and "using the XLA attention" in caplog.text
    tiny_cfg.attention_impl = "xla"
    reference = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(3))
    batch = random_batch(4, batch=2, seq=24)
    np.testing.assert_array_equal(encode(model, batch), encode(reference, batch))


def test_pallas_row_lengths():
    assert [s for s in range(1, 600) if pallas_supports(s)] == [16, 32, 64, 128, 256, 384, 512]
    q, k, v, seg = _segment_case(0, seq=24)
    with pytest.raises(ValueError, match=r"model\.attention_impl='pallas' needs rows .* got 24"):
        segment_attention(q, k, v, seg, implementation="pallas", interpret=True)


def _copy_model(tiny_cfg, vocab_size: int = 40) -> Behrt:
    tiny_cfg.mlm_copy = True
    return Behrt(tiny_cfg, vocab_size, rngs=nnx.Rngs(11))


# Row 0: patient 1 = [CLS] 10 11 [SEP] [MASK] 10 [SEP], patient 2 = [CLS] 20 [UNK] [MASK] [SEP], padding.
# Row 1: empty (padding only), as in the last, filled-up batch of an epoch.
COPY_CODES = jnp.array([[1, 10, 11, 2, 3, 10, 2, 1, 20, 4, 3, 2, 0, 0], [0] * 14])
COPY_SEGMENTS = jnp.array([[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0], [0] * 14])
COPY_POSITIONS = jnp.array([[4, 10, 13], [0, 0, 0]])


def test_copy_head_points_at_the_patients_own_visible_codes(tiny_cfg):
    model = _copy_model(tiny_cfg)
    copy = model.mlm_head.copy
    copy.query.kernel[...] = jnp.zeros_like(copy.query.kernel[...])  # equal scores: uniform over visible codes
    copy.query.bias[...] = jnp.zeros_like(copy.query.bias[...])
    zeros = jnp.zeros_like(COPY_CODES)
    hidden = model.encode(COPY_CODES, zeros + 600, zeros, COPY_SEGMENTS)
    h = jnp.take_along_axis(hidden, COPY_POSITIONS[..., None], axis=1)
    p = np.asarray(copy.copy_distribution(h, hidden, COPY_POSITIONS, COPY_CODES, COPY_SEGMENTS, 40))
    expected = np.zeros((2, 3, 40), np.float32)
    expected[0, 0, 10], expected[0, 0, 11] = 2 / 3, 1 / 3  # code 10 twice, 11 once; specials get nothing
    expected[0, 1, 20] = 1.0  # the other patient of the row: its only clinical code ([UNK] is not copied)
    np.testing.assert_allclose(p, expected, atol=1e-6)  # padding slot and empty row: no copy mass


def test_copy_mixture_is_normalised_with_finite_gradients_on_empty_rows(tiny_cfg):
    import optax

    model = _copy_model(tiny_cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    zeros = jnp.zeros_like(COPY_CODES)
    labels = jnp.array([[10, 20, 0], [0, 0, 0]])

    def loss(params):
        m = nnx.merge(graphdef, params)
        hidden = m.encode(COPY_CODES, zeros + 600, zeros, COPY_SEGMENTS)
        logits = m.mlm_logits(hidden, COPY_POSITIONS, COPY_CODES, COPY_SEGMENTS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(jax.scipy.special.logsumexp(logits, axis=-1), 0.0, atol=1e-5)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["mlm_head"]["copy"]["key"]["kernel"][...]).sum()) > 0
    with pytest.raises(ValueError, match="mlm_copy"):
        model.mlm_logits(jnp.zeros((2, 14, tiny_cfg.hidden_dim)), COPY_POSITIONS)


def test_tied_mlm_logits_start_at_unit_scale():
    """Without the rescale a tied head's logits start at std EMBED_STD * sqrt(embed_dim) (0.16 for `small`)
    and it stays at the unigram for a whole epoch of configs/cpu.py."""
    from ehrjax.config import model_config

    for tied in (False, True):
        cfg = model_config("small")
        cfg.tie_mlm = tied
        model = Behrt(cfg, 1000, rngs=nnx.Rngs(3))
        h = jax.random.normal(jax.random.key(0), (4, 32, cfg.hidden_dim))
        std = float(model.mlm_head(h, model.embeddings.code).std())
        assert 0.5 < std < 2.0, (tied, std)


def test_copy_distribution_equals_the_one_hot_product_with_its_gradient(tiny_cfg):
    """The scatter-add equals sum_l weight[b, m, l] * one_hot(code[b, l]), values and gradient."""
    from ehrjax.data.vocab import NUM_SPECIAL

    model = _copy_model(tiny_cfg)
    copy = model.mlm_head.copy
    zeros = jnp.zeros_like(COPY_CODES)
    hidden = model.encode(COPY_CODES, zeros + 600, zeros, COPY_SEGMENTS)
    vocab = 40

    def reference(hidden):
        h = jnp.take_along_axis(hidden, COPY_POSITIONS[..., None], axis=1)
        scores = jnp.einsum("bmh,blh->bml", copy.query(h), copy.key(hidden)) / jnp.sqrt(jnp.float32(h.shape[-1]))
        own = jnp.take_along_axis(COPY_SEGMENTS, COPY_POSITIONS, axis=1)
        visible = (COPY_SEGMENTS[:, None, :] == own[:, :, None]) & (COPY_CODES >= NUM_SPECIAL)[:, None, :]
        weights = jnp.where(visible, jax.nn.softmax(jnp.where(visible, scores, -1e30), axis=-1), 0.0)
        return jnp.einsum("bml,blv->bmv", weights, jax.nn.one_hot(COPY_CODES, vocab))

    def ours(hidden):
        h = jnp.take_along_axis(hidden, COPY_POSITIONS[..., None], axis=1)
        return copy.copy_distribution(h, hidden, COPY_POSITIONS, COPY_CODES, COPY_SEGMENTS, vocab)

    probe = jax.random.normal(jax.random.key(1), (2, 3, vocab))
    np.testing.assert_allclose(ours(hidden), reference(hidden), atol=1e-6)
    grad_ours = jax.grad(lambda x: jnp.sum(ours(x) * probe))(hidden)
    grad_ref = jax.grad(lambda x: jnp.sum(reference(x) * probe))(hidden)
    np.testing.assert_allclose(grad_ours, grad_ref, atol=1e-5)
