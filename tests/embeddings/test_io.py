import json
import pickle

import numpy as np
import pytest
from flax import nnx

from ehrjax.config import model_config
from ehrjax.data.synthetic import generate_cohort
from ehrjax.data.vocab import CLS, NUM_SPECIAL, PAD, Vocab
from ehrjax.embeddings.io import (
    CODE_TABLE_PATH,
    load_code_table,
    match_codes,
    normalize_code,
    set_code_table,
    split_code,
    vocab_token_counts,
)
from ehrjax.models.behrt import Behrt


def write_original_med2vec(folder, codes, d=3, d2=4, seed=0, name="model.9"):
    """A file as the original Theano tool writes it: float64 arrays, a pickled dict `.types` map."""
    rng = np.random.default_rng(seed)
    n = len(codes)
    arrays = dict(
        W_emb=rng.normal(size=(n, d)),
        b_emb=rng.normal(size=d),
        W_hidden=rng.normal(size=(d, d2)),
        b_hidden=np.zeros(d2),
        W_output=rng.normal(size=(d2, n)),
        b_output=np.zeros(n),
    )
    np.savez_compressed(folder / f"{name}.npz", **arrays)
    with open(folder / f"{name}.types", "wb") as fh:
        pickle.dump({c: i for i, c in enumerate(codes)}, fh, protocol=2)
    return folder / f"{name}.npz", arrays


@pytest.mark.parametrize("code", ["D_428.0", "428.0", "4280", "ICD9:428.0", " icd9:428.0 "])
def test_normalisation_strips_system_case_and_dots(code):
    assert normalize_code(code) == "4280"


def test_split_code_keeps_the_system():
    assert split_code("ICD10:E11.9") == ("ICD10", "E119")
    assert split_code("D_428.0") == ("D", "4280")
    assert split_code("RX:metformin") == ("RX", "METFORMIN")
    assert split_code("LOINC:4548-4") == ("LOINC", "4548-4")
    assert split_code("E11.9") == ("", "E119")


def test_original_layout_imports_with_pickle_opt_in_and_is_refused_without(tmp_path):
    file_codes = ["D_428.0", "D_401.9", "D_250.00", "D_V58.61"]
    path, arrays = write_original_med2vec(tmp_path, file_codes)
    vocab = Vocab(["ICD9:428.0", "ICD9:250.00", "ICD9:999.9", "RX:x"])
    with pytest.raises(ValueError, match=r"model\.9\.npz: code map .*model\.9\.types is a pickle; pass allow_pickle"):
        load_code_table(path, vocab)
    table, report = load_code_table(path, vocab, allow_pickle=True, rescale="none", missing_init="zeros")
    assert table.dtype == np.float32 and table.shape == (len(vocab), 3)
    relu = np.maximum(arrays["W_emb"], 0).astype(np.float32)
    np.testing.assert_array_equal(table[vocab.id("ICD9:428.0")], relu[0])
    np.testing.assert_array_equal(table[vocab.id("ICD9:250.00")], relu[2])
    assert not table[vocab.id("ICD9:999.9")].any() and not table[vocab.id("RX:x")].any()
    assert (report.matched_exact, report.matched_normalized, report.vocab_share) == (0, 2, 0.5)
    assert report.file_format == "med2vec" and report.codes_path.endswith("model.9.types")

    # A JSON map next to the file is the safe path and is preferred: no opt-in needed.
    (tmp_path / "model.9.types.json").write_text(json.dumps({c: i for i, c in enumerate(file_codes)}))
    table_json, report_json = load_code_table(path, vocab, rescale="none", missing_init="zeros")
    np.testing.assert_array_equal(table_json, table)
    assert report_json.codes_path.endswith("model.9.types.json")


