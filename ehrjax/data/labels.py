"""Task labels from a cohort: the binary outcome and the next visit's diagnosis codes (multi-hot).

Builders return the labels of every patient and an eligibility mask; a task keeps its eligible patients.
"""

from __future__ import annotations

import numpy as np

from ehrjax.data.cohort import Cohort
from ehrjax.data.vocab import Vocab


def outcome_labels(cohort: Cohort) -> tuple[np.ndarray, np.ndarray]:
    """Binary outcome labels float32[n] (0 where not eligible) and the eligibility mask bool[n]."""
    if "outcome" not in cohort.labels:
        raise ValueError("cohort label 'outcome' is missing; generate the cohort with outcome labels")
    y = np.asarray(cohort.labels["outcome"])
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
