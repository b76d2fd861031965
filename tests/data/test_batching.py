import functools
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ehrjax.config import base_config
from ehrjax.data.batching import (
    DeviceBatcher,
    _spread_sorted,
    batch_at,
    bucket_lengths,
    format_padding_report,
    pack_row_classes,
    pack_row_lengths,
    pack_rows,
    padding_report,
    to_device,
)
from ehrjax.data.cohort import Cohort
from ehrjax.data.labels import next_visit_label_space, next_visit_labels, outcome_labels
from ehrjax.data.tokenize import TokenizedCorpus, tokenize
from ehrjax.data.vocab import CLS, Vocab

CODE_NAMES = np.asarray([f"ICD10:D{i:02d}" for i in range(20)] + [f"RX:r{i}" for i in range(10)])
VOCAB = Vocab(list(CODE_NAMES))


def random_cohort(seed: int, n: int, mean_codes: float = 6.0) -> Cohort:
    """n patients with lognormal numbers of codes spread over random visits."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.lognormal(np.log(mean_codes), 0.9, n).astype(np.int64), 60)
    lengths[rng.random(n) < 0.1] = 0
    total = int(lengths.sum())
    new_visit = rng.random(total) < 0.35
    new_visit[np.cumsum(lengths)[lengths > 0] - lengths[lengths > 0]] = True
    count = np.concatenate([[0], np.cumsum(new_visit)])
    visit = count[1:] - np.repeat(count[np.cumsum(lengths) - lengths], lengths) - 1
    age = (300 + 6 * visit).astype(np.int32)
    return Cohort(
        codes=rng.integers(0, len(CODE_NAMES), total).astype(np.int32),
        visit=visit.astype(np.int32),
        age=age,
        time=age,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        patient_id=np.arange(n, dtype=np.int64),
        sex=np.zeros(n, dtype=np.int8),
        birth_year=np.full(n, 1960, dtype=np.int16),
        split=(np.arange(n) % 3).astype(np.int8),
        code_names=CODE_NAMES,
    )


def corpus_from_lengths(lengths: np.ndarray, max_len: int, seed: int = 0) -> TokenizedCorpus:
    """A corpus with the given token lengths and random contents (for planning tests)."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    codes = rng.integers(5, 100, offsets[-1]).astype(np.int32)
    codes[offsets[:-1]] = CLS
    ages = rng.integers(0, 1200, offsets[-1]).astype(np.int32)
    visits = rng.integers(0, 20, offsets[-1]).astype(np.int32)
    return TokenizedCorpus(codes=codes, ages=ages, visits=visits, offsets=offsets, max_len=max_len)


def lognormal_lengths(n: int, max_len: int, seed: int = 0) -> np.ndarray:
    """Long-tailed lengths: mean about 25 tokens, p99 about 150."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(2.744, 0.975, n).round(), 3, max_len).astype(np.int64)


_group_batch = jax.jit(batch_at)  # one compilation per batch shape


def plan_batch(plan, k: int) -> dict:
    """The `k`-th batch of an epoch plan (the group and index its `order[k]` names)."""
    g, j = (int(x) for x in plan.order[k])
    return _group_batch(plan.groups[g], j)


def plan_batches(plan) -> Iterator[dict]:
    """The epoch's batches in plan order."""
    for k in range(plan.num_batches):
        yield plan_batch(plan, k)


