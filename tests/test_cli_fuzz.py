"""Hostile configs, embedding files, state files and output folders, table-driven: each case asserts the error
(a ValueError for a library call, exit status 2 for a CLI), that its message is ONE line naming the input, that
it came before any cohort was built (not after minutes of work), and that nothing in the folders involved
changed. A handful of subprocess cases check the CLI edges themselves."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ehrjax.atomic import atomic_write, dumps_strict, write_text
from ehrjax.config import load_config_file
from ehrjax.data.vocab import SPECIAL_TOKENS
from tests.fuzzkit import assert_one_line, snapshot

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.py"
CODES = [f"D_{k}" for k in range(6)]


def smoke(tmp_path: Path, **overrides):
    """The smoke config writing to tmp_path/run, with dotted overrides (`optim.learning_rate`)."""
    config = load_config_file(SMOKE)
    config.output_dir = str(tmp_path / "run")
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture
def no_work(monkeypatch):
    """Building a cohort is the first real work; an error that comes after it is late."""

    def late(*args, **kwargs):
        raise RuntimeError("LATE: a cohort was built before the error")

    monkeypatch.setattr("ehrjax.data.sources.generate_cohort", late)
    pytest.importorskip("pyarrow")
    monkeypatch.setattr("ehrjax.data.meds.read_meds", late)


def expect_error(fn, *needles, folders=()):
    """`fn()` raises a one-line ValueError naming `needles`; the folders are unchanged. Returns the message."""
    before = snapshot(*folders)
    with pytest.raises(ValueError) as err:
        fn()
    assert_one_line(str(err.value), *needles)
    assert snapshot(*folders) == before, "the error changed a folder"
    return str(err.value)


# ---------------------------------------------------------------------------------------------- configs
NAN, INF = float("nan"), float("inf")
CONFIG_CASES = [
    ({"train.epochs": 0}, "train.epochs"),
    ({"train.epochs": -3}, "train.epochs"),
    ({"train.patience": 0}, "train.patience"),
    ({"train.log_every": 0}, "train.log_every"),
    ({"train.checkpoint_every": -1}, "train.checkpoint_every"),
    ({"train.max_eval_patients": 0}, "train.max_eval_patients"),
    ({"train.metric": "bogus"}, "train.metric 'bogus'"),
    ({"task": "outcome", "train.metric": "top1"}, "auroc, ap, pr_auc, loss"),
    ({"optim.learning_rate": 0.0}, "optim.learning_rate"),
    ({"optim.learning_rate": NAN}, "optim.learning_rate"),
    ({"optim.learning_rate": INF}, "optim.learning_rate"),
    ({"optim.weight_decay": NAN}, "optim.weight_decay"),
    ({"optim.weight_decay": -0.1}, "optim.weight_decay"),
    ({"optim.clip_norm": -1.0}, "optim.clip_norm"),
    ({"optim.b1": 1.0}, "optim.b1"),
    ({"optim.b2": NAN}, "optim.b2"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps"),
    ({"optim.schedule": "linear"}, "optim.schedule"),
    ({"model.hidden_dim": 0}, "model.hidden_dim"),
    ({"model.num_heads": 3}, "model.num_heads"),
    ({"model.dropout": 1.0}, "model.dropout"),
    ({"model.dropout": NAN}, "model.dropout"),
    ({"model.dtype": "float8"}, "model.dtype"),
    ({"model.position": "rotary"}, "model.position"),
    ({"task": "outcome", "arm": "mlm_lora", "init_from": "/nonexistent", "lora.rank": 0}, "lora.rank"),
    ({"data.mask_prob": 0.0}, "data.mask_prob"),
    ({"data.mask_prob": NAN}, "data.mask_prob"),
    ({"data.max_len": 0}, "data.max_len"),
    ({"data.rows_per_batch": 0}, "data.rows_per_batch"),
    ({"data.mlm_slot_factor": INF}, "data.mlm_slot_factor"),
    ({"pretrain.num_patients": 0}, "pretrain.num_patients"),
    ({"finetune.num_patients": -5}, "finetune.num_patients"),
    ({"task": "bogus"}, "task 'bogus'"),
    ({"task": "outcome", "arm": "nonsense"}, "arm 'nonsense'"),
    ({"task": "outcome", "arm": "logreg"}, "logreg"),
    ({"task": "outcome", "arm": "mlm_lora"}, "init_from"),
    ({"task": "outcome", "arm": "med2vec_emb"}, "embeddings_from"),
    ({"data.source": "sql"}, "data.source 'sql'"),
    ({"data.source": "meds"}, "data.meds_dir"),
    ({"init_from": "/nonexistent/run"}, "/nonexistent/run"),
    ({"embeddings_from": "/nonexistent/table.txt"}, "/nonexistent/table.txt"),
]


@pytest.mark.parametrize(("overrides", "needle"), CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_bad_config_is_one_line_before_any_work_and_makes_no_folder(tmp_path, no_work, overrides, needle):
    from ehrjax.train.loop import train

    config = smoke(tmp_path, **overrides)
    expect_error(lambda: train(config), needle, folders=[tmp_path])
    assert not (tmp_path / "run").exists()


def test_med2vec_config_nan_is_refused(tmp_path):
    from ehrjax.embeddings.med2vec import validate_config

    config = smoke(tmp_path, **{"med2vec.l2": NAN})
    expect_error(lambda: validate_config(config.med2vec), "med2vec.l2")


# ---------------------------------------------------------------------------------------------- embedding files
def med2vec_arrays(n: int = len(CODES), d: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"W_emb": rng.normal(size=(n, d)), "b_emb": np.zeros(d), "W_hidden": rng.normal(size=(d, 4)),
            "b_hidden": np.zeros(4), "W_output": rng.normal(size=(4, n)), "b_output": np.zeros(n)}  # fmt: skip


def types_map() -> dict[str, int]:
    return {c: k for k, c in enumerate(CODES)}


def word2vec(rows: list[str], header: str | None = None) -> str:
    return (f"{header}\n" if header else "") + "".join(f"{r}\n" for r in rows)


def build_embedding(tmp: Path, case: str) -> tuple[Path, dict]:
    """An embedding file for `case` and the keyword arguments of validate_embedding_file."""
    vec = " ".join(["0.1"] * 8)
    if case == "missing":
        return tmp / "absent.txt", {}
    if case == "nan_text":
        path = tmp / "t.txt"
        path.write_text(word2vec([f"{c} {vec}" for c in CODES[:-1]] + [f"{CODES[-1]} nan {vec[4:]}"], "6 8"))
        return path, {}
    if case == "inf_npy":
        path = tmp / "t.npy"
        table = np.ones((len(CODES), 8))
        table[2, 3] = np.inf
        np.save(path, table)
        (tmp / "t.json").write_text(json.dumps(CODES))
        return path, {}
    if case in ("nan_med2vec", "bad_shape_med2vec", "no_map", "pickle_no_opt_in", "bad_pickle", "map_count"):
        arrays = med2vec_arrays()
        if case == "nan_med2vec":
            arrays["W_emb"][0, 0] = np.nan
        if case == "bad_shape_med2vec":
            arrays["b_emb"] = np.zeros(3)
        path = tmp / "m.npz"
        np.savez(path, **arrays)
        if case in ("nan_med2vec", "bad_shape_med2vec"):
            (tmp / "m.types.json").write_text(json.dumps(types_map()))
        elif case == "pickle_no_opt_in":
            (tmp / "m.types").write_bytes(pickle.dumps(types_map(), protocol=2))
        elif case == "bad_pickle":
            (tmp / "m.types").write_bytes(b"\x80\x02garbage")
            return path, {"allow_pickle": True}
        elif case == "map_count":
            (tmp / "m.types.json").write_text(json.dumps({"D_0": 0}))
        return path, {}
    if case == "npy_3d":
        path = tmp / "t.npy"
        np.save(path, np.ones((2, 3, 4)))
        (tmp / "t.json").write_text(json.dumps(["a", "b"]))
        return path, {}
    if case == "header_count":
        path = tmp / "t.txt"
        path.write_text(word2vec([f"{c} {vec}" for c in CODES], "9 8"))
        return path, {}
    if case == "wrong_dim":
        path = tmp / "t.txt"
        path.write_text(word2vec([f"{c} {vec}" for c in CODES], "6 8"))
        return path, {"embed_dim": 16}
    if case == "empty_text":
        path = tmp / "t.txt"
        path.write_text("")
        return path, {}
    if case == "garbage_npz":
        path = tmp / "t.npz"
        path.write_bytes(b"PK\x03\x04 not really a zip")
        return path, {}
    if case == "ragged_csv":
        path = tmp / "t.csv"
        path.write_text("D_0,0.1,0.2\nD_1,0.3\n")
        return path, {}
    if case == "foreign_npz":
        path = tmp / "t.npz"
        np.savez(path, weights=np.ones((3, 4)))
        return path, {}
    if case == "pickle_suffix":
        path = tmp / "t.pkl"
        path.write_bytes(pickle.dumps({"a": 1}))
        return path, {}
    raise AssertionError(case)


EMBEDDING_CASES = [
    ("missing", "does not exist"),
    ("nan_text", "NaN/inf"),
    ("inf_npy", "NaN/inf"),
    ("nan_med2vec", "NaN/inf values in W_emb"),
    ("bad_shape_med2vec", "b_emb"),
    ("no_map", "no code map found"),
    ("pickle_no_opt_in", "allow_pickle"),
    ("bad_pickle", "not a readable pickle"),
    ("map_count", "codes map"),
    ("npy_3d", "2-d array"),
    ("header_count", "header says 9"),
    ("wrong_dim", "model.embed_dim"),
    ("empty_text", "empty"),
    ("garbage_npz", "not a readable .npz"),
    ("ragged_csv", "values"),
    ("foreign_npz", "Med2Vec arrays"),
    ("pickle_suffix", "unknown format"),
]


@pytest.mark.parametrize(("case", "needle"), EMBEDDING_CASES, ids=[c[0] for c in EMBEDDING_CASES])
def test_bad_embedding_file_is_one_line_naming_it(tmp_path, case, needle):
    from ehrjax.embeddings.io import validate_embedding_file

    path, kwargs = build_embedding(tmp_path, case)
    expect_error(lambda: validate_embedding_file(path, **kwargs), str(path), needle, folders=[tmp_path])


def test_bad_embedding_file_fails_the_train_config_before_any_work(tmp_path, no_work):
    from ehrjax.train.loop import train

    path, _ = build_embedding(tmp_path, "nan_med2vec")
    config = smoke(tmp_path, embeddings_from=str(path), **{"model.embed_dim": 8})
    expect_error(lambda: train(config), "embeddings_from", str(path), "NaN/inf", folders=[tmp_path])
    assert not (tmp_path / "run").exists()


def test_original_med2vec_epoch_file_finds_its_types_map(tmp_path):
    """The original tool writes X.<epoch>.npz beside X.types: the map is found by stripping the epoch."""
    from ehrjax.embeddings.io import validate_embedding_file

    np.savez(tmp_path / "model.9.npz", **med2vec_arrays())
    (tmp_path / "model.types").write_bytes(pickle.dumps(types_map(), protocol=2))
    expect_error(lambda: validate_embedding_file(tmp_path / "model.9.npz"), "allow_pickle", "model.types")
    assert validate_embedding_file(tmp_path / "model.9.npz", allow_pickle=True) == (len(CODES), 8)
    (tmp_path / "model.types.json").write_text(json.dumps(types_map()))  # the safe map is preferred
    assert validate_embedding_file(tmp_path / "model.9.npz") == (len(CODES), 8)


def test_an_explicit_code_map_is_accepted_for_train_too(tmp_path, no_work):
    """med2vec.codes_path names the map (JSON, whatever its name) for the train CLI as for the benchmark."""
    from ehrjax.embeddings.io import validate_embedding_file
    from ehrjax.train.loop import validate_config

    np.savez(tmp_path / "out.9.npz", **med2vec_arrays())
    codes = tmp_path / "elsewhere" / "codes.types"
    codes.parent.mkdir()
    codes.write_text(json.dumps(types_map()))  # JSON under the original tool's name: read as JSON, no pickle
    assert validate_embedding_file(tmp_path / "out.9.npz", codes) == (len(CODES), 8)
    config = smoke(tmp_path, embeddings_from=str(tmp_path / "out.9.npz"), **{"model.embed_dim": 8,
                   "med2vec.codes_path": str(codes)})  # fmt: skip
    validate_config(config)
    config.med2vec.codes_path = str(tmp_path / "nope.json")
    expect_error(lambda: validate_config(config), "nope.json", "does not exist")


# ---------------------------------------------------------------------------------------------- state files
def fake_run(folder: Path, task: str = "mlm", *, checkpoints: str = "garbage") -> Path:
    """A run folder as `train` leaves it, with a damaged checkpoint unless `checkpoints` says otherwise."""
    from ehrjax.train.loop import config_to_dict

    config = smoke(folder.parent, task=task)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config_to_dict(config)))
    (folder / "vocab.json").write_text(json.dumps({"format": "ehrjax.vocab", "version": 1,
                                                   "codes": [*SPECIAL_TOKENS, *CODES]}))  # fmt: skip
    (folder / "checkpoints").mkdir()
    if checkpoints == "garbage":
        (folder / "checkpoints" / "latest" / "20" / "params").mkdir(parents=True)
        (folder / "checkpoints" / "latest" / "20" / "params" / "junk").write_text("not a checkpoint")
    return folder


INIT_CASES = [
    ("other_task", "a run of task outcome, expected mlm"),
    ("config_not_json", "not valid JSON"),
    ("config_a_list", "not a run config"),
    ("no_vocab", "no vocab.json"),
    ("no_checkpoints", "no checkpoints/ folder"),
    ("empty_checkpoints", "no complete checkpoint"),
    ("garbage_checkpoint", "cannot restore"),
    ("not_a_folder", "not a directory"),
]


@pytest.mark.parametrize(("case", "needle"), INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_bad_init_from_run_is_one_line_and_the_run_is_not_touched(tmp_path, no_work, case, needle):
    from ehrjax.train.loop import train

    run = tmp_path / "pre"
    fake_run(run, task="outcome" if case == "other_task" else "mlm",
             checkpoints="none" if case == "empty_checkpoints" else "garbage")  # fmt: skip
    if case == "config_not_json":
        (run / "config.json").write_text('{"task": "mlm", "model": ')
    elif case == "config_a_list":
        (run / "config.json").write_text("[1, 2]")
    elif case == "no_vocab":
        (run / "vocab.json").unlink()
    elif case == "no_checkpoints":
        shutil.rmtree(run / "checkpoints")
    elif case == "not_a_folder":
        shutil.rmtree(run)
        run.write_text("x")
    config = smoke(tmp_path, task="outcome", arm="mlm_lora", init_from=str(run))
    expect_error(lambda: train(config), str(run) if case != "garbage_checkpoint" else str(run / "checkpoints"),
                 needle, folders=[run])  # fmt: skip
    assert not (tmp_path / "run").exists()


RESUME_CASES = [
    ("not_json", "not valid JSON"),
    ("a_list", "not a JSON object"),
    ("no_config", "no config.json"),
    ("other_config", "different config"),
    ("a_file", "not a folder"),
]


@pytest.mark.parametrize(("case", "needle"), RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_bad_resume_folder_is_one_line_and_untouched(tmp_path, no_work, case, needle):
    from ehrjax.train.loop import train

    run = fake_run(tmp_path / "old", checkpoints="none")
    (run / "metrics.jsonl").write_text('{"event": "start", "step": 0}\n')
    if case == "not_json":
        (run / "config.json").write_text("{oops")
    elif case == "a_list":
        (run / "config.json").write_text("[]")
    elif case == "no_config":
        (run / "config.json").unlink()
    elif case == "a_file":
        shutil.rmtree(run)
        run.write_text("x")
    config = smoke(tmp_path, resume=str(run), **({"model.hidden_dim": 64} if case == "other_config" else {}))
    expect_error(lambda: train(config), str(run), needle, folders=[run])


MANIFEST_CASES = [
    ("{", "not valid JSON"),
    ("", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"stages": {}}', "expected a JSON object with a 'config'"),
    ('{"config": {}, "stages": []}', "expected a JSON object with a 'config'"),
    ('{"config": {}, "stages": {"cohorts": "done"}}', "stage 'cohorts' is not a JSON object"),
]


@pytest.mark.parametrize(("text", "needle"), MANIFEST_CASES, ids=[f"manifest{k}" for k in range(len(MANIFEST_CASES))])
def test_hand_edited_manifest_is_one_line(tmp_path, text, needle):
    from ehrjax.benchmark.manifest import Manifest

    (tmp_path / "manifest.json").write_text(text)
    expect_error(lambda: Manifest(tmp_path, {}, resume=True), "manifest.json", needle, folders=[tmp_path])


def test_a_new_benchmark_never_overwrites_a_manifest(tmp_path):
    from ehrjax.benchmark.manifest import Manifest
    from ehrjax.train.rundir import check_output_folder

    (tmp_path / "manifest.json").write_text('{"config": {}, "stages": {"cohorts": {}}}')
    (tmp_path / "report.md").write_text("finished")
    expect_error(lambda: Manifest(tmp_path, {}, resume=False), str(tmp_path), "already holds a benchmark",
                 folders=[tmp_path])  # fmt: skip
    expect_error(lambda: check_output_folder(tmp_path, resume=False, marker="manifest.json", what="benchmark"),
                 str(tmp_path), "--config.resume", folders=[tmp_path])  # fmt: skip
    (tmp_path / "manifest.json").unlink()
    expect_error(lambda: check_output_folder(tmp_path, resume=True, marker="manifest.json", what="benchmark"),
                 str(tmp_path), "no manifest.json", folders=[tmp_path])  # fmt: skip
    expect_error(lambda: check_output_folder(tmp_path, resume=False, marker="manifest.json", what="benchmark"),
                 str(tmp_path), "not empty", folders=[tmp_path])  # fmt: skip


def write_hashes(folder: Path, arrays: dict[str, np.ndarray] | bytes | None) -> Path:
    (folder / "cohorts").mkdir(parents=True, exist_ok=True)
    for stream in ("pretrain", "finetune"):
        path = folder / "cohorts" / f"{stream}_patient_hashes.npz"
        if isinstance(arrays, bytes):
            path.write_bytes(arrays)
        elif arrays is not None:
            np.savez(path, **arrays)
    return folder / "cohorts" / "finetune_patient_hashes.npz"


H = {k: np.arange(5, dtype=np.uint64) * (j + 1) for j, k in enumerate(("codes", "age", "label__outcome"))}
COMPARE_CASES = [
    ("identical", dict(H), None),
    ("lacks_an_array", {k: v for k, v in H.items() if k != "age"}, None),
    ("extra_array", dict(H, sex=np.zeros(5, np.uint64)), None),
    ("disjoint", {"other": np.zeros(5, np.uint64)}, None),
    ("bad_zip", b"PK\x03\x04garbage", "not a readable .npz"),
    ("empty_npz", {}, "holds no hash arrays"),
    ("ragged", dict(H, age=np.zeros(3, np.uint64)), "different lengths"),
    ("float_hashes", dict(H, age=np.zeros(5)), "expected uint64"),
    ("missing", None, "missing"),
]


@pytest.mark.parametrize(("case", "b", "error"), COMPARE_CASES, ids=[c[0] for c in COMPARE_CASES])
def test_cohort_comparison_compares_every_array(tmp_path, case, b, error):
    from ehrjax.benchmark.manifest import compare_prefixes

    write_hashes(tmp_path / "a", H)
    path_b = write_hashes(tmp_path / "b", b)
    if error is not None:
        needle = str(path_b).replace("finetune", "pretrain")
        expect_error(lambda: compare_prefixes(tmp_path / "a", tmp_path / "b"), needle, error, folders=[tmp_path])
        return
    result = compare_prefixes(tmp_path / "a", tmp_path / "b")["finetune"]
    assert result["identical"] == (case == "identical"), result
    if case == "disjoint":
        assert result["common_arrays"] == 0


JSONL_CASES = [
    ('{"step": 1}\n{"step": 2}\n{"step": 3, "lo', 2, None),  # a kill tore the last line: dropped, with a warning
    ('{"step": 1}\n{"step": 2}\n\n', 2, None),
    ('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n', None, "line 2"),
    ('{"step": 1}\n[1, 2]\n{"step": 3}\n', None, "line 2"),
    ('NaN\n{"step": 2}\n', None, "line 1"),
]


@pytest.mark.parametrize(("text", "n", "error"), JSONL_CASES, ids=[f"jsonl{k}" for k in range(len(JSONL_CASES))])
def test_torn_metrics_lines(tmp_path, capsys, text, n, error):
    from ehrjax.eval.baselines import last_test_eval
    from ehrjax.train.rundir import RunLog, read_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text(text)
    if error is not None:
        expect_error(lambda: read_jsonl(path), str(path), error, folders=[tmp_path])
        expect_error(lambda: last_test_eval(path), str(path), error, folders=[tmp_path])
        expect_error(lambda: RunLog(path, resume_step=10), str(path), error, folders=[tmp_path])
        return
    assert [r["step"] for r in read_jsonl(path)] == list(range(1, n + 1))
    warned = capsys.readouterr().err
    if not text.endswith("\n"):
        assert_one_line(warned, str(path), "torn last line 3")
    else:
        assert not warned
    log = RunLog(path, resume_step=10)
    assert path.read_text() == text  # nothing rewritten before the resumed run logs
    log.log({"step": 11})  # then the complete lines are kept and the torn one dropped
    log.close()
    assert path.read_text() == "".join(f'{{"step": {k}}}\n' for k in [*range(1, n + 1), 11])


# ---------------------------------------------------------------------------------------------- output folders, locks
def test_a_run_folder_is_never_replaced_without_resume(tmp_path, no_work):
    from ehrjax.train.loop import train

    run = fake_run(tmp_path / "run", checkpoints="none")
    (run / "metrics.jsonl").write_text('{"event": "start"}\n')
    expect_error(lambda: train(smoke(tmp_path)), str(run), "already holds a run", folders=[run])
    (run / "config.json").unlink()
    expect_error(lambda: train(smoke(tmp_path)), str(run), "not empty", folders=[run])
    shutil.rmtree(run)
    run.write_text("a file")
    expect_error(lambda: train(smoke(tmp_path)), str(run), "not a folder", folders=[run])


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the folder's lock until killed."""
    code = ("import sys, time\nfrom ehrjax.train.rundir import FolderLock\n"
            f"FolderLock({str(folder)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(120)\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))  # fmt: skip
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_folder_in_use_is_refused_naming_the_process(tmp_path, no_work):
    from ehrjax.train.loop import config_to_dict, train

    config = smoke(tmp_path)
    run = Path(config.output_dir)
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_to_dict(config)))
    config.resume = str(run)
    proc = hold_lock(run)
    try:
        lock_file = run / ".ehrjax.lock"
        expect_error(lambda: train(config), str(run), f"in use by process {proc.pid}", folders=[run])
        assert lock_file.is_file()
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    import socket

    from ehrjax.train.rundir import FolderLock

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".ehrjax.lock").write_text(f"{dead.pid} {socket.gethostname()}\n")
    with FolderLock(tmp_path):
        assert (tmp_path / ".ehrjax.lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / ".ehrjax.lock").exists()  # released on exit
    assert_one_line(capsys.readouterr().err, str(dead.pid), "took over")


# ---------------------------------------------------------------------------------------------- one-class task
@pytest.fixture(scope="module")
def all_false_meds(tmp_path_factory):
    pytest.importorskip("meds")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ehrjax.data.meds import meds_label_table, write_meds
    from ehrjax.data.synthetic import generate_cohort

    root = tmp_path_factory.mktemp("meds")
    cohort = generate_cohort(400, 0, "finetune", 50)
    write_meds(cohort, root / "data")
    table = meds_label_table(cohort)
    table = table.set_column(2, "boolean_value", pa.array(np.zeros(table.num_rows, bool)))
    (root / "labels" / "outcome").mkdir(parents=True)
    pq.write_table(table, root / "labels" / "outcome" / "labels.parquet")
    return root


def test_a_one_class_task_is_refused_before_training(tmp_path, all_false_meds):
    from ehrjax.train.loop import train

    config = smoke(tmp_path, task="outcome", **{"data.source": "meds", "data.meds_dir": str(all_false_meds / "data"),
                   "data.meds_labels": str(all_false_meds / "labels" / "outcome")})  # fmt: skip
    message = expect_error(lambda: train(config), "'outcome'", "val split has one class", "0 positive",
                           folders=[all_false_meds])  # fmt: skip
    assert "negative" in message
    assert not (tmp_path / "run").exists()


def test_a_one_class_validation_split_alone_is_refused():
    from ehrjax.data.synthetic import generate_cohort
    from ehrjax.data.tasks import check_evaluable, make_task_data

    data = make_task_data(generate_cohort(400, 0, "finetune", 50), "outcome", max_len=64)
    check_evaluable(data)
    labels = data.labels.copy()
    labels[data.splits["test"]] = 1.0
    expect_error(lambda: check_evaluable(dataclasses.replace(data, labels=labels)), "test split has one class")


def test_cli_json_is_strict():
    payload = {"val": {"auroc": float("nan"), "n": np.float32(3)}, "curve": [np.inf, 1.0], "a": np.array([np.nan])}
    text = dumps_strict(payload)

    def refuse(name):
        raise AssertionError(f"bare {name} in the JSON")

    assert json.loads(text, parse_constant=refuse) == {"val": {"auroc": None, "n": 3.0}, "curve": [None, 1.0],
                                                       "a": [None]}  # fmt: skip


# ---------------------------------------------------------------------------------------------- temp files, modes
def test_killed_atomic_write_leaves_a_temp_file_the_next_write_removes(tmp_path):
    code = ("import os\nfrom ehrjax.atomic import atomic_write\n"
            f"atomic_write({str(tmp_path / 'c.npz')!r}, lambda tmp: (tmp.write_bytes(b'half'), os._exit(9)))\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False, timeout=60)
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".c.npz.tmp-") and left[0].endswith(".npz"), left
    write_text(tmp_path / "other.txt", "x")  # any write into the folder cleans up after the dead writer
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]


