"""Next-code (CLM) pre-training: the scored positions and targets, and short runs against the baselines."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from ehrjax.data.vocab import CLS, PAD, SEP, UNK
from ehrjax.train.loop import train
from ehrjax.train.steps import StepConfig, clm_targets

CODE_END = 20  # clinical codes 5..19; 20 and up are time tokens
TIME = 21


def test_clm_targets_of_a_packed_row_by_hand():
    """Row 0: patient 1 = [CLS] 7 8 [SEP] TIME 9 [UNK] [SEP], patient 2 = [CLS] 11 11 [SEP], padding. Row 1: a
    patient cut right after a code, then one that runs to the end of the row."""
    codes = jnp.array([[CLS, 7, 8, SEP, TIME, 9, UNK, SEP, CLS, 11, 11, SEP, PAD, PAD, PAD, PAD],
                       [CLS, 5, 6, 7, 8, SEP, 9, 10, 11, 12, 13, 14, 15, 16, 17, 19]])  # fmt: skip
    segments = jnp.array([[1] * 8 + [2] * 4 + [0] * 4, [1] * 3 + [2] * 13])
    out = clm_targets({"codes": codes, "segment_ids": segments}, StepConfig(task="clm", code_end=CODE_END))
    scored = [np.flatnonzero(w).tolist() for w in np.asarray(out["weights"])]
    # Never scored: a next token that is [SEP], a time token, [UNK], another patient's, padding or past the row.
    assert scored == [[0, 1, 4, 8, 9], [0, 1, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    labels = np.asarray(out["labels"])
    assert [labels[r, s].tolist() for r, s in enumerate(scored)] == [[7, 8, 9, 11, 11],
                                                                     [5, 6, 8, 9, *range(10, 18), 19]]
    assert labels[np.asarray(out["weights"]) == 0].tolist() == [0] * (32 - 18)
    np.testing.assert_array_equal(out["positions"], np.broadcast_to(np.arange(16), (2, 16)))
    np.testing.assert_array_equal(out["masked_codes"], codes)  # the input is not corrupted
    assert int(out["overflow"]) == 0


def _run(config, epochs: int):
    config.task = "clm"
    config.train.epochs = epochs
    result = train(config)
    return result, result.test["baselines"]


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory):
    """One epoch of CLM on the smoke config (the tiny model)."""
    from tests.train.conftest import load_config

    config = load_config("smoke")
    config.output_dir = str(tmp_path_factory.mktemp("clm") / "run")
    return _run(config, epochs=1)


def test_clm_run_end_to_end_and_resume(clm_run):
    """A short CLM run writes what an MLM run writes, logs its baselines beside the model on the same targets,
    and a finished run resumes without training again."""
    from ehrjax.config import fill_defaults

    result, baselines = clm_run
    run = Path(result.workdir)
    assert result.arm == "clm"
    for name in ("config.json", "vocab.json", "metrics.jsonl", "export/code_embeddings.npz", "export/model.npz",
                 "checkpoints/best", "checkpoints/latest"):  # fmt: skip
        assert (run / name).exists(), name
    assert not (run / "predictions.npz").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["task"] == "clm" and records[-1]["event"] == "baselines"
    assert any(r["event"] == "train" and "top1" in r and "mlm_overflow" not in r for r in records)
    test = result.test
    assert test["n"] == baselines["unigram"]["n"] == baselines["bigram"]["n"] > 1000
    assert 0 < test["top1"] <= test["top10"] <= 1 and 0 < test["macro_auroc"] <= 1
    # One epoch of the tiny model already beats code frequencies (the bigram takes longer: see the slow test).
    assert test["loss"] < baselines["unigram"]["loss"]
    assert baselines["bigram"]["loss"] < baselines["unigram"]["loss"]

    import ml_collections

    again = ml_collections.ConfigDict(fill_defaults(json.loads((run / "config.json").read_text())))
    again.resume = str(run)
    resumed = train(again)
    assert resumed.steps == result.steps and resumed.test["loss"] == pytest.approx(result.test["loss"])


@pytest.mark.slow
def test_clm_beats_the_bigram_baseline(smoke_config):
    """8 epochs of the tiny model (about 40 s on 2 CPU cores; benchmarks/RESULTS.md, "Autoregressive
    pre-training (issue 23)")."""
    result, baselines = _run(smoke_config, epochs=8)
    margin = baselines["bigram"]["loss"] - result.test["loss"]
    print(f"\nCLM test CE {result.test['loss']:.4f}, bigram {baselines['bigram']['loss']:.4f}, unigram "
          f"{baselines['unigram']['loss']:.4f}: margin {margin:.4f} nats")  # fmt: skip
    assert margin > 0.2


def test_clm_encoder_fine_tunes_like_an_mlm_one(clm_run, smoke_config, tmp_path):
    """clm_lora loads the CLM run's encoder and table (frozen, bidirectional now) and trains adapters + head;
    an MLM arm refuses a CLM run."""
    pretrained = clm_run[0]
    smoke_config.task, smoke_config.arm, smoke_config.init_from = "outcome", "clm_lora", str(pretrained.workdir)
    smoke_config.train.epochs = 1
    result = train(smoke_config)
    assert np.isfinite(result.test["loss"]) and 0 <= result.test["auroc"] <= 1
    assert 0 < result.params["trainable_pct"] < 25
    base = np.load(Path(pretrained.workdir) / "export" / "model.npz")
    tuned = np.load(Path(result.workdir) / "export" / "model.npz")
    shared = [k for k in base.files if k.startswith(("embeddings/", "encoder/"))]
    assert shared and all(np.array_equal(base[k], tuned[k]) for k in shared)

    smoke_config.arm, smoke_config.output_dir = "mlm_lora", str(tmp_path / "wrong")
    with pytest.raises(ValueError, match="a run of task clm, expected mlm"):
        train(smoke_config)
