"""Third-party code embeddings -> the model's code table, with a coverage report.

Formats, chosen by extension (then content for other text files):

* Med2Vec `X.npz` with exactly `W_emb, b_emb, W_hidden, b_hidden, W_output, b_output` (float32 or float64)
  plus its code -> row map. The map is `codes_path` if given (JSON or, by its content, a pickle), else the
  first of `X.types.json`, `X.json` (safe JSON, preferred) and `X.types` (the original tool's pickled dict,
  read only with `allow_pickle=True`). The original tool saves epoch k as `X.k.npz` beside the `X.types` of
  its input, so for `X.k.npz` the maps of `X` (`X.types.json`, then `X.types`) are looked for too.
  Code vectors are `ReLU(W_emb)`, as in the paper.
* word2vec text (`.txt`, `.vec`, `.w2v` or any text file): a header `n d`, then `code v1 ... vd` per line.
  A file without the header (GloVe) is read too. Percent-escaped whitespace and `%` in names (`%20`, `%25`,
  as ehrjax's export writes them, `escape_word2vec_code`) are decoded.
* cui2vec-style CSV (`.csv`): the first column is the concept id (or code), the others the vector; a header
  row is optional (detected: a first row whose values are not numbers, or one with an empty first cell and
  the column numbers, as pandas writes it).
* a local Hugging Face model folder: `model.safetensors` (or a sharded `model.safetensors.index.json`) and
  `vocab.txt` (token per line, row = line) or `tokenizer.json` (`model.vocab` plus `added_tokens`). The
  table is the tensor `tensor_name`, else the one tensor named `*embeddings.word_embeddings.weight`; rows
  beyond the vocabulary are ignored. A pickled `pytorch_model.bin` is read (with torch, `weights_only`) only
  with `allow_pickle=True`.
* `X.npy` f[n, d] plus a JSON codes file (`codes_path`, else `X.json`, `X.vocab.json`, `X.types.json`):
  a list of codes (row i = code i), a `{code: row}` map, or an ehrjax Vocab JSON (rows = vocab ids; rows of
  special tokens are ignored).
* an ehrjax code-table export (`ehrjax.train.export.export_code_table`): `X.npz` or `X.safetensors` with
  the single array `code_embeddings`, codes from the JSON files above or `vocab.json` in the same folder.

Matching to the vocabulary, for each clinical code of the vocabulary: the identical code string first;
otherwise a normalised key: the system prefix stripped (`ICD9:`, `ICD10:`, `RX:`, any `NAME:` or a
one-letter `D_` style prefix), upper case, dots removed; so `D_428.0`, `428.0`, `4280` and `ICD9:428.0`
all match. The key ignores the system, so codes of different systems can meet (`RX:1` and `LAB:1`);
such matches are counted (`cross_system`) and `normalize=False` turns normalised matching off. When several
file codes share the key, the one whose system prefix equals the vocabulary code's wins, then the first in
file row order; such codes are counted as ambiguous. A file row may feed several vocabulary codes.

The table, f32[len(vocab), d]:

* imported rows are rescaled (`rescale`): `match_init` (default) multiplies all imported vectors by one
  factor so that their mean row norm equals that of the model's default init rows, `init_std * sqrt(d)`
  (`ehrjax.models.embeddings.EMBED_INIT` is normal(0.02)): cosine geometry and relative norms are kept;
  `standardize` centres every dimension and scales entries to std `init_std`; `none` keeps the file's
  values;
* codes missing from the file: `missing_init='normal'` draws normal(0, s) with s the std of the imported
  (rescaled) entries, from `seed`; `'zeros'` leaves them zero;
* special tokens are never taken from the file: normal(0, s) like missing codes, from `seed`, and the
  `[PAD]` row is zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import jax
import jax.numpy as jnp
import numpy as np

from ehrjax.atomic import write_json
from ehrjax.cli import one_line
from ehrjax.data.cohort import Cohort
from ehrjax.data.vocab import NUM_SPECIAL, PAD, SPECIAL_TOKENS, Vocab
from ehrjax.models.behrt import CODE_TABLE_PATH, path_names

MED2VEC_KEYS: frozenset[str] = frozenset({"W_emb", "b_emb", "W_hidden", "b_hidden", "W_output", "b_output"})
EHRJAX_TABLE_KEY = "code_embeddings"  # ehrjax.train.export.export_code_table: rows = vocab ids, vocab.json beside
HF_TABLE_SUFFIX = "embeddings.word_embeddings.weight"  # BERT-style input embeddings in a Hugging Face model
RESCALE_MODES: tuple[str, ...] = ("match_init", "standardize", "none")
MISSING_INITS: tuple[str, ...] = ("normal", "zeros")
DEFAULT_INIT_STD = 0.02  # the model's code-table init, ehrjax.models.embeddings.EMBED_INIT

_SYSTEM = re.compile(r"^(?:([A-Za-z][A-Za-z0-9_\-]*):|([A-Za-z])_)(.*)$")


def split_code(code: str) -> tuple[str, str]:
    """`ICD9:428.0` -> (`ICD9`, `4280`); `D_428.0` -> (`D`, `4280`); `428.0` -> (``, `4280`).

    The second part is the normalised key: system prefix stripped, upper case, dots and spaces removed.
    """
    code = code.strip()
    m = _SYSTEM.match(code)
    system, rest = ((m.group(1) or m.group(2)).upper(), m.group(3)) if m else ("", code)
    return system, rest.upper().replace(".", "").replace(" ", "")


def normalize_code(code: str) -> str:
    """The matching key of a code string (see `split_code`)."""
    return split_code(code)[1]


@dataclasses.dataclass(frozen=True)
class CodeMatch:
    """rows: int64[len(vocab)] file row per vocab id (-1: none); exact: bool[len(vocab)]; ambiguous: vocab
    codes whose key several file codes share; cross_system: normalised matches between two different
    non-empty systems (e.g. `D_428.0` -> `ICD9:428.0`, but also `RX:1` -> `LAB:1`: worth a look)."""

    rows: np.ndarray
    exact: np.ndarray
    ambiguous: int
    cross_system: int

    @property
    def matched(self) -> np.ndarray:
        return self.rows >= 0


def match_codes(file_codes: Sequence[str | None], vocab: Vocab, *, normalize: bool = True) -> CodeMatch:
    """Match the vocabulary's clinical codes to file rows (`None` or special-token rows never match).

    Exact string first; then, with `normalize`, the normalised key (module docstring).
    """
    exact_index: dict[str, int] = {}
    by_key: dict[str, list[tuple[int, str]]] = {}
    for row, code in enumerate(file_codes):
        if code is None or code in SPECIAL_TOKENS:
            continue
        exact_index.setdefault(code, row)
        system, key = split_code(code)
        if key:
            by_key.setdefault(key, []).append((row, system))
    rows = np.full(len(vocab), -1, dtype=np.int64)
    exact = np.zeros(len(vocab), dtype=bool)
    ambiguous = cross_system = 0
    for vid in range(NUM_SPECIAL, len(vocab)):
        code = vocab.code(vid)
        if code in exact_index:
            rows[vid], exact[vid] = exact_index[code], True
            continue
        system, key = split_code(code)
        candidates = by_key.get(key) if normalize and key else None
        if not candidates:
            continue
        ambiguous += len(candidates) > 1
        same_system = [c for c in candidates if c[1] == system]
        rows[vid], file_system = (same_system or candidates)[0]
        cross_system += bool(system and file_system and system != file_system)
    return CodeMatch(rows, exact, ambiguous, cross_system)


@dataclasses.dataclass
class CoverageReport:
    """How much of a vocabulary (and of a cohort's tokens) an embedding file covers."""

    path: str
    file_format: str
    codes_path: str | None
    dim: int
    file_codes: int
    vocab_codes: int  # clinical codes of the vocabulary (specials excluded)
    matched_exact: int
    matched_normalized: int
    ambiguous: int
    cross_system: int
    file_codes_used: int
    tokens_total: int | None
    tokens_exact: int | None
    tokens_normalized: int | None
    unmatched_examples: list[str]
    rescale: str
    scale: float
    missing_init: str
    fill_std: float

    @property
    def matched(self) -> int:
        return self.matched_exact + self.matched_normalized

    @property
    def vocab_share(self) -> float:
        """Share of the vocabulary's clinical codes that got a vector from the file."""
        return self.matched / self.vocab_codes if self.vocab_codes else 0.0

    @property
    def token_share(self) -> float | None:
        """Share of the cohort's clinical-code tokens whose code got a vector (None without counts)."""
        if self.tokens_total is None:
            return None
        return (self.tokens_exact + self.tokens_normalized) / self.tokens_total if self.tokens_total else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(matched=self.matched, vocab_share=self.vocab_share, token_share=self.token_share)
        return out

    def format(self) -> str:
        """A few lines for the terminal or a report."""
        lines = [
            f"embeddings {self.path} ({self.file_format}, {self.file_codes:,} codes x {self.dim})"
            + (f", codes from {self.codes_path}" if self.codes_path else ""),
            f"vocabulary: {self.matched:,}/{self.vocab_codes:,} codes matched ({self.vocab_share:.1%}): "
            f"{self.matched_exact:,} exact, {self.matched_normalized:,} normalised "
            f"({self.ambiguous:,} ambiguous, {self.cross_system:,} across systems); "
            f"{self.file_codes_used:,} file codes used",
        ]
        if self.token_share is not None:
            lines.append(
                f"tokens: {self.tokens_exact + self.tokens_normalized:,}/{self.tokens_total:,} covered "
                f"({self.token_share:.1%}): {self.tokens_exact:,} exact, {self.tokens_normalized:,} normalised"
            )
        if self.unmatched_examples:
            lines.append("unmatched, e.g.: " + ", ".join(self.unmatched_examples))
        lines.append(
            f"rescale {self.rescale} (x{self.scale:.4g}); missing codes {self.missing_init} "
            f"(std {self.fill_std:.4g}); special tokens random, [PAD] zero"
        )
        return "\n".join(lines)

    def save(self, path: str | os.PathLike) -> None:
        """Write `as_dict()` as strict JSON atomically (`ehrjax.atomic.write_json`)."""
        write_json(path, self.as_dict(), strict=True)


def vocab_token_counts(cohort: Cohort, vocab: Vocab) -> np.ndarray:
    """int64[len(vocab)] occurrences of each vocabulary id in `cohort` (codes outside it count as [UNK])."""
    counts = np.zeros(len(vocab), dtype=np.int64)
    np.add.at(counts, vocab.ids(cohort.code_names), cohort.code_counts())
    return counts


def escape_word2vec_code(code: str) -> str:
    """A code as a word2vec name: whitespace and `%` percent-escaped as UTF-8 (`A B%` -> `A%20B%25`)."""
    return "".join(quote(ch, safe="") if ch.isspace() or ch == "%" else ch for ch in code)


_ESCAPED_RUN = re.compile(r"(?:%[0-9A-F]{2})+")


def unescape_word2vec_code(name: str) -> str:
    """Undo `escape_word2vec_code`: escapes that decode to whitespace or `%` are decoded, others kept."""

    def decode(match: re.Match) -> str:
        try:
            text = unquote(match.group(), errors="strict")
        except UnicodeDecodeError:
            return match.group()
        return "".join(ch if ch.isspace() or ch == "%" else quote(ch, safe="") for ch in text)

    return _ESCAPED_RUN.sub(decode, name) if "%" in name else name


def sibling(path: Path, suffix: str) -> Path:
    """`model.9.npz` + `.types.json` -> `model.9.types.json` (only the last suffix is replaced)."""
    return path.with_name(path.name[: len(path.name) - len(path.suffix)] + suffix)


_EPOCH = re.compile(r"^(?P<stem>.+)\.\d+$")


def epoch_stem(path: Path) -> Path | None:
    """`X.9.npz` -> `X` (the original Med2Vec tool's per-epoch output, beside its input's `X.types`); else None."""
    m = _EPOCH.match(path.name[: len(path.name) - len(path.suffix)])
    return path.with_name(m["stem"]) if m else None


def _is_json_file(path: Path) -> bool:
    """Whether a code map file holds JSON (its first non-blank byte opens an object or a list), whatever its
    name: a pickle never starts so."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return path.suffix == ".json"
    return head[:1] in (b"{", b"[")


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((p for p in candidates if p.is_file()), None)


def _read_json(path: Path, what: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"embedding file {what}: codes file {path} is not readable JSON ({one_line(err)})") from err


def _codes_from_map(mapping: Any, n_rows: int, path: Path, source: Path) -> list[str | None]:
    """A `{code: row}` map covering rows 0..n-1 exactly once -> codes by row."""
    if not isinstance(mapping, Mapping):
        raise ValueError(f"embedding file {path}: codes file {source} must hold a {{code: row}} map")
    if len(mapping) != n_rows:
        raise ValueError(f"embedding file {path}: {n_rows} vectors but the codes map {source} has {len(mapping)} codes")
    codes: list[str | None] = [None] * n_rows
    for code, row in mapping.items():
        if not isinstance(code, str) or isinstance(row, bool) or not isinstance(row, int | np.integer):
            raise ValueError(f"embedding file {path}: codes map {source} must map strings to row numbers")
        if not 0 <= row < n_rows or codes[row] is not None:
            raise ValueError(
                f"embedding file {path}: codes map {source} gives row {row} twice or outside [0, {n_rows})"
            )
        codes[row] = code
    return codes


def _codes_from_json(payload: Any, n_rows: int, path: Path, source: Path) -> list[str | None]:
    if isinstance(payload, dict) and payload.get("format") == "ehrjax.vocab":
        payload = payload.get("codes")
    if isinstance(payload, list):
        if not all(isinstance(c, str) for c in payload):
            raise ValueError(f"embedding file {path}: codes list {source} must hold strings")
        if len(payload) != n_rows:
            raise ValueError(f"embedding file {path}: {n_rows} vectors but the codes list {source} has {len(payload)}")
        return list(payload)
    return _codes_from_map(payload, n_rows, path, source)


def _check_unique(codes: Sequence[str | None], path: Path) -> None:
    seen: set[str] = set()
    for code in codes:
        if code is not None and code in seen:
            raise ValueError(f"embedding file {path}: code {code!r} appears twice")
        if code is not None:
            seen.add(code)


def _check_finite(array: np.ndarray, path: Path, name: str) -> None:
    if not np.issubdtype(array.dtype, np.floating) and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"embedding file {path}: {name} has non-numeric dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise ValueError(f"embedding file {path}: {bad} NaN/inf values in {name}")


def _load_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an `.npz` or `.safetensors` file, never unpickling."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.numpy import load_file

            return load_file(str(path))
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as err:  # zipfile, numpy and safetensors raise many kinds
        raise ValueError(f"embedding file {path}: not a readable {path.suffix} ({one_line(err)})") from err


def _read_med2vec(
    path: Path, arrays: dict[str, np.ndarray], codes_path: Path | None, allow_pickle: bool
) -> tuple[list[str | None], np.ndarray, Path]:
    if set(arrays) != MED2VEC_KEYS:
        missing, extra = sorted(MED2VEC_KEYS - set(arrays)), sorted(set(arrays) - MED2VEC_KEYS)
        raise ValueError(
            f"embedding file {path}: expected the Med2Vec arrays {sorted(MED2VEC_KEYS)} (or an ehrjax table "
            f"'{EHRJAX_TABLE_KEY}'); missing {missing}, unexpected {extra}"
        )
    w, b = arrays["W_emb"], arrays["b_emb"]
    wh, bh, wo, bo = arrays["W_hidden"], arrays["b_hidden"], arrays["W_output"], arrays["b_output"]
    if w.ndim != 2 or b.shape != (w.shape[1],):
        raise ValueError(f"embedding file {path}: W_emb {w.shape} and b_emb {b.shape} must be (n_codes, d) and (d,)")
    if wh.ndim != 2 or wh.shape[0] < w.shape[1] or bh.shape != (wh.shape[1],):
        raise ValueError(
            f"embedding file {path}: W_hidden {wh.shape} / b_hidden {bh.shape} do not follow W_emb {w.shape}"
        )
    if wo.ndim != 2 or wo.shape[0] != wh.shape[1] or bo.shape != (wo.shape[1],):
        raise ValueError(
            f"embedding file {path}: W_output {wo.shape} / b_output {bo.shape} do not follow W_hidden {wh.shape}"
        )
    for name, array in arrays.items():
        _check_finite(array, path, name)

    stem = sibling(path, "")
    base = epoch_stem(path)
    json_maps = [sibling(path, ".types.json"), sibling(path, ".json")]
    pickles = [sibling(path, ".types")]
    if base is not None:
        json_maps.append(base.with_name(base.name + ".types.json"))
        pickles.append(base.with_name(base.name + ".types"))
    source = codes_path or _first_existing(json_maps) or _first_existing(pickles)
    if source is None:
        looked = ", ".join(p.name for p in json_maps + pickles)
        raise ValueError(f"embedding file {path}: no code map found (looked for {looked}; or pass codes_path)")
    if _is_json_file(source):
        codes = _codes_from_json(_read_json(source, path), len(w), path, source)
    else:
        if not allow_pickle:
            raise ValueError(
                f"embedding file {path}: code map {source} is a pickle; pass allow_pickle=True only for a file you "
                f"trust, or provide {stem.name}.types.json"
            )
        try:
            with open(source, "rb") as fh:
                mapping = pickle.load(fh, encoding="latin1")  # Python 2 (cPickle) str keys
        except Exception as err:  # a corrupt pickle can raise almost anything
            raise ValueError(
                f"embedding file {path}: code map {source} is not a readable pickle ({one_line(err)})"
            ) from err
        codes = _codes_from_map(mapping, len(w), path, source)
    return codes, np.maximum(w, 0), source


def _read_table(
    path: Path, vectors: np.ndarray, codes_path: Path | None, candidates: Sequence[Path]
) -> tuple[list[str | None], np.ndarray, Path]:
    """A plain table f[n, d] whose codes come from a JSON file (`codes_path` or the first candidate found)."""
    if vectors.ndim != 2:
        raise ValueError(f"embedding file {path}: expected a 2-d array (codes, d), got shape {vectors.shape}")
    _check_finite(vectors, path, "the vectors")
    source = codes_path or _first_existing(candidates)
    if source is None:
        looked = ", ".join(p.name for p in candidates)
        raise ValueError(f"embedding file {path}: no codes JSON found (looked for {looked}; or pass codes_path)")
    return _codes_from_json(_read_json(source, path), len(vectors), path, source), vectors, source


def _read_text(path: Path) -> tuple[list[str | None], np.ndarray, str]:
    try:
        lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"embedding file {path}: unknown format (not a readable text file: {one_line(err)})") from err
    if not lines:
        raise ValueError(f"embedding file {path}: empty")
    header = lines[0]
    if len(header) == 2 and all(t.isdigit() for t in header):
        n, d = int(header[0]), int(header[1])
        body, fmt = lines[1:], "word2vec"
        if len(body) != n:
            raise ValueError(f"embedding file {path}: the header says {n} vectors, the file has {len(body)}")
    else:
        body, fmt, d = lines, "glove", len(header) - 1
    if d < 1:
        raise ValueError(f"embedding file {path}: unknown format (expected 'code v1 ... vd' lines)")
    widths = np.fromiter((len(parts) for parts in body), dtype=np.int64, count=len(body))
    if np.any(widths != d + 1):
        k = int(np.flatnonzero(widths != d + 1)[0])
        raise ValueError(f"embedding file {path}: vector {k + 1} has {widths[k] - 1} values, expected {d}")
    try:
        vectors = np.array([parts[1:] for parts in body], dtype=np.float64).reshape(len(body), d)
    except ValueError as err:
        raise ValueError(f"embedding file {path}: unknown format (values are not numbers: {one_line(err)})") from err
    _check_finite(vectors, path, "the vectors")
    codes: list[str | None] = [unescape_word2vec_code(parts[0]) for parts in body]
    return codes, vectors, fmt


def _is_header(row: list[str]) -> bool:
    """A CSV row is a header if its values are not numbers, or if its first cell is empty and its values are
    the column numbers (0..d-1 or 1..d)."""
    try:
        values = np.asarray(row[1:], dtype=np.float64)
    except ValueError:
        return True
    positions = np.arange(len(values))
    numbered = np.array_equal(values, positions) or np.array_equal(values, positions + 1)
    return bool(numbered and not row[0].strip())


def _read_csv(path: Path) -> tuple[list[str | None], np.ndarray]:
    """cui2vec-style CSV: `id, v1, ..., vd` per row, an optional header."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ValueError(f"embedding file {path}: not a readable CSV file ({one_line(err)})") from err
    if rows and _is_header(rows[0]):
        rows = rows[1:]
    if not rows:
        raise ValueError(f"embedding file {path}: empty")
    d = len(rows[0]) - 1
    widths = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    if d < 1 or np.any(widths != d + 1):
        k = int(np.flatnonzero(widths != d + 1)[0]) if d >= 1 else 0
        raise ValueError(f"embedding file {path}: data row {k + 1} has {widths[k] - 1} values, expected {max(d, 1)}")
    try:
        vectors = np.array([row[1:] for row in rows], dtype=np.float64)
    except ValueError as err:
        raise ValueError(f"embedding file {path}: values are not numbers ({one_line(err)})") from err
    _check_finite(vectors, path, "the vectors")
    return [row[0].strip() for row in rows], vectors


def _hf_tokens(folder: Path) -> tuple[list[str | None], Path]:
    """The tokenizer's tokens by id: `vocab.txt` (row = line) or `tokenizer.json`."""
    vocab_txt, tokenizer = folder / "vocab.txt", folder / "tokenizer.json"
    if vocab_txt.is_file():
        try:
            return list(vocab_txt.read_text(encoding="utf-8").splitlines()), vocab_txt
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"embedding folder {folder}: {vocab_txt.name} is not readable ({one_line(err)})") from err
    if not tokenizer.is_file():
        raise ValueError(f"embedding folder {folder}: no vocab.txt or tokenizer.json for the rows' tokens")
    payload = _read_json(tokenizer, folder)
    vocab = payload.get("model", {}).get("vocab") if isinstance(payload, dict) else None
    pairs: list[tuple[str, int]] = []
    if isinstance(vocab, dict):
        pairs = list(vocab.items())
    elif isinstance(vocab, list):  # Unigram: [[token, score], ...], id = position
        pairs = [(entry[0], i) for i, entry in enumerate(vocab) if isinstance(entry, list) and entry]
    else:
        raise ValueError(f"embedding folder {folder}: tokenizer.json has no model.vocab")
    pairs += [(t.get("content"), t.get("id")) for t in payload.get("added_tokens", []) if isinstance(t, dict)]
    if not all(isinstance(tok, str) and isinstance(i, int) and i >= 0 for tok, i in pairs):
        raise ValueError(f"embedding folder {folder}: tokenizer.json vocab must map strings to ids >= 0")
    tokens: list[str | None] = [None] * (max(i for _, i in pairs) + 1 if pairs else 0)
    for tok, i in pairs:
        if tokens[i] is not None and tokens[i] != tok:
            raise ValueError(f"embedding folder {folder}: tokenizer.json gives id {i} to {tokens[i]!r} and {tok!r}")
        tokens[i] = tok
    return tokens, tokenizer