def test_a_killed_meds_write_leaves_no_folder_behind_the_next_one(tmp_path):
    pytest.importorskip("meds")
    from ehrjax.data.meds import write_meds
    from ehrjax.data.synthetic import generate_cohort

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".m.{dead.pid}.tmp"
    (stale / "data").mkdir(parents=True)
    (stale / "data" / "000000.parquet").write_text("half")
    live = tmp_path / f".m.{os.getppid()}.tmp"
    live.mkdir()
    write_meds(generate_cohort(20, 0, "pretrain", 10), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name])


def test_a_live_writers_temp_file_is_kept(tmp_path):
    live = tmp_path / f".x.npz.tmp-{os.getppid()}-0a0b0c0d.npz"
    live.write_text("in progress")
    write_text(tmp_path / "y.txt", "y")
    assert live.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_honour_the_umask(tmp_path, umask):
    from ehrjax.data.synthetic import generate_cohort
    from ehrjax.data.vocab import Vocab
    from ehrjax.embeddings.med2vec import save_med2vec

    old = os.umask(umask)
    try:
        write_text(tmp_path / "a.txt", "x")
        generate_cohort(30, 0, "pretrain", 10).save(tmp_path / "c.npz")
        vocab = Vocab([*SPECIAL_TOKENS, *CODES])
        params = med2vec_arrays()
        save_med2vec(tmp_path / "m.npz", params, vocab)
    finally:
        os.umask(old)
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, (p.name, oct(p.stat().st_mode))


