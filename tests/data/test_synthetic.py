import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import csr_matrix
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from ehrjax.data.cohort import Cohort
from ehrjax.data.synthetic import (
    BLOCK_SIZE,
    DISEASE_INDEX,
    DISEASES,
    CdfSampler,
    assign_splits,
    code_catalogue,
    generate_cohort,
    visible_risk,
    window_risk,
)


@pytest.fixture(scope="module")
def pretrain():
    return generate_cohort(40_000, seed=3, stream="pretrain")


@pytest.fixture(scope="module")
def finetune():
    return generate_cohort(30_000, seed=3, stream="finetune")


@given(
    n=st.integers(1, 2 * BLOCK_SIZE + 50),
    extra=st.integers(1, BLOCK_SIZE + 10),
    seed=st.integers(0, 2**31 - 1),
    stream=st.sampled_from(["pretrain", "finetune"]),
)
@settings(max_examples=12, deadline=None)
def test_prefix_stability(n, extra, seed, stream):
    small = generate_cohort(n, seed, stream)
    large = generate_cohort(n + extra, seed, stream)
    assert len(small) == n
    assert large[:n].equals(small)  # records, ids, splits, labels, outcome_p


@pytest.mark.parametrize("stream", ["pretrain", "finetune"])
@pytest.mark.parametrize("n", [1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE - 7])
def test_threaded_generation_is_bitwise_the_serial_one(n, stream):
    serial = generate_cohort(n, 5, stream, workers=1)
    for workers in (2, 3, 8):  # 8 > blocks: capped
        threaded = generate_cohort(n, 5, stream, workers=workers)
        assert threaded.equals(serial)
        for name in ("codes", "age", "visit", "time", "offsets", "split", "sex", "birth_year"):
            assert getattr(threaded, name).tobytes() == getattr(serial, name).tobytes(), name
        for name, value in serial.labels.items():
            assert threaded.labels[name].tobytes() == value.tobytes(), name


# SHA-256 over every array (cohort fields, then labels by name) of generate_cohort(9000, 3, stream, workers=1),
# taken at the commit before the guide-table sampler. The generator is part of the benchmark's definition: a change
# that alters its output must be deliberate (and then these digests change with it, with a note saying why).
# finetune: re-taken when the visible heart-failure risk and the renal-decline task added four labels; every array
# that was there before is bitwise unchanged (test_every_recorded_array_is_bitwise_unchanged).
GOLDEN_SHA256 = {
    "pretrain": "a12858a062db9f598e985df1e25535d6fe62cc03412a5d4850d60bdeb7ff99ac",
    "finetune": "de44774cdbddd8b7075ee2b56167a49fafe27c4d1cec69103ad87e377d95a57a",
}


@pytest.mark.parametrize("stream", sorted(GOLDEN_SHA256))
def test_output_is_bitwise_the_recorded_one(stream):
    import hashlib

    from ehrjax.data.cohort import PATIENT_FIELDS, TOKEN_FIELDS

    cohort = generate_cohort(9000, 3, stream, workers=1)
    digest = hashlib.sha256()
    for name in (*TOKEN_FIELDS, "offsets", *PATIENT_FIELDS):
        digest.update(np.ascontiguousarray(getattr(cohort, name)).tobytes())
    for name in sorted(cohort.labels):
        digest.update(np.ascontiguousarray(cohort.labels[name]).tobytes())
    assert digest.hexdigest() == GOLDEN_SHA256[stream]


# The first 16 hex digits of each array's own SHA-256, same cohorts as above. The digests above cover the arrays
# as a whole, so a new label changes them; these show, array by array, that the arrays already there did not.
ARRAY_SHA256 = {
    "finetune": {
        "codes": "4ac701753598a251",
        "visit": "441394badb8b6e54",
        "age": "af70d1332dd3461d",
        "time": "f34c648e56a71d26",
        "offsets": "8dc77681f2517b38",
        "patient_id": "a8544b318c4a2aff",
        "sex": "f1152c413ac020a3",
        "birth_year": "d8502bc92ae4f936",
        "split": "7b4fdb98eaa8cc79",
        "label:index_visit": "4923a0c6d8a8b5a2",
        "label:next_visit": "0fbf07796c8b5291",
        "label:next_visit_offsets": "b558e41268526ec1",
        "label:onset_age_months": "c937488002b3a46b",
        "label:outcome": "ba4fb67cd4c91163",
        "label:outcome_p": "27a1d3ceabce7a69",
        # added with the renal-decline task (the arrays above are as they were before it)
        "label:outcome_p_visible": "8632fa4dddf088b8",
        "label:renal_decline": "9ed7deb0b60a7215",
        "label:renal_decline_p": "c6ae72660e98da74",
        "label:renal_decline_p_visible": "0050bb926d4628a8",
    },
    "pretrain": {
        "codes": "820d14e87561421b",
        "visit": "8cd4673a222736e6",
        "age": "49efe33a76a2a890",
        "time": "f01f4adf91a31bb1",
        "offsets": "c05385263ea2653a",
        "patient_id": "d86c3dabc616e66e",
        "sex": "37d6e51869642ff1",
        "birth_year": "d2c84ae9869fff89",
        "split": "14c44f0cc9d11cda",
        "label:onset_age_months": "79ae216f813578dd",
    },
}


