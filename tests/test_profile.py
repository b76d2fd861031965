"""`ehrjax.profile`: profile_mode on the smoke config, the CLI end to end, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ehrjax.config import load_config_file
from ehrjax.profile import parse_list, profile_mode

ROOT = Path(__file__).resolve().parents[1]


def smoke_config():
    config = load_config_file(ROOT / "configs" / "smoke.py")
    config.profile.peak_matmul_size = 512  # a quicker CPU peak
    return config


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "ehrjax.profile", f"--config={ROOT / 'configs' / 'smoke.py'}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_profile_mode_pack():
    r = profile_mode(smoke_config(), "pack", "float32", steps=3, warmup=1)
    assert r["num_shapes"] == 1 and len(r["shapes"]) == 1
    assert 0.0 < r["efficiency"] <= 1.0
    assert r["real_tokens_per_s"] > 0 and r["computed_tokens_per_s"] >= r["real_tokens_per_s"]
    assert r["patients_per_s"] > 0 and r["compile_s"] > 0
    assert r["step_min_s"] <= r["step_s"] <= r["step_max_s"]
    assert 0.0 < r["mfu"] < 1.0 and r["mfu"] < r["hfu"]
    assert r["mfu"] == pytest.approx(r["model_flops_per_step"] / r["step_s"] / r["peak_flops"])
    assert r["real_tokens_per_s"] == pytest.approx(r["efficiency"] * r["computed_tokens_per_s"])
    assert r["memory"]["compiled_bytes"] > 0
    assert r["mlm_overflow"] == 0
    targets = r["mlm_targets_per_real_token"]
    assert 0.05 < targets["expected"] < 0.15 and targets["timed"] == pytest.approx(targets["expected"], rel=0.3)


def test_cli_end_to_end(tmp_path):
    proc = _cli("--steps=3", "--warmup=1", "--modes=pack", "--out=tmp", "--config.profile.peak_matmul_size=512",
                "--ops=5", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "tmp"
    assert (out / "profile.png").stat().st_size > 0
    saved = json.loads((out / "profile.json").read_text())
    (result,) = saved["results"]
    assert result["mode"] == "pack" and result["dtype"] == "float32" and result["steps"] == 3
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert "pack" in proc.stdout and "MFU" in proc.stdout
    ops = result["ops"]  # --ops: where the step's time goes
    assert len(ops["top"]) == 5 and ops["op_seconds"] > 0
    assert sum(ops["categories"].values()) == pytest.approx(ops["op_seconds"])
    assert ops["categories"]["matmul"] > 0 and ops["categories"]["random bits"] > 0
    assert "where the time goes" in proc.stdout and "matmul" in proc.stdout


@pytest.mark.parametrize(("flag", "needle"), [("--modes=pack,paq", "--modes"), ("--dtypes=float16", "--dtypes")])
def test_cli_bad_list_is_one_line_exit_2(tmp_path, flag, needle):
    proc = _cli(flag, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr


def test_parse_list():
    assert parse_list(" pack, bucket ", ("pack", "bucket"), "--modes") == ("pack", "bucket")
    with pytest.raises(ValueError, match="--modes"):
        parse_list("", ("pack",), "--modes")


def test_mlm_targets_count_codes_only():
    import numpy as np

    from ehrjax.data.tokenize import TokenizedCorpus
    from ehrjax.data.vocab import CLS, SEP
    from ehrjax.profile import _clinical_tokens

    # two patients: [CLS] 5 [SEP] <time 9> 6 7 [SEP] and [CLS] 8 [SEP]; ids from 9 on are time tokens
    codes = np.asarray([CLS, 5, SEP, 9, 6, 7, SEP, CLS, 8, SEP], np.int32)
    zeros = np.zeros(len(codes), np.int32)
    corpus = TokenizedCorpus(codes=codes, ages=zeros, visits=zeros, offsets=np.asarray([0, 7, 10]), max_len=8)
    assert _clinical_tokens(corpus, np.asarray([0, 1]), code_end=9) == 4
    assert _clinical_tokens(corpus, np.asarray([0]), code_end=10) == 4
    assert _clinical_tokens(corpus, np.asarray([1]), code_end=9) == 1