def _pick_tensor(folder: Path, names: Sequence[str], tensor_name: str | None) -> str:
    if tensor_name is not None:
        if tensor_name not in names:
            raise ValueError(
                f"embedding folder {folder}: no tensor {tensor_name!r} (tensors ending in 'weight': "
                f"{[n for n in names if n.endswith('weight')][:8]})"
            )
        return tensor_name
    found = [n for n in names if n.endswith(HF_TABLE_SUFFIX)]
    if len(found) != 1:
        what = "no tensor" if not found else f"{len(found)} tensors ({found})"
        raise ValueError(f"embedding folder {folder}: {what} named *{HF_TABLE_SUFFIX}; pass tensor_name")
    return found[0]


def _read_hf_folder(
    folder: Path, tensor_name: str | None, allow_pickle: bool
) -> tuple[list[str | None], np.ndarray, Path]:
    """A Hugging Face model folder -> (tokens by row, the input-embedding table, the tokens file)."""
    tokens, source = _hf_tokens(folder)
    single, index, pickled = folder / "model.safetensors", folder / "model.safetensors.index.json", None
    try:
        if single.is_file() or index.is_file():
            from safetensors import safe_open

            if single.is_file():
                with safe_open(str(single), framework="numpy") as fh:
                    names = list(fh.keys())
                shard_of = dict.fromkeys(names, single.name)
            else:
                weight_map = _read_json(index, folder).get("weight_map", {})
                names, shard_of = list(weight_map), weight_map
            name = _pick_tensor(folder, names, tensor_name)
            with safe_open(str(folder / shard_of[name]), framework="numpy") as fh:
                table = fh.get_tensor(name)
        elif (folder / "pytorch_model.bin").is_file():
            pickled = folder / "pytorch_model.bin"
            if not allow_pickle:
                raise ValueError(
                    f"embedding folder {folder}: only a pickled pytorch_model.bin; pass allow_pickle=True only for "
                    "a folder you trust, or save the model as model.safetensors"
                )
            try:
                import torch
            except ImportError as err:
                raise ValueError(
                    f"embedding folder {folder}: reading pytorch_model.bin needs torch (pip install torch)"
                ) from err
            state = torch.load(pickled, map_location="cpu", weights_only=True)
            name = _pick_tensor(folder, list(state), tensor_name)
            table = state[name].float().numpy()
        else:
            raise ValueError(
                f"embedding folder {folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
            )
    except ValueError:
        raise
    except Exception as err:  # safetensors and torch raise many kinds
        raise ValueError(f"embedding folder {folder}: cannot read the model ({one_line(err)})") from err
    if table.ndim != 2:
        raise ValueError(f"embedding folder {folder}: tensor {name!r} has shape {table.shape}, expected 2-d")
    if len(table) < len(tokens):
        raise ValueError(f"embedding folder {folder}: tensor {name!r} has {len(table)} rows for {len(tokens)} tokens")
    if table.dtype not in (np.float32, np.float64):  # float16, bfloat16 (ml_dtypes), ...
        table = table.astype(np.float32)
    _check_finite(table, folder, f"tensor {name!r}")
    return tokens + [None] * (len(table) - len(tokens)), table, source


