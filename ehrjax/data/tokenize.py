"""BEHRT's token layout of a cohort: `[CLS] v1 codes [SEP] v2 codes [SEP] ...`, truncated to the most recent.

Each patient becomes `[CLS]` followed by its codes (as vocabulary ids) with a `[SEP]` closing every visit.
Truncation to `max_len` tokens (`[CLS]` and `[SEP]`s included) cuts whole leading tokens, so the most recent
ones stay; a `[SEP]` left at the front by the cut is dropped, so the first token after `[CLS]` is a code.
Visit indices count the `[SEP]`s before a token and restart at 0 on the first kept visit; `[CLS]` carries the
first kept token's age and visit 0. Everything is vectorised over the flat CSR arrays.

With `time_tokens` (`data.time_tokens`, CEHR-BERT's artificial time tokens) a gap token opens every visit but
the first: `[CLS] v1 [SEP] W2 v2 [SEP] LT v3 [SEP]`. The gap is the days between the visit's first code and the
previous visit's last code (`Cohort.time`): W0-W3 for 0-6, 7-13, 14-20 and 21-27 days, M1-M11 for
`days // 30` months from 28 up to 359 days (28-59 days is M1), LT from 360 days. A gap token carries its
visit's index and age, and a cut that leaves one in front drops it, as it drops a leading `[SEP]`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ehrjax.data.cohort import Cohort
from ehrjax.data.vocab import CLS, SEP, Vocab

MIN_MAX_LEN = 3  # [CLS], one code and its [SEP]


def time_gap_index(days: np.ndarray) -> np.ndarray:
    """Index into `TIME_TOKENS` of each gap in days: int[...] -> int64[...] (0-3 weeks, 4-14 months, 15 LT)."""
    days = np.maximum(np.asarray(days, dtype=np.int64), 0)
    return np.where(days < 28, days // 7, np.where(days < 360, 3 + np.clip(days // 30, 1, 11), 15))


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """Laid-out patients in CSR form, in cohort order (patient `i` of the corpus is patient `i` of the cohort).

    codes: int32[T] vocabulary ids with [CLS]/[SEP] inserted; ages: int32[T] months; visits: int32[T]
    visit index within the patient (0 for [CLS]); offsets: int64[n + 1]; max_len: truncation length;
    num_truncated: patients whose layout was cut.
    """

    codes: np.ndarray
    ages: np.ndarray
    visits: np.ndarray
    offsets: np.ndarray
    max_len: int
    num_truncated: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """int32[n] tokens per patient, [CLS] and [SEP]s included (1 <= length <= max_len)."""
        return np.diff(self.offsets).astype(np.int32)

    def patient(self, i: int) -> dict[str, np.ndarray]:
        """One patient's `codes`, `ages` and `visits` (views into the flat arrays)."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return {"codes": self.codes[lo:hi], "ages": self.ages[lo:hi], "visits": self.visits[lo:hi]}


