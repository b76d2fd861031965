"""Task labels from a cohort: the binary outcomes and the next visit's diagnosis codes (multi-hot).

Builders return the labels of every patient and an eligibility mask; a task keeps its eligible patients.
`OUTCOME_TASKS` names the binary outcome tasks and the cohort labels that hold each one's label (int8: 1, 0,
-1 not eligible) and its two ceilings (docs/tasks.md).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ehrjax.data.cohort import Cohort
from ehrjax.data.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class OutcomeTask:
    """A binary outcome task by the cohort label keys it reads.

    label: int8 (1 event, 0 none, -1 not eligible); risk: float32 true probability, which includes a frailty
    no record shows, so no model is expected to reach it; visible_risk: float32 probability with that frailty
    integrated out over its prior, the best a model can do in expectation without it. Both NaN where not
    eligible; synthetic cohorts only (real data has neither).
    """

    label: str
    risk: str
    visible_risk: str
    title: str


OUTCOME_TASKS: dict[str, OutcomeTask] = {
    "heart_failure": OutcomeTask(
        label="outcome", risk="outcome_p", visible_risk="outcome_p_visible", title="heart failure within 365 days"
    ),
    "renal_decline": OutcomeTask(
        label="renal_decline",
        risk="renal_decline_p",
        visible_risk="renal_decline_p_visible",
        title="renal decline within 365 days",
    ),
}
DEFAULT_OUTCOME_TASK = "heart_failure"


def outcome_task(task: str) -> OutcomeTask:
    """The registered outcome task `task`; a one-line ValueError naming the known tasks otherwise."""
    if task not in OUTCOME_TASKS:
        raise ValueError(f"outcome task {task!r} unknown; expected one of {sorted(OUTCOME_TASKS)}")
    return OUTCOME_TASKS[task]


def outcome_labels(cohort: Cohort, task: str = DEFAULT_OUTCOME_TASK) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels float32[n] of outcome task `task` (0 where not eligible) and the eligibility mask bool[n]."""
    key = outcome_task(task).label
    if key not in cohort.labels:
        raise ValueError(f"cohort label {key!r} ({task} outcome) is missing; generate the cohort with outcome labels")
    y = np.asarray(cohort.labels[key])
    eligible = y >= 0
    return np.where(eligible, y, 0).astype(np.float32), eligible


def next_visit_label_space(vocab: Vocab, prefix: str = "ICD10:") -> np.ndarray:
    """The next-visit label space: vocabulary ids int32[C] of the diagnosis codes (`prefix`), in id order.

    The vocabulary is built on the pre-training cohort, so these are the diagnosis codes seen in training.
    """
    ids = np.asarray([i for i, code in enumerate(vocab.codes) if code.startswith(prefix)], dtype=np.int32)
    if len(ids) == 0:
        raise ValueError(f"next_visit label space: no vocabulary code starts with {prefix!r}")
    return ids


def next_visit_labels(cohort: Cohort, vocab: Vocab, label_space: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multi-hot float32[n, C] of the next visit's codes over `label_space` (vocab ids), and eligibility bool[n]
    (at least one positive label). Codes outside the label space are ignored."""
    if "next_visit" not in cohort.labels or "next_visit_offsets" not in cohort.labels:
        raise ValueError("cohort label 'next_visit' is missing; generate the cohort with next-visit labels")
    offsets = np.asarray(cohort.labels["next_visit_offsets"], dtype=np.int64)
    column_of = np.full(len(vocab), -1, dtype=np.int64)
    column_of[label_space] = np.arange(len(label_space))
    columns = column_of[vocab.ids(cohort.code_names)[cohort.labels["next_visit"]]]
    rows = np.repeat(np.arange(len(cohort)), np.diff(offsets))
    keep = columns >= 0
    out = np.zeros((len(cohort), len(label_space)), dtype=np.float32)
    out[rows[keep], columns[keep]] = 1.0
    return out, out.any(axis=1)
