"""Task cohorts from the synthetic generator (unchanged) and from a MEDS dataset chosen by config keys."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ehrjax.config import base_config, load_config_file
from ehrjax.data.cohort import PATIENT_FIELDS, TOKEN_FIELDS
from ehrjax.data.sources import task_cohort
from ehrjax.data.synthetic import generate_cohort
from ehrjax.data.tasks import build_task_data
from ehrjax.data.tasks import task_cohort as tasks_task_cohort

ROOT = Path(__file__).resolve().parents[2]
RECORD_FIELDS = (*TOKEN_FIELDS, "offsets", *PATIENT_FIELDS, "code_names")


def small_config():
    c = base_config()
    c.pretrain.num_patients = 300
    c.finetune.num_patients = 400
    c.pretrain.seed = 3
    c.data.num_noise_codes = 20
    return c


def test_synthetic_source_is_the_generator():
    c = small_config()
    assert c.data.source == "synthetic"
    assert task_cohort(c, "mlm").equals(generate_cohort(300, 3, "pretrain", 20))
    assert task_cohort(c, "outcome").equals(generate_cohort(400, 0, "finetune", 20))
    assert tasks_task_cohort is task_cohort


@pytest.fixture
def meds_config(tmp_path):
    from ehrjax.data.meds import write_meds, write_meds_labels

    c = small_config()
    pretrain = generate_cohort(300, 3, "pretrain", 20)
    finetune = generate_cohort(400, 0, "finetune", 20)
    write_meds(pretrain, tmp_path / "pretrain", shard_size=128)
    write_meds(finetune, tmp_path / "finetune", shard_size=128)
    c.data.source = "meds"
    c.data.meds_dir = str(tmp_path / "pretrain")
    c.data.meds_labels = str(write_meds_labels(finetune, tmp_path / "finetune"))
    return c, pretrain, finetune, tmp_path


def test_meds_source_reads_the_dataset(meds_config):
    pytest.importorskip("pyarrow")
    c, pretrain, finetune, tmp_path = meds_config
    mlm = task_cohort(c, "mlm")
    for name in RECORD_FIELDS:
        np.testing.assert_array_equal(getattr(mlm, name), getattr(pretrain, name), err_msg=name)
    c.data.meds_dir = str(tmp_path / "finetune")
    outcome = task_cohort(c, "outcome")
    eligible = finetune.select(finetune.labels["outcome"] >= 0)
    for name in RECORD_FIELDS:
        np.testing.assert_array_equal(getattr(outcome, name), getattr(eligible, name), err_msg=name)
    data = build_task_data(c, "outcome")
    np.testing.assert_array_equal(data.labels[:, 0], eligible.labels["outcome"].astype(np.float32))


def test_build_task_data_takes_a_cohort_at_hand(monkeypatch):
    """A cohort the caller holds is used as it is (the benchmark passes its pre-training cohort to `train`)."""
    import ehrjax.data.tasks as tasks

    c = small_config()
    cohort = task_cohort(c, "mlm")
    expected = build_task_data(c, "mlm")

    def refuse(*args):
        raise AssertionError("the cohort was generated again")

    monkeypatch.setattr(tasks, "task_cohort", refuse)
    data = build_task_data(c, "mlm", cohort=cohort)
    assert data.cohort is cohort
    for name in ("codes", "ages", "visits", "offsets"):
        np.testing.assert_array_equal(getattr(data.corpus, name), getattr(expected.corpus, name), err_msg=name)


@pytest.mark.parametrize(
    ("keys", "task", "message"),
    [
        ({"source": "omop"}, "mlm", r"data.source 'omop' unknown; expected one of \('synthetic', 'meds'\)"),
        ({"source": "meds"}, "mlm", "data.meds_dir is empty"),
        ({"source": "meds", "meds_dir": "x", "meds_visit_hours": -1.0}, "mlm", "meds_visit_hours must be >= 0"),
        ({"source": "meds", "meds_dir": "x"}, "outcome", "needs data.meds_labels"),
        ({"source": "meds", "meds_dir": "x"}, "next_visit", "MEDS label files do not carry"),
    ],
)
def test_source_errors(keys, task, message):
    c = small_config()
    c.data.update(keys)
    with pytest.raises(ValueError, match=message):
        task_cohort(c, task)


@pytest.mark.slow
def test_train_on_meds_end_to_end(meds_config):
    """Pre-train on a MEDS dataset, then fine-tune the outcome task on MEDS labels, through the config keys."""
    from ehrjax.train.loop import train

    tmp_path = meds_config[3]
    c = load_config_file(ROOT / "configs" / "smoke.py")
    c.data.source = "meds"
    c.data.meds_dir = str(tmp_path / "pretrain")
    c.train.epochs = 1
    c.output_dir = str(tmp_path / "mlm")
    mlm = train(c)
    for name in ("code_embeddings.safetensors", "code_embeddings.txt"):
        assert (Path(mlm.workdir) / "export" / name).is_file(), name
    c.task, c.arm, c.init_from = "outcome", "mlm_lora", str(mlm.workdir)
    c.data.meds_dir = str(tmp_path / "finetune")
    c.data.meds_labels = str(tmp_path / "finetune" / "outcome")
    c.output_dir = str(tmp_path / "outcome")
    result = train(c)
    assert Path(result.workdir, "metrics.jsonl").is_file()
