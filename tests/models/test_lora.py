"""LoRA adapters: identity at init, merge equivalence, adapter-only state, loading a pretrained base."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from behrt_inputs import VOCAB_SIZE, forward, random_batch
from flax import nnx

from ehrjax.models import Behrt, LoRADense, add_lora, load_lora, load_pretrained, lora_state, merge_lora

POSITIONS = jnp.array([[1, 4, 9], [2, 3, 20]])
CLS_INDEX = jnp.array([[0, 12], [0, 12]])


def perturb_adapters(model: nnx.Module, seed: int) -> None:
    """Random non-zero adapters (both A and B), as after some training."""
    state = lora_state(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))


def flat_params(model: nnx.Module) -> dict:
    return {path: var[...] for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_lora_dense_scaling_and_zero_init():
    layer = LoRADense(6, 5, target="q", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 6))
    base = layer(x)
    layer.attach_lora(rank=2, alpha=16.0, dropout=0.0, key=jax.random.key(2))
    assert layer.lora_scale == 8.0
    assert isinstance(layer.lora_a, nnx.LoRAParam) and layer.lora_a.shape == (6, 2)
    assert isinstance(layer.lora_b, nnx.LoRAParam) and layer.lora_b.shape == (2, 5)
    np.testing.assert_array_equal(layer(x), base)  # B = 0
    layer.lora_b[...] = jnp.ones((2, 5))
    expected = base + 8.0 * (x @ layer.lora_a[...] @ layer.lora_b[...])
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_lora_model_equals_base_at_init_and_shares_base_paths(tiny_cfg, lora_cfg):
    base = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=2, rngs=nnx.Rngs(0))
    adapted = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=2, lora_cfg=lora_cfg, rngs=nnx.Rngs(0))
    base_params, adapted_params = flat_params(base), flat_params(adapted)
    lora_paths = {p for p in adapted_params if p[-1] in ("lora_a", "lora_b")}
    assert len(lora_paths) == 2 * 6 * tiny_cfg.num_layers
    assert set(adapted_params) - lora_paths == set(base_params)
    for path, value in base_params.items():  # adapters are drawn last: same seed, same base weights
        np.testing.assert_array_equal(value, adapted_params[path])
    batch = random_batch(0, batch=2, seq=24)
    for out_base, out_adapted in zip(
        forward(base, batch, POSITIONS, CLS_INDEX), forward(adapted, batch, POSITIONS, CLS_INDEX), strict=True
    ):
        np.testing.assert_allclose(out_base, out_adapted, atol=1e-6)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_merge_lora_gives_the_unmerged_outputs(tiny_cfg, lora_cfg, scan_layers):
    tiny_cfg.scan_layers = scan_layers
    model = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=2, lora_cfg=lora_cfg, rngs=nnx.Rngs(1))
    batch = random_batch(1, batch=2, seq=24)
    base_out = forward(model, batch, POSITIONS, CLS_INDEX)
    for seed in range(3):
        perturb_adapters(model, seed)
        adapted = forward(model, batch, POSITIONS, CLS_INDEX)
        assert not np.allclose(adapted[1], base_out[1], atol=1e-3)  # the adapters do something
    merge_lora(model)
    assert len(jax.tree.leaves(lora_state(model))) == 0
    merged = forward(model, batch, POSITIONS, CLS_INDEX)
    for a, m in zip(adapted, merged, strict=True):
        np.testing.assert_allclose(m, a, atol=1e-5, rtol=1e-5)


def test_merged_model_has_the_plain_model_paths(tiny_cfg, lora_cfg):
    plain = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(2))
    model = Behrt(tiny_cfg, VOCAB_SIZE, lora_cfg=lora_cfg, rngs=nnx.Rngs(2))
    merge_lora(model)
    assert set(flat_params(model)) == set(flat_params(plain))
    assert nnx.graphdef(model) == nnx.graphdef(plain)


def test_lora_state_round_trip(tiny_cfg, lora_cfg):
    source = Behrt(tiny_cfg, VOCAB_SIZE, lora_cfg=lora_cfg, rngs=nnx.Rngs(3))
    perturb_adapters(source, 0)
    adapters = lora_state(source)
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(adapters))
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert n_adapter == tiny_cfg.num_layers * lora_cfg.rank * (4 * 2 * 32 + 2 * (32 + 64))

    target = Behrt(tiny_cfg, VOCAB_SIZE, lora_cfg=lora_cfg, rngs=nnx.Rngs(3))
    load_lora(target, adapters)
    for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(adapters), nnx.to_flat_state(lora_state(target)), strict=True):
        assert p1 == p2
        np.testing.assert_array_equal(v1[...], v2[...])
    batch = random_batch(2, batch=2, seq=24)
    np.testing.assert_array_equal(forward(source, batch)[0], forward(target, batch)[0])

    lora_cfg.rank = 2
    wrong_rank = Behrt(tiny_cfg, VOCAB_SIZE, lora_cfg=lora_cfg, rngs=nnx.Rngs(3))
    with pytest.raises(ValueError, match="shape"):
        load_lora(wrong_rank, adapters)
    lora_cfg.targets = ("q",)
    fewer = Behrt(tiny_cfg, VOCAB_SIZE, lora_cfg=lora_cfg, rngs=nnx.Rngs(3))
    with pytest.raises(ValueError, match="unexpected"):
        load_lora(fewer, adapters)


def test_load_pretrained_base_into_lora_classifier(tiny_cfg, lora_cfg):
    """Pre-training state (MLM head, no LoRA) -> fine-tuning model (LoRA + classifier, no MLM head)."""
    pretrained = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(4))
    finetune = Behrt(tiny_cfg, VOCAB_SIZE, num_labels=1, lora_cfg=lora_cfg, mlm_head=False, rngs=nnx.Rngs(5))
    report = load_pretrained(finetune, nnx.state(pretrained, nnx.Param))
    assert all(p.startswith(("embeddings/", "encoder/")) for p in report["loaded"])
    assert all(p.startswith("mlm_head/") for p in report["unused"]) and report["unused"]
    assert all(p.startswith("classifier/") or p.endswith(("lora_a", "lora_b")) for p in report["missing"])
    batch = random_batch(3, batch=2, seq=24)
    np.testing.assert_allclose(forward(finetune, batch)[0], forward(pretrained, batch)[0], atol=1e-6)


def test_load_pretrained_converts_the_layer_layout(tiny_cfg, lora_cfg):
    pretrained = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(6))
    tiny_cfg.scan_layers = True
    scanned = Behrt(tiny_cfg, VOCAB_SIZE, lora_cfg=lora_cfg, rngs=nnx.Rngs(7))
    report = load_pretrained(scanned, nnx.state(pretrained, nnx.Param))
    assert not report["unused"]
    batch = random_batch(4, batch=2, seq=24)
    np.testing.assert_allclose(forward(scanned, batch)[0], forward(pretrained, batch)[0], atol=1e-5)


def test_add_lora_to_a_loaded_model_keeps_its_weights(tiny_cfg, lora_cfg):
    model = Behrt(tiny_cfg, VOCAB_SIZE, rngs=nnx.Rngs(8))
    before = flat_params(model)
    add_lora(model, lora_cfg, jax.random.key(0))
    after = flat_params(model)
    for path, value in before.items():
        np.testing.assert_array_equal(value, after[path])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        add_lora(model, lora_cfg, jax.random.key(0))


def test_lora_dropout_only_acts_in_training(tiny_cfg, lora_cfg):
    lora_cfg.dropout = 0.5
    tiny_cfg.dropout = 0.0
    tiny_cfg.attention_dropout = 0.0
    model = Behrt(tiny_cfg, VOCAB_SIZE, lora_cfg=lora_cfg, rngs=nnx.Rngs(9))
    perturb_adapters(model, 1)
    batch = random_batch(5, batch=2, seq=24)
    args = [batch[k] for k in ("codes", "ages", "visits", "segment_ids")]
    run = nnx.jit(lambda m, key: m.encode(*args, deterministic=False, rngs=key))
    eval_out = forward(model, batch)[0]
    assert not np.allclose(run(model, jax.random.key(0)), eval_out)  # the only dropout left is LoRA's
    merge_lora(model)
    assert not model.encoder.layers[0].attn.q.has_lora and model.encoder.layers[0].attn.q.lora_dropout.rate == 0.0
