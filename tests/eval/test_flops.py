"""The analytic FLOP model (hand-computed and against the step's jaxpr), MFU and the device peak table."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from ehrjax.config import load_config_file, model_config
from ehrjax.data.masking import num_mlm_slots
from ehrjax.eval.flops import FlopModel, datasheet_peak, device_peak, jaxpr_matmul_flops, mfu

ROOT = Path(__file__).resolve().parents[2]
# E=16, H=32, Y=2 layers, F=64, V=100
TINY = FlopModel(embed_dim=16, hidden_dim=32, num_layers=2, mlp_dim=64, vocab_size=100)


def test_hand_computed_hardware_flops():
    # P = E H + Y (4 H^2 + 2 H F) = 16*32 + 2 * (4*32*32 + 2*32*64) = 512 + 2 * (4096 + 4096) = 16,896
    assert TINY.matmul_params_per_token == 16_896
    # 2 rows x 8 tokens, 2 MLM slots per row:
    #   dense      2 P x 16 tokens                     = 33,792 x 16   = 540,672
    #   attention  4 H Y = 256 per pair x 2 x 8 x 8    = 256 x 128     =  32,768
    #   MLM head   2 (H H + H V) = 2 (1,024 + 3,200)   = 8,448 x 4     =  33,792
    #   forward 607,232; training = 3 x forward        = 1,821,696
    assert TINY.hardware_flops(rows=2, row_len=8, mlm_slots=2) == 1_821_696
    # tied head: dense H -> E and logits against the E-wide table: 2 (32*16 + 16*100) = 4,224 per slot
    tied = FlopModel(16, 32, 2, 64, 100, tied=True)
    assert tied.head_per_slot == 4_224
    assert tied.hardware_flops(2, 8, 2) == 3 * (540_672 + 32_768 + 4 * 4_224)
    # embed_dim == hidden_dim: no projection
    assert FlopModel(32, 32, 2, 64, 100).matmul_params_per_token == 16_384


def test_hand_computed_model_flops():
    # patients of 5 and 3 real tokens, 2 real MLM targets:
    #   dense 33,792 x 8 = 270,336; attention 256 x (25 + 9) = 8,704; head 8,448 x 2 = 16,896
    #   forward 295,936; training 887,808
    assert TINY.model_flops(real_tokens=8, sum_sq_lengths=34, mlm_targets=2) == 887_808


def test_from_config_and_mfu():
    cfg = model_config("tiny")
    assert FlopModel.from_config(cfg, 100) == TINY
    assert mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)


def test_hand_computed_copy_head_flops():
    # H = 32: key 2 H^2 = 2,048 per token; query + gate 2 H^2 + 2 H = 2,112 per slot; scores 2 H = 64 per pair.
    copy = FlopModel(16, 32, 2, 64, 100, copy=True)
    # 2 rows x 8 tokens, 2 slots per row: + 2,048 x 16 + 2,112 x 4 + 64 x (4 slots x 8 positions), x 3
    assert copy.hardware_flops(2, 8, 2) == 1_821_696 + 3 * (32_768 + 8_448 + 2_048)
    # patients of 5 and 3 tokens, 2 targets: copy pairs = 2 x 34 / 8 = 8.5
    assert copy.model_flops(8, 34, 2) == pytest.approx(887_808 + 3 * (2_048 * 8 + 2_112 * 2 + 64 * 8.5))


@pytest.mark.parametrize("mlm_copy", [False, True])
def test_flop_model_matches_the_train_step_jaxpr(mlm_copy):
    """Every dot_general of the jitted MLM train step (forward, backward, head) is accounted for exactly."""
    from ehrjax.train.loop import build_run_trainer

    config = load_config_file(ROOT / "configs" / "smoke.py")
    config.task = "mlm"
    config.model.mlm_copy = mlm_copy
    config.pretrain.num_patients = 300
    trainer = build_run_trainer(config)[0]
    row_len, patient, cls = trainer.stacked_plan(0).batch(0)
    args = (trainer.state, trainer.corpus, patient, cls, trainer.keys(), jnp.ones(1, bool))
    jaxpr = jax.make_jaxpr(trainer.train_step(row_len).jitted)(*args)
    rows, row_len = trainer.train_batchers[0].shapes[0]
    slots = num_mlm_slots(row_len, config.data.mask_prob, config.data.mlm_slot_factor)
    model = FlopModel.from_config(config.model, len(trainer.data.vocab))
    assert jaxpr_matmul_flops(jaxpr) == model.hardware_flops(rows, row_len, slots)


@pytest.mark.parametrize(
    ("kind", "bf16", "f32"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12, 494.5e12),
        ("NVIDIA H100 PCIe", 756e12, 378e12),
        ("NVIDIA H200", 989e12, 494.5e12),
        ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
        ("NVIDIA A40", 149.7e12, 74.8e12),
        ("NVIDIA L4", 121e12, 60e12),
        ("NVIDIA L40S", None, None),  # not the L4
        ("cpu", None, None),
    ],
)
def test_datasheet_peaks(kind, bf16, f32):
    assert datasheet_peak(kind, "bfloat16") == bf16
    assert datasheet_peak(kind, "float32") == f32


def test_cpu_peak_is_measured():
    peak, source = device_peak("float32", jax.devices("cpu")[0], matmul_size=256)
    assert peak > 1e8 and source.startswith("measured")
