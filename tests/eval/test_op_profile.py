"""`ehrjax.eval.op_profile`: HLO parsing, op kinds and a traced breakdown of a small compiled function."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from ehrjax.eval.op_profile import CATEGORIES, categorize, format_breakdown, hlo_ops, op_breakdown


def _attention(q, k, v, key):
    """Scores, softmax, dropout and the value product over [batch, heads, L, d]; a transpose to [batch, L, ...]."""
    probs = jax.nn.softmax(jnp.einsum("bhld,bhmd->bhlm", q, k), axis=-1)
    keep = jax.random.bernoulli(key, 0.9, probs.shape)
    out = jnp.einsum("bhlm,bhmd->bhld", jnp.where(keep, probs / 0.9, 0.0), v)
    return jnp.transpose(out, (0, 2, 1, 3)).reshape(out.shape[0], out.shape[2], -1)


@pytest.fixture(scope="module")
def compiled():
    q = k = v = jnp.ones((4, 2, 64, 16), jnp.float32)
    fn = jax.jit(_attention)
    args = (q, k, v, jax.random.key(0))
    return fn.lower(*args).compile(), args


def test_hlo_ops_parses_every_instruction_with_its_kind(compiled):
    exe, _ = compiled
    ops = hlo_ops(exe.as_text())
    kinds = {categorize(op) for op in ops.values()}
    assert {"matmul", "softmax / reductions", "random bits"} <= kinds
    dots = [op for op in ops.values() if categorize(op) == "matmul"]
    assert dots and all(" dot(" in op.body or op.opcode == "dot" for op in dots)
    assert all(op.shape for op in ops.values())


def test_categorize_exact_cases():
    from ehrjax.eval.op_profile import HloOp

    def op(opcode, body):
        return HloOp("x", opcode, "f32[2]", "", body)

    assert categorize(op("dot", "%x = f32[2] dot(%a, %b)")) == "matmul"
    assert categorize(op("all-reduce", "%x = f32[2] all-reduce(%a)")) == "collectives"
    assert categorize(op("fusion", "%x = f32[2] fusion()\n %e = f32[2] exponential(%a)")) == "softmax / reductions"
    assert categorize(op("fusion", "%x = fusion()\n %t = f32[2] transpose(%a)")) == "layout copies"
    assert categorize(op("fusion", '%x = fusion()\n %s = u32[2] shift-right-logical(%a), op_name="threefry2x32"')) == (
        "random bits"
    )
    assert categorize(op("fusion", "%x = fusion()\n %g = f32[2] gather(%a, %i)")) == "gather / scatter"
    assert categorize(op("fusion", "%x = fusion()\n %m = f32[2] multiply(%a, %b)")) == "element-wise"


def test_op_breakdown_adds_up(compiled):
    exe, args = compiled
    b = op_breakdown(exe, lambda: exe(*args), steps=3, top=4)
    assert set(b["categories"]) == set(CATEGORIES)
    assert b["op_seconds"] > 0 and b["wall_seconds"] > 0
    assert sum(b["categories"].values()) == pytest.approx(b["op_seconds"])
    assert len(b["top"]) == 4 and b["top"][0]["seconds"] >= b["top"][-1]["seconds"]
    assert b["categories"]["matmul"] > 0
    text = format_breakdown(b)
    assert "matmul" in text and "ms/step" in text
