"""Shared builder: a `Cohort` from hand-written per-patient visits, for the tokenizer tests."""

from __future__ import annotations

import numpy as np

from ehrjax.data.cohort import Cohort


def cohort_from_visits(patients: list[list[tuple[int, int, list[int]]]], code_names: np.ndarray,
                       splits: list[int] | None = None) -> Cohort:  # fmt: skip
    """Each patient a list of visits `(day, age in months, code indices)`; sex 0, born 1950, split 0 unless
    `splits` gives one per patient."""
    codes, visit, age, time, lengths = [], [], [], [], []
    for visits in patients:
        lengths.append(sum(len(c) for _, _, c in visits))
        for v, (day, months, visit_codes) in enumerate(visits):
            codes += visit_codes
            visit += [v] * len(visit_codes)
            age += [months] * len(visit_codes)
            time += [day] * len(visit_codes)
    n = len(patients)
    return Cohort(
        codes=np.asarray(codes, dtype=np.int32),
        visit=np.asarray(visit, dtype=np.int32),
        age=np.asarray(age, dtype=np.int32),
        time=np.asarray(time, dtype=np.int32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        patient_id=np.arange(n, dtype=np.int64),
        sex=np.zeros(n, dtype=np.int8),
        birth_year=np.full(n, 1950, dtype=np.int16),
        split=np.asarray(splits if splits is not None else [0] * n, dtype=np.int8),
        code_names=code_names,
    )
