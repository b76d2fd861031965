"""MLM trivial baselines: exact values on a hand-made batch, λ fitting, and the batches the evaluation scores."""

import math
from pathlib import Path

import jax
import numpy as np
import pytest
from eval_targets import assert_same_targets
from hypothesis import given, settings
from hypothesis import strategies as st

from ehrjax.data.batching import DeviceBatcher
from ehrjax.data.vocab import CLS, MASK, NUM_SPECIAL, PAD, SEP
from ehrjax.eval.baselines import (
    baseline_sums,
    copy_mixture_probs,
    copy_statistics,
    eval_mlm_batches,
    fit_copy_lambda,
    main,
    mlm_baselines,
    run_mlm_baselines,
    token_counts,
    unigram_log_probs,
)

ROOT = Path(__file__).resolve().parents[2]

# Clinical ids 5..16. Training counts 9, 3, then 1 for ids 7..14 and 0 for 15, 16: smoothed (+1) they are
# 10, 4, 2 (x8), 1, 1 out of 32. Specials carry counts that must be ignored.
COUNTS = np.array([50, 20, 30, 0, 7, 9, 3, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0])
P = {5: 10 / 32, 6: 4 / 32, **{c: 2 / 32 for c in range(7, 15)}, 15: 1 / 32, 16: 1 / 32}


def hand_batch():
    """Row 0: two patients; row 1: a patient and one whose only other token is [CLS]. Slot labels 15, 7, (empty)
    and 5 (left visible at its own position: excluded from its own count), 16, 6 (no other visible code)."""
    return {
        "masked_codes": np.array([[CLS, 5, MASK, 15, CLS, 7, MASK, SEP], [CLS, 16, 5, 5, MASK, CLS, MASK, PAD]]),
        "segment_ids": np.array([[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 2, 2, 0]]),
        "positions": np.array([[2, 6, 0], [2, 4, 6]]),
        "labels": np.array([[15, 7, PAD], [5, 16, 6]]),
        "weights": np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=np.float32),
    }


def test_unigram_log_probs_are_add_one_smoothed_over_clinical_codes():
    log_p = unigram_log_probs(COUNTS)
    assert np.all(np.isneginf(log_p[:NUM_SPECIAL]))
    np.testing.assert_allclose(np.exp(log_p[NUM_SPECIAL:]), [P[c] for c in range(5, 17)], rtol=1e-12)


@pytest.mark.parametrize(
    "counts, message", [(np.zeros(NUM_SPECIAL), "more than 5 entries"), (-np.ones(8), ">= 0")]
)
def test_unigram_log_probs_rejects_bad_counts(counts, message):
    with pytest.raises(ValueError, match=message):
        unigram_log_probs(counts)