def test_full_disk_names_the_file(tmp_path):
    from ehrjax.cli import error_line

    def full(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError) as err:
        atomic_write(tmp_path / "manifest.json", full)
    assert_one_line(error_line(err.value), str(tmp_path / "manifest.json"), "No space left")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- CLIs in process
def test_meds_write_checks_labels_before_writing(tmp_path, capsys):
    pytest.importorskip("meds")
    from ehrjax.data.meds import main

    out, labels = tmp_path / "m", tmp_path / "L"
    rc = main(["write", "--num-patients", "50", "--stream", "pretrain", "--out", str(out), "--labels", str(labels)])
    assert rc == 2
    assert_one_line(capsys.readouterr().err, str(labels), "--stream finetune")
    assert sorted(tmp_path.iterdir()) == []
    (labels / "outcome").mkdir(parents=True)
    (labels / "outcome" / "labels.parquet").write_text("earlier labels")
    before = snapshot(tmp_path)
    rc = main(["write", "--num-patients", "50", "--stream", "finetune", "--out", str(out), "--labels", str(labels)])
    assert rc == 2
    assert_one_line(capsys.readouterr().err, str(labels / "outcome"), "not an empty folder")
    assert snapshot(tmp_path) == before


def test_meds_write_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("meds")
    from ehrjax.data.meds import main

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full)
    out = tmp_path / "m"
    assert main(["write", "--num-patients", "30", "--out", str(out)]) == 2
    assert_one_line(capsys.readouterr().err, str(out), "No space left")
    assert sorted(tmp_path.iterdir()) == []