def read_code_vectors(
    path: str | os.PathLike,
    *,
    codes_path: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    tensor_name: str | None = None,
) -> tuple[list[str | None], np.ndarray, str, Path | None]:
    """The file's codes (by row; None for rows without one), vectors f[n, d] (ReLU(W_emb) for Med2Vec), format
    name and codes file. `path` may be a Hugging Face model folder (`tensor_name` picks its tensor)."""
    path = Path(path)
    codes_path = Path(codes_path) if codes_path is not None else None
    if path.is_dir():
        codes, vectors, source = _read_hf_folder(path, tensor_name, allow_pickle)
        _check_unique(codes, path)
        return codes, vectors, "huggingface", source
    if not path.is_file():
        raise ValueError(f"embedding file {path}: does not exist")
    if codes_path is not None and not codes_path.is_file():
        raise ValueError(f"embedding file {path}: codes file {codes_path} does not exist")
    suffix = path.suffix.lower()
    table_json = [sibling(path, ".json"), sibling(path, ".vocab.json"), sibling(path, ".types.json")]
    if suffix in (".npz", ".safetensors"):
        arrays = _load_arrays(path)
        if set(arrays) == {EHRJAX_TABLE_KEY}:
            table_json.append(path.parent / "vocab.json")
            codes, vectors, source = _read_table(path, arrays[EHRJAX_TABLE_KEY], codes_path, table_json)
            fmt = "ehrjax"
        elif suffix == ".npz":
            codes, vectors, source = _read_med2vec(path, arrays, codes_path, allow_pickle)
            fmt = "med2vec"
        else:
            raise ValueError(f"embedding file {path}: expected one array '{EHRJAX_TABLE_KEY}', found {sorted(arrays)}")
    elif suffix == ".npy":
        try:
            vectors = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ValueError(f"embedding file {path}: not a readable .npy ({one_line(err)})") from err
        codes, vectors, source = _read_table(path, vectors, codes_path, table_json)
        fmt = "npy"
    elif suffix == ".csv":
        codes, vectors = _read_csv(path)
        fmt, source = "cui2vec", None
    elif suffix in (".bin", ".pkl", ".pickle", ".pt", ".h5"):
        raise ValueError(
            f"embedding file {path}: unknown format {suffix}; expected Med2Vec .npz, .npy + codes JSON, word2vec "
            "text, a .csv or a Hugging Face model folder"
        )
    else:
        codes, vectors, fmt = _read_text(path)
        source = None
    if len(vectors) == 0 or vectors.shape[1] == 0:
        raise ValueError(f"embedding file {path}: holds no vectors (shape {vectors.shape})")
    _check_unique(codes, path)
    return codes, vectors, fmt, source


