import functools
import itertools
import json
import pickle

import jax
import numpy as np
import pytest

from ehrjax.config import base_config
from ehrjax.data.cohort import Cohort
from ehrjax.data.synthetic import DISEASES, generate_cohort
from ehrjax.data.vocab import NUM_SPECIAL, Vocab
from ehrjax.embeddings import med2vec
from ehrjax.embeddings.io import load_code_table


def small_config(**overrides):
    c = base_config().med2vec
    c.dim, c.visit_dim, c.epochs, c.batch_visits = 32, 32, 3, 500
    c.update(overrides)
    return c


def toy_cohort(visits_per_patient, code_names):
    """Patients as lists of visits (lists of catalogue indices) -> a Cohort."""
    codes, visit, lengths = [], [], []
    for patient in visits_per_patient:
        n = 0
        for v, vis in enumerate(patient):
            codes += vis
            visit += [v] * len(vis)
            n += len(vis)
        lengths.append(n)
    n_pat = len(visits_per_patient)
    zeros = np.zeros(len(codes), dtype=np.int32)
    return Cohort(
        codes=np.asarray(codes, dtype=np.int32),
        visit=np.asarray(visit, dtype=np.int32),
        age=zeros,
        time=zeros,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        patient_id=np.arange(n_pat, dtype=np.int64),
        sex=np.zeros(n_pat, dtype=np.int8),
        birth_year=np.full(n_pat, 1950, dtype=np.int16),
        split=np.zeros(n_pat, dtype=np.int8),
        code_names=np.asarray(code_names),
    )


def test_build_visits_pads_dedups_truncates_and_never_crosses_patients():
    names = ["A", "B", "C", "D", "E"]
    cohort = toy_cohort([[[0, 1, 1], [2]], [[0, 1, 2, 3]], [[4]]], names)
    vocab = Vocab(["A", "B", "C", "D"])  # E is not in the vocabulary
    data = med2vec.build_visits(cohort, vocab, max_codes=3, window=1)
    # Med2Vec index k = vocab id k + NUM_SPECIAL: A 0, B 1, C 2, D 3.
    np.testing.assert_array_equal(data.codes, [[0, 1, -1], [2, -1, -1], [0, 1, 2]])
    assert data.truncated_codes == 1 and data.dropped_tokens == 1  # D cut from visit 3, E dropped
    np.testing.assert_array_equal(data.neighbours, [[-1, 1], [0, -1], [-1, -1]])
    assert len(data.pairs) == 2 + 0 + 6
    assert np.all(data.pairs[:, 0] != data.pairs[:, 1])
    assert {tuple(p) for p in data.pairs} == {(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)}
    wide = med2vec.build_visits(toy_cohort([[[0], [1], [2]], [[3]]], names), vocab, max_codes=2, window=2)
    np.testing.assert_array_equal(wide.neighbours, [[-1, -1, 1, 2], [-1, 0, 2, -1], [0, 1, -1, -1], [-1] * 4])


