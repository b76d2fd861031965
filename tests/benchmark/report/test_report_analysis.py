import copy

import numpy as np
import pytest
from conftest import N_BOOT, REPLICATES, SIZES, TASKS

from ehrjax.benchmark.report import UNRESOLVED, compute_stats, markdown
from ehrjax.eval.stats import holm


def _task(stats, name=TASKS[0]):
    return next(t for t in stats["tasks"] if t["name"] == name)


def _row(task, arm, size):
    return next(r for r in task["rows"] if r["arm"] == arm and r["size"] == size)


def _one_task(summary, name=TASKS[0]):
    """The summary cut to one task (half the bootstrap work)."""
    summary = copy.deepcopy(summary)
    summary["tasks"] = [t for t in summary["tasks"] if t["name"] == name]
    summary["runs"] = [r for r in summary["runs"] if r["task"] == name]
    return summary


def test_every_metric_interval_brackets_its_point_estimate(written):
    _, _, stats = written
    for task in stats["tasks"]:
        assert len(task["rows"]) == 6 * len(SIZES)  # the two ceiling arms are not rows
        for row in task["rows"]:
            assert row["n_replicates"] == len(REPLICATES)
            for metric in ("auroc", "ap", "pr_auc", "brier"):
                lo, hi = row[f"{metric}_ci"]
                assert 0 <= lo <= row[metric] <= hi <= 1, (row["arm"], metric)
        for c in task["ceilings"].values():
            assert c["present"]
            for metric in ("auroc", "ap", "pr_auc", "brier"):
                assert c[f"{metric}_ci"][0] <= c[metric] <= c[f"{metric}_ci"][1]
        true, visible = task["ceilings"]["outcome_p"], task["ceilings"]["outcome_p_visible"]
        assert true["name"] == "oracle" and visible["name"] == "oracle_visible"
        assert true["auroc"] > visible["auroc"] > _row(task, "scratch", SIZES[-1])["auroc"]
        assert task["above_true_risk"] == []


def test_an_arm_above_the_true_risk_is_flagged_as_a_leak(copy_fake):
    out, summary = copy_fake()
    summary = _one_task(summary)
    for run in summary["runs"]:
        if run["arm"] == "mlm_full" and run["size"] == SIZES[-1]:  # scores that know the label: a leak
            arrays = dict(np.load(out / run["predictions"]))
            arrays["probability"] = 0.05 + 0.9 * arrays["label"]
            np.savez(out / run["predictions"], **arrays)
    stats = compute_stats(summary, out, n_boot=20)
    assert _task(stats)["above_true_risk"] == [["mlm_full", SIZES[-1]]]
    assert "**Leakage check failed**: mlm_full at n = 400 score above" in markdown.document(summary, stats, {})


def test_a_copy_of_the_reference_is_not_resolved_and_a_much_better_arm_is_better(written):
    _, _, stats = written
    for task in stats["tasks"]:
        family = task["families"]["reference"]
        assert {c["a"] for c in family} == {"mlm_lora", "med2vec_lora", "mlm_full"}  # neural arms only
        assert all(c["m"] == len(family) == 3 * len(SIZES) for c in family)
        np.testing.assert_allclose([c["p_holm"] for c in family], holm([c["p"] for c in family]))
        for size in SIZES:
            copy_ = _row(task, "mlm_full", size)["vs_reference"]
            assert (copy_["mean"], *copy_["ci"], copy_["p"]) == (0.0, 0.0, 0.0, 1.0)
            assert copy_["verdict"] == UNRESOLVED
            better = _row(task, "mlm_lora", size)["vs_reference"]
            assert better["verdict"] == "better" and better["ci"][0] > 0 and better["p_holm"] < 0.05
            assert better["replicates"] == list(REPLICATES)
            assert _row(task, "scratch", size)["vs_reference"] is None
            assert "verdict" not in _row(task, "trees", size)["vs_reference"]  # baselines: descriptive only