def validate_embedding_file(
    path: str | os.PathLike,
    codes_path: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    *,
    embed_dim: int | None = None,
    label: str = "",
) -> tuple[int, int]:
    """Read and check an embedding file before any work: (number of codes, dimension), or a one-line ValueError
    naming it for a missing file or code map, an unknown format, NaN/inf values, inconsistent shapes, no
    vectors, a pickle without `allow_pickle`, or (given `embed_dim`) another width. `label` prefixes the
    message with the setting that named the file (`embeddings_from`)."""
    try:
        codes, vectors, _, _ = read_code_vectors(path, codes_path=codes_path or None, allow_pickle=allow_pickle)
        if embed_dim is not None and vectors.shape[1] != embed_dim:
            raise ValueError(
                f"embedding file {path}: vectors have dimension {vectors.shape[1]} but model.embed_dim is "
                f"{embed_dim}; set model.embed_dim = {vectors.shape[1]} (the model projects embed_dim -> hidden_dim)"
            )
    except ValueError as err:
        if label:
            raise ValueError(f"{label}: {err}") from err
        raise
    return len(codes), int(vectors.shape[1])


def _counts_by_id(code_counts: np.ndarray | Mapping[str, int], vocab: Vocab) -> np.ndarray:
    if isinstance(code_counts, Mapping):
        counts = np.zeros(len(vocab), dtype=np.int64)
        for code, n in code_counts.items():
            if code in vocab:
                counts[vocab.id(code)] += int(n)
        return counts
    counts = np.asarray(code_counts, dtype=np.int64)
    if counts.shape != (len(vocab),):
        raise ValueError(f"code_counts has shape {counts.shape}, expected ({len(vocab)},): one count per vocab id")
    return counts


