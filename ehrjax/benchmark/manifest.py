"""What a benchmark directory holds and how it was made: the stage manifest and the cohort fingerprints.

`Manifest` (`manifest.json`) records every finished stage and grid cell with the config that produced it, so
a rerun with `--config.resume=DIR` skips them; a changed config is refused rather than mixed in.

Cohort fingerprints answer "are two runs comparable?": per array, a SHA-256 of the whole cohort and a 64-bit
hash per patient (`patient_hashes.npz`). Patient `i` of a synthetic stream depends only on (seed, stream, i), so
a cohort of 4,718 patients must equal the first 4,718 of a cohort of 5,000: `python -m ehrjax.benchmark.manifest
DIR_A DIR_B` compares the common prefix of two benchmark directories array by array.
"""

from __future__ import annotations

import hashlib
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ehrjax.atomic import read_json
from ehrjax.data.cohort import Cohort
from ehrjax.train.rundir import write_json, write_npz

TOKEN_ARRAYS: tuple[str, ...] = ("codes", "visit", "age", "time")
PATIENT_ARRAYS: tuple[str, ...] = ("patient_id", "sex", "birth_year", "split")
_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised (uint64 arithmetic wraps)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK
        return x ^ (x >> np.uint64(31))


def patient_hashes(cohort: Cohort) -> dict[str, np.ndarray]:
    """uint64[n] per array: a hash of each patient's values (token arrays: order-sensitive over the patient's
    tokens, with the code as its name so catalogues may differ), so prefixes of cohorts compare patient by
    patient. Labels are included (`label:<name>` for per-patient labels)."""
    n = len(cohort)
    offsets = np.asarray(cohort.offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    owner = np.repeat(np.arange(n), lengths)
    position = np.arange(offsets[-1], dtype=np.int64) - offsets[owner]
    out: dict[str, np.ndarray] = {}
    names = np.asarray(cohort.code_names)
    name_hash = np.asarray([int.from_bytes(hashlib.blake2b(str(c).encode(), digest_size=8).digest(), "little")
                            for c in names], dtype=np.uint64)  # fmt: skip
    for field in TOKEN_ARRAYS:
        values = getattr(cohort, field)
        values = name_hash[values] if field == "codes" else np.asarray(values, dtype=np.int64).astype(np.uint64)
        token = _mix(values ^ _mix(position.astype(np.uint64)))
        per_patient = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.add.at(per_patient, owner, token)
        out[field] = _mix(per_patient ^ lengths.astype(np.uint64))
    for field in PATIENT_ARRAYS:
        out[field] = _mix(np.asarray(getattr(cohort, field), dtype=np.int64).astype(np.uint64))
    for name, values in cohort.labels.items():
        values = np.asarray(values)
        if values.shape == (n,) and f"{name}_offsets" not in cohort.labels and not name.endswith("_offsets"):
            out[f"label:{name}"] = _mix(np.ascontiguousarray(values.astype(np.float64)).view(np.uint64))
    return out


def cohort_fingerprint(cohort: Cohort, hashes: dict[str, np.ndarray]) -> dict[str, Any]:
    """The manifest entry of a cohort: size, tokens, a SHA-256 per array (over the per-patient hashes, so it
    also identifies the patients' order) and `prefix_hash` over all of them."""
    digests = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in hashes.items()}
    combined = hashlib.sha256("".join(digests[k] for k in sorted(digests)).encode()).hexdigest()
    return {"num_patients": len(cohort), "tokens": int(cohort.offsets[-1]), "hashes": digests,
            "prefix_hash": combined}  # fmt: skip


def save_patient_hashes(path: str | os.PathLike, hashes: dict[str, np.ndarray]) -> None:
    write_npz(path, {k.replace(":", "__"): v for k, v in hashes.items()})


def _load_hashes(path: Path) -> dict[str, np.ndarray]:
    """The per-patient hash arrays of a `*_patient_hashes.npz`, or a one-line ValueError naming it."""
    if not path.is_file():
        raise ValueError(f"{path}: missing; not a benchmark directory whose cohorts stage finished")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz ({' '.join(str(err).split())})") from err
    if not arrays:
        raise ValueError(f"{path}: holds no hash arrays")
    sizes = {k: v.shape for k, v in arrays.items()}
    bad = [k for k, v in arrays.items() if v.ndim != 1 or v.dtype != np.uint64]
    if bad:
        raise ValueError(f"{path}: array {bad[0]!r} is {arrays[bad[0]].dtype}{list(sizes[bad[0]])}, expected uint64[n]")
    if len({v.shape for v in arrays.values()}) != 1:
        raise ValueError(f"{path}: arrays of different lengths ({', '.join(f'{k}={v[0]}' for k, v in sizes.items())})")
    return arrays


