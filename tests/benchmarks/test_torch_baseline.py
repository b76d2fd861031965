"""The PyTorch BEHRT baseline (benchmarks/torch_baseline.py): architecture parity, data, padding variants."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ehrjax.config import model_config  # noqa: E402
from ehrjax.data.vocab import NUM_SPECIAL, PAD  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "torch_baseline.py"


def _load_module():
    spec = importlib.util.spec_from_file_location("torch_baseline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


tb = _load_module()
MAX_LEN = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on shared cores, more threads than free cores make every op wait at barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return tb.load_data(400, MAX_LEN, seed=0)


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_parameter_count_matches_ehrjax(preset):
    from flax import nnx

    from ehrjax.models import Behrt

    cfg = model_config(preset)
    vocab = 300
    jax_params = nnx.state(nnx.eval_shape(lambda: Behrt(cfg, vocab, rngs=nnx.Rngs(0))), nnx.Param)
    expected = sum(int(np.prod(x.shape)) for x in nnx.to_flat_state(jax_params).leaves)
    # torch's MultiheadAttention keeps a key bias, which ehrjax drops (softmax-invariant): hidden per layer.
    expected += cfg.num_layers * cfg.hidden_dim
    assert tb.count_parameters(tb.TorchBehrt(cfg, vocab)) == expected


def test_collate_pads_and_masks_only_clinical_tokens(data):
    index = np.arange(8)
    pad_to = int(data.lengths[index].max())
    batch = tb.collate(data.corpus, data.patients[index], pad_to)
    assert batch["codes"].shape == (8, pad_to)
    for row, i in enumerate(data.patients[index]):
        p = data.corpus.patient(int(i))
        n = len(p["codes"])
        np.testing.assert_array_equal(batch["codes"][row, :n].numpy(), p["codes"])
        np.testing.assert_array_equal(batch["ages"][row, :n].numpy(), p["ages"])
        np.testing.assert_array_equal(batch["visits"][row, :n].numpy(), p["visits"])
        assert not batch["padding"][row, :n].any() and batch["padding"][row, n:].all()
        assert (batch["codes"][row, n:] == PAD).all()

    gen = torch.Generator().manual_seed(0)
    codes = batch["codes"]
    inputs, labels = tb.mask_mlm(codes, data.vocab_size, mask_prob=0.5, generator=gen)
    selected = labels != tb.IGNORE_INDEX
    assert selected.any()
    assert (codes[selected] >= NUM_SPECIAL).all()  # never a special token, never padding
    torch.testing.assert_close(labels[selected], codes[selected])
    torch.testing.assert_close(inputs[~selected], codes[~selected])


def test_batch_order_variants(data):
    lengths = data.lengths
    n, b = len(lengths), 16
    rng = np.random.default_rng(0)
    for variant in tb.VARIANTS:
        batches = tb.batch_order(lengths, variant, b, rng)
        flat = np.concatenate(batches)
        assert len(batches) == n // b and len(np.unique(flat)) == len(flat)
    # Sorted batches are contiguous length ranges, so they compute fewer padded slots than random ones.
    sorted_batches = tb.batch_order(lengths, "sorted", b, rng)
    ranges = sorted((lengths[x].min(), lengths[x].max()) for x in sorted_batches)
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in itertools.pairwise(ranges))
    slots = {v: sum(b * int(lengths[x].max()) for x in tb.batch_order(lengths, v, b, rng)) for v in tb.VARIANTS}
    slots["pad_max"] = (n // b) * b * MAX_LEN
    assert slots["sorted"] < 0.8 * slots["pad_longest"] and slots["pad_longest"] <= slots["pad_max"]


def test_all_and_masked_logits_give_the_same_loss(data):
    cfg = model_config("tiny")
    cfg.dropout = 0.0
    torch.manual_seed(0)
    model = tb.TorchBehrt(cfg, data.vocab_size, mlm_logits="all").eval()
    batch = tb.make_batch(data, np.arange(8), MAX_LEN, generator=torch.Generator().manual_seed(1))
    args = [batch[k] for k in ("codes", "ages", "visits", "padding", "labels")]
    with torch.no_grad():
        loss_all = model(*args)
    model.mlm_logits = "masked"
    with torch.no_grad():
        torch.testing.assert_close(model(*args), loss_all)
    assert math.isfinite(loss_all.item())


def test_overfits_a_fixed_batch(data):
    cfg = model_config("tiny")
    cfg.dropout = 0.0
    torch.manual_seed(0)
    model = tb.TorchBehrt(cfg, data.vocab_size).train()
    optimizer = tb.make_optimizer(model, lr=3e-3)
    batch = tb.make_batch(data, np.arange(16), MAX_LEN, generator=torch.Generator().manual_seed(0))
    losses = [tb.train_step(model, optimizer, batch) for _ in range(20)]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.parametrize("variant", tb.VARIANTS)
def test_run_baseline_counts_padded_slots(data, variant):
    b, warmup, steps = 8, 1, 2
    out = tb.run_baseline(
        variant, preset="tiny", max_len=MAX_LEN, batch_size=b, steps=steps, warmup=warmup, threads=1, data=data
    )
    # The timed batches are the first of an epoch drawn with the seed (warm-up batches have their own stream).
    timed = tb.batch_order(data.lengths, variant, b, np.random.default_rng(0))[:steps]
    pad_to = [MAX_LEN if variant == "pad_max" else int(data.lengths[x].max()) for x in timed]
    assert out["padded_tokens"] == b * sum(pad_to)
    assert out["real_tokens"] == sum(int(data.lengths[x].sum()) for x in timed)
    assert out["padding_efficiency"] == pytest.approx(out["real_tokens"] / out["padded_tokens"])
    assert len(out["losses"]) == steps and all(math.isfinite(x) for x in out["losses"])
    assert out["step_ms"] > 0 and out["real_tokens_per_s"] > 0


def test_run_baseline_steps_zero_is_one_epoch(data):
    out = tb.run_baseline("sorted", preset="tiny", max_len=MAX_LEN, batch_size=64, steps=0, warmup=0, data=data)
    n = len(data.patients)
    assert out["steps"] == n // 64
    assert out["real_tokens"] == sum(
        int(data.lengths[x].sum()) for x in tb.batch_order(data.lengths, "sorted", 64, np.random.default_rng(0))
    )
