"""Paired comparison of one arm across two benchmark folders, on the fake folder and copies of it."""

import json
import shutil

import numpy as np
import pytest
from conftest import N_BOOT, N_VAL, REPLICATES, SIZES, TASKS, _rel
from sklearn.metrics import roc_auc_score

from ehrjax.benchmark.report.compare import compare_runs, format_comparison, main


def _with_summary(out, summary):
    (out / "summary.json").write_text(json.dumps(summary))
    return out


def test_a_folder_against_itself_differs_by_nothing(fake, copy_fake):
    out, summary = copy_fake()
    _with_summary(out, summary)
    result = compare_runs(out, out, n_boot=N_BOOT)
    arms = {c["arm"] for c in result["comparisons"]}
    assert arms == {"scratch", "mlm_lora", "med2vec_lora", "mlm_full", "logreg", "trees"}  # no ceilings
    assert len(result["comparisons"]) == len(TASKS) * len(SIZES) * len(arms)
    for c in result["comparisons"]:
        assert (c["mean"], c["ci"], c["p_holm"], c["verdict"]) == (0.0, [0.0, 0.0], 1.0, "not resolved")
        assert c["replicates"] == list(REPLICATES) and c["m"] == len(SIZES) * len(arms)


def test_a_worse_arm_is_called_worse_by_the_paired_difference(copy_fake, tmp_path):
    a, summary = copy_fake()
    _with_summary(a, summary)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for task in TASKS:  # in A, mlm_lora's predictions are scratch's
        for size in SIZES:
            for rep in REPLICATES:
                shutil.copy(a / _rel(task, "scratch", size, rep), a / _rel(task, "mlm_lora", size, rep))
    result = compare_runs(a, b, arms=["mlm_lora"], n_boot=N_BOOT)
    assert {c["arm"] for c in result["comparisons"]} == {"mlm_lora"}
    for c in result["comparisons"]:
        test = slice(N_VAL, None)
        expected = []
        for rep in REPLICATES:
            worse, better = (np.load(x / _rel(c["task"], "mlm_lora", c["size"], rep)) for x in (a, b))
            expected.append(roc_auc_score(worse["label"][test], worse["probability"][test])
                            - roc_auc_score(better["label"][test], better["probability"][test]))  # fmt: skip
        assert c["mean"] == pytest.approx(np.mean(expected), abs=1e-12)
        assert c["ci"][1] < 0 and c["verdict"] == "worse" and c["m"] == len(SIZES)
    assert "| mlm_lora |" in format_comparison(result)


def test_other_patients_or_nothing_in_common_is_a_one_line_error(copy_fake, tmp_path, capsys):
    a, summary = copy_fake()
    _with_summary(a, summary)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for path in b.glob("runs/*/*/*/*/predictions.npz"):
        arrays = dict(np.load(path))
        arrays["patient_id"] = arrays["patient_id"] + 1
        np.savez(path, **arrays)
    with pytest.raises(ValueError, match="scored different test patients"):
        compare_runs(a, b, n_boot=N_BOOT)
    assert main([str(a), str(b), "--n-boot", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: task ") and err.count("\n") == 1
    with pytest.raises(ValueError, match="no \\(task, arm, size\\) ran in both among arms nope"):
        compare_runs(a, a, arms=["nope"], n_boot=N_BOOT)
    assert main([str(a), str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_prints_the_table_and_writes_json(copy_fake, tmp_path, capsys):
    a, summary = copy_fake()
    _with_summary(a, summary)
    assert main([str(a), str(a), "--arms", "scratch", "--n-boot", "20", "--out", str(tmp_path / "c.json")]) == 0
    assert "| scratch |" in capsys.readouterr().out
    saved = json.loads((tmp_path / "c.json").read_text())
    assert {c["arm"] for c in saved["comparisons"]} == {"scratch"} and saved["n_boot"] == 20