def check_epoch(corpus: TokenizedCorpus, plan) -> list[int]:
    """Fetch every batch of `plan`, check each row against the corpus and return the patients in order."""
    seen: list[int] = []
    for batch in plan_batches(plan):
        b = jax.device_get(batch)
        rows, row_len = b["codes"].shape
        expected = {k: np.zeros((rows, row_len), np.int32) for k in ("codes", "ages", "visits", "segment_ids")}
        for r in range(rows):
            pos = 0
            for s, p in enumerate(b["patient_index"][r]):
                if p < 0:
                    assert not b["slot_mask"][r, s:].any() and (b["patient_index"][r, s:] == -1).all()
                    assert (b["cls_index"][r, s:] == 0).all()
                    break
                assert b["slot_mask"][r, s] and b["cls_index"][r, s] == pos
                tokens = corpus.patient(int(p))
                n = len(tokens["codes"])
                assert tokens["codes"][0] == CLS
                for key in ("codes", "ages", "visits"):
                    expected[key][r, pos : pos + n] = tokens[key]
                expected["segment_ids"][r, pos : pos + n] = s + 1
                pos += n
                seen.append(int(p))
            assert pos <= row_len
        for key, value in expected.items():
            np.testing.assert_array_equal(b[key], value, err_msg=key)
        assert b["num_real_tokens"] == (b["segment_ids"] > 0).sum()
    return seen


def make_batcher(corpus, mode, **kw) -> DeviceBatcher:
    defaults = dict(
        row_len=corpus.max_len, rows_per_batch=2, slots_per_row=4, tokens_per_batch=64, batch_size=3, bucket_min_len=4,
        pack_min_len=4,
    )
    defaults.update(kw)
    return DeviceBatcher(corpus, mode=mode, **defaults)


def check_packing(lengths, row, slot, start, num_rows, row_len, slots):
    assert row.min() == 0 and row.max() == num_rows - 1 and len(np.unique(row)) == num_rows
    np.testing.assert_array_less(np.bincount(row, weights=lengths), row_len + 1)
    assert np.bincount(row).max() <= slots
    for r in range(num_rows):
        members = np.flatnonzero(row == r)
        members = members[np.argsort(slot[members])]
        assert slot[members].tolist() == list(range(len(members)))
        # Slots are back to back from position 0.
        assert start[members].tolist() == np.concatenate([[0], np.cumsum(lengths[members])[:-1]]).tolist()
    assert num_rows >= -(-lengths.sum() // row_len)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=200),
    row_len=st.sampled_from([40, 48, 64, 100]),
    slots=st.integers(1, 12),
    target=st.floats(0.3, 1.5),
)
@example(lengths=[40, 40], row_len=40, slots=1, target=1.5)
def test_pack_rows_is_a_valid_packing(lengths, row_len, slots, target):
    lengths = np.asarray(lengths)
    check_packing(lengths, *pack_rows(lengths, row_len, slots), row_len, slots)
    # The worst-fit spreading stage alone, at any target row count (its overflow goes to best-fit).
    ordered = np.sort(lengths)[::-1]
    num_rows = max(1, int(target * ordered.sum() / row_len))
    check_packing(ordered, *_spread_sorted(ordered, row_len, slots, num_rows), row_len, slots)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=300),
    row_lengths=st.sampled_from([(64,), (8, 16, 32, 64), (16, 32, 64), (5, 10, 20, 40, 64)]),
    slots=st.integers(1, 12),
)
@example(lengths=[64, 33, 33, 1, 1, 1], row_lengths=(8, 16, 32, 64), slots=2)
def test_pack_row_classes_is_a_valid_packing_per_length(lengths, row_lengths, slots):
    lengths = np.asarray(lengths)
    classes = pack_row_classes(lengths, row_lengths, slots)
    assert len(classes) == len(row_lengths)
    items = np.concatenate([c[0] for c in classes])
    assert sorted(items.tolist()) == list(range(len(lengths)))  # every item exactly once
    for k, (item, row, slot, start, num_rows) in enumerate(classes):
        if num_rows == 0:
            assert len(item) == 0
            continue
        check_packing(lengths[item], row, slot, start, num_rows, row_lengths[k], slots)
        # An item goes to rows no shorter than the shortest that holds it.
        shortest = np.searchsorted(np.asarray(row_lengths), lengths[item], side="left")
        assert (shortest <= k).all()
    # The layout depends only on the multiset of lengths: a permutation gives the same row counts.
    permuted = pack_row_classes(lengths[::-1], row_lengths, slots)
    assert [c[4] for c in permuted] == [c[4] for c in classes]


