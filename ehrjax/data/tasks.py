"""The data of one training task, from a config: cohort -> vocabulary -> tokenised corpus -> labels -> splits.

`mlm` and `clm` pre-train on the `pretrain` stream; `outcome` and `next_visit` fine-tune on the `finetune` stream,
restricted to the patients the task is defined for. The vocabulary is built on the training split (or given:
a fine-tuning run reuses its pre-training run's vocabulary, so code ids line up with the pre-trained table).
`finetune.train_size` takes the first k training patients, so labeled-set sizes are nested prefixes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ehrjax.data.cohort import Cohort, ragged_index
from ehrjax.data.labels import next_visit_label_space, next_visit_labels, outcome_labels
from ehrjax.data.sources import task_cohort
from ehrjax.data.tokenize import TokenizedCorpus, tokenize
from ehrjax.data.vocab import NUM_SPECIAL, Vocab

TASKS: tuple[str, ...] = ("mlm", "clm", "outcome", "next_visit")
PRETRAIN_TASKS: tuple[str, ...] = ("mlm", "clm")  # unlabelled, on the pre-training cohort: they predict codes


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """task: one of TASKS; cohort: the task's patients; corpus: their layout (corpus row i = cohort row i);
    labels: float32[n, num_labels] or None (mlm, clm); splits: corpus indices per split; label_space: vocab ids of
    the next-visit label columns (next_visit only)."""

    task: str
    cohort: Cohort
    vocab: Vocab
    corpus: TokenizedCorpus
    labels: np.ndarray | None
    splits: dict[str, np.ndarray]
    label_space: np.ndarray | None = None

    @property
    def num_labels(self) -> int:
        return 0 if self.labels is None else self.labels.shape[1]

    def with_train_size(self, k: int) -> TaskData:
        """The same data with the training split cut to its first `k` patients (nested labelled sets share
        everything else: cohort, vocabulary, corpus, validation and test patients)."""
        if k <= 0 or k > len(self.splits["train"]):
            raise ValueError(
                f"train size {k} must be in 1..{len(self.splits['train'])}, the training patients of the "
                f"{self.task!r} task; raise the fine-tuning cohort's num_patients"
            )
        return dataclasses.replace(self, splits=dict(self.splits, train=self.splits["train"][:k]))

    def frequent_codes(self, k: int) -> np.ndarray:
        """The `k` most frequent clinical codes (vocab ids, no time tokens) among the training patients' tokens; always
        min(k, clinical codes) of them (unseen codes last), so the number does not depend on the labelled set."""
        counts = self.train_token_counts()[NUM_SPECIAL : self.vocab.code_end]
        order = np.argsort(-counts, kind="stable")
        return (order[:k] + NUM_SPECIAL).astype(np.int32)

    def train_token_counts(self) -> np.ndarray:
        """int64[len(vocab)] token counts of every vocab id over the training patients' tokenised histories."""
        index, _ = ragged_index(np.asarray(self.corpus.offsets, dtype=np.int64), self.splits["train"])
        return np.bincount(np.asarray(self.corpus.codes)[index], minlength=len(self.vocab)).astype(np.int64)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "task": self.task,
            "patients": len(self.cohort),
            "vocab_size": len(self.vocab),
            "tokens": self.corpus.num_tokens,
            "truncated_patients": self.corpus.num_truncated,
            "splits": {k: len(v) for k, v in self.splits.items()},
        }
        if self.task == "outcome":
            out["prevalence"] = {k: float(self.labels[v, 0].mean()) for k, v in self.splits.items() if len(v)}
        return out


def build_vocab(cohort: Cohort, min_count: int = 1, *, time_tokens: bool = False) -> Vocab:
    """Vocabulary of the codes in the cohort's training split (and the time tokens when `time_tokens`)."""
    train = cohort.select(cohort.split_mask("train"))
    return Vocab.build(cohort.code_names, train.code_counts(), min_count=min_count, time_tokens=time_tokens)