def test_copy_statistics_by_hand():
    b = hand_batch()
    count, n_other = copy_statistics(b["masked_codes"], b["segment_ids"], b["positions"], b["labels"])
    # The empty slot (position 0 of row 0, label [PAD]) sees positions 1 and 3 and never counts [PAD].
    np.testing.assert_array_equal(count, [[1, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(n_other, [[2, 1, 2], [2, 3, 0]])


def test_baseline_sums_by_hand():
    b = hand_batch()
    sums = jax.device_get(baseline_sums(**b, log_unigram=unigram_log_probs(COUNTS), lam=0.5))
    # unigram: labels 15, 7, 5, 16, 6 -> p 1, 2, 10, 1, 4 (/32); ranks 10, 2, 0, 10, 1.
    unigram = sums["unigram"]
    assert unigram["weight"] == 5
    assert unigram["loss_sum"] == pytest.approx(-sum(math.log(k / 32) for k in (1, 2, 10, 1, 4)), rel=1e-6)
    assert (unigram["correct"], unigram["correct_top10"]) == (1, 3)
    # copy (λ = 1/2): 15 -> 1/4 + 1/64 (5 scores higher: rank 1); 7 -> 1/2 + 1/32 (rank 0); 5 -> 1/4 + 5/32
    # (rank 0); 16 -> 1/6 + 1/64 (5 higher: rank 1); 6 has no other visible code -> unigram 4/32 (rank 1).
    copy = sums["copy"]
    expected = [1 / 4 + 1 / 64, 1 / 2 + 1 / 32, 1 / 4 + 5 / 32, 1 / 6 + 1 / 64, 4 / 32]
    assert copy["weight"] == 5
    assert copy["loss_sum"] == pytest.approx(-sum(math.log(p) for p in expected), rel=1e-6)
    assert (copy["correct"], copy["correct_top10"]) == (2, 5)


def test_lambda_zero_copy_is_the_unigram():
    b = hand_batch()
    sums = jax.device_get(baseline_sums(**b, log_unigram=unigram_log_probs(COUNTS), lam=0.0))
    for key in ("loss_sum", "correct", "correct_top10", "weight"):
        assert sums["copy"][key] == pytest.approx(sums["unigram"][key], rel=1e-6)


def test_fit_copy_lambda_never_helps_gives_zero():
    count = np.zeros(6)
    n_other = np.array([3, 1, 0, 5, 2, 2])
    assert fit_copy_lambda(count, n_other, np.full(6, 0.1), np.ones(6)) == 0.0


def test_fit_copy_lambda_always_copied_gives_one():
    n_other = np.array([3, 1, 4, 5])
    lam = fit_copy_lambda(n_other.copy(), n_other, np.full(4, 0.01), np.ones(4))
    assert lam == pytest.approx(1.0, abs=1e-9)


def test_fit_copy_lambda_interior_optimum_in_closed_form():
    # One slot always copied (a = 1), one never (a = 0), both with u = 0.1: the log-likelihood
    # log(λ + 0.9 (1 - λ) ... ) has its maximum at λ = (1 - 2u) / (2 (1 - u)) = 4/9. A weight-0 slot is ignored.
    lam = fit_copy_lambda(np.array([2, 0, 0]), np.array([2, 3, 1]), np.full(3, 0.1), np.array([1.0, 1.0, 0.0]))
    assert lam == pytest.approx(4 / 9, abs=1e-9)
    grid = np.linspace(0, 0.999, 1000)
    ll = np.log(grid + (1 - grid) * 0.1) + np.log((1 - grid) * 0.1)
    assert abs(grid[np.argmax(ll)] - lam) < 1e-3


def test_fit_copy_lambda_rejects_no_slots():
    with pytest.raises(ValueError, match="no weighted slot"):
        fit_copy_lambda(np.zeros(2), np.ones(2), np.full(2, 0.1), np.zeros(2))


@settings(max_examples=25, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.floats(0.0, 1.0),
    st.integers(1, 4),
)
def test_copy_mixture_sums_to_one_over_clinical_codes(seed, lam, segments):
    rng = np.random.default_rng(seed)
    vocab, length, slots = NUM_SPECIAL + 7, 12, 4
    codes = rng.integers(0, vocab, size=(2, length))
    segment_ids = np.sort(rng.integers(0, segments + 1, size=(2, length)), axis=1)
    positions = rng.integers(0, length, size=(2, slots))
    log_u = unigram_log_probs(rng.integers(0, 20, size=vocab))
    probs = np.asarray(copy_mixture_probs(codes, segment_ids, positions, log_u, lam))
    np.testing.assert_allclose(probs[..., NUM_SPECIAL:].sum(-1), 1.0, rtol=1e-5)
    assert np.all(probs[..., :NUM_SPECIAL] == 0)


def test_mlm_baselines_fits_lambda_on_validation_and_scores_test():
    b = hand_batch()
    val = dict(b, labels=np.array([[15, 7, PAD], [5, 9, 6]]))  # code 9 is not in its patient's history
    log_u = unigram_log_probs(COUNTS)
    out = mlm_baselines([val], [b, b], log_u)
    count, n_other = copy_statistics(val["masked_codes"], val["segment_ids"], val["positions"], val["labels"])
    lam = fit_copy_lambda(np.asarray(count), np.asarray(n_other), np.exp(log_u)[val["labels"]], val["weights"])
    assert out["copy"]["lambda"] == pytest.approx(lam)
    assert 0 < lam < 1
    sums = jax.device_get(baseline_sums(**b, log_unigram=log_u, lam=lam))
    for name in ("unigram", "copy"):
        assert out[name]["n"] == 10
        assert out[name]["loss"] == pytest.approx(sums[name]["loss_sum"] / 5, rel=1e-6)
        assert out[name]["top1"] == pytest.approx(sums[name]["correct"] / 5)
        assert out[name]["top10"] == pytest.approx(sums[name]["correct_top10"] / 5)
    assert out["copy"]["loss"] < out["unigram"]["loss"]


def test_eval_mlm_batches_are_the_batches_the_evaluation_scores():
    from ehrjax.config import load_config_file
    from ehrjax.train.loop import build_run_trainer

    config = load_config_file(ROOT / "configs" / "smoke.py")
    config.pretrain.num_patients = 400
    trainer = build_run_trainer(config)[0]
    data = trainer.data
    batcher = trainer.val_batcher
    vocab_size = len(data.vocab)
    plan = batcher.plan_epoch(0, shuffle=False)
    ours = list(eval_mlm_batches(batcher, vocab_size, config.data.mask_prob, config.data.mlm_slot_factor))
    assert len(ours) == plan.num_batches
    assert_same_targets(ours, trainer, plan)  # the targets the trainer's evaluation masks, batch by batch
    counts = token_counts(data.corpus, data.splits["train"], vocab_size)
    assert counts.sum() == data.corpus.lengths[data.splits["train"]].sum()
    test = DeviceBatcher.from_config(config.data, data.corpus, seed=0, patients=data.splits["test"])
    settings = (vocab_size, config.data.mask_prob, config.data.mlm_slot_factor)
    expected = mlm_baselines(ours, eval_mlm_batches(test, *settings), unigram_log_probs(counts))
    assert expected["unigram"]["loss"] > expected["copy"]["loss"] > 0
    assert 0 <= expected["unigram"]["top1"] <= expected["unigram"]["top10"] <= 1
    assert run_mlm_baselines(data, config.data, seed=0, max_val_patients=1000) == expected


def test_cli_rejects_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: run") and "no config.json" in err
