"""Exports of a trained model: the code-embedding table (+ vocabulary), the LoRA adapters alone, all params.

Tables and parameters are written as `.npz` and `safetensors` (flat names `a/b/c`), each atomically. The
code table is also written as word2vec text (`code_embeddings.txt`, what gensim's
`KeyedVectors.load_word2vec_format` and other tools read): a header `n d`, then `code v1 ... vd` per clinical
code in vocabulary-id order, special tokens left out, values printed with 9 significant digits (float32
exact). A name cannot hold whitespace in that format, so whitespace and `%` in a code are percent-escaped as
UTF-8 (`A B%` -> `A%20B%25`; `ehrjax.embeddings.io.escape_word2vec_code`), which the importer undoes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from ehrjax.atomic import atomic_write
from ehrjax.data.vocab import NUM_SPECIAL, Vocab
from ehrjax.embeddings.io import escape_word2vec_code
from ehrjax.models.behrt import CODE_TABLE_PATH


def flat_arrays(state: nnx.State) -> dict[str, np.ndarray]:
    """`{'a/b/c': float32 array}` of an nnx.State (host copies)."""
    return {"/".join(map(str, path)): np.asarray(var.get_value()) for path, var in nnx.to_flat_state(state)}


def save_arrays(arrays: dict[str, np.ndarray], stem: Path) -> list[Path]:
    """Write `stem.npz` and `stem.safetensors`; returns the paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    npz, st = stem.with_suffix(".npz"), stem.with_suffix(".safetensors")

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(npz, write_npz)
    atomic_write(st, lambda tmp: save_file(arrays, str(tmp)))
    return [npz, st]


def save_word2vec(table: np.ndarray, codes: list[str], path: Path) -> Path:
    """Write `table` f[n, d] as word2vec text, row i named `codes[i]` (escaped, module docstring), atomically."""
    if table.ndim != 2 or len(table) != len(codes):
        raise ValueError(f"word2vec output {path}: {len(codes)} codes for a table of shape {table.shape}")
    names = [escape_word2vec_code(code) for code in codes]
    values = np.char.mod("%.9g", np.asarray(table, dtype=np.float32))
    lines = [f"{len(names)} {table.shape[1]}"] + [
        name + " " + " ".join(row) for name, row in zip(names, values.tolist(), strict=True)
    ]

    def write(tmp: Path) -> None:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")

    atomic_write(path, write)
    return path


def export_code_table(params: nnx.State, vocab: Vocab, directory: str | os.PathLike) -> list[Path]:
    """The code table `code_embeddings` float32[len(vocab), embed_dim] (`.npz`, `.safetensors`), its clinical
    rows as word2vec text (`code_embeddings.txt`, specials left out) and `vocab.json` beside them."""
    directory = Path(directory)
    flat = flat_arrays(params)
    table = flat["/".join(CODE_TABLE_PATH)]
    if table.shape[0] != len(vocab):
        raise ValueError(f"code table has {table.shape[0]} rows, vocabulary {len(vocab)}")
    paths = save_arrays({"code_embeddings": table}, directory / "code_embeddings")
    text = save_word2vec(table[NUM_SPECIAL:], list(vocab.codes[NUM_SPECIAL:]), directory / "code_embeddings.txt")
    vocab.save(directory / "vocab.json")
    return [*paths, text, directory / "vocab.json"]


def export_model(params: nnx.State, directory: str | os.PathLike, *, name: str = "model") -> list[Path]:
    """All parameters, flat-named."""
    return save_arrays(flat_arrays(params), Path(directory) / name)


def export_adapters(params: nnx.State, directory: str | os.PathLike) -> list[Path]:
    """The LoRA adapters alone (`lora_a` / `lora_b` leaves); nothing if the model has none."""
    adapters = {k: v for k, v in flat_arrays(params).items() if k.rsplit("/", 1)[-1] in ("lora_a", "lora_b")}
    return save_arrays(adapters, Path(directory) / "adapters") if adapters else []
