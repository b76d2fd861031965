"""Partitions, freezing through optax.partition, schedules, weight-decay mask and the parameter report."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ehrjax.config import base_config, lora_config, model_config
from ehrjax.data.vocab import MASK
from ehrjax.models import Behrt
from ehrjax.train.optimizer import (
    PARTITIONS,
    make_optimizer,
    make_schedule,
    param_labels,
    parameter_report,
    schedule_arrays,
    scheduled_lr,
)

VOCAB = 40
INPUTS = ("codes", "ages", "visits", "segment_ids")


def tiny_model(*, lora: bool = True, scan_layers: bool = False, num_labels: int = 1, seed: int = 0) -> Behrt:
    cfg = model_config("tiny")
    cfg.num_layers = 1  # compile time matters more than depth here
    cfg.scan_layers = scan_layers
    return Behrt(cfg, VOCAB, num_labels=num_labels, lora_cfg=lora_config() if lora else None, rngs=nnx.Rngs(seed))


def optim_config(**overrides):
    config = base_config()
    config.optim.warmup_steps = 1
    config.optim.learning_rate = 1e-2
    config.optim.update(overrides)
    return config


def labelled(params) -> dict[tuple, tuple[str, jax.Array]]:
    """path -> (label, value) for every leaf."""
    labels = dict(nnx.to_flat_state(param_labels(params)))
    return {path: (labels[path], var.get_raw_value()) for path, var in nnx.to_flat_state(params)}


def training_batch(seed: int = 0, batch: int = 2, seq: int = 24) -> dict:
    """Two patients per row, 4 masked positions per row with their true codes, one binary label per patient."""
    rng = np.random.default_rng(seed)
    seg = np.zeros((batch, seq), np.int32)
    seg[:, :10], seg[:, 10:20] = 1, 2
    codes = np.where(seg > 0, rng.integers(5, VOCAB, (batch, seq)), 0).astype(np.int32)
    codes[:, [0, 10]] = 1  # [CLS]
    positions = np.stack([rng.choice(np.r_[1:10, 11:20], 4, replace=False) for _ in range(batch)]).astype(np.int32)
    targets = np.take_along_axis(codes, positions, axis=1)
    np.put_along_axis(codes, positions, MASK, axis=1)
    return {
        "codes": jnp.asarray(codes),
        "ages": jnp.asarray(np.where(seg > 0, rng.integers(0, 1200, (batch, seq)), 0), jnp.int32),
        "visits": jnp.asarray(np.where(seg > 0, rng.integers(0, 4, (batch, seq)), 0), jnp.int32),
        "segment_ids": jnp.asarray(seg),
        "mlm_positions": jnp.asarray(positions),
        "mlm_targets": jnp.asarray(targets),
        "cls_index": jnp.asarray(np.array([[0, 10]] * batch, np.int32)),
        "labels": jnp.asarray(rng.integers(0, 2, (batch, 2)), jnp.float32),
    }


def train(model: Behrt, trainable, steps: int = 4, **optim):
    """Real MLM + classification loss, jitted steps on the split state; returns (before, after, opt_state, tx)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(optim_config(**optim), params, trainable, total_steps=20)
    opt_state = tx.init(params)
    batch = training_batch()

    def loss_fn(params, key):
        k_encode, k_head = jax.random.split(key)
        m = nnx.merge(graphdef, params, rest)
        hidden = m.encode(*(batch[k] for k in INPUTS), deterministic=False, rngs=k_encode)
        mlm = m.mlm_logits(hidden, batch["mlm_positions"])
        cls = m.classify(hidden, batch["cls_index"], deterministic=False, rngs=k_head)[..., 0]
        mlm_loss = optax.softmax_cross_entropy_with_integer_labels(mlm, batch["mlm_targets"]).mean()
        return mlm_loss + optax.sigmoid_binary_cross_entropy(cls, batch["labels"]).mean()

    @jax.jit
    def step(params, opt_state, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    before = params
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
        assert np.isfinite(loss)
    return before, params, opt_state, tx


def test_param_labels_by_path_and_type():
    for scan_layers in (False, True):
        abstract = nnx.eval_shape(lambda s=scan_layers: tiny_model(scan_layers=s))
        params = nnx.state(abstract, nnx.Param)
        for path, (label, _) in labelled(params).items():
            if path[-1] in ("lora_a", "lora_b"):
                assert label == "lora"
            elif path[0] in ("mlm_head", "classifier"):
                assert label == "head"
            elif tuple(map(str, path)) == ("embeddings", "code", "embedding"):
                assert label == "code_table"
            else:
                assert label == path[0]
        assert set(jax.tree.leaves(param_labels(params))) == set(PARTITIONS)
        pure = param_labels(nnx.to_pure_dict(params))  # plain arrays: LoRA recognised by name
        assert jax.tree.leaves(pure) == jax.tree.leaves(param_labels(params))


def test_unknown_top_level_parameter_is_an_error():
    with pytest.raises(ValueError, match="'pooler/kernel' has no partition"):
        param_labels({"pooler": {"kernel": jnp.zeros((2, 2))}})


def test_lora_and_head_training_leaves_frozen_partitions_bitwise_unchanged():
    before, after, opt_state, _ = train(tiny_model(), {"lora", "head"})
    old, new = labelled(before), labelled(after)
    n_trainable = 0
    for path, (label, value) in old.items():
        if label in ("code_table", "embeddings", "encoder"):
            assert np.asarray(value).tobytes() == np.asarray(new[path][1]).tobytes(), path
        else:
            assert not np.array_equal(value, new[path][1]), path  # every trainable leaf moved
            n_trainable += value.size
    report = parameter_report(before, {"lora", "head"})
    assert report.trainable == n_trainable
    # Adam's two moments for trainable leaves only (+ scalar step counters); frozen leaves hold nothing.
    leaves = jax.tree.leaves(opt_state)
    assert sum(x.size for x in leaves) - sum(1 for x in leaves if x.ndim == 0) == 2 * n_trainable
    shapes = {x.shape for x in jax.tree.leaves(opt_state)}
    assert (VOCAB, 16) not in shapes  # no moment for the (frozen) code table


def test_full_training_updates_everything_and_holds_moments_for_all():
    before, after, opt_state, _ = train(tiny_model(lora=False), set(PARTITIONS) - {"lora"}, steps=2)
    total = parameter_report(before, PARTITIONS).total
    counters = sum(1 for x in jax.tree.leaves(opt_state) if x.ndim == 0)
    assert sum(x.size for x in jax.tree.leaves(opt_state)) - counters == 2 * total
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)]
    assert sum(changed) >= len(changed) - 2  # all but LayerNorm params that get no gradient at step 0