def test_coverage_is_exact_by_vocab_and_by_token_frequency(tmp_path):
    vocab = Vocab(["ICD10:I10", "ICD10:E11.9", "RX:metformin", "ICD10:J45.909", "LOINC:4548-4", "NOISE:0001"])
    counts = np.zeros(len(vocab), dtype=np.int64)
    counts[NUM_SPECIAL:] = [50, 30, 10, 5, 4, 1]  # 100 clinical tokens
    counts[PAD] = 999  # specials never count
    lines = ["3 2", "ICD10:I10 1 0", "E119 0 1", "rx:METFORMIN 1 1"]
    (tmp_path / "w.txt").write_text("\n".join(lines) + "\n")
    table, report = load_code_table(tmp_path / "w.txt", vocab, code_counts=counts, rescale="none")
    assert report.file_format == "word2vec"
    assert (report.matched_exact, report.matched_normalized, report.matched) == (1, 2, 3)
    assert report.vocab_codes == 6 and report.vocab_share == 0.5
    assert (report.tokens_total, report.tokens_exact, report.tokens_normalized) == (100, 50, 40)
    assert report.token_share == 0.9
    assert report.unmatched_examples == ["ICD10:J45.909", "LOINC:4548-4", "NOISE:0001"]  # most frequent first
    np.testing.assert_array_equal(table[vocab.id("ICD10:E11.9")], [0, 1])
    text = report.format()
    assert "3/6 codes matched (50.0%)" in text and "90/100 covered (90.0%)" in text
    report.save(tmp_path / "coverage.json")
    saved = json.loads((tmp_path / "coverage.json").read_text())
    assert saved["token_share"] == 0.9 and saved["matched"] == 3
    # The same counts given as a {code: count} map.
    by_code = {c: int(n) for c, n in zip(vocab.codes, counts, strict=True) if n and c != "[PAD]"}
    _, report_map = load_code_table(tmp_path / "w.txt", vocab, code_counts=by_code, rescale="none")
    assert report_map.token_share == 0.9


def test_glove_text_without_header(tmp_path):
    (tmp_path / "g.vec").write_text("ICD10:I10 0.5 0.25\nRX:x 1 2\n")
    table, report = load_code_table(tmp_path / "g.vec", Vocab(["ICD10:I10"]), rescale="none")
    assert report.file_format == "glove" and report.file_codes == 2
    np.testing.assert_array_equal(table[NUM_SPECIAL], [0.5, 0.25])


@pytest.mark.parametrize("form", ["list", "map", "vocab"])
def test_npy_with_codes_json(tmp_path, form):
    codes = ["ICD10:I10", "RX:x", "LOINC:1"]
    vectors = np.arange(12, dtype=np.float32).reshape(4, 3)
    if form == "vocab":  # an ehrjax table: rows are vocab ids, special rows are ignored
        file_vocab = Vocab(codes[:3])
        vectors = np.arange(3 * len(file_vocab), dtype=np.float32).reshape(len(file_vocab), 3)
        vectors[CLS] = 1e6
        payload = json.loads(file_vocab.to_json())
        expected = {c: vectors[file_vocab.id(c)] for c in codes}
    else:
        vectors = vectors[:3]
        payload = codes if form == "list" else {c: i for i, c in enumerate(codes)}
        expected = {c: vectors[i] for i, c in enumerate(codes)}
    np.save(tmp_path / "t.npy", vectors)
    (tmp_path / "t.json").write_text(json.dumps(payload))
    vocab = Vocab(["RX:x", "ICD10:I10", "LOINC:1", "NEW:1"])
    table, report = load_code_table(tmp_path / "t.npy", vocab, rescale="none", seed=1)
    for code, vec in expected.items():
        np.testing.assert_array_equal(table[vocab.id(code)], vec)
    assert report.matched_exact == 3 and report.file_codes == 3 and report.file_format == "npy"
    assert np.abs(table[CLS]).max() < 100  # special tokens never come from the file
    assert not table[PAD].any()


