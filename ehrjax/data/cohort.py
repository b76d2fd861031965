"""Ragged (CSR) storage of a cohort's records.

Tokens of all patients are concatenated in flat int32 arrays; patient `i` owns
`offsets[i]:offsets[i + 1]`. Codes are indices into the cohort's own `code_names` catalogue (strings); a
`Vocab` maps those names to model ids. Per-patient arrays hold id, sex, birth year, split and task labels.
A label `X` with a companion `X_offsets` is ragged (CSR over patients), e.g. the next visit's codes.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ehrjax.atomic import atomic_write, check_output_path

SPLITS: tuple[str, ...] = ("train", "val", "test")
TOKEN_FIELDS: tuple[str, ...] = ("codes", "visit", "age", "time")
PATIENT_FIELDS: tuple[str, ...] = ("patient_id", "sex", "birth_year", "split")
_FORMAT = "ehrjax.cohort.v1"
_COUNT_CHUNK = 1 << 22  # codes per np.bincount call in Cohort.code_counts


def ragged_index(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat element indices of CSR rows `rows`, vectorised, and the offsets of the gathered rows.

    offsets: int64[n + 1]; rows: int[k]  ->  (index: int64[total], new_offsets: int64[k + 1])
    """
    rows = np.asarray(rows, dtype=np.int64)
    starts = offsets[rows]
    lens = offsets[rows + 1] - starts
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_offsets[1:])
    index = np.repeat(starts - new_offsets[:-1], lens) + np.arange(new_offsets[-1], dtype=np.int64)
    return index, new_offsets