@pytest.mark.parametrize("stream", sorted(ARRAY_SHA256))
def test_every_recorded_array_is_bitwise_unchanged(stream):
    import hashlib

    cohort = generate_cohort(9000, 3, stream, workers=1)
    arrays = {name: getattr(cohort, name) for name in ARRAY_SHA256[stream] if not name.startswith("label:")}
    arrays.update({f"label:{name}": value for name, value in cohort.labels.items()})
    got = {name: hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).hexdigest()[:16] for name in
           ARRAY_SHA256[stream] if name in arrays}  # fmt: skip
    assert got == ARRAY_SHA256[stream]


@given(
    weights=st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=300),
    bits=st.integers(1, 14),
    seed=st.integers(0, 2**32 - 1),
)
@settings(max_examples=60, deadline=None)
def test_cdf_sampler_equals_searchsorted(weights, bits, seed):
    cdf = np.cumsum(weights) / np.sum(weights)
    sampler = CdfSampler(cdf, bits)
    grid = np.arange(1 << bits) / (1 << bits)  # bucket edges
    u = np.concatenate([
        np.random.default_rng(seed).random(2000), grid, np.nextafter(grid[1:], 0), cdf[cdf < 1],
        np.nextafter(cdf[cdf < 1], 0), np.nextafter(cdf[cdf < 1], 1), [0.0, np.nextafter(1.0, 0)],
    ])  # fmt: skip
    u = u[(u >= 0) & (u < 1)]
    expected = np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)
    np.testing.assert_array_equal(sampler(u), expected)


def test_documented_prefix_example():
    assert generate_cohort(5000, 0, "finetune")[:4718].equals(generate_cohort(4718, 0, "finetune"))


def test_splits_come_from_a_hash_of_seed_and_id():
    ids = np.arange(10**12, 10**12 + 50_000, dtype=np.int64)
    split = assign_splits(ids, seed=7)
    np.testing.assert_array_equal(assign_splits(ids[::-1], seed=7), split[::-1])  # not positional
    np.testing.assert_array_equal(assign_splits(ids[1234:1300], seed=7), split[1234:1300])
    fractions = np.bincount(split, minlength=3) / len(split)
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.01)
    assert (assign_splits(ids, seed=8) != split).mean() > 0.2


def test_same_seed_same_arrays_other_seed_differs():
    a, b = generate_cohort(3000, 11, "pretrain"), generate_cohort(3000, 11, "pretrain")
    assert a.equals(b)
    c = generate_cohort(3000, 12, "pretrain")
    assert not a.equals(c)
    assert not np.array_equal(a.split, c.split)


def test_streams_are_disjoint():
    a, b = generate_cohort(2000, 0, "pretrain"), generate_cohort(2000, 0, "finetune")
    assert not set(a.patient_id.tolist()) & set(b.patient_id.tolist())
    assert a.codes[:200].tolist() != b.codes[:200].tolist()


def test_records_are_well_formed(pretrain):
    c = pretrain
    patient = np.repeat(np.arange(len(c)), c.lengths)
    same = patient[1:] == patient[:-1]
    assert np.all(np.diff(c.time)[same] >= 0) and np.all(np.diff(c.age)[same] >= 0)
    step = np.diff(c.visit)[same]
    assert set(np.unique(step).tolist()) <= {0, 1}  # visit indices are contiguous
    assert np.all(c.visit[c.offsets[:-1][c.lengths > 0]] == 0) and np.all(c.time[c.offsets[:-1]] == 0)
    assert np.all(c.lengths > 0)  # every patient has at least one visit, every visit a code
    age_years = c.age[c.offsets[1:] - 1] / 12
    assert np.all(age_years <= 2025 - c.birth_year + 1)  # the last visit is before the extract date
    assert set(c.code_names.tolist()) == set(code_catalogue(1000).tolist())


