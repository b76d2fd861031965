"""Where a task's cohort comes from: the seeded synthetic generator (default) or a MEDS dataset on disk.

`data.source = "synthetic"`: `mlm` and `clm` take the `pretrain` stream, `outcome` and `next_visit` the
`finetune` stream, sized and seeded by `pretrain` / `finetune`. `data.source = "meds"`: `mlm` and `clm` read
every subject of `data.meds_pretrain_dir` if set, else `data.meds_dir` (splits from its
`subject_splits.parquet`); `outcome` reads the subjects of the label folder `data.meds_labels` in
`data.meds_dir`, each history cut strictly before its prediction time (`ehrjax.data.meds`).
MEDS label files carry no next-visit codes, so `next_visit` needs the synthetic source.
"""

from __future__ import annotations

from typing import Any

from ehrjax.data.cohort import Cohort
from ehrjax.data.synthetic import generate_cohort

SOURCES: tuple[str, ...] = ("synthetic", "meds")


def validate_data_source(data: Any) -> None:
    """One-line errors for the `data.source` keys of a config's `data` section."""
    source = data.source
    if source not in SOURCES:
        raise ValueError(f"data.source {source!r} unknown; expected one of {SOURCES}")
    if source == "meds":
        if not data.meds_dir:
            raise ValueError("data.source is 'meds' but data.meds_dir is empty: set it to a MEDS dataset folder")
        if data.meds_visit_hours < 0:
            raise ValueError(f"data.meds_visit_hours must be >= 0, got {data.meds_visit_hours}")


def task_cohort(config: Any, task: str) -> Cohort:
    """The cohort a task trains on: synthetic (pre-training or fine-tuning stream) or read from MEDS."""
    from ehrjax.data.tasks import PRETRAIN_TASKS, TASKS

    if task not in TASKS:
        raise ValueError(f"task {task!r} unknown; expected one of {TASKS}")
    validate_data_source(config.data)
    if config.data.source == "synthetic":
        section = config.pretrain if task in PRETRAIN_TASKS else config.finetune
        stream = "pretrain" if task in PRETRAIN_TASKS else "finetune"
        return generate_cohort(section.num_patients, section.seed, stream, config.data.num_noise_codes)
    from ehrjax.data.meds import read_meds

    visit_hours = float(config.data.meds_visit_hours)
    if task in PRETRAIN_TASKS:
        return read_meds(config.data.meds_pretrain_dir or config.data.meds_dir, visit_hours=visit_hours)
    if task == "next_visit":
        raise ValueError("task 'next_visit' needs next-visit labels, which MEDS label files do not carry; use "
                         "data.source='synthetic'")  # fmt: skip
    if not config.data.meds_labels:
        raise ValueError(f"task {task!r} on MEDS data needs data.meds_labels: a folder of MEDS label files")
    return read_meds(config.data.meds_dir, labels_dir=config.data.meds_labels, visit_hours=visit_hours)