def test_med2vec_cli_checks_out_first_and_leaves_no_folder(tmp_path, capsys, monkeypatch):
    from ehrjax.embeddings import med2vec

    def late(*args, **kwargs):
        raise RuntimeError("LATE: a cohort was built before the error")

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setattr("ehrjax.data.synthetic.generate_cohort", late)
    assert med2vec.main(["--num-patients", "20", "--out", str(blocker)]) == 2
    assert_one_line(capsys.readouterr().err, str(blocker), "not a folder")
    assert med2vec.main(["--num-patients", "20", "--epochs", "0", "--out", str(tmp_path / "new")]) == 2
    assert_one_line(capsys.readouterr().err, "med2vec.epochs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_med2vec_cli_full_disk_removes_the_folder_it_made(tmp_path, capsys, monkeypatch):
    from types import SimpleNamespace

    from ehrjax.embeddings import med2vec

    monkeypatch.setattr(med2vec, "train_med2vec", lambda *a, **k: SimpleNamespace(params={}, stats={}))

    def full(path, *args, **kwargs):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(med2vec, "save_med2vec", full)
    out = tmp_path / "m2v"
    assert med2vec.main(["--num-patients", "40", "--epochs", "1", "--out", str(out)]) == 2
    assert_one_line(capsys.readouterr().err, str(out), "No space left")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- CLI edges (subprocess)
def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))  # fmt: skip