def test_lengths_are_long_tailed(pretrain):
    lengths = pretrain.lengths
    assert np.median(lengths) < lengths.mean() < np.percentile(lengths, 90)
    assert np.percentile(lengths, 99) > 5 * np.median(lengths)


def test_disease_prevalences_match_the_table(pretrain):
    onset = pretrain.labels["onset_age_months"]
    end_age_years = 2025 - pretrain.birth_year
    for k, disease in enumerate(DISEASES):
        eligible = end_age_years >= disease.age_range[0]
        got = (onset[eligible, k] >= 0).mean()
        assert got == pytest.approx(disease.prevalence, rel=0.2), disease.name


def test_comorbidity_links_are_visible(pretrain):
    has = pretrain.labels["onset_age_months"] >= 0
    for parent, child in [("type2_diabetes", "chronic_kidney_disease"), ("hypertension", "heart_failure")]:
        p, c = has[:, DISEASE_INDEX[parent]], has[:, DISEASE_INDEX[child]]
        assert c[p].mean() > 2.5 * c.mean(), (parent, child)


def test_disease_codes_appear_only_after_onset(pretrain):
    c = pretrain
    names = c.code_names.tolist()
    dx = names.index("ICD10:E11.9")
    rows = np.flatnonzero(c.codes == dx)
    patient = np.searchsorted(c.offsets, rows, side="right") - 1
    onset = c.labels["onset_age_months"][patient, DISEASE_INDEX["type2_diabetes"]]
    assert np.all(onset >= 0) and np.all(c.age[rows] >= onset)


def test_outcome_task(finetune):
    y, p = finetune.labels["outcome"], finetune.labels["outcome_p"]
    eligible = y >= 0
    assert 0.10 <= y[eligible].mean() <= 0.15
    assert np.all(np.isnan(p[~eligible])) and np.all((p[eligible] > 0) & (p[eligible] < 1))
    oracle = roc_auc_score(y[eligible], p[eligible])
    print(f"\noracle AUROC {oracle:.3f} on {eligible.sum()} eligible patients")
    assert 0.70 < oracle < 0.95
    # History ends at the index visit; prevalent cases are not eligible.
    index_visit = finetune.labels["index_visit"]
    np.testing.assert_array_equal(finetune.num_visits[index_visit >= 0], index_visit[index_visit >= 0] + 1)
    hf_codes = [finetune.code_names.tolist().index(code) for code in DISEASES[DISEASE_INDEX["heart_failure"]].diagnosis]
    patient = np.repeat(np.arange(len(finetune)), finetune.lengths)
    assert not np.isin(finetune.codes, hf_codes)[eligible[patient]].any()


def test_renal_decline_task(finetune):
    index_visit = finetune.labels["index_visit"]
    for key in ("outcome_p_visible", "renal_decline_p", "renal_decline_p_visible"):
        assert finetune.labels[key].dtype == np.float32, key
    y, p, visible = (finetune.labels[k] for k in ("renal_decline", "renal_decline_p", "renal_decline_p_visible"))
    eligible = y >= 0
    assert y.dtype == np.int8 and set(np.unique(y).tolist()) == {-1, 0, 1}
    np.testing.assert_array_equal(eligible, index_visit >= 0)  # no prevalent-case exclusion
    for risk in (p, visible):
        assert np.all(np.isnan(risk[~eligible])) and np.all((risk[eligible] > 0) & (risk[eligible] <= 0.95))
    assert 0.08 <= y[eligible].mean() <= 0.15
    # The visible risk averages the hidden frailty out: it is smoother than the true risk, and close to it.
    assert np.std(visible[eligible]) < np.std(p[eligible])
    assert np.corrcoef(visible[eligible], p[eligible])[0, 1] > 0.9
    hf_eligible = finetune.labels["outcome"] >= 0
    assert np.all(np.isnan(finetune.labels["outcome_p_visible"][~hf_eligible]))