def test_pack_row_classes_fills_long_rows_with_short_patients():
    # Two patients of 40 open two 64-rows; the 20s fill their gaps (no 32-row opens), then one 3 each; the other
    # eight 3s go down to 16-rows: 5 + 3 of them.
    lengths = np.asarray([40, 40, 20, 20, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    classes = pack_row_classes(lengths, (16, 32, 64), 8)
    assert [c[4] for c in classes] == [2, 0, 2]
    item, row, _, _, _ = classes[2]
    assert np.bincount(row, weights=lengths[item]).tolist() == [63, 63]
    item, row, _, _, _ = classes[0]
    assert lengths[item].tolist() == [3] * 8 and sorted(np.bincount(row).tolist()) == [3, 5]


def test_pack_row_lengths():
    assert pack_row_lengths(128, 32) == (32, 64, 128)
    assert pack_row_lengths(512, 64) == (64, 128, 256, 512)
    assert pack_row_lengths(100, 16) == (16, 32, 64, 100)
    assert pack_row_lengths(128, 128) == (128,)
    for bad in (0, 129):
        with pytest.raises(ValueError, match=r"data\.pack_min_len"):
            pack_row_lengths(128, bad)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 40),
    mode=st.sampled_from(["pack", "bucket", "pad_max", "pack_buckets"]),
    max_len=st.sampled_from([8, 16]),
    wide=st.booleans(),
    subset=st.booleans(),
    epoch=st.integers(0, 3),
)
def test_every_patient_exactly_once_and_reconstructed(seed, n, mode, max_len, wide, subset, epoch):
    corpus = tokenize(random_cohort(seed, n), VOCAB, max_len)
    patients = np.arange(n)
    if subset and n > 1:
        patients = np.random.default_rng(seed).permutation(n)[: n // 2 + 1]
    batcher = make_batcher(corpus, mode, row_len=max_len * (2 if wide else 1), seed=seed, patients=patients)
    plan = batcher.plan_epoch(epoch)
    assert plan.num_batches == batcher.num_batches
    seen = check_epoch(corpus, plan)
    assert sorted(seen) == sorted(patients.tolist())  # no drops, no duplicates, the last batch included
    assert len(plan.groups) == len(batcher.shapes)
    assert sum(g.num_batches for g in plan.groups) == plan.num_batches


def patient_hidden_states(plan, encode) -> dict[int, np.ndarray]:
    """Per patient of the plan, the encoder's hidden states at its tokens: f32[length, hidden]."""
    out = {}
    for batch in plan_batches(plan):
        hidden = np.asarray(encode(*(batch[k] for k in ("codes", "ages", "visits", "segment_ids"))))
        patient, cls, length = (np.asarray(batch[k]) for k in ("patient_index", "cls_index", "segment_ids"))
        for r, s in zip(*np.nonzero(patient >= 0), strict=True):
            n = int(np.sum(length[r] == s + 1))
            out[int(patient[r, s])] = hidden[r, cls[r, s] : cls[r, s] + n]
    return out


@functools.cache
def tiny_encoder():
    """A jitted deterministic encode of a tiny BEHRT (one compilation per batch shape for the whole module)."""
    from flax import nnx

    from ehrjax.config import model_config
    from ehrjax.models.behrt import Behrt

    model = Behrt(model_config("tiny"), len(VOCAB), mlm_head=False, rngs=nnx.Rngs(params=0))
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, *inputs: nnx.merge(graphdef, state).encode(*inputs))
    return functools.partial(encode, state)