def assert_cli_error(result: subprocess.CompletedProcess, rc: int, *needles: str) -> None:
    assert result.returncode == rc, (result.returncode, result.stderr[-3000:])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert_one_line(lines[0], *needles)


def test_benchmark_refuses_a_finished_folder_without_resume(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "manifest.json").write_text('{"config": {}, "stages": {"cohorts": {}}}')
    (out / "summary.json").write_text("{}")
    before = snapshot(out)
    started = time.perf_counter()
    result = cli("ehrjax.benchmark", "--config", str(SMOKE), f"--config.output_dir={out}", "--config.seed=5")
    assert_cli_error(result, 2, str(out), "already holds a benchmark")
    assert snapshot(out) == before
    assert time.perf_counter() - started < 60


def test_benchmark_on_a_folder_in_use_names_the_process(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "manifest.json").write_text('{"config": {}, "stages": {}}')
    proc = hold_lock(out)
    try:
        before = snapshot(out)
        result = cli("ehrjax.benchmark", "--config", str(SMOKE), f"--config.resume={out}")
        assert_cli_error(result, 2, str(out), f"in use by process {proc.pid}")
        assert snapshot(out) == before
    finally:
        proc.kill()
        proc.wait()


def test_train_cli_bad_metric_and_unknown_key(tmp_path):
    out = tmp_path / "run"
    result = cli("ehrjax.train", "--config", str(SMOKE), f"--config.output_dir={out}", "--config.train.metric=bogus")
    assert_cli_error(result, 2, "train.metric 'bogus'", "loss")
    result = cli("ehrjax.train", "--config", str(SMOKE), f"--config.output_dir={out}", "--config.train.epoch=3")
    assert_cli_error(result, 2, "epoch")
    assert not out.exists()