def make_task_data(
    cohort: Cohort,
    task: str,
    *,
    max_len: int,
    vocab: Vocab | None = None,
    min_count: int = 1,
    train_size: int = 0,
    outcome: str = "heart_failure",
    time_tokens: bool = False,
) -> TaskData:
    """The task's data from a cohort: eligible patients, labels, vocabulary, tokenised corpus and splits.

    vocab: reuse a vocabulary (a fine-tuning run reuses its pre-training run's, so code ids line up with the
    pre-trained table); otherwise it is built on the labelled training patients (the first `train_size` of the
    training split when set), so a small labelled set sees only its own patients' codes. outcome: which outcome
    task (`ehrjax.data.labels.OUTCOME_TASKS`) the `outcome` labels come from. time_tokens: gap tokens between
    visits (`ehrjax.data.tokenize`); a given vocabulary must have been built with the same choice.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} unknown; expected one of {TASKS}")
    labels = label_space = None
    if task == "outcome":
        y, eligible = outcome_labels(cohort, outcome)
        cohort = cohort.select(eligible)
        labels = y[eligible][:, None]
    if vocab is None:
        train_rows = np.flatnonzero(cohort.split_mask("train"))
        if train_size:
            train_rows = train_rows[:train_size]
        vocab = Vocab.build(cohort.code_names, cohort.select(train_rows).code_counts(), min_count=min_count,
                            time_tokens=time_tokens)  # fmt: skip
    elif vocab.has_time_tokens and not time_tokens:
        raise ValueError("data.time_tokens: False, but the vocabulary holds time tokens (its pre-training run "
                         "used data.time_tokens=True); set data.time_tokens=True")  # fmt: skip
    if task == "next_visit":
        label_space = next_visit_label_space(vocab)
        multi_hot, eligible = next_visit_labels(cohort, vocab, label_space)
        cohort = cohort.select(eligible)
        labels = multi_hot[eligible]
    corpus = tokenize(cohort, vocab, max_len, time_tokens=time_tokens)
    splits = {name: np.flatnonzero(cohort.split_mask(name)) for name in ("train", "val", "test")}
    for name, rows in splits.items():
        if len(rows) == 0:
            raise ValueError(f"the {task!r} task has no {name} patients; raise the cohort's num_patients")
    data = TaskData(task, cohort, vocab, corpus, labels, splits, label_space)
    return data.with_train_size(train_size) if train_size else data


def check_evaluable(data: TaskData) -> None:
    """A one-line ValueError, before any training, where a split's metric could not be computed: the
    validation split picks the best epoch and the test split is reported, so each needs patients and, for a
    binary task, both classes (AUROC and AP are undefined for one); for a multi-label task, a patient with a
    positive label. Names the split and its class counts."""
    if data.labels is None:
        return
    for name in ("val", "test"):
        rows = data.splits.get(name, np.zeros(0, dtype=np.int64))
        if len(rows) == 0:
            raise ValueError(f"the {data.task!r} task has no {name} patients; its metric cannot be computed")
        y = np.asarray(data.labels[rows]) > 0.5
        if y.shape[1] == 1:
            positive = int(y.sum())
            if positive == 0 or positive == len(rows):
                raise ValueError(
                    f"the {data.task!r} task's {name} split has one class ({positive} positive, "
                    f"{len(rows) - positive} negative labels): its AUROC/AP cannot be computed; check the labels"
                )
        elif not y.any():
            raise ValueError(f"the {data.task!r} task's {name} split has no positive label among {len(rows)} "
                             "patients: its metrics cannot be computed")  # fmt: skip


def build_task_data(
    config: Any, task: str | None = None, *, vocab: Vocab | None = None, cohort: Cohort | None = None
) -> TaskData:
    """`make_task_data` for the config's cohort (`pretrain` stream for mlm and clm, `finetune` otherwise); `cohort`:
    that cohort already at hand (the benchmark holds it), instead of generating or reading it again."""
    task = task or config.task
    train_size = config.finetune.train_size if task not in PRETRAIN_TASKS else 0
    cohort = cohort if cohort is not None else task_cohort(config, task)
    return make_task_data(cohort, task, max_len=config.data.max_len, vocab=vocab, min_count=config.data.min_count,
                          train_size=train_size, time_tokens=config.data.time_tokens)  # fmt: skip
