import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ehrjax.train.loop import train

ROOT = Path(__file__).resolve().parents[2]

SHARDED_RUN = textwrap.dedent(
    """
    import sys
    import jax
    assert jax.device_count() == 4, jax.devices()
    from ehrjax.config import load_config_file
    from ehrjax.train.loop import train
    for devices in (1, 4):
        config = load_config_file(sys.argv[1])
        config.train.epochs = 1
        config.train.num_devices = devices
        config.output_dir = f"{sys.argv[2]}/devices{devices}"
        train(config)
    """
)


def test_four_devices_match_one(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run(
        [sys.executable, "-c", SHARDED_RUN, str(ROOT / "configs" / "smoke.py"), str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    one, four = (np.load(tmp_path / f"devices{n}" / "export" / "model.npz") for n in (1, 4))
    for name in one.files:
        np.testing.assert_allclose(one[name], four[name], atol=1e-5, rtol=0, err_msg=name)
    losses = [
        [r["loss"] for r in map(json.loads, (tmp_path / f"devices{n}" / "metrics.jsonl").read_text().splitlines())
         if r["event"] in ("train", "eval")]
        for n in (1, 4)
    ]  # fmt: skip
    np.testing.assert_allclose(losses[0], losses[1], atol=1e-5)


def test_mlm_learns_beyond_chance(smoke_config):
    smoke_config.train.epochs = 6
    result = train(smoke_config)
    vocab_size = len(json.loads((Path(result.workdir) / "vocab.json").read_text())["codes"])
    val = result.val
    print(f"\nMLM held-out: loss {val['loss']:.3f} (log V = {np.log(vocab_size):.3f}), "
          f"top-1 {val['top1']:.3f} (chance {1 / vocab_size:.4f}), top-10 {val['top10']:.3f}")  # fmt: skip
    assert result.val["loss"] < np.log(vocab_size) - 1.0
    assert result.val["top1"] > 10 / vocab_size


@pytest.mark.slow
def test_mlm_copy_head_learns_faster_without_seeing_its_targets(smoke_config, tmp_path):
    """The copy head beats the plain head at equal steps; a loss near 0 would mean the step hands the head the
    unmasked codes (the target itself would be visible to copy)."""
    smoke_config.train.epochs = 2
    plain = train(smoke_config)
    smoke_config.model.mlm_copy = True
    smoke_config.output_dir = str(tmp_path / "copy")
    copy = train(smoke_config)
    print(f"\nMLM held-out after 2 epochs: plain {plain.val['loss']:.3f}, copy head {copy.val['loss']:.3f}")
    assert copy.val["loss"] < plain.val["loss"] - 0.1
    assert copy.val["loss"] > 1.5


def test_outcome_auroc_rises_above_point_seven(smoke_config):
    smoke_config.task = "outcome"
    smoke_config.finetune.num_patients = 20_000  # about 1,300 validation patients: AUROC's noise is about 0.02
    smoke_config.train.epochs = 2
    smoke_config.train.max_eval_patients = 3000
    result = train(smoke_config)
    print(f"\noutcome (scratch, tiny): val AUROC {result.val['auroc']:.3f}, test AUROC {result.test['auroc']:.3f}")
    assert result.val["auroc"] > 0.7
    assert result.params["trainable_pct"] == 100.0