def test_manifest_cli_missing_arrays_differ_and_bad_files_are_one_line(tmp_path):
    write_hashes(tmp_path / "a", H)
    write_hashes(tmp_path / "b", {"other": np.zeros(5, np.uint64)})
    result = cli("ehrjax.benchmark.manifest", str(tmp_path / "a"), str(tmp_path / "b"))
    assert result.returncode == 1 and "IDENTICAL" not in result.stdout and "MISSING" in result.stdout, result.stdout
    write_hashes(tmp_path / "b", b"PK\x03\x04garbage")
    result = cli("ehrjax.benchmark.manifest", str(tmp_path / "a"), str(tmp_path / "b"))
    assert_cli_error(result, 2, str(tmp_path / "b"), "not a readable .npz")


def test_profile_and_probe_check_their_outputs_before_the_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    started = time.perf_counter()
    result = cli("ehrjax.profile", "--config", str(SMOKE), f"--out={blocker}")
    assert_cli_error(result, 2, str(blocker), "not a folder")
    run = fake_run(tmp_path / "pre", checkpoints="none")
    result = cli("ehrjax.probe", "--config", str(SMOKE), f"--config.init_from={run}", f"--config.output_dir={blocker}")
    assert_cli_error(result, 2, str(blocker), "not a folder")
    assert time.perf_counter() - started < 60  # no profiling, no probe: seconds of imports only
    assert blocker.read_text() == "x"


