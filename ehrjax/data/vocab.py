"""String <-> id vocabulary of clinical codes, with BEHRT's special tokens first.

Codes are strings with a system prefix (`ICD10:E11.9`, `RX:metformin`, `NOISE:0042`). A `Vocab` is built
from a cohort once (pre-training), saved as JSON next to every checkpoint and embedding export, and frozen.

With time tokens on (`data.time_tokens`), the 16 gap tokens `TIME_TOKENS` close the vocabulary: ids
`NUM_SPECIAL .. code_end - 1` are clinical codes and `code_end ..` time tokens, so code-only consumers (MLM
targets, the MLM baselines, code metrics) bound their ids by `code_end`; without them `code_end == len(vocab)`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ehrjax.atomic import write_text

PAD, CLS, SEP, MASK, UNK = 0, 1, 2, 3, 4
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
NUM_SPECIAL = len(SPECIAL_TOKENS)
# The gap between consecutive visits (`ehrjax.data.tokenize.time_gap_index`): weeks W0-W3 under 28 days,
# months M1-M11 under 360 days, LT from 360 days on.
TIME_TOKENS: tuple[str, ...] = (
    *(f"TIME:W{w}" for w in range(4)), *(f"TIME:M{m}" for m in range(1, 12)), "TIME:LT",
)  # fmt: skip


class Vocab:
    """An immutable mapping between code strings and int ids; ids below `NUM_SPECIAL` are special."""

    def __init__(self, codes: Sequence[str]):
        codes = list(codes)
        if tuple(codes[:NUM_SPECIAL]) != SPECIAL_TOKENS:
            codes = list(SPECIAL_TOKENS) + [c for c in codes if c not in SPECIAL_TOKENS]
        if len(set(codes)) != len(codes):
            dup = next(c for c in codes if codes.count(c) > 1)
            raise ValueError(f"vocab codes must be unique; {dup!r} appears twice")
        timed = [i for i, c in enumerate(codes) if c.startswith("TIME:")]
        if timed and tuple(codes[timed[0]:]) != TIME_TOKENS:
            raise ValueError(f"vocab codes: time tokens must close the vocabulary as the block {TIME_TOKENS[0]}.."
                             f"{TIME_TOKENS[-1]}; got {len(timed)} TIME: codes from id {timed[0]}")  # fmt: skip
        self._codes: tuple[str, ...] = tuple(codes)
        self._index: dict[str, int] = {c: i for i, c in enumerate(self._codes)}
        self.code_end: int = timed[0] if timed else len(codes)

    @property
    def has_time_tokens(self) -> bool:
        return self.code_end < len(self._codes)

    def time_token_ids(self) -> np.ndarray:
        """int32[16] ids of TIME_TOKENS, in their order (gap index -> id). A ValueError without time tokens."""
        if not self.has_time_tokens:
            raise ValueError("vocab: no time tokens (build it with time_tokens=True, data.time_tokens)")
        return np.arange(self.code_end, len(self._codes), dtype=np.int32)

    @classmethod
    def build(
        cls, code_names: Sequence[str], code_counts: np.ndarray, min_count: int = 1, *, time_tokens: bool = False
    ) -> Vocab:
        """Vocabulary of the codes seen at least `min_count` times, most frequent first (ties by name), then
        the time tokens when `time_tokens`.

        code_names: str[n_codes]; code_counts: int[n_codes] occurrences of each code in a cohort.
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = np.asarray(code_counts)
        if counts.shape != (len(code_names),):
            raise ValueError(f"code_counts has shape {counts.shape}, expected ({len(code_names)},)")
        keep = [(int(-counts[i]), str(code_names[i])) for i in np.flatnonzero(counts >= min_count)]
        keep.sort()
        names = [name for _, name in keep]
        if any(name.startswith("TIME:") for name in names):
            raise ValueError("cohort codes: the TIME: prefix is reserved for time tokens")
        return cls(names + list(TIME_TOKENS if time_tokens else ()))

    @property
    def codes(self) -> tuple[str, ...]:
        return self._codes

    def __len__(self) -> int:
        return len(self._codes)

    def __contains__(self, code: str) -> bool:
        return code in self._index

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self._codes == other._codes

    def __hash__(self) -> int:
        return hash(self._codes)

    def __repr__(self) -> str:
        return f"Vocab({len(self)} codes, {len(self) - NUM_SPECIAL} clinical)"

    def id(self, code: str) -> int:
        """Id of `code`; `[UNK]` for codes outside the vocabulary."""
        return self._index.get(code, UNK)

    def ids(self, codes: Iterable[str]) -> np.ndarray:
        """int32 ids of `codes`, `[UNK]` for unknown ones."""
        return np.fromiter((self._index.get(c, UNK) for c in codes), dtype=np.int32)

    def code(self, idx: int) -> str:
        return self._codes[idx]

    def is_special(self, ids: np.ndarray) -> np.ndarray:
        return np.asarray(ids) < NUM_SPECIAL

    def to_json(self) -> str:
        return json.dumps({"format": "ehrjax.vocab", "version": 1, "codes": list(self._codes)})

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as JSON atomically (a temporary file, then a rename)."""
        write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"vocab file {path}: cannot read JSON ({err})") from err
        if not isinstance(payload, dict) or not isinstance(payload.get("codes"), list):
            raise ValueError(f"vocab file {path}: expected a JSON object with a 'codes' list")
        codes = payload["codes"]
        if tuple(codes[:NUM_SPECIAL]) != SPECIAL_TOKENS:
            raise ValueError(f"vocab file {path}: expected the special tokens {SPECIAL_TOKENS} first")
        return cls(codes)
