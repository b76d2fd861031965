"""Pure helpers of the benchmark scripts: variant parsing (ab_step) and the ratio table (compare)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_ab_step_parses_variants():
    ab = _load("ab_step")
    assert ab.parse_variant("base=") == ("base", {}, None)
    name, overrides, prng = ab.parse_variant("v=model.dropout=0.0,data.batching=pack_buckets,prng:rbg")
    assert (name, prng) == ("v", "rbg")
    assert overrides == {"model.dropout": 0.0, "data.batching": "pack_buckets"}
    assert ab.parse_variant("s=model.scan_layers=True")[1] == {"model.scan_layers": True}
    for bad in ("=model.dropout=0", "v=dropout=0", "v=model.dropout"):
        with pytest.raises(ValueError, match="--variant"):
            ab.parse_variant(bad)


def test_compare_ratios_cover_every_torch_head():
    compare = _load("compare")
    ehrjax = {"pack": {"real_tokens_per_s": 100.0}, "pack_buckets": {"real_tokens_per_s": 120.0}}
    torch = {"sorted/all": {"real_tokens_per_s": 50.0}, "sorted/masked": {"real_tokens_per_s": 200.0},
             "pad_max/all": {"real_tokens_per_s": 5.0}}  # fmt: skip
    got = {(p["ehrjax"], p["torch"]): (p["ratio"], p["met"]) for p in compare.ratios(ehrjax, torch)}
    assert got == {
        ("pack", "sorted/all"): (2.0, None),
        ("pack", "sorted/masked"): (0.5, None),
        ("pack", "pad_max/all"): (20.0, True),
        ("pack_buckets", "sorted/all"): (2.4, None),
        ("pack_buckets", "sorted/masked"): (0.6, None),
        ("pack_buckets", "pad_max/all"): (24.0, None),
    }
    order = compare.run_order(("pack", "pack_buckets"), ("sorted",))
    assert order == [("torch", "sorted"), ("ehrjax", "pack"), ("ehrjax", "pack_buckets")]
    best = compare.best_ratio(ehrjax, torch)
    assert best == {"ehrjax": "pack_buckets", "torch": "sorted/masked", "ratio": 0.6, "target": 1.5, "met": False}
    assert "fastest ehrjax (pack_buckets) / fastest torch (sorted/masked): 0.60x" in compare.format_report(
        {k: dict(v, computed_tokens_per_s=1.0, efficiency=1.0, step_s=1.0, patients_per_s=1.0, mfu=0.1,
                 load=(0.0, 0.0)) for k, v in ehrjax.items()},
        {k: dict(v, padded_tokens_per_s=1.0, padding_efficiency=1.0, step_ms=1.0, patients_per_s=1.0, cpu_util=1.0,
                 load=(0.0, 0.0)) for k, v in torch.items()},
        [],
    )  # fmt: skip


def test_generator_whole_process_against_a_baseline_checkout(capsys):
    """--baseline runs another checkout's CLI beside this one's and compares the two files byte for byte (here the
    same tree twice: IDENTICAL)."""
    generator = _load("generator")
    generator.whole_process(300, "finetune", [1], 1, baseline=BENCHMARKS.parent)
    out = capsys.readouterr().out
    assert out.count("before") == 1 and out.count(" this ") == 1
    assert "cohorts IDENTICAL: " in out
    with pytest.raises(SystemExit, match="--baseline"):
        generator.whole_process(300, "finetune", [1], 1, baseline=BENCHMARKS)
