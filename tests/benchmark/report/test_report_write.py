import copy
import json

import numpy as np
import pytest
from conftest import N_TEST, N_VAL, TASKS

from ehrjax.benchmark import report
from ehrjax.benchmark.report import compute_stats, format_results_table, markdown, plots, write_report

SECTIONS = (
    "## What was cut", "## How to read this report", "### Test set and sizing",
    "### Ceilings on the same test patients", "### Q1. Does pre-training + LoRA (mlm_lora) beat training from scratch",
    "### Q2. Do learned code embeddings beat third-party ones?", "### The seed study's expectations",
    "### Verdicts against scratch (Holm family)", "### Results per labelled-set size", "### Tuning",
    "### Convergence", "### Data efficiency", "### ROC and precision-recall at the largest size",
    "### Training curves", "## Arms and trainable parameters", "## MLM pre-training", "## Linear probe",
    "## Med2Vec", "## Stage timing",
)  # fmt: skip


def test_the_files_are_written(written):
    out, summary, _ = written
    pngs = [f"plots/{t}/{k}.png" for t in TASKS for k in ("data_efficiency", "roc_pr", "training_curves")]
    pngs += ["plots/mlm_curves.png", "plots/stage_times.png"]
    text = (out / "report.md").read_text()
    for rel in pngs:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({rel})" in text
    saved = json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert saved["runs"] == summary["runs"] and "report" in saved["stages"]
    assert [t["n_test"] for t in saved["stats"]["tasks"]] == [N_TEST, N_TEST]
    assert not list(out.rglob(".*"))  # no temporary files left


def test_every_section_renders_with_numbers_and_no_dash(written):
    out, _, _ = written
    text = (out / "report.md").read_text()
    for heading in SECTIONS:
        assert text.count(heading) == (len(TASKS) if heading.startswith("### ") else 1), heading
    assert "—" not in text and "None" not in text and "nan" not in text
    assert "two sizes instead of five" in text
    assert "covers test-patient noise, run-to-run noise and the labelled-set draw together" in text
    assert "no model is expected to reach it" in text and "the realistic ceiling" in text
    assert "ceiling any model can reach" not in text and "has not used order or timing" not in text
    assert "**yes**, mlm_lora beats scratch at n = 100, 400." in text
    assert "mlm_lora (learned) is better at n = 100, 400." in text
    assert "| 100 | mlm_full | +0.000 [+0.000, +0.000] | 1.000 | 1.000 | not resolved |" in text
    assert f"{N_VAL} validation and {N_TEST:,} test patients" in text
    assert "Best baseline at n = 400: logreg (validation AUROC" in text
    assert "| scratch | 100 | learning_rate | 0.0003 | 0.0001: 0.5200, 0.0003: 0.4800*, 0.001: 0.5000 | yes |" in text
    assert "| mlm_lora | 100 | 4.0 | 4.0 | 40 | 21 | 2.0 | 3 of 3 |" in text
    assert "| mlm_lora | neural | fake mlm_lora | mlm | 64 | 20,000 | 365 | 1.82% | 300 | 65 | 0 | about 2% |" in text
    assert "1. Fine-tuning (mlm_lora) converges faster than scratch" in text and "holds at n = 100" in text
    assert "2. scratch may end slightly better at the largest size: at n = 400" in text
    assert "mlm_lora trains 1.82% (about 2%, as expected), med2vec_lora trains 7.00% (about 7%, as expected)" in text
    assert "every family can call one." in text


def test_fixed_defects_probe_med2vec_and_stage_table(written):
    out, _, _ = written
    text = (out / "report.md").read_text()
    assert "trained on 800 patients and tested on 400" in text
    assert "| pretrained - random | +0.100 [+0.040, +0.160] | excludes 0 |" in text
    assert "dim 200, 5.2 s wall time." in text
    assert "| finetune | 10.0 | 2.0 | 6.0 | 2.0 | no |" in text  # wall = compile + train + other


def test_a_stage_record_that_does_not_add_up_is_refused():
    assert markdown.stage_rows({"a": {"wall_s": 5.0, "compile_s": 2.0, "train_s": 3.004}})[0][4] == 0.0  # rounding
    with pytest.raises(ValueError, match=r"summary: stage a: compile_s \+ train_s = 6.000 exceeds wall_s = 5.000"):
        markdown.stage_rows({"a": {"wall_s": 5.0, "compile_s": 2.0, "train_s": 4.0}})


def test_the_terminal_table(written):
    table = format_results_table(written[2])
    for task in TASKS:
        assert f"task {task}: {N_TEST:,} test patients; ceilings AUROC: oracle (true risk)" in table
    assert "mlm_lora" in table and "better" in table and "not resolved" in table and "reference" in table


def test_without_ceilings_the_report_says_they_are_absent(copy_fake):
    out, summary = copy_fake()
    summary["tasks"], summary["runs"] = summary["tasks"][:1], [r for r in summary["runs"] if r["task"] == TASKS[0]]
    for run in summary["runs"]:
        arrays = dict(np.load(out / run["predictions"]))
        arrays["outcome_p"] = arrays["outcome_p_visible"] = np.full(N_VAL + N_TEST, np.nan)
        np.savez(out / run["predictions"], **arrays)
    stats = compute_stats(summary, out, n_boot=20)
    assert not any(c["present"] for c in stats["tasks"][0]["ceilings"].values())
    text = markdown.document(summary, stats, {})
    assert "- oracle (true risk): absent: column `outcome_p` is NaN, as on real (MEDS) data" in text
    assert "absent (real data)" in text and "—" not in text
    assert "ceilings AUROC: absent (real data)" in format_results_table(stats)


def test_a_failing_plot_leaves_no_report_and_no_summary(copy_fake, monkeypatch):
    out, summary = copy_fake()
    summary["tasks"], summary["runs"] = summary["tasks"][:1], [r for r in summary["runs"] if r["task"] == TASKS[0]]

    def broken(*args):
        raise RuntimeError("plot failed")

    (out / "report.md").write_text("stale")
    monkeypatch.setattr(plots, "plot_roc_pr", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(summary, out, n_boot=20)
    assert not (out / "report.md").exists() and not (out / "summary.json").exists()


def test_a_bad_predictions_file_leaves_no_report(copy_fake):
    out, summary = copy_fake()
    (out / "report.md").write_text("stale")
    rel = summary["runs"][5]["predictions"]
    (out / rel).unlink()
    with pytest.raises(ValueError, match=f"^predictions {rel}: cannot read"):
        write_report(summary, out, n_boot=20)
    assert not (out / "report.md").exists()


def test_only_the_writer_process_writes(copy_fake, monkeypatch):
    import ehrjax.train.rundir as rundir

    out, summary = copy_fake()
    summary["tasks"], summary["runs"] = summary["tasks"][:1], [r for r in summary["runs"] if r["task"] == TASKS[0]]
    monkeypatch.setattr(rundir, "is_writer", lambda: False)
    stats = write_report(copy.deepcopy(summary), out, n_boot=20)
    assert stats["tasks"][0]["n_test"] == N_TEST
    assert not (out / "report.md").exists() and not (out / "summary.json").exists() and not (out / "plots").exists()


def test_the_public_names():
    assert {"write_report", "compute_stats", "format_results_table"} <= set(report.__all__)
    from ehrjax.benchmark.report import format_results_table, write_report  # as the benchmark CLI imports them

    assert callable(format_results_table) and callable(write_report)