def check_model_output_per_patient(seed: int, n: int, modes: tuple[str, ...]) -> None:
    """Per mode, two epochs (other rows, row lengths and neighbours): the same hidden states per patient as one
    patient per row (pad_max), as the block-diagonal mask and per-patient positions promise."""
    corpus = tokenize(random_cohort(seed, n), VOCAB, 16)
    encode = tiny_encoder()
    one_per_row = make_batcher(corpus, "pad_max")
    reference = patient_hidden_states(one_per_row.plan_epoch(0), encode)
    assert sorted(reference) == list(range(n))
    for mode in modes:
        batcher = make_batcher(corpus, mode, row_len=32)
        for epoch in (0, 1):
            got = patient_hidden_states(batcher.plan_epoch(epoch), encode)
            assert sorted(got) == list(range(n)), mode
            for p, h in reference.items():
                np.testing.assert_allclose(got[p], h, atol=2e-5, err_msg=f"{mode} epoch {epoch} patient {p}")


def test_a_patients_model_output_does_not_depend_on_its_row():
    check_model_output_per_patient(seed=11, n=40, modes=("pack_buckets",))


@pytest.mark.slow
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(2, 50))
def test_a_patients_model_output_does_not_depend_on_its_row_in_any_mode(seed, n):
    check_model_output_per_patient(seed, n, modes=("pack", "bucket", "pack_buckets"))


def test_epoch_order_is_seeded_and_reproducible():
    corpus = tokenize(random_cohort(0, 300), VOCAB, 16)
    for mode in ("pack", "bucket", "pad_max", "pack_buckets"):
        batcher = make_batcher(corpus, mode, row_len=32, seed=5)

        def order(b: DeviceBatcher, epoch: int, shuffle: bool = True) -> list[int]:
            plan = b.plan_epoch(epoch, shuffle=shuffle)
            out = []
            for g, j in plan.order:
                out += np.asarray(plan.groups[g].patient_index[j]).ravel().tolist()
            return [p for p in out if p >= 0]

        first = order(batcher, 0)
        assert sorted(first) == list(range(300))
        assert order(batcher, 0) == first
        assert order(make_batcher(corpus, mode, row_len=32, seed=5), 0) == first
        assert order(batcher, 1) != first
        assert order(make_batcher(corpus, mode, row_len=32, seed=6), 0) != first
        assert order(batcher, 0, shuffle=False) == order(batcher, 7, shuffle=False)


def test_packing_efficiency_on_long_tailed_lengths():
    data = base_config().data
    reports = {}
    for row_len in (128, 256):
        corpus = corpus_from_lengths(lognormal_lengths(100_000, row_len), row_len)
        data.max_len = data.row_len = row_len
        report = padding_report(corpus, data)
        reports[row_len] = report
        assert report["pack"]["efficiency"] >= 0.90
        assert report["bucket"]["efficiency"] >= 0.70
        assert report["pad_max"]["efficiency"] < report["bucket"]["efficiency"] < report["pack"]["efficiency"]
        assert report["pack"]["distinct_shapes"] == 1
        assert report["bucket"]["distinct_shapes"] <= 6
        assert report["pad_max"]["distinct_shapes"] == 1
        assert report["pack_buckets"]["efficiency"] >= 0.95
        assert report["pack_buckets"]["distinct_shapes"] == len(pack_row_lengths(row_len, data.pack_min_len))
        text = format_padding_report(report)
        assert "pack" in text and "bucket" in text and "pad_max" in text and "pack_buckets" in text
    assert np.isclose(np.mean(lognormal_lengths(20_000, 10_000)), 25, atol=2)


def test_planning_100k_patients_is_fast():
    corpus = corpus_from_lengths(lognormal_lengths(100_000, 256), 256)
    t0 = time.perf_counter()
    batcher = DeviceBatcher(corpus, mode="pack", row_len=256, rows_per_batch=32, slots_per_row=16)
    batcher.plan_epoch(3)
    assert time.perf_counter() - t0 < 1.0