@dataclasses.dataclass(frozen=True, eq=False)
class Cohort:
    """A cohort in CSR form.

    codes, visit, age, time: int32[n_tokens]  (code index, visit index within patient, age in months,
        days since the patient's first visit); tokens of a patient are in time order.
    offsets: int64[n_patients + 1]
    patient_id: int64[n]; sex: int8[n] (0 female, 1 male); birth_year: int16[n];
    split: int8[n] (index into SPLITS)
    code_names: str[n_codes] the catalogue `codes` index into.
    labels: per-patient task arrays (leading dim n) and ragged labels (`X` + `X_offsets`).
    """

    codes: np.ndarray
    visit: np.ndarray
    age: np.ndarray
    time: np.ndarray
    offsets: np.ndarray
    patient_id: np.ndarray
    sex: np.ndarray
    birth_year: np.ndarray
    split: np.ndarray
    code_names: np.ndarray
    labels: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        n_tokens = len(self.codes)
        for name in TOKEN_FIELDS:
            if getattr(self, name).shape != (n_tokens,):
                raise ValueError(f"cohort field {name!r} has shape {getattr(self, name).shape}, expected ({n_tokens},)")
        n = len(self.offsets) - 1
        if n < 0 or self.offsets[0] != 0 or self.offsets[-1] != n_tokens or np.any(np.diff(self.offsets) < 0):
            raise ValueError("cohort offsets must start at 0, never decrease and end at the number of tokens")
        for name in PATIENT_FIELDS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"cohort field {name!r} has {len(getattr(self, name))} rows, expected {n}")
        for name, value in self.labels.items():
            if name.endswith("_offsets"):
                if len(value) != n + 1 or name[: -len("_offsets")] not in self.labels:
                    raise ValueError(f"cohort label {name!r} must be offsets (n + 1) of a ragged label")
            elif name + "_offsets" not in self.labels and len(value) != n:
                raise ValueError(f"cohort label {name!r} has {len(value)} rows, expected {n}")
        if n_tokens and (self.codes.min() < 0 or self.codes.max() >= len(self.code_names)):
            raise ValueError("cohort codes must index into code_names")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def lengths(self) -> np.ndarray:
        """int64[n] number of code tokens per patient (no [CLS]/[SEP])."""
        return np.diff(self.offsets)

    @property
    def num_visits(self) -> np.ndarray:
        """int64[n] visits per patient."""
        last = self.offsets[1:] - 1
        out = np.zeros(len(self), dtype=np.int64)
        nonempty = self.lengths > 0
        out[nonempty] = self.visit[last[nonempty]].astype(np.int64) + 1
        return out

    def _ragged_labels(self) -> list[str]:
        return [k for k in self.labels if k + "_offsets" in self.labels]

    def select(self, rows: np.ndarray) -> Cohort:
        """The patients `rows` (indices or a boolean mask), in that order."""
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise ValueError(f"boolean row mask has shape {rows.shape}, expected ({len(self)},)")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"patient rows out of range [0, {len(self)})")
        index, offsets = ragged_index(self.offsets, rows)
        tokens = {name: getattr(self, name)[index] for name in TOKEN_FIELDS}
        patients = {name: getattr(self, name)[rows] for name in PATIENT_FIELDS}
        labels: dict[str, np.ndarray] = {}
        ragged = self._ragged_labels()
        for name in ragged:
            label_index, labels[name + "_offsets"] = ragged_index(self.labels[name + "_offsets"], rows)
            labels[name] = self.labels[name][label_index]
        for name, value in self.labels.items():
            if name not in labels:
                labels[name] = value[rows]
        return Cohort(
            **tokens, offsets=offsets, **patients, code_names=self.code_names, labels=labels, meta=dict(self.meta)
        )

    def __getitem__(self, key: slice) -> Cohort:
        if not isinstance(key, slice):
            raise TypeError("index a cohort with a slice of patients, or use select(rows)")
        return self.select(np.arange(len(self))[key])

    def patient(self, i: int) -> dict[str, Any]:
        """One patient's record as plain Python/numpy values (code strings included), for inspection."""
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        out: dict[str, Any] = {name: getattr(self, name)[i].item() for name in PATIENT_FIELDS}
        out["split"] = SPLITS[out["split"]]
        out.update({name: getattr(self, name)[lo:hi] for name in TOKEN_FIELDS})
        out["code_strings"] = [str(s) for s in self.code_names[self.codes[lo:hi]]]
        for name in self._ragged_labels():
            off = self.labels[name + "_offsets"]
            out[name] = self.labels[name][off[i] : off[i + 1]]
        for name, value in self.labels.items():
            if name not in out and not name.endswith("_offsets"):
                out[name] = value[i].item() if value.ndim == 1 else value[i]
        return out

    def code_counts(self) -> np.ndarray:
        """int64[n_codes] occurrences of each catalogue code.

        Counted in chunks: `np.bincount` converts its input to int64, and one conversion of a 1e6-patient
        cohort's codes is a fresh 270 MB buffer whose page faults cost more than the count itself."""
        counts = np.zeros(len(self.code_names), dtype=np.int64)
        for start in range(0, len(self.codes), _COUNT_CHUNK):
            counts += np.bincount(self.codes[start : start + _COUNT_CHUNK], minlength=len(counts))
        return counts

    def split_mask(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"split {split!r} unknown; expected one of {SPLITS}")
        return self.split == SPLITS.index(split)

    def summary(self, top_codes: int = 10) -> dict[str, Any]:
        """Patients, tokens, visits, length percentiles, split sizes and the most frequent codes."""
        lengths = self.lengths
        visits = self.num_visits
        counts = self.code_counts()
        order = np.argsort(-counts, kind="stable")[:top_codes]
        pct = (50, 90, 99)
        out: dict[str, Any] = {
            "patients": len(self),
            "tokens": self.num_tokens,
            "visits": int(visits.sum()),
            "distinct_codes": int((counts > 0).sum()),
            "tokens_per_patient_mean": float(lengths.mean()) if len(self) else 0.0,
            "tokens_per_patient_percentiles": {
                f"p{p}": float(np.percentile(lengths, p)) if len(self) else 0.0 for p in pct
            },
            "tokens_per_patient_max": int(lengths.max()) if len(self) else 0,
            "visits_per_patient_mean": float(visits.mean()) if len(self) else 0.0,
            "splits": {s: int((self.split == k).sum()) for k, s in enumerate(SPLITS)},
            "top_codes": [(str(self.code_names[i]), int(counts[i])) for i in order if counts[i] > 0],
        }
        if "outcome" in self.labels:
            y = self.labels["outcome"]
            eligible = y >= 0
            out["outcome_eligible"] = int(eligible.sum())
            out["outcome_prevalence"] = float(y[eligible].mean()) if eligible.any() else 0.0
        return out

    def format_summary(self, top_codes: int = 10) -> str:
        s = self.summary(top_codes)
        p = s["tokens_per_patient_percentiles"]
        lines = [
            f"patients {s['patients']:,}  tokens {s['tokens']:,}  visits {s['visits']:,}  "
            f"distinct codes {s['distinct_codes']:,}",
            f"tokens/patient mean {s['tokens_per_patient_mean']:.1f}  p50 {p['p50']:.0f}  p90 {p['p90']:.0f}  "
            f"p99 {p['p99']:.0f}  max {s['tokens_per_patient_max']}",
            f"visits/patient mean {s['visits_per_patient_mean']:.1f}",
            "splits " + "  ".join(f"{k} {v:,}" for k, v in s["splits"].items()),
        ]
        if "outcome_prevalence" in s:
            lines.append(f"outcome: {s['outcome_eligible']:,} eligible, prevalence {s['outcome_prevalence']:.3f}")
        lines.append("top codes " + ", ".join(f"{c} ({n:,})" for c, n in s["top_codes"]))
        edges = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        hist = np.histogram(self.lengths, bins=[0, *edges, np.inf])[0]
        labels = ["0"] + [f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in itertools.pairwise(edges)]
        labels.append(f">={edges[-1]}")
        lines.append("length histogram " + "  ".join(f"{lab}:{h}" for lab, h in zip(labels, hist, strict=True) if h))
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> None:
        """Write the cohort as `.npz`, atomically: a temporary file in the same folder, then a rename."""
        path = check_output_path(path, ".npz", "cohort output")
        arrays = {name: getattr(self, name) for name in TOKEN_FIELDS + ("offsets",) + PATIENT_FIELDS}
        arrays["code_names"] = np.asarray(self.code_names, dtype=str)
        arrays.update({f"label__{k}": v for k, v in self.labels.items()})
        arrays["format"] = np.asarray(_FORMAT)
        arrays["meta_keys"] = np.asarray(list(self.meta), dtype=str)
        arrays["meta_values"] = np.asarray([str(v) for v in self.meta.values()], dtype=str)
        try:
            atomic_write(path, lambda tmp: np.savez(tmp, **arrays))
        except OSError as err:
            raise ValueError(f"cohort output {path}: cannot write ({err.strerror or err})") from err

    @classmethod
    def load(cls, path: str | os.PathLike) -> Cohort:
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except FileNotFoundError as err:
            raise ValueError(f"cohort file {path}: does not exist") from err
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
            raise ValueError(f"cohort file {path}: not a readable .npz ({err})") from err
        if data.get("format") is None or str(data["format"]) != _FORMAT:
            raise ValueError(f"cohort file {path}: not an ehrjax cohort (expected format {_FORMAT})")
        missing = [k for k in TOKEN_FIELDS + ("offsets", *PATIENT_FIELDS, "code_names") if k not in data]
        if missing:
            raise ValueError(f"cohort file {path}: missing arrays {missing}")
        labels = {k[len("label__") :]: v for k, v in data.items() if k.startswith("label__")}
        meta = dict(zip(data["meta_keys"].tolist(), data["meta_values"].tolist(), strict=True))
        try:
            return cls(
                **{k: data[k] for k in TOKEN_FIELDS + ("offsets",) + PATIENT_FIELDS},
                code_names=data["code_names"],
                labels=labels,
                meta=meta,
            )
        except ValueError as err:
            raise ValueError(f"cohort file {path}: {err}") from err

    def equals(self, other: Cohort) -> bool:
        """Exact equality of every array and label."""
        names = TOKEN_FIELDS + ("offsets",) + PATIENT_FIELDS + ("code_names",)
        if any(not np.array_equal(getattr(self, k), getattr(other, k)) for k in names):
            return False
        if self.labels.keys() != other.labels.keys():
            return False
        return all(np.array_equal(v, other.labels[k], equal_nan=v.dtype.kind == "f") for k, v in self.labels.items())


def main(argv: list[str] | None = None) -> int:
    """`python -m ehrjax.data.cohort FILE.npz`: print a saved cohort's summary."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m ehrjax.data.cohort", description="Summarise a saved cohort.")
    parser.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    try:
        cohort = Cohort.load(args.path)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(cohort.format_summary())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
