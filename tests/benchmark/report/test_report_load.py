import numpy as np
import pytest
from conftest import N_TEST, N_VAL, REPLICATES, SIZES, TASKS

from ehrjax.benchmark.report import load


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_cells_group_replicates_and_ceilings_come_from_the_columns(fake):
    out, summary = fake
    data = load.load(summary, out)
    assert list(data) == list(TASKS)
    task = data[TASKS[0]]
    cell = task.cells[("mlm_lora", SIZES[-1])]
    assert cell.replicates == list(REPLICATES) and cell.test.shape == (3, N_TEST) and cell.val.shape == (3, N_VAL)
    assert len(task.labels) == N_TEST and len(task.val_labels) == N_VAL
    oracle = task.cells[("oracle", SIZES[0])].test[0]
    np.testing.assert_array_equal(task.ceilings["outcome_p"], oracle)
    assert task.ceilings["outcome_p_visible"] is not None and task.runs_checked == 8 * len(SIZES) * 3


def _rewrite(out, rel, **changes):
    arrays = dict(np.load(out / rel))
    arrays.update(changes)
    for key, value in changes.items():
        if value is None:
            del arrays[key]
    np.savez(out / rel, **arrays)


REL = "runs/stroke/med2vec_lora/n400/rep1/predictions.npz"


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ("missing", "cannot read it as the expected .npz"),
        ("garbage", "cannot read it as the expected .npz"),
        ("no_key", "cannot read it as the expected .npz"),
        ("probability", "probability must be finite and in [0, 1]"),
        ("label", "labels must be 0 or 1"),
        ("short", "expected equal 1-D arrays"),
        ("split", "split must be 'val' or 'test'"),
        ("mixed_ceiling", "outcome_p must be NaN on every row"),
        ("patients", "patient ids differ from"),
        ("ceiling_differs", "outcome_p_visible differs from"),
    ],
)
def test_a_bad_predictions_file_is_a_one_line_error_naming_it(copy_fake, change, needle):
    out, summary = copy_fake()
    arrays = dict(np.load(out / REL))
    n = len(arrays["label"])
    if change == "missing":
        (out / REL).unlink()
    elif change == "garbage":
        (out / REL).write_bytes(b"not an npz")
    elif change == "no_key":
        _rewrite(out, REL, outcome_p_visible=None)
    elif change == "probability":
        _rewrite(out, REL, probability=np.full(n, 1.5))
    elif change == "label":
        _rewrite(out, REL, label=np.full(n, 2.0))
    elif change == "short":
        _rewrite(out, REL, logit=arrays["logit"][:-1])
    elif change == "split":
        _rewrite(out, REL, split=np.r_[["train"], arrays["split"][1:]])
    elif change == "mixed_ceiling":
        _rewrite(out, REL, outcome_p=np.r_[np.nan, arrays["outcome_p"][1:]])
    elif change == "patients":
        _rewrite(out, REL, patient_id=arrays["patient_id"][::-1].copy())
    else:
        _rewrite(out, REL, outcome_p_visible=arrays["outcome_p_visible"] * 0.5)
    with pytest.raises(ValueError) as excinfo:
        load.load(summary, out)
    message = _one_line(excinfo)
    assert message.startswith(f"predictions {REL}: ") and needle in message


def test_summary_problems_are_one_line_errors(fake):
    out, summary = fake
    bad = {**summary, "runs": [{**summary["runs"][0], "task": "sepsis"}, *summary["runs"][1:]]}
    with pytest.raises(ValueError, match="names task 'sepsis', not in 'tasks'"):
        load.load(bad, out)
    bad = {**summary, "runs": [*summary["runs"], summary["runs"][0]]}
    with pytest.raises(ValueError, match="lists a replicate twice"):
        load.load(bad, out)
    with pytest.raises(ValueError, match="'runs' is empty"):
        load.load({**summary, "runs": []}, out)
    with pytest.raises(ValueError, match="'tasks' is empty"):
        load.load({**summary, "tasks": []}, out)


def test_ceilings_are_absent_when_the_columns_are_nan(copy_fake):
    out, summary = copy_fake()
    for run in summary["runs"]:
        _rewrite(out, run["predictions"], outcome_p=np.full(N_VAL + N_TEST, np.nan),
                 outcome_p_visible=np.full(N_VAL + N_TEST, np.nan))  # fmt: skip
    data = load.load(summary, out)
    assert all(c is None for task in data.values() for c in task.ceilings.values())
