"""The causal encoder of next-code pre-training: a token sees only its own patient's earlier tokens, exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from behrt_inputs import INPUTS, PATIENT_A, PATIENT_B, VOCAB_SIZE, encode, pack_rows
from flax import nnx

from ehrjax.models import Behrt, attention_mask
from ehrjax.models.encoder import segment_attention

# PATIENT_A takes positions 0-9 of the row, PATIENT_B 10-17, padding 18-23.
A_STOP, B_STOP = 10, 18
CHANGED = 6  # a code of patient A's second visit


def _rows() -> tuple[dict, dict, dict]:
    """The packed row, the same row with a later code and age of patient A changed, and with patient B changed."""
    batch, _, spans = pack_rows([[PATIENT_A, PATIENT_B]], row_len=24)
    assert spans == [[(0, A_STOP), (A_STOP, B_STOP)]]
    later = dict(batch, codes=batch["codes"].at[0, CHANGED].set(30), ages=batch["ages"].at[0, CHANGED].add(7))
    other = dict(batch, codes=batch["codes"].at[0, A_STOP + 1 : B_STOP - 1].set(33))
    return batch, later, other


def _assert_causal(outputs: list[jax.Array]) -> None:
    """outputs of (row, later, other): A before the change and all of B are bitwise unchanged by a later code;
    A is bitwise unchanged by patient B."""
    base, later, other = (np.asarray(o[0]) for o in outputs)
    assert np.abs(later[:CHANGED] - base[:CHANGED]).max() == 0.0
    assert np.abs(later[A_STOP:B_STOP] - base[A_STOP:B_STOP]).max() == 0.0
    assert np.abs(later[CHANGED:A_STOP] - base[CHANGED:A_STOP]).max() > 0  # the change is seen from there on
    assert np.abs(other[:A_STOP] - base[:A_STOP]).max() == 0.0
    assert np.abs(other[A_STOP + 1 : B_STOP] - base[A_STOP + 1 : B_STOP]).max() > 0


def test_causal_mask_is_the_lower_triangle_of_each_segment():
    seg = jnp.array([[1, 1, 1, 2, 2, 0, 0]])
    mask = np.asarray(attention_mask(seg, causal=True))[0, 0]
    expected = np.asarray(attention_mask(seg))[0, 0] & np.tri(7, dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    assert mask[2, :3].all() and not mask[1, 2] and not mask[3, :3].any() and mask[4, 3:5].all()
    assert mask.any(axis=-1).all()  # padding queries still see themselves: no empty softmax row


def test_causal_model_sees_only_its_patients_earlier_tokens(tiny_cfg):
    model = Behrt(tiny_cfg, VOCAB_SIZE, causal=True, rngs=nnx.Rngs(0))
    _assert_causal([encode(model, b) for b in _rows()])
    positions = jnp.arange(24)[None]
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, batch):
        m = nnx.merge(graphdef, state)
        return m.mlm_logits(m.encode(*(batch[k] for k in INPUTS)), positions)

    _assert_causal([logits(state, b) for b in _rows()])


def test_causal_attention_dropout_path_is_causal(tiny_cfg):
    """Training with attention dropout takes the explicit softmax-dropout attention: the same key, the same
    masks, so the earlier tokens' outputs are again bitwise unchanged."""
    tiny_cfg.attention_dropout = 0.2
    model = Behrt(tiny_cfg, VOCAB_SIZE, causal=True, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, batch: nnx.merge(graphdef, state).encode(
        *(batch[k] for k in INPUTS), deterministic=False, rngs=jax.random.key(3)))  # fmt: skip
    outputs = [run(state, b) for b in _rows()]
    _assert_causal(outputs)
    assert not np.allclose(outputs[0], encode(model, _rows()[0]))  # dropout was on


def test_causal_copy_head_points_at_earlier_codes_only(tiny_cfg):
    tiny_cfg.mlm_copy = True
    model = Behrt(tiny_cfg, VOCAB_SIZE, causal=True, rngs=nnx.Rngs(2))
    copy = model.mlm_head.copy
    batch = _rows()[0]
    hidden = encode(model, batch)
    positions = jnp.array([[1, 4, 12]])
    h = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    p = np.asarray(copy.copy_distribution(h, hidden, positions, batch["codes"], batch["segment_ids"], VOCAB_SIZE))
    codes = np.asarray(batch["codes"][0])
    for slot, pos in enumerate((1, 4, 12)):
        start = 0 if pos < A_STOP else A_STOP
        seen = {int(c) for c in codes[start : pos + 1] if c >= 5}
        assert set(np.flatnonzero(p[0, slot])) == seen
        np.testing.assert_allclose(p[0, slot].sum(), 1.0, rtol=1e-6)


def test_causal_and_bidirectional_models_share_their_parameters(tiny_cfg):
    """A causal model draws the same weights as the bidirectional one: its checkpoint loads anywhere."""
    a = nnx.state(Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(4)), nnx.Param)
    b = nnx.state(Behrt(tiny_cfg, VOCAB_SIZE, causal=True, rngs=nnx.Rngs(4)), nnx.Param)
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b), strict=True):
        assert pa == pb
        np.testing.assert_array_equal(va[...], vb[...])


def test_causal_pallas_kernel_matches_xla_and_is_causal_in_interpret_mode():
    seq = 32
    q, k, v = (jax.random.normal(jax.random.key(i), (2, seq, 2, 16)) for i in range(3))
    seg = np.zeros((2, seq), np.int32)
    seg[0, :10], seg[0, 10:22] = 1, 2
    seg[1, :29] = 1
    seg = jnp.asarray(seg)

    def run(impl: str, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return segment_attention(q, k, v, seg, implementation=impl, interpret=impl == "pallas", causal=True)

    fused = run("pallas", q, k, v)
    np.testing.assert_allclose(fused, run("xla", q, k, v), atol=2e-6)
    later = run("pallas", q, k.at[0, 6].set(5.0), v.at[0, 6].set(-3.0))  # a later key and value of patient 1
    np.testing.assert_array_equal(later[0, :6], fused[0, :6])
    np.testing.assert_array_equal(later[0, 10:], fused[0, 10:])
    assert not np.allclose(later[0, 6:10], fused[0, 6:10])
    other = run("pallas", q, k, v.at[0, 10:22].set(0.0))  # patient 2's values
    np.testing.assert_array_equal(other[0, :10], fused[0, :10])