def reference_loss(params, visits, patient, pairs, l2, window=1):
    """The original Theano cost in numpy, on a dense multi-hot x (one batch = all visits)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    n = p["W_emb"].shape[0]
    x = np.zeros((len(visits), n))
    for t, vis in enumerate(visits):
        x[t, vis] = 1.0
    u = np.maximum(x @ p["W_emb"] + p["b_emb"], 0)
    v = np.maximum(u @ p["W_hidden"] + p["b_hidden"], 0)
    logits = v @ p["W_output"] + p["b_output"]
    y = np.exp(logits - logits.max(1, keepdims=True))
    y /= y.sum(1, keepdims=True)
    visit_cost = 0.0
    for o in range(1, window + 1):
        same = (patient[:-o] == patient[o:]).astype(float)[:, None]

        def ce(pred, target):
            return -(target * np.log(pred) + (1 - target) * np.log(1 - pred))

        total = (ce(y[:-o], x[o:]) * same).sum() + (ce(y[o:], x[:-o]) * same).sum()
        visit_cost += total / same.sum()
    c = np.maximum(p["W_emb"], 0)
    s = c @ c.T
    lse = np.log(np.exp(s).sum(1))
    emb_cost = np.mean([lse[i] - s[i, j] for i, j in pairs])
    return visit_cost + emb_cost + l2 * (p["W_emb"] ** 2).sum()


@pytest.mark.parametrize("pairs_per_batch", [64, 4])  # full-softmax normaliser for all codes vs per pair
def test_loss_matches_the_original_cost(pairs_per_batch):
    names = [f"C{k}" for k in range(6)]
    visits_by_patient = [[[0, 1], [2, 3, 4]], [[1, 5], [0], [3, 4]], [[2]]]
    cohort = toy_cohort(visits_by_patient, names)
    vocab = Vocab(names)
    data = med2vec.build_visits(cohort, vocab, max_codes=4, window=1)
    params = med2vec.init_params(jax.random.key(1), data.n_codes, 5, 4)
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(2), a.shape), params)
    n_pairs = len(data.pairs)
    pair_idx = np.arange(n_pairs) if pairs_per_batch >= n_pairs else np.arange(pairs_per_batch)
    pair_idx = np.pad(pair_idx, (0, max(pairs_per_batch - len(pair_idx), 0)), constant_values=-1)
    pairs = data.pairs[np.maximum(pair_idx, 0)]
    nb = data.neighbours
    targets = data.codes[np.maximum(nb, 0)]
    loss_fn = jax.jit(functools.partial(med2vec.loss_fn, l2=0.001))
    loss, metrics = loss_fn(params, data.codes, targets, nb >= 0, pairs, pair_idx >= 0)
    visits = [row[row >= 0] for row in data.codes]
    patient = np.repeat(np.arange(3), [2, 3, 1])
    used = data.pairs[pair_idx[pair_idx >= 0]]
    expected = reference_loss(params, visits, patient, used, 0.001)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    assert set(metrics) == {"loss", "visit", "code", "l2"}


@pytest.fixture(scope="module")
def trained():
    cohort = generate_cohort(8000, seed=0, stream="pretrain", num_noise_codes=200)
    vocab = Vocab.build(cohort.code_names, cohort.code_counts())
    return med2vec.train_med2vec(cohort, vocab, small_config(), progress=False, log=lambda s: None)


def nn_precision(vectors, vocab, k=3):
    """Among the diseases' codes: share of each code's k nearest (cosine) codes from the same disease."""
    ids, disease = [], []
    for label, d in enumerate(DISEASES):
        for code in d.diagnosis + d.treatment + d.monitoring:
            ids.append(vocab.id(code) - NUM_SPECIAL)
            disease.append(label)
    ids, disease = np.asarray(ids), np.asarray(disease)
    x = vectors[ids] / np.maximum(np.linalg.norm(vectors[ids], axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    same = disease[:, None] == disease[None, :]
    chance = (same.sum() - len(ids)) / (len(ids) * (len(ids) - 1))
    return float((disease[nearest] == disease[:, None]).mean()), float(chance)


def test_embeddings_group_codes_of_the_same_disease(trained):
    precision, chance = nn_precision(trained.code_vectors(), trained.vocab)
    print(f"Med2Vec 3-NN same-disease precision {precision:.3f} (chance {chance:.3f})")
    assert precision >= 3 * chance


def test_losses_decrease_over_epochs(trained):
    total = [e["loss"] for e in trained.losses]
    assert len(total) == 3 and all(np.isfinite(total))
    assert all(b < a for a, b in itertools.pairwise(total))
    assert trained.losses[-1]["visit"] < trained.losses[0]["visit"]
    assert trained.losses[-1]["code"] < trained.losses[0]["code"]
    stats = trained.stats
    assert stats["pairs_left_out"] == 0 and stats["truncated_codes"] == 0
    assert stats["pairs_per_step"] * stats["steps_per_epoch"] >= stats["pairs"]
    assert len(stats["epoch_seconds"]) == len(stats["epoch_cpu_seconds"]) == 3


def test_export_writes_the_original_layout_and_imports_back(trained, tmp_path):
    paths = med2vec.save_med2vec(tmp_path / "m2v.npz", trained.params, trained.vocab)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m2v.npz", "m2v.types", "m2v.types.json", "m2v.vocab.json"]
    with np.load(paths["npz"]) as z:
        assert set(z.files) == set(med2vec.PARAM_NAMES)
        n, d = z["W_emb"].shape
        assert z["b_emb"].shape == (d,) and z["W_hidden"].shape == (d, 32) and z["b_hidden"].shape == (32,)
        assert z["W_output"].shape == (32, n) and z["b_output"].shape == (n,)
    with open(paths["types"], "rb") as fh:
        types = pickle.load(fh)
    assert type(types) is dict and types == json.loads(paths["types_json"].read_text())
    assert all(types[c] == k - NUM_SPECIAL for k, c in enumerate(trained.vocab.codes) if k >= NUM_SPECIAL)
    assert Vocab.load(paths["vocab"]) == trained.vocab

    table, report = load_code_table(paths["npz"], trained.vocab, embed_dim=d, rescale="none")
    np.testing.assert_array_equal(table[NUM_SPECIAL:], trained.code_vectors())
    assert report.matched_exact == n and report.vocab_share == 1.0 and report.file_format == "med2vec"
    assert report.codes_path.endswith("m2v.types.json")


def test_training_is_deterministic_given_the_seed():
    cohort = generate_cohort(600, seed=3, stream="pretrain", num_noise_codes=50)
    vocab = Vocab.build(cohort.code_names, cohort.code_counts())
    cfg = small_config(epochs=2, dim=8, visit_dim=8, batch_visits=256, seed=5)
    a = med2vec.train_med2vec(cohort, vocab, cfg, progress=False, log=lambda s: None)
    b = med2vec.train_med2vec(cohort, vocab, cfg, progress=False, log=lambda s: None)
    for name in med2vec.PARAM_NAMES:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert a.losses == b.losses


def test_adadelta_and_fixed_pairs_per_batch_run():
    cohort = generate_cohort(300, seed=0, stream="pretrain", num_noise_codes=20)
    vocab = Vocab.build(cohort.code_names, cohort.code_counts())
    cfg = small_config(epochs=1, dim=8, visit_dim=8, optimizer="adadelta", learning_rate=1.0, pairs_per_batch=64)
    result = med2vec.train_med2vec(cohort, vocab, cfg, progress=False, log=lambda s: None)
    assert np.isfinite(result.losses[0]["loss"])
    assert result.stats["pairs_left_out"] == result.stats["pairs"] - 64 * result.stats["steps_per_epoch"]


@pytest.mark.parametrize(
    "key, value, message",
    [("dim", 0, "med2vec.dim"), ("optimizer", "sgd", "med2vec.optimizer"), ("pairs_per_batch", -1, "pairs_per_batch")],
)
def test_bad_config_is_a_one_line_error(key, value, message):
    cfg = small_config()
    cfg[key] = value
    cohort = generate_cohort(10, seed=0, num_noise_codes=5)
    with pytest.raises(ValueError, match=message):
        med2vec.train_med2vec(cohort, Vocab(list(cohort.code_names)), cfg, progress=False)


def test_save_refuses_bad_paths(trained, tmp_path):
    with pytest.raises(ValueError, match=r"ending in \.npz"):
        med2vec.save_med2vec(tmp_path / "m2v.bin", trained.params, trained.vocab)
    with pytest.raises(ValueError, match="does not exist"):
        med2vec.save_med2vec(tmp_path / "nope" / "m2v.npz", trained.params, trained.vocab)


def test_command_line_trains_and_exports(tmp_path, capsys):
    rc = med2vec.main(["--num-patients", "300", "--seed", "1", "--out", str(tmp_path / "run"), "--epochs", "1"])
    assert rc == 0
    assert (tmp_path / "run" / "med2vec.npz").is_file() and (tmp_path / "run" / "med2vec.types.json").is_file()
    out = capsys.readouterr()
    assert "visits/s" in out.out and "epoch 1/1" in out.err + out.out
    # trained on the training split only: the vocabulary holds no code seen only in validation/test patients
    cohort = generate_cohort(300, seed=1, stream="pretrain")
    train_only = cohort.select(cohort.split_mask("train"))
    seen = {train_only.code_names[i] for i in np.unique(train_only.codes)}
    codes = json.loads((tmp_path / "run" / "med2vec.types.json").read_text())
    assert set(codes) == seen


def test_command_line_refuses_zero_patients(tmp_path, capsys):
    assert med2vec.main(["--num-patients", "0", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--num-patients must be > 0" in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_with_a_clear_error():
    cohort = generate_cohort(200, seed=0, num_noise_codes=10)
    vocab = Vocab.build(cohort.code_names, cohort.code_counts())
    cfg = small_config(epochs=2, dim=4, visit_dim=4, learning_rate=1e30)
    with pytest.raises(ValueError, match=r"loss became (nan|inf) in epoch 1; lower med2vec\.learning_rate"):
        med2vec.train_med2vec(cohort, vocab, cfg, progress=False, log=lambda s: None)
