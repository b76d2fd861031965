"""CLM baselines: the next-code pairs, exact unigram and bigram values on a hand-made corpus, the k fit, and the
batches the CLM evaluation scores."""

import math
from pathlib import Path

import jax
import numpy as np
import pytest
from eval_targets import assert_same_targets

from ehrjax.data.tokenize import TokenizedCorpus
from ehrjax.data.vocab import CLS, NUM_SPECIAL, SEP, UNK
from ehrjax.eval.baselines import (
    bigram_counts,
    bigram_log_likelihood,
    bigram_sums,
    clm_baselines,
    eval_clm_batches,
    fit_bigram_k,
    format_table,
    next_code_pairs,
    run_baselines,
    run_clm_baselines,
    token_counts,
    unigram_log_probs,
)

ROOT = Path(__file__).resolve().parents[2]
CODE_END, VOCAB = 8, 9  # clinical codes 5, 6, 7; id 8 is a time token
T = 8
# Training patients 0-2, a test patient 3 (with [UNK], which is context but never a target).
PATIENTS = [[CLS, 5, 6, SEP], [CLS, 5, 5, SEP], [CLS, 6, SEP, T, 5, SEP], [CLS, 6, 7, SEP, T, UNK, 7, SEP]]


def corpus() -> TokenizedCorpus:
    codes = np.concatenate([np.asarray(p, np.int32) for p in PATIENTS])
    offsets = np.cumsum([0, *map(len, PATIENTS)]).astype(np.int64)
    zeros = np.zeros_like(codes)
    return TokenizedCorpus(codes=codes, ages=zeros, visits=zeros, offsets=offsets, max_len=8)


def test_next_code_pairs_stay_within_patients_and_end_on_codes():
    current, target = next_code_pairs(corpus(), np.arange(3), CODE_END)
    np.testing.assert_array_equal(current, [CLS, 5, CLS, 5, CLS, T])
    np.testing.assert_array_equal(target, [5, 6, 5, 5, 6, 5])
    current, target = next_code_pairs(corpus(), np.array([3, 0]), CODE_END)  # in the order given
    np.testing.assert_array_equal(current, [CLS, 6, UNK, CLS, 5])
    np.testing.assert_array_equal(target, [6, 7, 7, 5, 6])


def test_bigram_counts_by_hand():
    counts = bigram_counts(*next_code_pairs(corpus(), np.arange(3), CODE_END), VOCAB, CODE_END)
    expected = np.zeros((VOCAB, CODE_END), np.float32)
    expected[CLS, 5], expected[CLS, 6], expected[5, 5], expected[5, 6], expected[T, 5] = 2, 1, 1, 1, 1
    np.testing.assert_array_equal(counts, expected)
    with pytest.raises(ValueError, match="ids outside"):
        bigram_counts(np.array([CLS]), np.array([SEP]), VOCAB, CODE_END)


def _hand_batch() -> dict[str, np.ndarray]:
    """Test patient 3's next-code targets laid out as one CLM evaluation row (positions = the row)."""
    row = np.asarray(PATIENTS[3], np.int32)
    labels = np.array([6, 7, 0, 0, 0, 7, 0, 0], np.int32)
    return {"masked_codes": row[None], "segment_ids": np.ones((1, 8), np.int32),
            "positions": np.arange(8, dtype=np.int32)[None], "labels": labels[None],
            "weights": (labels > 0).astype(np.float32)[None]}  # fmt: skip


def test_unigram_and_bigram_sums_by_hand():
    train = np.arange(3)
    log_u = unigram_log_probs(token_counts(corpus(), train, VOCAB)[:CODE_END])
    # Training codes 5 x4, 6 x2, 7 x0: add-one smoothed 5/9, 3/9, 1/9.
    np.testing.assert_allclose(np.exp(log_u[NUM_SPECIAL:]), [5 / 9, 3 / 9, 1 / 9], rtol=1e-12)
    counts = bigram_counts(*next_code_pairs(corpus(), train, CODE_END), VOCAB, CODE_END)
    b = _hand_batch()
    current = np.take_along_axis(b["masked_codes"], b["positions"], axis=1)
    sums = jax.device_get(bigram_sums(current, b["labels"], b["weights"], counts, log_u, k=2.0))
    # Targets (CLS -> 6), (6 -> 7), (UNK -> 7). With k = 2: p(6 | CLS) = (1 + 2 * 3/9) / (3 + 2) = 1/3 (5 ranks
    # above it); 6 and [UNK] never precede a code in training: the unigram 1/9 (5 and 6 above).
    bigram = sums["bigram"]
    assert bigram["weight"] == 3
    assert bigram["loss_sum"] == pytest.approx(-(math.log(1 / 3) + 2 * math.log(1 / 9)), rel=1e-6)
    assert (bigram["correct"], bigram["correct_top10"]) == (0, 3)
    unigram = sums["unigram"]
    assert unigram["loss_sum"] == pytest.approx(-(math.log(3 / 9) + 2 * math.log(1 / 9)), rel=1e-6)
    assert (unigram["weight"], unigram["correct"], unigram["correct_top10"]) == (3, 0, 3)
    # After a time token: p(7 | TIME) = (0 + 2/9) / (1 + 2) = 2/27, below 5 (1 + 10/9) and 6 (6/9): rank 2.
    sums = jax.device_get(bigram_sums(np.array([T, T]), np.array([7, 5]), np.ones(2, np.float32), counts, log_u,
                                      k=2.0))  # fmt: skip
    assert sums["bigram"]["loss_sum"] == pytest.approx(-(math.log(2 / 27) + math.log((1 + 10 / 9) / 3)), rel=1e-6)
    assert (sums["bigram"]["correct"], sums["bigram"]["correct_top10"]) == (1, 2)