def test_rescale_missing_init_and_determinism(tmp_path):
    rng = np.random.default_rng(0)
    codes = [f"C:{k}" for k in range(50)]
    lines = [f"{len(codes)} 16"] + [c + " " + " ".join(f"{v:.6f}" for v in rng.normal(3, 2, 16)) for c in codes]
    (tmp_path / "e.w2v").write_text("\n".join(lines))
    vocab = Vocab(codes[:40] + ["MISSING:X1", "MISSING:X2"])
    clinical = slice(NUM_SPECIAL, NUM_SPECIAL + 40)

    table, report = load_code_table(tmp_path / "e.w2v", vocab, embed_dim=16, seed=3)
    np.testing.assert_allclose(np.linalg.norm(table[clinical], axis=1).mean(), 0.02 * np.sqrt(16), rtol=1e-5)
    assert report.rescale == "match_init" and report.scale < 1
    missing = table[[vocab.id("MISSING:X1"), vocab.id("MISSING:X2")]]
    assert missing.any() and abs(missing.std() - report.fill_std) < 0.5 * report.fill_std
    assert not table[PAD].any() and table[CLS].any()
    again, _ = load_code_table(tmp_path / "e.w2v", vocab, embed_dim=16, seed=3)
    np.testing.assert_array_equal(table, again)

    zeros, _ = load_code_table(tmp_path / "e.w2v", vocab, missing_init="zeros", seed=3)
    assert not zeros[vocab.id("MISSING:X1")].any() and zeros[CLS].any()
    np.testing.assert_array_equal(zeros[clinical], table[clinical])

    std, _ = load_code_table(tmp_path / "e.w2v", vocab, rescale="standardize")
    np.testing.assert_allclose(std[clinical].mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(std[clinical].std(), 0.02, rtol=1e-5)


def test_ambiguous_normalised_keys_prefer_the_same_system_then_file_order():
    vocab = Vocab(["ICD9:4280", "X_E11", "LAB:1"])
    file_codes = ["D_428.0", "ICD9:428.0", "ICD10:E11", "E_E11", "None:1", None]
    match = match_codes(file_codes, vocab)
    assert match.rows[vocab.id("ICD9:4280")] == 1  # same system ICD9 wins over D_
    assert match.rows[vocab.id("X_E11")] == 2  # no system matches: first in file order
    assert match.rows[vocab.id("LAB:1")] == 4
    assert match.ambiguous == 2 and not match.exact.any()
    assert match.cross_system == 2  # X_E11 <- ICD10:E11 and LAB:1 <- None:1 (ICD9 <- ICD9 is not)
    assert not match_codes(file_codes, vocab, normalize=False).matched.any()


def test_vocab_token_counts_follow_vocab_ids():
    cohort = generate_cohort(200, seed=0, num_noise_codes=30)
    vocab = Vocab.build(cohort.code_names, cohort.code_counts(), min_count=3)
    counts = vocab_token_counts(cohort, vocab)
    assert counts.sum() == cohort.num_tokens
    code = vocab.code(NUM_SPECIAL)
    assert counts[NUM_SPECIAL] == cohort.code_counts()[list(cohort.code_names).index(code)]


def test_set_code_table_puts_the_table_into_the_real_model(tmp_path):
    cfg = model_config("tiny")
    vocab = Vocab(["ICD10:I10", "RX:x", "LOINC:1"])
    model = Behrt(cfg, len(vocab), rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    before = np.asarray(params["embeddings"]["code"]["embedding"][...]).copy()
    table = np.arange(len(vocab) * cfg.embed_dim, dtype=np.float32).reshape(len(vocab), cfg.embed_dim)
    new = set_code_table(params, table)
    merged = nnx.merge(graphdef, new, rest)
    np.testing.assert_array_equal(np.asarray(merged.embeddings.code.embedding[...]), table)
    np.testing.assert_array_equal(np.asarray(params["embeddings"]["code"]["embedding"][...]), before)
    np.testing.assert_array_equal(  # other parameters untouched
        np.asarray(new["embeddings"]["age"]["embedding"][...]),
        np.asarray(params["embeddings"]["age"]["embedding"][...]),
    )
    with pytest.raises(ValueError, match="shape"):
        set_code_table(params, table[:, :2])
    pure = {"embeddings": {"code": {"embedding": np.zeros_like(table)}}}
    np.testing.assert_array_equal(set_code_table(pure, table)["embeddings"]["code"]["embedding"], table)
    with pytest.raises(ValueError, match="/".join(CODE_TABLE_PATH)):
        set_code_table({"other": np.zeros(2)}, table)


def _npz_wrong_keys(tmp_path):
    np.savez(tmp_path / "m.npz", W_emb=np.ones((2, 3)), embeddings=np.ones(3))
    (tmp_path / "m.types.json").write_text('{"A": 0, "B": 1}')
    return tmp_path / "m.npz", {}, r"expected the Med2Vec arrays .*missing \['W_hidden'.*unexpected \['embeddings'\]"


def _npz_shape_mismatch(tmp_path):
    path, _ = write_original_med2vec(tmp_path, ["ICD10:I10", "B", "C"], name="m")
    with open(tmp_path / "m.types", "wb") as fh:
        pickle.dump({"ICD10:I10": 0, "B": 1}, fh)
    return path, {"allow_pickle": True}, "3 vectors but the codes map .*m.types has 2 codes"


def _npz_nan(tmp_path):
    path, arrays = write_original_med2vec(tmp_path, ["ICD10:I10", "B"], name="m")
    arrays["W_emb"][1, 2] = np.nan
    np.savez(path, **arrays)
    return path, {"allow_pickle": True}, "1 NaN/inf values in W_emb"


def _w2v_inf(tmp_path):
    (tmp_path / "w.txt").write_text("2 2\nICD10:I10 1 inf\nB 0 1\n")
    return tmp_path / "w.txt", {}, "1 NaN/inf values in the vectors"


def _unknown_binary(tmp_path):
    (tmp_path / "w.dat").write_bytes(bytes(range(256)) * 4)
    return tmp_path / "w.dat", {}, "unknown format"


def _unknown_extension(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"2 2\n")
    return tmp_path / "w.bin", {}, r"unknown format \.bin"


def _text_not_numbers(tmp_path):
    (tmp_path / "w.txt").write_text("ICD10:I10 a b\n")
    return tmp_path / "w.txt", {}, "unknown format .values are not numbers"


def _pickle_without_opt_in(tmp_path):
    path, _ = write_original_med2vec(tmp_path, ["ICD10:I10"], name="m")
    return path, {}, "is a pickle; pass allow_pickle=True"


def _zero_overlap(tmp_path):
    (tmp_path / "w.txt").write_text("1 2\nFOO:1 1 2\n")
    return tmp_path / "w.txt", {}, "none of its 1 codes .* matches the vocabulary"


def _dim_mismatch(tmp_path):
    (tmp_path / "w.txt").write_text("1 2\nICD10:I10 1 2\n")
    return tmp_path / "w.txt", {"embed_dim": 64}, r"dimension 2 but model.embed_dim is 64; set model.embed_dim = 2"


def _header_count(tmp_path):
    (tmp_path / "w.txt").write_text("3 2\nICD10:I10 1 2\n")
    return tmp_path / "w.txt", {}, "the header says 3 vectors, the file has 1"


def _ragged_rows(tmp_path):
    (tmp_path / "w.txt").write_text("2 2\nICD10:I10 1 2\nB 1\n")
    return tmp_path / "w.txt", {}, "vector 2 has 1 values, expected 2"


def _duplicate_code(tmp_path):
    (tmp_path / "w.txt").write_text("2 1\nICD10:I10 1\nICD10:I10 2\n")
    return tmp_path / "w.txt", {}, "code 'ICD10:I10' appears twice"


def _no_map(tmp_path):
    np.save(tmp_path / "t.npy", np.ones((2, 2)))
    return tmp_path / "t.npy", {}, "no codes JSON found"


def _npy_not_2d(tmp_path):
    np.save(tmp_path / "t.npy", np.ones(3))
    (tmp_path / "t.json").write_text('["ICD10:I10"]')
    return tmp_path / "t.npy", {}, "expected a 2-d array"


def _missing_file(tmp_path):
    return tmp_path / "nope.npz", {}, "does not exist"


def _corrupt_npz(tmp_path):
    (tmp_path / "m.npz").write_bytes(b"not a zip")
    return tmp_path / "m.npz", {}, "not a readable .npz"


@pytest.mark.parametrize(
    "make",
    [
        _npz_wrong_keys,
        _npz_shape_mismatch,
        _npz_nan,
        _w2v_inf,
        _unknown_binary,
        _unknown_extension,
        _text_not_numbers,
        _pickle_without_opt_in,
        _zero_overlap,
        _dim_mismatch,
        _header_count,
        _ragged_rows,
        _duplicate_code,
        _no_map,
        _npy_not_2d,
        _missing_file,
        _corrupt_npz,
    ],
)
def test_bad_files_are_one_line_errors_naming_the_file(tmp_path, make):
    path, kwargs, message = make(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        load_code_table(path, Vocab(["ICD10:I10", "RX:x"]), **kwargs)
    text = str(err.value)
    assert text.startswith(f"embedding file {path}: ") and "\n" not in text


def test_bad_options_are_errors(tmp_path):
    (tmp_path / "w.txt").write_text("1 2\nICD10:I10 1 2\n")
    with pytest.raises(ValueError, match="rescale 'max' unknown"):
        load_code_table(tmp_path / "w.txt", Vocab(["ICD10:I10"]), rescale="max")
    with pytest.raises(ValueError, match="missing_init 'ones' unknown"):
        load_code_table(tmp_path / "w.txt", Vocab(["ICD10:I10"]), missing_init="ones")


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_ehrjax_code_table_export_imports_back(tmp_path, suffix):
    from ehrjax.train.export import export_code_table

    vocab = Vocab(["ICD10:I10", "RX:x", "LOINC:1"])
    model = Behrt(model_config("tiny"), len(vocab), rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    export_code_table(params, vocab, tmp_path)
    table, report = load_code_table(tmp_path / f"code_embeddings{suffix}", vocab, rescale="none")
    expected = np.asarray(params["embeddings"]["code"]["embedding"][...])
    np.testing.assert_array_equal(table[NUM_SPECIAL:], expected[NUM_SPECIAL:])
    assert report.file_format == "ehrjax" and report.matched_exact == 3 and report.codes_path.endswith("vocab.json")