def test_weight_decay_skips_biases_and_layer_norms():
    params = nnx.state(tiny_model(lora=False), nnx.Param)
    tx = make_optimizer(optim_config(weight_decay=0.5, warmup_steps=0), params, {"head"}, total_steps=10)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
    for path, var in nnx.to_flat_state(updates):
        if path[0] != "mlm_head" and path[0] != "classifier":
            assert not np.any(var[...]), path
        elif path[-1] == "kernel":
            assert np.any(var[...]), path  # decayed
        else:
            assert not np.any(var[...]), path  # bias / LayerNorm scale: not decayed


@pytest.mark.parametrize(
    ("trainable", "match"),
    [
        ({"lora", "decoder"}, r"trainable has unknown partition\(s\) \['decoder'\]"),
        ("lora", "got the string 'lora'"),
        (set(), "trainable is empty"),
    ],
)
def test_trainable_names_are_validated(trainable, match):
    params = nnx.state(nnx.eval_shape(tiny_model), nnx.Param)
    with pytest.raises(ValueError, match=match):
        make_optimizer(optim_config(), params, trainable, total_steps=10)


def test_trainable_partition_must_exist():
    params = nnx.state(nnx.eval_shape(lambda: tiny_model(lora=False)), nnx.Param)
    with pytest.raises(ValueError, match=r"trainable partition\(s\) \['lora'\] match no parameter"):
        make_optimizer(optim_config(), params, {"lora", "head"}, total_steps=10)


def test_schedules():
    optim = optim_config(learning_rate=1.0, warmup_steps=10).optim
    cosine = make_schedule(optim, total_steps=110)
    assert float(cosine(0)) == 0.0 and float(cosine(5)) == pytest.approx(0.5)
    assert float(cosine(10)) == pytest.approx(1.0) and float(cosine(60)) == pytest.approx(0.5)
    assert float(cosine(110)) == pytest.approx(0.0, abs=1e-6)
    optim.schedule = "constant"
    constant = make_schedule(optim, total_steps=110)
    assert float(constant(5)) == pytest.approx(0.5) and float(constant(1000)) == 1.0
    optim.schedule = "linear"
    with pytest.raises(ValueError, match=r"optim\.schedule 'linear' unknown"):
        make_schedule(optim, total_steps=110)
    optim.schedule = "cosine"
    short = make_schedule(optim, total_steps=20)  # warm-up clamped to a tenth of the run: 2 steps
    assert float(short(1)) == pytest.approx(0.5) and float(short(2)) == pytest.approx(1.0)
    assert float(short(11)) == pytest.approx(0.5) and float(short(20)) == pytest.approx(0.0, abs=1e-6)
    assert float(make_schedule(optim, total_steps=1)(0)) == pytest.approx(1.0)  # no warm-up left


def test_external_schedule_equals_the_built_in_one():
    """The trainer's optimiser has learning rate 1 and scales updates by `scheduled_lr` from state arrays."""
    params = {"classifier": {"kernel": jnp.ones((3, 2))}}
    config = optim_config(learning_rate=0.1, warmup_steps=2)
    built_in = make_optimizer(config, params, {"head"}, total_steps=20)
    unit = make_optimizer(config, params, {"head"})
    arrays = schedule_arrays(config.optim, 20)
    a_state, b_state, a, b = built_in.init(params), unit.init(params), params, params
    for step in range(5):
        grads = jax.tree.map(lambda x, scale=step + 1.0: x * scale, params)
        ua, a_state = built_in.update(grads, a_state, a)
        ub, b_state = unit.update(grads, b_state, b)
        a = optax.apply_updates(a, ua)
        lr = scheduled_lr(arrays, step)
        b = optax.apply_updates(b, jax.tree.map(lambda u, lr=lr: u * lr, ub))
    np.testing.assert_allclose(a["classifier"]["kernel"], b["classifier"]["kernel"], rtol=1e-6)


def test_parameter_report():
    model = nnx.eval_shape(tiny_model)
    params = nnx.state(model, nnx.Param)
    report = parameter_report(params, {"lora", "head"})
    assert report.total == sum(report.by_label.values()) == sum(x.size for x in jax.tree.leaves(params))
    assert report.trainable == report.by_label["lora"] + report.by_label["head"]
    as_dict = report.as_dict()
    assert as_dict["trainable_pct"] == pytest.approx(100 * report.trainable / report.total)
    table = report.table()
    assert "lora" in table and "trainable" in table and f"{report.total:,}" in table
    print("\n" + table)
