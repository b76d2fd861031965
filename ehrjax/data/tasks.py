"""The data of one training task, from a config: cohort -> vocabulary -> tokenised corpus -> labels -> splits.

`mlm` pre-trains on the `pretrain` stream; `outcome` and `next_visit` fine-tune on the `finetune` stream,
restricted to the patients the task is defined for. The vocabulary is built on the training split (or given:
a fine-tuning run reuses its pre-training run's vocabulary, so code ids line up with the pre-trained table).
`finetune.train_size` takes the first k training patients, so labeled-set sizes are nested prefixes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ehrjax.data.batching import next_visit_label_space, next_visit_labels, outcome_labels
from ehrjax.data.cohort import Cohort
from ehrjax.data.sources import task_cohort
from ehrjax.data.tokenize import TokenizedCorpus, tokenize
from ehrjax.data.vocab import Vocab

TASKS: tuple[str, ...] = ("mlm", "outcome", "next_visit")


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """task: one of TASKS; cohort: the task's patients; corpus: their layout (corpus row i = cohort row i);
    labels: float32[n, num_labels] or None (mlm); splits: corpus indices per split; label_space: vocab ids of
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


def build_vocab(cohort: Cohort, min_count: int = 1) -> Vocab:
    """Vocabulary of the codes in the cohort's training split."""
    train = cohort.select(cohort.split_mask("train"))
    return Vocab.build(cohort.code_names, train.code_counts(), min_count=min_count)


def build_task_data(config: Any, task: str | None = None, *, vocab: Vocab | None = None) -> TaskData:
    task = task or config.task
    cohort = task_cohort(config, task)
    labels = label_space = None
    if task == "outcome":
        y, eligible = outcome_labels(cohort)
        cohort = cohort.select(eligible)
        labels = y[eligible][:, None]
    if vocab is None:
        vocab = build_vocab(cohort, config.data.min_count)
    if task == "next_visit":
        label_space = next_visit_label_space(vocab)
        multi_hot, eligible = next_visit_labels(cohort, vocab, label_space)
        cohort = cohort.select(eligible)
        labels = multi_hot[eligible]
    corpus = tokenize(cohort, vocab, config.data.max_len)
    splits = {name: np.flatnonzero(cohort.split_mask(name)) for name in ("train", "val", "test")}
    train_size = config.finetune.get("train_size", 0) if task != "mlm" else 0
    if train_size:
        if train_size > len(splits["train"]):
            raise ValueError(
                f"finetune.train_size={train_size} exceeds the {len(splits['train'])} training patients of the "
                f"{task!r} task; raise finetune.num_patients"
            )
        splits["train"] = splits["train"][:train_size]
    for name, rows in splits.items():
        if len(rows) == 0:
            raise ValueError(f"the {task!r} task has no {name} patients; raise the cohort's num_patients")
    return TaskData(task, cohort, vocab, corpus, labels, splits, label_space)