def tokenize(cohort: Cohort, vocab: Vocab, max_len: int, *, time_tokens: bool = False) -> TokenizedCorpus:
    """Lay out every patient of `cohort` with `vocab` ids, keeping at most `max_len` most recent tokens;
    `time_tokens`: a gap token before every visit but the first (module docstring; `vocab` must hold them)."""
    if time_tokens and not vocab.has_time_tokens:
        raise ValueError("data.time_tokens: the vocabulary has no time tokens (a run without data.time_tokens "
                         "built it); pre-train with data.time_tokens=True")  # fmt: skip
    if max_len < MIN_MAX_LEN:
        raise ValueError(f"data.max_len must be >= {MIN_MAX_LEN} ([CLS], a code and its [SEP]), got {max_len}")
    n = len(cohort)
    if n == 0:
        raise ValueError("cohort: no patients to tokenise (empty cohort)")
    offsets = np.asarray(cohort.offsets, dtype=np.int64)
    lens = np.diff(offsets)
    num_codes = int(offsets[-1])
    ids = vocab.ids(cohort.code_names)[cohort.codes]
    age = np.asarray(cohort.age, dtype=np.int32)

    # A code closes its visit when the next code belongs to another visit or another patient.
    closes = np.ones(num_codes, dtype=bool)
    closes[:-1] = cohort.visit[1:] != cohort.visit[:-1]
    closes[offsets[1:][lens > 0] - 1] = True
    closes_before = np.zeros(num_codes + 1, dtype=np.int64)
    np.cumsum(closes, out=closes_before[1:])

    # A code opens a visit with a gap token when the code before it closed a visit of the same patient.
    opens = np.zeros(num_codes, dtype=bool)
    if time_tokens:
        opens[1:] = closes[:-1]
        opens[offsets[:-1][lens > 0]] = False
    extra_before = np.zeros(num_codes + 1, dtype=np.int64)
    np.cumsum(closes.astype(np.int64) + opens, out=extra_before[1:])

    # The full layout without [CLS]: each code, preceded by its gap token when it opens a visit and followed by
    # a [SEP] when it closes one. One extra dummy entry at the end gives the [CLS] positions a safe gather index.
    width = opens + 1 + closes.astype(np.int64)
    code_pos = np.cumsum(width) - width + opens
    sep_pos = code_pos[closes] + 1
    time_pos = code_pos[opens] - 1
    full_len = num_codes + int(extra_before[-1])
    full_codes = np.full(full_len + 1, SEP, dtype=np.int32)
    full_codes[code_pos] = ids
    full_is_sep = np.ones(full_len + 1, dtype=bool)
    full_is_sep[code_pos] = False
    full_is_sep[time_pos] = False
    full_is_time = np.zeros(full_len + 1, dtype=bool)
    full_ages = np.zeros(full_len + 1, dtype=np.int32)
    full_ages[code_pos] = age
    full_ages[sep_pos] = age[closes]
    visit_rank = closes_before[:-1] - np.repeat(closes_before[offsets[:-1]], lens)
    full_visits = np.zeros(full_len + 1, dtype=np.int64)
    full_visits[code_pos] = visit_rank
    full_visits[sep_pos] = visit_rank[closes]
    if time_tokens:
        days = np.asarray(cohort.time, dtype=np.int64)
        opening = np.flatnonzero(opens)
        full_codes[time_pos] = vocab.time_token_ids()[time_gap_index(days[opening] - days[opening - 1])]
        full_is_time[time_pos] = True
        full_ages[time_pos] = age[opens]
        full_visits[time_pos] = visit_rank[opens]
    full_offsets = offsets + extra_before[offsets]

    # Keep the last max_len - 1 entries; drop a [SEP] and then a gap token the cut leaves in front.
    ends = full_offsets[1:]
    keep_from = np.maximum(full_offsets[:-1], ends - (max_len - 1))
    keep_from += (keep_from < ends) & full_is_sep[keep_from]
    keep_from += (keep_from < ends) & full_is_time[keep_from]
    kept = ends - keep_from

    out_offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(1 + kept, out=out_offsets[1:])
    total = int(out_offsets[-1])
    src = np.repeat(keep_from - out_offsets[:-1] - 1, 1 + kept) + np.arange(total, dtype=np.int64)
    src[out_offsets[:-1]] = full_len  # [CLS] positions read the dummy entry
    first = np.where(kept > 0, keep_from, full_len)

    codes = full_codes[src]
    codes[out_offsets[:-1]] = CLS
    ages = full_ages[src]
    ages[out_offsets[:-1]] = full_ages[first]
    visits = full_visits[src] - np.repeat(full_visits[first], 1 + kept)
    visits[out_offsets[:-1]] = 0
    num_truncated = int(np.sum(np.diff(full_offsets) > max_len - 1))
    return TokenizedCorpus(
        codes=codes,
        ages=ages,
        visits=visits.astype(np.int32),
        offsets=out_offsets,
        max_len=int(max_len),
        num_truncated=num_truncated,
    )
