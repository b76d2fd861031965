"""`ehrjax.train.rundir.run_directory`: where a run (or a benchmark) writes."""

from __future__ import annotations

import re
from pathlib import Path

import ml_collections

from ehrjax.train.rundir import run_directory


def test_resume_then_output_dir_then_a_stamped_default():
    cfg = ml_collections.ConfigDict({"resume": "r/old", "output_dir": "o/new"})
    assert run_directory(cfg, "stem") == Path("r/old")
    cfg.resume = ""
    assert run_directory(cfg, "stem") == Path("o/new")
    cfg.output_dir = ""
    default = run_directory(cfg, "benchmark-cpu")
    assert default.parent == Path("results")
    assert re.fullmatch(r"benchmark-cpu-\d{8}-\d{6}", default.name)