@pytest.mark.slow
def test_a_real_run_survives_a_rerun_a_torn_log_and_a_damaged_checkpoint(tmp_path):
    """On a real (one-epoch) run: a rerun without resume is refused and changes nothing; a torn last metrics
    line does not block its resume; a damaged checkpoint is one line naming it; the run is never replaced."""
    from ehrjax.train.loop import train

    config = smoke(tmp_path, **{"train.epochs": 1})
    run = train(config).workdir
    before = snapshot(run)
    expect_error(lambda: train(smoke(tmp_path, **{"train.epochs": 1, "seed": 3})), str(run), "already holds a run")
    assert snapshot(run) == before
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "train", "step": 99, "lo')  # a kill mid-line
    resumed = smoke(tmp_path, **{"train.epochs": 1})
    resumed.resume = str(run)
    train(resumed)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(ln) for ln in lines)
    step = max(int(p.name) for p in (run / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    for f in (run / "checkpoints" / "latest" / str(step) / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 100:
            f.write_bytes(f.read_bytes()[:50])
    for f in (run / "checkpoints" / "best").rglob("*"):  # the best checkpoint's parameters, damaged the same way
        if f.is_file() and f.stat().st_size > 100 and "params" in f.parts:
            f.write_bytes(f.read_bytes()[:50])
    expect_error(lambda: train(resumed), str(run / "checkpoints"), "cannot restore", folders=[run])
