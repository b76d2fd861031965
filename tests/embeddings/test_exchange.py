"""Embedding exchange: the word2vec export (gensim reads it), cui2vec CSV and Hugging Face folders on import."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ehrjax.config import model_config
from ehrjax.data.vocab import NUM_SPECIAL, SPECIAL_TOKENS, Vocab
from ehrjax.embeddings.io import (
    escape_word2vec_code,
    load_code_table,
    read_code_vectors,
    unescape_word2vec_code,
)
from ehrjax.models.behrt import Behrt
from ehrjax.train.export import export_code_table, save_word2vec

CODES = ["ICD10:I10", "RX:metformin", "LAB//glucose mg/dL", "NOTE 50%", "LOINC:4548-4"]


def exported(tmp_path):
    vocab = Vocab(CODES)
    model = Behrt(model_config("tiny"), len(vocab), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    paths = export_code_table(params, vocab, tmp_path)
    return vocab, np.asarray(params["embeddings"]["code"]["embedding"][...]), paths


def test_escape_round_trip():
    assert escape_word2vec_code("A B%\t\u00a0x") == "A%20B%25%09%C2%A0x"
    for code in ["A B%\t\u00a0x", "plain", "already%2Fescaped", "%", "100%20"]:
        assert unescape_word2vec_code(escape_word2vec_code(code)) == code
    assert unescape_word2vec_code("a%2Fb%20c") == "a%2Fb c"  # only whitespace and % are decoded


def test_export_tables_equal_the_model_table(tmp_path):
    vocab, table, paths = exported(tmp_path)
    assert [p.name for p in paths] == [
        "code_embeddings.npz",
        "code_embeddings.safetensors",
        "code_embeddings.txt",
        "vocab.json",
    ]
    np.testing.assert_array_equal(load_file(str(tmp_path / "code_embeddings.safetensors"))["code_embeddings"], table)
    np.testing.assert_array_equal(np.load(tmp_path / "code_embeddings.npz")["code_embeddings"], table)
    lines = (tmp_path / "code_embeddings.txt").read_text().splitlines()
    assert lines[0] == f"{len(CODES)} {table.shape[1]}"
    assert [line.split(" ")[0] for line in lines[1:]] == [escape_word2vec_code(c) for c in vocab.codes[NUM_SPECIAL:]]
    assert not any(token in (tmp_path / "code_embeddings.txt").read_text() for token in SPECIAL_TOKENS)
    codes, vectors, fmt, _ = read_code_vectors(tmp_path / "code_embeddings.txt")
    assert fmt == "word2vec" and codes == list(vocab.codes[NUM_SPECIAL:])
    np.testing.assert_array_equal(vectors.astype(np.float32), table[NUM_SPECIAL:])
    imported, report = load_code_table(tmp_path / "code_embeddings.txt", vocab, rescale="none")
    np.testing.assert_array_equal(imported[NUM_SPECIAL:], table[NUM_SPECIAL:])
    assert report.matched_exact == len(CODES)


def test_gensim_reads_the_word2vec_export(tmp_path):
    gensim = pytest.importorskip("gensim")
    vocab, table, _ = exported(tmp_path)
    kv = gensim.models.KeyedVectors.load_word2vec_format(str(tmp_path / "code_embeddings.txt"), binary=False)
    assert kv.index_to_key == [escape_word2vec_code(c) for c in vocab.codes[NUM_SPECIAL:]]
    np.testing.assert_array_equal(kv.vectors, table[NUM_SPECIAL:])
    # The README snippet: keys back to codes.
    vectors = {unescape_word2vec_code(k): kv[k] for k in kv.index_to_key}
    np.testing.assert_array_equal(vectors["LAB//glucose mg/dL"], table[vocab.id("LAB//glucose mg/dL")])


def test_save_word2vec_checks_shapes(tmp_path):
    with pytest.raises(ValueError, match="2 codes for a table of shape"):
        save_word2vec(np.zeros((3, 2)), ["a", "b"], tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_readme_torch_snippet(tmp_path):
    torch = pytest.importorskip("torch")
    vocab, table, _ = exported(tmp_path)
    from safetensors.torch import load_file as load_torch

    weights = load_torch(str(tmp_path / "code_embeddings.safetensors"))["code_embeddings"]
    embedding = torch.nn.Embedding.from_pretrained(weights, freeze=True, padding_idx=0)
    codes = json.loads((tmp_path / "vocab.json").read_text())["codes"]
    row = embedding(torch.tensor([codes.index("ICD10:I10")]))[0].numpy()
    np.testing.assert_array_equal(row, table[vocab.id("ICD10:I10")])


@pytest.mark.parametrize("header", ['"",V1,V2,V3\n', ",0,1,2\n", ""])
def test_cui2vec_csv(tmp_path, header):
    body = '"C0000005",0.5,-1,2\n"ICD10:I10",1,2,3\nC0000039,4,5,6.25\n'
    (tmp_path / "cui2vec.csv").write_text(header + body)
    codes, vectors, fmt, _ = read_code_vectors(tmp_path / "cui2vec.csv")
    assert fmt == "cui2vec" and codes == ["C0000005", "ICD10:I10", "C0000039"]
    np.testing.assert_array_equal(vectors, [[0.5, -1, 2], [1, 2, 3], [4, 5, 6.25]])
    table, report = load_code_table(tmp_path / "cui2vec.csv", Vocab(["C0000039", "ICD10:I10", "X"]), rescale="none")
    np.testing.assert_array_equal(table[NUM_SPECIAL : NUM_SPECIAL + 2], [[4, 5, 6.25], [1, 2, 3]])
    assert report.matched_exact == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,1,2\nb,1\n", "data row 2 has 1 values, expected 2"),
        ('"",0,1\nx,1,2\ny,3\n', "data row 2 has 1 values, expected 2"),
        ("a,1,2\nb,1,x\n", "values are not numbers"),
        ('"",V1\n', "empty"),
    ],
)
def test_cui2vec_csv_errors(tmp_path, text, message):
    (tmp_path / "e.csv").write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        read_code_vectors(tmp_path / "e.csv")
    assert "\n" not in str(err.value)


HF_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "ICD10:I10", "RX:metformin", "##ing"]


def hf_folder(tmp_path, *, tokenizer="vocab.txt", dtype=np.float32, name="bert.embeddings.word_embeddings.weight"):
    folder = tmp_path / "bert"
    folder.mkdir()
    rng = np.random.default_rng(0)
    table = rng.normal(size=(len(HF_TOKENS) + 2, 4)).astype(dtype)  # padded beyond the tokenizer
    tensors = {
        name: table,
        "bert.embeddings.position_embeddings.weight": rng.normal(size=(16, 4)).astype(dtype),
        "cls.predictions.bias": np.zeros(len(HF_TOKENS), dtype),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    if tokenizer == "vocab.txt":
        (folder / "vocab.txt").write_text("\n".join(HF_TOKENS) + "\n")
    else:
        vocab = {t: i for i, t in enumerate(HF_TOKENS[:-1])}
        added = [{"id": len(HF_TOKENS) - 1, "content": HF_TOKENS[-1]}]
        (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": vocab},
                                                           "added_tokens": added}))  # fmt: skip
    return folder, table


@pytest.mark.parametrize("tokenizer", ["vocab.txt", "tokenizer.json"])
def test_hugging_face_folder(tmp_path, tokenizer):
    folder, table = hf_folder(tmp_path, tokenizer=tokenizer)
    codes, vectors, fmt, source = read_code_vectors(folder)
    assert fmt == "huggingface" and source.name == tokenizer
    assert codes == [*HF_TOKENS, None, None]
    np.testing.assert_array_equal(vectors, table)
    vocab = Vocab(["RX:metformin", "ICD10:I10", "LOINC:1"])
    imported, report = load_code_table(folder, vocab, rescale="none", embed_dim=4)
    np.testing.assert_array_equal(imported[vocab.id("ICD10:I10")], table[3])
    np.testing.assert_array_equal(imported[vocab.id("RX:metformin")], table[4])
    assert report.matched_exact == 2 and report.file_codes == 3  # BERT's [PAD] [UNK] [CLS] are specials here too


def test_hugging_face_named_tensor_and_bfloat16(tmp_path):
    import ml_dtypes

    folder, table = hf_folder(tmp_path, dtype=ml_dtypes.bfloat16, name="encoder.tok.weight")
    with pytest.raises(ValueError, match=r"no tensor named \*embeddings.word_embeddings.weight; pass tensor_name"):
        read_code_vectors(folder)
    with pytest.raises(ValueError, match="no tensor 'nope'"):
        read_code_vectors(folder, tensor_name="nope")
    _, vectors, _, _ = read_code_vectors(folder, tensor_name="encoder.tok.weight")
    assert vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, table.astype(np.float32))


def test_hugging_face_sharded_safetensors(tmp_path):
    folder, table = hf_folder(tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    shard = "model-00001-of-00001.safetensors"
    weight_map = dict.fromkeys(load_file(str(folder / shard)), shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, vectors, _, _ = read_code_vectors(folder)
    np.testing.assert_array_equal(vectors, table)


def test_hugging_face_folder_errors(tmp_path):
    folder, _ = hf_folder(tmp_path)
    (folder / "vocab.txt").unlink()
    with pytest.raises(ValueError, match=r"no vocab\.txt or tokenizer\.json"):
        read_code_vectors(folder)
    (folder / "vocab.txt").write_text("\n".join(HF_TOKENS * 2))
    with pytest.raises(ValueError, match="has 8 rows for 12 tokens"):
        read_code_vectors(folder)
    (folder / "vocab.txt").write_text("\n".join(HF_TOKENS))
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"only a pickled pytorch_model\.bin; pass allow_pickle=True"):
        read_code_vectors(folder)
    try:
        import torch  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"reading pytorch_model.bin needs torch"):
            read_code_vectors(folder, allow_pickle=True)
    else:
        with pytest.raises(ValueError, match="cannot read the model"):  # a safetensors file is no torch pickle
            read_code_vectors(folder, allow_pickle=True)


def test_hugging_face_pytorch_bin_with_opt_in(tmp_path):
    torch = pytest.importorskip("torch")
    folder = tmp_path / "m"
    folder.mkdir()
    table = torch.randn(len(HF_TOKENS), 3)
    torch.save({"bert.embeddings.word_embeddings.weight": table}, folder / "pytorch_model.bin")
    (folder / "vocab.txt").write_text("\n".join(HF_TOKENS))
    _, vectors, _, _ = read_code_vectors(folder, allow_pickle=True)
    np.testing.assert_array_equal(vectors, table.numpy())