def test_batch_at_under_jit_with_a_traced_index():
    corpus = tokenize(random_cohort(1, 120), VOCAB, 16)
    for mode in ("pack", "pad_max"):
        batcher = make_batcher(corpus, mode, row_len=32)
        plan = batcher.plan_epoch(0)

        @jax.jit
        def epoch(plan):
            def body(acc, i):
                batch = batch_at(plan, i)
                return acc + batch["num_real_tokens"], batch["patient_index"]

            return jax.lax.scan(body, jnp.int32(0), jnp.arange(plan.num_batches))

        total, patient_index = epoch(plan)
        assert int(total) == corpus.num_tokens
        eager = np.stack([np.asarray(plan_batch(plan, k)["patient_index"]) for k in range(plan.num_batches)])
        np.testing.assert_array_equal(patient_index, eager)


def test_bucket_plan_needs_a_concrete_index():
    corpus = tokenize(random_cohort(2, 60), VOCAB, 16)
    batcher = make_batcher(corpus, "bucket")
    plan = batcher.plan_epoch(0)
    assert len(plan.groups) > 1
    assert batch_at(plan, 0)["codes"].shape == plan_batch(plan, 0)["codes"].shape
    with pytest.raises(ValueError, match="concrete batch index"):
        jax.jit(batch_at)(plan, 0)
    group = plan.groups[0]
    assert jax.jit(batch_at)(group, group.num_batches - 1)["codes"].shape == (64 // group.row_len, group.row_len)


def test_bucket_lengths():
    assert bucket_lengths(512, 16) == (16, 32, 64, 128, 256, 512)
    assert bucket_lengths(256) == (8, 16, 32, 64, 128, 256)
    assert bucket_lengths(100, 16) == (16, 32, 64, 128)
    assert bucket_lengths(8, 16) == (16,)


def labelled_cohort() -> Cohort:
    cohort = random_cohort(3, 6)
    next_codes = [[0, 21], [], [1, 1, 2], [25], [3], [0]]  # code indices; 20.. are RX codes
    labels = {
        "outcome": np.asarray([1, 0, -1, 1, 0, -1], dtype=np.int8),
        "next_visit": np.asarray([c for codes in next_codes for c in codes], dtype=np.int32),
        "next_visit_offsets": np.concatenate([[0], np.cumsum([len(c) for c in next_codes])]).astype(np.int64),
    }
    return Cohort(**{**cohort.__dict__, "labels": labels})


def test_task_labels_are_gathered_per_slot():
    cohort = labelled_cohort()
    corpus = tokenize(cohort, VOCAB, 16)
    y, eligible = outcome_labels(cohort)
    assert y.tolist() == [1, 0, 0, 1, 0, 0] and eligible.tolist() == [True, True, False, True, True, False]
    space = next_visit_label_space(VOCAB)
    assert len(space) == 20 and all(VOCAB.code(int(i)).startswith("ICD10:") for i in space)
    multi_hot, has_next = next_visit_labels(cohort, VOCAB, space)
    assert multi_hot.shape == (6, 20) and multi_hot.dtype == np.float32
    assert multi_hot.sum(axis=1).tolist() == [1, 0, 2, 0, 1, 1]  # RX codes are outside the label space
    assert has_next.tolist() == [True, False, True, False, True, True]
    for labels in (y, multi_hot):
        batcher = make_batcher(corpus, "pack", row_len=32, labels=labels, patients=np.flatnonzero(eligible))
        for batch in plan_batches(batcher.plan_epoch(0)):
            index = np.asarray(batch["patient_index"])
            got = np.asarray(batch["labels"])
            assert got.dtype == np.float32 and got.shape == index.shape + labels.shape[1:]
            np.testing.assert_array_equal(got[index >= 0], labels[index[index >= 0]])
            assert (got[index < 0] == 0).all()


def test_bad_input_names_the_key():
    corpus = tokenize(random_cohort(4, 30), VOCAB, 16)
    cases = [
        (dict(mode="pack", row_len=8), "data.row_len"),
        (dict(mode="pack", slots_per_row=0), "data.slots_per_row"),
        (dict(mode="pack", rows_per_batch=0), "data.rows_per_batch"),
        (dict(mode="bucket", tokens_per_batch=40), "data.tokens_per_batch"),
        (dict(mode="bucket", bucket_min_len=3), "data.bucket_min_len"),
        (dict(mode="pack_buckets", tokens_per_batch=40), "data.tokens_per_batch"),
        (dict(mode="pack_buckets", pack_min_len=0), "data.pack_min_len"),
        (dict(mode="pack_buckets", row_len=8), "data.row_len"),
        (dict(mode="pad_max", batch_size=0), "data.batch_size"),
        (dict(mode="sorted"), "data.batching"),
        (dict(mode="pack", patients=np.asarray([], dtype=np.int64)), "patients"),
        (dict(mode="pack", patients=np.asarray([0, 0])), "patients"),
        (dict(mode="pack", patients=np.asarray([30])), "patients"),
        (dict(mode="pack", labels=np.zeros(3)), "labels"),
    ]
    for kw, key in cases:
        mode = kw.pop("mode")
        with pytest.raises(ValueError, match=re.escape(key)):
            make_batcher(corpus, mode, **kw)
    data = base_config().data
    with pytest.raises(ValueError, match=r"data\.max_len"):
        DeviceBatcher.from_config(data, corpus, seed=0)
    with pytest.raises(ValueError, match="outcome"):
        outcome_labels(random_cohort(0, 3))


def test_from_config_and_a_shared_device_corpus():
    data = base_config().data
    data.max_len, data.row_len, data.rows_per_batch, data.slots_per_row = 16, 32, 4, 8
    cohort = random_cohort(5, 90)
    corpus = tokenize(cohort, VOCAB, data.max_len)
    shared = to_device(corpus)
    seen = []
    for split in ("train", "val", "test"):
        patients = np.flatnonzero(cohort.split_mask(split))
        batcher = DeviceBatcher.from_config(data, corpus, seed=0, patients=patients, device_corpus=shared)
        assert batcher.corpus is shared and batcher.mode == "pack"
        seen += check_epoch(corpus, batcher.plan_epoch(0, shuffle=False))
    assert sorted(seen) == list(range(90))


SHARDED_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import sys
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_batching import VOCAB, plan_batch, random_cohort
    from ehrjax.data.batching import DeviceBatcher
    from ehrjax.data.tokenize import tokenize

    assert jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("data",))
    corpus = tokenize(random_cohort(7, 200), VOCAB, 16)
    labels = np.arange(200, dtype=np.float32)
    kw = dict(row_len=32, rows_per_batch=8, slots_per_row=4, tokens_per_batch=128, batch_size=8,
              bucket_min_len=4, pack_min_len=4, labels=labels, seed=3)
    for mode in ("pack", "bucket", "pad_max", "pack_buckets"):
        sharded = DeviceBatcher(corpus, mode=mode, mesh=mesh, **kw)
        single = DeviceBatcher(corpus, mode=mode, **kw)
        plan_s, plan_1 = sharded.plan_epoch(2), single.plan_epoch(2)
        for k in range(plan_s.num_batches):
            a, b = plan_batch(plan_s, k), plan_batch(plan_1, k)
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
            codes = a["codes"]
            assert len(codes.sharding.device_set) == 4, codes.sharding
            assert codes.sharding.spec[0] == "data", codes.sharding.spec
            assert {s.data.shape[0] for s in codes.addressable_shards} == {codes.shape[0] // 4}
    try:
        DeviceBatcher(corpus, mode="pack", mesh=mesh, **{**kw, "rows_per_batch": 6})
    except ValueError as err:
        assert "data.rows_per_batch" in str(err) and "4 devices" in str(err), err
    else:
        raise AssertionError("rows not divisible by devices must fail")
    print("SHARDED OK")
    """
)


def test_sharded_batches_match_unsharded():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT, here], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SHARDED OK" in result.stdout
