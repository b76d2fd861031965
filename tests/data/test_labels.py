import dataclasses

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from ehrjax.data.cohort import Cohort
from ehrjax.data.labels import OUTCOME_TASKS, OutcomeTask, outcome_labels, outcome_task
from ehrjax.data.synthetic import generate_cohort
from ehrjax.data.tasks import build_vocab
from ehrjax.data.tokenize import tokenize
from ehrjax.eval.logreg import bag_of_codes_features, fit_logreg
from ehrjax.eval.trees import fit_trees, frequent_codes, tabular_features


@pytest.fixture(scope="module")
def small():
    return generate_cohort(3000, 1, "finetune")


def test_registry_names_the_label_keys_of_each_task(small):
    assert list(OUTCOME_TASKS) == ["heart_failure", "renal_decline"]
    assert OUTCOME_TASKS["heart_failure"] == OutcomeTask(
        label="outcome", risk="outcome_p", visible_risk="outcome_p_visible", title="heart failure within 365 days"
    )
    assert OUTCOME_TASKS["renal_decline"].label == "renal_decline"
    with pytest.raises(dataclasses.FrozenInstanceError):
        OUTCOME_TASKS["renal_decline"].label = "outcome"  # type: ignore[misc]
    for task in OUTCOME_TASKS.values():
        for key in (task.label, task.risk, task.visible_risk):
            assert key in small.labels, key


@pytest.mark.parametrize("task", sorted(OUTCOME_TASKS))
def test_outcome_labels_of_each_task(small, task):
    y, eligible = outcome_labels(small, task)
    raw = small.labels[OUTCOME_TASKS[task].label]
    assert y.dtype == np.float32 and eligible.dtype == bool and y.shape == eligible.shape == (len(small),)
    np.testing.assert_array_equal(eligible, raw >= 0)
    np.testing.assert_array_equal(y, np.where(raw == 1, 1.0, 0.0))
    assert np.isfinite(small.labels[OUTCOME_TASKS[task].risk][eligible]).all()


def test_the_default_task_is_heart_failure(small):
    for a, b in zip(outcome_labels(small), outcome_labels(small, "heart_failure"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(outcome_labels(small)[0], outcome_labels(small, "renal_decline")[0])


def test_unknown_task_and_missing_label_are_one_line_errors(small):
    with pytest.raises(ValueError, match=r"outcome task 'sepsis' unknown; expected one of \['heart_failure', "
                                         r"'renal_decline'\]") as err:  # fmt: skip
        outcome_labels(small, "sepsis")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="sepsis"):
        outcome_task("sepsis")
    without = Cohort(**{**small.__dict__, "labels": {k: v for k, v in small.labels.items() if k != "renal_decline"}})
    with pytest.raises(ValueError, match=r"cohort label 'renal_decline' .* is missing") as err:
        outcome_labels(without, "renal_decline")
    assert "\n" not in str(err.value)
    outcome_labels(without)  # heart failure is still there


def test_saved_cohorts_keep_both_tasks(small, tmp_path):
    path = tmp_path / "finetune.npz"
    small.save(path)
    loaded = Cohort.load(path)
    assert loaded.equals(small)
    for task in OUTCOME_TASKS.values():
        for key in (task.label, task.risk, task.visible_risk):
            assert loaded.labels[key].dtype == small.labels[key].dtype
            assert loaded.labels[key].tobytes() == small.labels[key].tobytes(), key


# Both tasks on the test split of generate_cohort(60_000, 0, "finetune"), before any neural arm runs: eligible
# patients per split, prevalence among the eligible, the AUROC of the true and of the visible risk, and a
# bag-of-codes logistic regression (full histories, age and sex; vocabulary of the training split) fitted on
# the first 1,000 eligible training patients with C chosen by validation log loss, and the gradient-boosted trees
# on the same patients. Deterministic: 3 decimals.
PINNED = {
    "heart_failure": dict(eligible=(31453, 3995, 3977), prevalence=0.106, true=0.817, visible=0.803, logreg=0.778,
                          trees=0.777),
    "renal_decline": dict(eligible=(32723, 4153, 4119), prevalence=0.099, true=0.751, visible=0.748, logreg=0.713,
                          trees=0.713),
}  # fmt: skip
TOLERANCE = 0.002
LOGREG_TRAIN_SIZE = 1000


@pytest.fixture(scope="module")
def study_cohort():
    cohort = generate_cohort(60_000, 0, "finetune")
    vocab = build_vocab(cohort)
    corpus = tokenize(cohort, vocab, int(cohort.lengths.max() + cohort.num_visits.max() + 1))  # nothing cut
    assert corpus.num_truncated == 0
    return cohort, vocab, corpus


@pytest.mark.parametrize("task", sorted(PINNED))
def test_outcome_tasks_before_any_neural_arm(study_cohort, task):
    cohort, vocab, corpus = study_cohort
    pinned, keys = PINNED[task], OUTCOME_TASKS[task]
    y, eligible = outcome_labels(cohort, task)
    rows = {s: np.flatnonzero(eligible & cohort.split_mask(s)) for s in ("train", "val", "test")}
    assert tuple(len(r) for r in rows.values()) == pinned["eligible"]
    assert y[eligible].mean() == pytest.approx(pinned["prevalence"], abs=TOLERANCE)
    test = rows["test"]
    for name, key in (("true", keys.risk), ("visible", keys.visible_risk)):
        auroc = roc_auc_score(y[test], cohort.labels[key][test])
        assert auroc == pytest.approx(pinned[name], abs=TOLERANCE), name
    train = rows["train"][:LOGREG_TRAIN_SIZE]
    x = {k: bag_of_codes_features(corpus, r, len(vocab), sex=cohort.sex[r])
         for k, r in (("train", train), ("val", rows["val"]), ("test", test))}  # fmt: skip
    fit = fit_logreg(x["train"], y[train], x["val"], y[rows["val"]])
    logreg = roc_auc_score(y[test], fit.predict_proba(x["test"]))
    print(f"\n{task}: true {pinned['true']} visible {pinned['visible']} logreg {logreg:.4f} (C={fit.C})")
    assert logreg == pytest.approx(pinned["logreg"], abs=TOLERANCE)


@pytest.mark.parametrize("task", sorted(PINNED))
def test_gradient_boosted_trees_before_any_neural_arm(study_cohort, task):
    """The gradient-boosted-trees baseline's test AUROC per task: the same 1,000 eligible training patients, the
    same validation and test patients as the logistic regression above; count, recency and first-seen features
    of the 256 most frequent training codes."""
    cohort, _, corpus = study_cohort
    y, eligible = outcome_labels(cohort, task)
    rows = {s: np.flatnonzero(eligible & cohort.split_mask(s)) for s in ("train", "val", "test")}
    train = rows["train"][:LOGREG_TRAIN_SIZE]
    codes = frequent_codes(corpus, train)
    x = {k: tabular_features(corpus, cohort, r, codes) for k, r in (("train", train), ("val", rows["val"]),
                                                                      ("test", rows["test"]))}  # fmt: skip
    fit = fit_trees(x["train"], y[train], x["val"], y[rows["val"]], n_threads=1)
    auroc = roc_auc_score(y[rows["test"]], fit.predict_proba(x["test"]))
    print(f"\n{task}: trees {auroc:.4f} ({fit.params['max_leaf_nodes']} leaves, {fit.params['max_iter']} rounds)")
    assert auroc == pytest.approx(PINNED[task]["trees"], abs=TOLERANCE)