def test_fit_bigram_k_finds_the_likelihood_maximum():
    rng = np.random.default_rng(0)
    n_current = rng.integers(0, 20, 200).astype(float)
    n_pair = np.floor(n_current * rng.uniform(0, 1, 200) ** 2)
    u = rng.uniform(0.001, 0.2, 200)
    k = fit_bigram_k(n_pair, n_current, u)
    grid = 10.0 ** np.linspace(-3, 6, 20001)
    ll = np.array([bigram_log_likelihood(g, n_pair, n_current, u) for g in grid])
    assert 1e-3 < k < 1e6
    assert abs(math.log10(k) - math.log10(grid[np.argmax(ll)])) < 1e-3
    assert bigram_log_likelihood(k, n_pair, n_current, u) >= ll.max() - 1e-12
    # A code always seen after its token wants no smoothing; one never seen wants the unigram (k at the bounds).
    assert fit_bigram_k(np.array([5.0]), np.array([5.0]), np.array([0.1])) == pytest.approx(1e-3)
    assert fit_bigram_k(np.array([0.0]), np.array([5.0]), np.array([0.1])) == pytest.approx(1e6)
    with pytest.raises(ValueError, match="no validation target"):
        fit_bigram_k(np.zeros(0), np.zeros(0), np.zeros(0))


def test_clm_baselines_fit_k_on_validation_and_score_test():
    train = np.arange(3)
    log_u = unigram_log_probs(token_counts(corpus(), train, VOCAB)[:CODE_END])
    counts = bigram_counts(*next_code_pairs(corpus(), train, CODE_END), VOCAB, CODE_END)
    b = _hand_batch()
    out = clm_baselines([b], [b, b], counts, log_u)
    current = np.take_along_axis(b["masked_codes"], b["positions"], axis=1)[b["weights"] > 0]
    labels = b["labels"][b["weights"] > 0]
    k = fit_bigram_k(counts[current, labels], counts.sum(1)[current], np.exp(log_u[labels]))
    assert out["bigram"]["k"] == pytest.approx(k)
    sums = jax.device_get(bigram_sums(current, labels, np.ones(3, np.float32), counts, log_u, k))
    for name in ("unigram", "bigram"):
        assert out[name]["n"] == 6
        assert out[name]["loss"] == pytest.approx(sums[name]["loss_sum"] / 3, rel=1e-6)
    assert "k = " in format_table(out) and "bigram" in format_table(out)


def test_eval_clm_batches_are_the_pairs_the_evaluation_scores():
    """The CLM evaluation batches hold exactly the next-code pairs of their patients, and they are the targets
    the trainer's evaluation scores."""
    from ehrjax.config import load_config_file
    from ehrjax.train.loop import build_run_trainer

    config = load_config_file(ROOT / "configs" / "smoke.py")
    config.task, config.pretrain.num_patients, config.data.time_tokens = "clm", 400, True
    trainer = build_run_trainer(config)[0]
    data, batcher = trainer.data, trainer.val_batcher
    code_end = data.vocab.code_end
    assert code_end < len(data.vocab)
    plan = batcher.plan_epoch(0, shuffle=False)
    ours = list(eval_clm_batches(batcher, code_end))
    assert_same_targets(ours, trainer, plan)
    pairs = []
    for batch in ours:
        scored = np.asarray(batch["weights"]) > 0
        pairs += list(zip(np.asarray(batch["masked_codes"])[scored], np.asarray(batch["labels"])[scored],
                          strict=True))  # fmt: skip
    expected = list(zip(*next_code_pairs(data.corpus, batcher.patients, code_end), strict=True))
    assert sorted(map(tuple, pairs)) == sorted(map(tuple, expected)) and len(pairs) > 100
    result = run_clm_baselines(data, config.data, seed=0, max_val_patients=len(batcher.patients))
    assert result == run_baselines(data, config.data, seed=0, max_val_patients=len(batcher.patients))
    assert result["unigram"]["loss"] > result["bigram"]["loss"] > 0
    assert result["unigram"]["n"] == len(next_code_pairs(data.corpus, data.splits["test"], code_end)[0])
