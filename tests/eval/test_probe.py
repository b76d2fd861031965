"""Linear probe: pooling, representations independent of packing, the probe's arms, the loader and the CLI."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from sklearn.metrics import roc_auc_score

from ehrjax.config import load_config_file
from ehrjax.data.tasks import build_task_data, make_task_data, task_cohort
from ehrjax.eval.baselines import main as baselines_main
from ehrjax.eval.probe import (
    format_table,
    load_pretrained_run,
    patient_representations,
    pool_segments,
    run_probe,
)
from ehrjax.models.behrt import Behrt
from ehrjax.train.streams import init_rngs

ROOT = Path(__file__).resolve().parents[2]
ARMS = ("pretrained", "random", "bag_of_codes", "oracle")  # the probe's arms, in result order


@pytest.fixture(scope="module")
def smoke():
    config = load_config_file(ROOT / "configs" / "smoke.py")
    return config, build_task_data(config, "outcome")


def test_pool_segments_by_hand():
    hidden = jnp.arange(12, dtype=jnp.float32).reshape(1, 6, 2)  # position p holds (2p, 2p + 1)
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 0]])
    cls_index = jnp.array([[0, 3, 0]])
    pooled = np.asarray(pool_segments(hidden, segment_ids, cls_index))
    np.testing.assert_allclose(pooled[0, 0], [0, 1, 2, 3])  # [CLS] at 0; mean of positions 0..2
    np.testing.assert_allclose(pooled[0, 1], [6, 7, 7, 8])  # [CLS] at 3; mean of positions 3, 4


def test_representations_do_not_depend_on_row_mates(smoke):
    config, data = smoke
    model = Behrt(config.model, len(data.vocab), mlm_head=False, rngs=nnx.Rngs(params=0))
    patients = data.splits["val"][:40]
    packed = patient_representations(model, data.corpus, patients, config.data)
    assert packed.shape == (40, 2 * config.model.hidden_dim)
    # The first three patients encoded alone, one per row padded to max_len (padding is segment 0).
    rows = [data.corpus.patient(int(i)) for i in patients[:3]]
    lengths = [len(p["codes"]) for p in rows]
    inputs = np.zeros((4, 3, config.data.max_len), dtype=np.int32)
    for r, (p, n) in enumerate(zip(rows, lengths, strict=True)):
        inputs[:3, r, :n] = p["codes"], p["ages"], p["visits"]
        inputs[3, r, :n] = 1
    hidden = np.asarray(nnx.jit(lambda m, x: m.encode(*x))(model, jnp.asarray(inputs)))
    for r, n in enumerate(lengths):
        alone = np.concatenate([hidden[r, 0], hidden[r, :n].mean(axis=0)])
        np.testing.assert_allclose(packed[r], alone, rtol=1e-4, atol=1e-5)


def test_probe_of_an_untrained_encoder_equals_the_random_arm(smoke):
    config, data = smoke
    init = Behrt(config.model, len(data.vocab), mlm_head=True, rngs=init_rngs(config.seed))
    result = run_probe(config.model, nnx.state(init, nnx.Param), data, config.data, config.seed, n_boot=50)
    assert tuple(result["arms"]) == ARMS
    assert result["n"] == {k: len(v) for k, v in data.splits.items()}
    for arm in result["arms"].values():
        assert 0 <= arm["auroc"] <= 1
        assert arm["ci_low"] <= arm["auroc"] <= arm["ci_high"]
    assert result["arms"]["pretrained"] == result["arms"]["random"]
    assert result["differences"]["pretrained - random"] == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    assert set(result["differences"]) == {"pretrained - random", "pretrained - bag_of_codes", "pretrained - oracle"}
    assert result["arms"]["oracle"]["auroc"] > 0.6
    assert "pretrained" in format_table(result) and "oracle" in format_table(result)


def test_probe_oracle_reads_the_tasks_own_risk(smoke):
    # Renal decline's test patients include some that are not eligible for heart failure (`outcome_p` is NaN
    # there): the probe's oracle must read the task's own risk column.
    config, hf = smoke
    cohort = task_cohort(config, "outcome")
    data = make_task_data(cohort, "outcome", max_len=config.data.max_len, vocab=hf.vocab, outcome="renal_decline")
    assert np.isnan(data.cohort.labels["outcome_p"][data.splits["test"]]).any()
    init = Behrt(config.model, len(data.vocab), mlm_head=False, rngs=nnx.Rngs(params=config.seed))
    result = run_probe(config.model, nnx.state(init, nnx.Param), data, config.data, config.seed, n_boot=20,
                       risk="renal_decline_p")  # fmt: skip
    test = data.splits["test"]
    expected = roc_auc_score(data.labels[test, 0], data.cohort.labels["renal_decline_p"][test])
    assert result["arms"]["oracle"]["auroc"] == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="scores must be finite"):
        run_probe(config.model, nnx.state(init, nnx.Param), data, config.data, config.seed, n_boot=20)


def test_probe_refuses_other_tasks(smoke):
    config, data = smoke
    data = dataclasses.replace(data, task="next_visit")
    with pytest.raises(ValueError, match="expected the 'outcome' task"):
        run_probe(config.model, nnx.State({}), data, config.data)


@pytest.mark.parametrize(
    "files, message",
    [
        (None, "not a directory"),
        ({}, "no config.json"),
        ({"config.json": {"task": "outcome"}, "vocab.json": {}}, "a run of task outcome, expected mlm"),
    ],
)
def test_load_pretrained_run_errors(tmp_path, files, message):
    run = tmp_path / "run"
    if files is not None:
        run.mkdir()
        for name, payload in files.items():
            (run / name).write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=message):
        load_pretrained_run(run)


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ehrjax.probe", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)  # fmt: skip


@pytest.mark.parametrize("init_from, message", [("nowhere", "not a directory"), ("", "set --config.init_from")])
def test_cli_missing_init_from_is_a_one_line_error(tmp_path, init_from, message):
    value = str(tmp_path / init_from) if init_from else ""
    proc = run_cli("--config", "configs/smoke.py", f"--config.init_from={value}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: init_from") and message in lines[0]


@pytest.mark.slow
def test_cli_probes_a_pretrained_run(tmp_path):
    from ehrjax.train.loop import train

    config = load_config_file(ROOT / "configs" / "smoke.py")
    config.train.epochs = 1
    config.output_dir = str(tmp_path / "mlm")
    train(config)
    model_cfg, vocab, _ = load_pretrained_run(tmp_path / "mlm")
    assert model_cfg.hidden_dim == config.model.hidden_dim and len(vocab) > 5
    proc = run_cli("--config", "configs/smoke.py", f"--config.init_from={tmp_path / 'mlm'}",
                   f"--config.output_dir={tmp_path / 'probe'}")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert set(result["arms"]) == set(ARMS)
    for arm in result["arms"].values():
        assert 0 <= arm["auroc"] <= 1 and arm["ci_low"] <= arm["auroc"] <= arm["ci_high"]
    assert result["arms"]["pretrained"] != result["arms"]["random"]
    assert "bag_of_codes" in proc.stdout
    # The MLM baselines of the same run's test slots, next to the model's own test evaluation.
    out = tmp_path / "baselines.json"
    assert baselines_main([str(tmp_path / "mlm"), "--out", str(out)]) == 0
    scores = json.loads(out.read_text())
    assert set(scores) == {"unigram", "copy", "model"}
    assert scores["unigram"]["n"] == scores["copy"]["n"] == scores["model"]["n"]
    assert scores["copy"]["loss"] < scores["unigram"]["loss"]