def test_without_the_frailty_term_the_visible_risk_is_the_true_risk():
    cohort = generate_cohort(6000, 3, "finetune", hidden_frailty=False)
    assert cohort.meta["hidden_frailty"] is False and "hidden_frailty" not in generate_cohort(10, 3, "finetune").meta
    for label, risk in (("outcome", "outcome_p"), ("renal_decline", "renal_decline_p")):
        true, visible = cohort.labels[risk], cohort.labels[risk + "_visible"]
        assert visible.tobytes() == true.tobytes(), risk  # bitwise, NaNs included
        y = cohort.labels[label]
        eligible = y >= 0
        assert roc_auc_score(y[eligible], visible[eligible]) == roc_auc_score(y[eligible], true[eligible])
    default = generate_cohort(6000, 3, "finetune")
    assert not np.array_equal(default.labels["outcome_p_visible"], default.labels["outcome_p"], equal_nan=True)


def test_visible_risk_integrates_the_frailty_over_its_prior():
    lh = np.linspace(-7.0, 0.5, 41)
    f = np.linspace(-12.0, 12.0, 24_001)  # a fine grid against the standard normal density
    density = np.exp(-0.5 * f**2) / np.sqrt(2 * np.pi)
    for c in (0.25, 0.35):
        grid = (window_risk(lh[:, None] + c * f[None, :]) * density).sum(axis=1) * (f[1] - f[0])
        np.testing.assert_allclose(visible_risk(lh, c), grid, atol=2e-4)
        np.testing.assert_allclose(visible_risk(lh[lh < -1], c), grid[lh < -1], rtol=1e-9, atol=0)
    assert visible_risk(lh, 0.0).tobytes() == window_risk(lh).tobytes()


def test_next_visit_labels_are_diagnosis_codes(finetune):
    labels, offsets = finetune.labels["next_visit"], finetune.labels["next_visit_offsets"]
    assert offsets[-1] == len(labels) > 0
    assert all(name.startswith("ICD10:") for name in np.unique(finetune.code_names[labels]))
    no_index = finetune.labels["index_visit"] < 0
    assert np.all(np.diff(offsets)[no_index] == 0)


def test_bag_of_codes_logistic_regression_is_below_the_oracle(finetune):
    c = finetune
    y, p = c.labels["outcome"], c.labels["outcome_p"]
    patient = np.repeat(np.arange(len(c)), c.lengths)
    x = csr_matrix((np.ones(c.num_tokens), (patient, c.codes)), shape=(len(c), len(c.code_names)))
    x.data = np.log1p(x.data)
    train, test = (y >= 0) & c.split_mask("train"), (y >= 0) & c.split_mask("test")
    model = LogisticRegression(C=0.1, max_iter=2000).fit(x[train], y[train])
    lr_auc = roc_auc_score(y[test], model.predict_proba(x[test])[:, 1])
    oracle = roc_auc_score(y[test], p[test])
    print(f"\nbag-of-codes LR AUROC {lr_auc:.3f} vs oracle {oracle:.3f} (test split)")
    assert lr_auc > 0.6 and oracle - lr_auc > 0.04


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_patients=0), "num_patients must be a positive integer"),
        (dict(num_patients=-5), "num_patients must be a positive integer"),
        (dict(num_patients=10, stream="other"), "stream 'other' unknown"),
        (dict(num_patients=10, num_noise_codes=0), "num_noise_codes"),
        (dict(num_patients=10, workers=0), "workers must be a positive integer"),
        (dict(num_patients=10, workers=1.5), "workers must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_cohort(**kwargs)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "ehrjax.data.synthetic", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_writes_a_cohort_and_prints_its_summary(tmp_path):
    out = tmp_path / "cohort.npz"
    result = run_cli("--num-patients", "500", "--seed", "4", "--stream", "finetune", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "patients 500" in result.stdout and "outcome:" in result.stdout
    assert Cohort.load(out).equals(generate_cohort(500, 4, "finetune"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-patients", "0"], "num_patients must be a positive integer"),
        (["--num-patients", "5", "--stream", "bogus"], "stream 'bogus' unknown"),
        (["--num-patients", "5", "--out", "/nonexistent-dir/c.npz"], "does not exist"),
        (["--num-patients", "5", "--out", "cohort.txt"], "ending in .npz"),
    ],
)
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "c.npz")]
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cohort_cli_reports_a_corrupt_file(tmp_path):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"\x00garbage")
    result = subprocess.run(
        [sys.executable, "-m", "ehrjax.data.cohort", str(bad)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "broken.npz: not a readable .npz" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