def test_the_best_baseline_is_chosen_on_validation_not_test(written):
    _, _, stats = written
    for task in stats["tasks"]:
        for size in SIZES:
            logreg, trees = _row(task, "logreg", size), _row(task, "trees", size)
            assert logreg["val_auroc"] > trees["val_auroc"] and trees["auroc"] > logreg["auroc"]  # built so
        assert [b["arm"] for b in task["best_baseline"]] == ["logreg"] * len(SIZES)
        q1 = task["families"]["q1_baseline"]
        assert [(c["a"], c["b"]) for c in q1] == [("mlm_lora", "logreg")] * len(SIZES)
        assert all(c["m"] == len(SIZES) and c["verdict"] == "better" for c in q1)
        assert [(c["a"], c["b"]) for c in task["families"]["q2"]] == [("mlm_lora", "med2vec_lora")] * len(SIZES)


def test_convergence_sizing_tuning_and_expectations(written):
    _, summary, stats = written
    task = _task(stats)
    row = _row(task, "mlm_lora", SIZES[0])
    assert row["steps_to_95_median"] == 21 and row["best_epoch_median"] == 4 and row["steps_to_95_reached"] == 3
    assert _row(task, "logreg", SIZES[0])["steps_to_95_median"] is None
    e = task["expectations"]
    assert [x["faster_replicates"] for x in e["faster"]] == [3, 3]
    assert e["largest"]["size"] == SIZES[-1] and e["largest"]["a"] == "mlm_lora"
    assert e["shares"]["mlm_lora"] == pytest.approx(100 * 365 / 20_000) and e["share_about"] == [True, True]
    assert [m["size"] for m in task["sizing"]["measured"]] == list(SIZES)
    assert task["sizing"]["target_half_width"] == 0.05 and task["n_test_positive"] == task["sizing"]["n_test_positive"]
    assert len(task["tuning"]) == 4 * len(SIZES) and all(t["chosen_is_lowest"] for t in task["tuning"])
    assert "lowest" not in summary["tuning"][0]  # the summary's own records are not changed
    assert stats["roles"]["notes"] == ["table pair mlm_emb / med2vec_emb skipped: mlm_emb, med2vec_emb did not run"]


def test_statistics_are_deterministic(written, fake):
    out, summary = fake
    again = compute_stats(_one_task(summary), out, n_boot=N_BOOT)
    assert _task(again)["rows"] == _task(written[2])["rows"]


def _rename(value, names):
    if isinstance(value, dict):
        return {names.get(k, k): _rename(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_rename(v, names) for v in value]
    return names.get(value, value) if isinstance(value, str) else value


def test_renaming_arms_through_the_roles_still_answers_q1(fake):
    out, summary = fake
    names = {"mlm_lora": "pretrained_adapter", "scratch": "from_nothing", "logreg": "bag_of_codes"}
    summary = _one_task(summary)
    runs = summary.pop("runs")
    summary = _rename(summary, names)
    summary["runs"] = [{**r, "arm": names.get(r["arm"], r["arm"])} for r in runs]  # files keep their paths
    stats = compute_stats(summary, out, n_boot=N_BOOT)
    task = _task(stats)
    assert stats["roles"]["reference"] == "from_nothing" and stats["roles"]["pretrained_lora"] == "pretrained_adapter"
    assert {c["a"] for c in task["families"]["reference"]} == {"pretrained_adapter", "med2vec_lora", "mlm_full"}
    assert [c["b"] for c in task["families"]["q1_baseline"]] == ["bag_of_codes"] * len(SIZES)
    text = "\n".join(markdown.document(summary, stats, {}).splitlines())
    assert "**yes**, pretrained_adapter beats from_nothing at n = 100, 400." in text
    assert "pretrained_adapter beats it at n = 100, 400." in text


def test_a_role_that_did_not_run_is_skipped_and_said(fake):
    out, summary = fake
    summary = _one_task(summary)
    summary["runs"] = [r for r in summary["runs"] if r["arm"] != "mlm_lora"]
    stats = compute_stats(summary, out, n_boot=20)
    assert stats["roles"]["pretrained_lora"] is None and stats["roles"]["table_pairs"] == []
    assert "roles.pretrained_lora names arm mlm_lora, which did not run" in stats["roles"]["notes"]
    text = markdown.document(summary, stats, {})
    assert "Not answered: roles.pretrained_lora names arm mlm_lora, which did not run" in text
    assert "Not answered: no pair of roles.table_pairs ran." in text and "—" not in text