def compare_prefixes(dir_a: str | os.PathLike, dir_b: str | os.PathLike) -> dict[str, Any]:
    """Per stream and array: whether the first min(n_a, n_b) patients of two benchmark directories are
    identical, with the SHA-256 of that common prefix in each. An array that only one side holds is a
    difference (`only_in`), and so is a comparison of no common array at all: `identical` means every array of
    both sides was compared and found equal."""
    out: dict[str, Any] = {}
    for stream in ("pretrain", "finetune"):
        paths = [Path(d) / "cohorts" / f"{stream}_patient_hashes.npz" for d in (dir_a, dir_b)]
        a, b = (_load_hashes(p) for p in paths)
        sizes = [len(next(iter(a.values()))), len(next(iter(b.values())))]
        k = min(sizes)
        arrays: dict[str, Any] = {}
        for name in sorted(set(a) | set(b)):
            label = name.replace("__", ":")
            if name not in b or name not in a:
                arrays[label] = {"identical": False, "only_in": "a" if name in a else "b",
                                 "sha256_a": "", "sha256_b": ""}  # fmt: skip
                continue
            ha = hashlib.sha256(a[name][:k].tobytes()).hexdigest()
            hb = hashlib.sha256(b[name][:k].tobytes()).hexdigest()
            arrays[label] = {"identical": ha == hb, "sha256_a": ha, "sha256_b": hb}
        common = sum("only_in" not in v for v in arrays.values())
        out[stream] = {"common_prefix": k, "sizes": sizes, "arrays": arrays, "common_arrays": common,
                       "identical": common > 0 and all(v["identical"] for v in arrays.values())}  # fmt: skip
    return out


class Manifest:
    """`manifest.json` of a benchmark directory: `{"config": ..., "stages": {name: record}}`, rewritten
    atomically after every finished stage or grid cell (process 0 only)."""

    def __init__(self, directory: str | os.PathLike, config: dict[str, Any], *, resume: bool):
        self.path = Path(directory) / "manifest.json"
        self.stages: dict[str, Any] = {}
        self.saved_config: dict[str, Any] | None = None
        if not resume and self.path.exists():  # a new benchmark never overwrites a finished one's record
            raise ValueError(f"output_dir {self.path.parent}: already holds a benchmark (manifest.json); continue it "
                             f"with --config.resume={self.path.parent} or choose a new folder")  # fmt: skip
        if resume and self.path.is_file():
            saved = read_json(self.path, "benchmark manifest")
            if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) \
                    or not isinstance(saved.get("stages", {}), dict):  # fmt: skip
                raise ValueError(f"benchmark manifest {self.path}: expected a JSON object with a 'config' object "
                                 "and a 'stages' object (hand-edited or not a manifest)")  # fmt: skip
            for name, record in saved.get("stages", {}).items():
                if not isinstance(record, dict):
                    raise ValueError(f"benchmark manifest {self.path}: stage {name!r} is not a JSON object")
            self.stages = saved.get("stages", {})
            self.saved_config = saved["config"]
        self.config = config

    def done(self, name: str) -> dict[str, Any] | None:
        return self.stages.get(name)

    def record(self, name: str, payload: dict[str, Any]) -> None:
        self.stages[name] = payload
        from ehrjax.train.rundir import is_writer

        if is_writer():
            write_json(self.path, {"config": self.config, "stages": self.stages})


def main(argv: list[str] | None = None) -> int:
    """`python -m ehrjax.benchmark.manifest DIR_A DIR_B`: compare the cohorts of two benchmark directories."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m ehrjax.benchmark.manifest DIR_A DIR_B", file=sys.stderr)
        return 2
    try:
        result = compare_prefixes(*args)
    except (ValueError, OSError) as err:
        from ehrjax.cli import error_line

        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    for stream, r in result.items():
        note = "" if r["common_arrays"] else "; no array in common"
        print(f"{stream}: sizes {r['sizes'][0]:,} and {r['sizes'][1]:,}; first {r['common_prefix']:,} patients "
              f"{'IDENTICAL' if r['identical'] else 'DIFFER'}{note}")  # fmt: skip
        for name, v in r["arrays"].items():
            if "only_in" in v:
                print(f"  {name:<22} {'MISSING':<9}  only in {'DIR_A' if v['only_in'] == 'a' else 'DIR_B'}")
                continue
            verdict = "same" if v["identical"] else "DIFFERENT"
            print(f"  {name:<22} {verdict:<9}  {v['sha256_a'][:16]}  {v['sha256_b'][:16]}")
    return 0 if all(r["identical"] for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