def load_code_table(
    path: str | os.PathLike,
    vocab: Vocab,
    *,
    embed_dim: int | None = None,
    codes_path: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    tensor_name: str | None = None,
    missing_init: str = "normal",
    rescale: str = "match_init",
    init_std: float = DEFAULT_INIT_STD,
    code_counts: np.ndarray | Mapping[str, int] | None = None,
    normalize: bool = True,
    seed: int = 0,
    num_examples: int = 8,
) -> tuple[np.ndarray, CoverageReport]:
    """A code table f32[len(vocab), d] from an embedding file, and its coverage report.

    embed_dim: the model's `model.embed_dim`; a file of another dimension is an error. code_counts:
    int[len(vocab)] token counts per vocab id (e.g. `vocab_token_counts(cohort, vocab)`) or a `{code: count}`
    map, for coverage by token frequency. normalize=False matches identical code strings only. See the
    module docstring for formats, matching and the init of rows that do not come from the file. Every
    problem is a one-line ValueError naming the file.
    """
    if missing_init not in MISSING_INITS:
        raise ValueError(f"missing_init {missing_init!r} unknown; expected one of {MISSING_INITS}")
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale {rescale!r} unknown; expected one of {RESCALE_MODES}")
    path = Path(path)
    codes, vectors, fmt, source = read_code_vectors(
        path, codes_path=codes_path, allow_pickle=allow_pickle, tensor_name=tensor_name
    )
    d = vectors.shape[1]
    if embed_dim is not None and d != embed_dim:
        raise ValueError(
            f"embedding file {path}: vectors have dimension {d} but model.embed_dim is {embed_dim}; set "
            f"model.embed_dim = {d} (the model projects embed_dim -> hidden_dim)"
        )
    match = match_codes(codes, vocab, normalize=normalize)
    ids = np.flatnonzero(match.matched)
    if not len(ids):
        file_eg = [c for c in codes[:3] if c is not None]
        raise ValueError(
            f"embedding file {path}: none of its {len(codes):,} codes (e.g. {file_eg}) matches the vocabulary's "
            f"{len(vocab) - NUM_SPECIAL:,} clinical codes (e.g. {list(vocab.codes[NUM_SPECIAL : NUM_SPECIAL + 3])})"
        )
    imported = vectors[match.rows[ids]].astype(np.float64)
    scale = 1.0
    if rescale == "match_init":
        mean_norm = float(np.linalg.norm(imported, axis=1).mean())
        if mean_norm == 0.0:
            raise ValueError(f"embedding file {path}: every matched vector is zero; nothing to rescale")
        scale = init_std * np.sqrt(d) / mean_norm
        imported = imported * scale
    elif rescale == "standardize":
        centred = imported - imported.mean(axis=0)
        std = float(centred.std())
        if std == 0.0:
            raise ValueError(f"embedding file {path}: the matched vectors are all equal; cannot standardise")
        scale = init_std / std
        imported = centred * scale
    fill_std = float(imported.std()) or init_std

    rng = np.random.default_rng(seed)
    table = rng.normal(0.0, fill_std, (len(vocab), d))
    if missing_init == "zeros":
        table[NUM_SPECIAL:] = 0.0
    table[ids] = imported
    table[PAD] = 0.0

    exact_ids = ids[match.exact[ids]]
    norm_ids = ids[~match.exact[ids]]
    unmatched = np.flatnonzero(~match.matched[NUM_SPECIAL:]) + NUM_SPECIAL
    tokens = None
    if code_counts is not None:
        counts = _counts_by_id(code_counts, vocab)
        tokens = (int(counts[NUM_SPECIAL:].sum()), int(counts[exact_ids].sum()), int(counts[norm_ids].sum()))
        unmatched = unmatched[np.argsort(-counts[unmatched], kind="stable")]
    report = CoverageReport(
        path=str(path),
        file_format=fmt,
        codes_path=str(source) if source else None,
        dim=d,
        file_codes=sum(c is not None and c not in SPECIAL_TOKENS for c in codes),
        vocab_codes=len(vocab) - NUM_SPECIAL,
        matched_exact=len(exact_ids),
        matched_normalized=len(norm_ids),
        ambiguous=match.ambiguous,
        cross_system=match.cross_system,
        file_codes_used=len(np.unique(match.rows[ids])),
        tokens_total=tokens[0] if tokens else None,
        tokens_exact=tokens[1] if tokens else None,
        tokens_normalized=tokens[2] if tokens else None,
        unmatched_examples=[vocab.code(int(i)) for i in unmatched[:num_examples]],
        rescale=rescale,
        scale=float(scale),
        missing_init=missing_init,
        fill_std=fill_std,
    )
    return table.astype(np.float32), report


def set_code_table(params: Any, table: np.ndarray | jax.Array, *, path: tuple[str, ...] = CODE_TABLE_PATH) -> Any:
    """A copy of `params` (an `nnx.State` of the model's params, or a plain nested dict) with the code
    embedding at `path` (default `embeddings/code/embedding`, f32[vocab, embed_dim]) replaced by `table`.

    Shapes must match. The input is not modified. Freezing the table is the optimiser's job (a partition
    that gives this path zero updates).
    """
    table = jnp.asarray(table)
    found = []

    def swap(key_path: tuple, leaf: Any) -> Any:
        if path_names(key_path) != path:
            return leaf
        found.append(leaf)
        if tuple(leaf.shape) != tuple(table.shape):
            raise ValueError(
                f"code table has shape {tuple(table.shape)}, the model's {'/'.join(path)} has {tuple(leaf.shape)}"
            )
        return table.astype(leaf.dtype)

    out = jax.tree_util.tree_map_with_path(swap, params)
    if not found:
        raise ValueError(f"params have no parameter at {'/'.join(path)}")
    return out
