"""One resolver for what an arm starts from: its rules on hand-made inputs, and the same arm trained through
`python -m ehrjax.train`'s path and through a benchmark grid cell giving the same predictions."""

from __future__ import annotations

from types import SimpleNamespace

import ml_collections
import numpy as np

from ehrjax.train.arms import EVERYTHING, Arm, _arm, arm_from_config
from ehrjax.train.resolve import resolve_arm

MODEL = ml_collections.ConfigDict({"embed_dim": 16, "hidden_dim": 32})
LORA = ml_collections.ConfigDict({"rank": 4, "alpha": 8.0, "targets": ("q", "v"), "dropout": 0.0})


def resolve(arm: Arm, runs: dict | None = None, width: int = 16):
    imported = []

    def import_table(source: str) -> np.ndarray:
        imported.append(source)
        return np.ones((5, width), np.float32)

    inputs = resolve_arm(arm, model_cfg=MODEL, lora_cfg=LORA, runs=runs or {},
                         learned_table=lambda run: run.table, import_table=import_table)  # fmt: skip
    return inputs, imported


def test_an_imported_table_is_frozen_whatever_the_arm_lists():
    inputs, imported = resolve(Arm("user", code_table="/data/vectors.txt", trainable=EVERYTHING))
    assert imported == ["/data/vectors.txt"]
    assert "code_table" not in inputs.trainable and set(inputs.trainable) == set(EVERYTHING) - {"code_table"}
    assert inputs.model_cfg is MODEL and inputs.pretrained is None


def test_a_table_of_another_width_sets_embed_dim_and_nothing_else():
    inputs, _ = resolve(Arm("m2v", code_table="med2vec", trainable=("encoder", "head")), width=100)
    assert inputs.model_cfg.embed_dim == 100 and inputs.model_cfg.hidden_dim == 32
    assert MODEL.embed_dim == 16  # the caller's config is not changed
    assert inputs.trainable == ("encoder", "head")


def test_a_learned_table_trains_as_the_arm_says_and_an_encoder_brings_its_own():
    run = SimpleNamespace(table=np.zeros((5, 16), np.float32), params="params", model_cfg="the run's model")
    learned, imported = resolve(Arm("mlm_full", code_table="mlm", trainable=EVERYTHING), runs={"mlm": run})
    assert learned.trainable == EVERYTHING and learned.code_table is run.table and not imported
    lora, imported = resolve(Arm("mlm_lora", code_table="mlm", encoder="mlm", trainable=("lora", "head"), lora=True),
                             runs={"mlm": run})  # fmt: skip
    assert lora.pretrained == "params" and lora.model_cfg == "the run's model" and lora.code_table is None
    assert lora.lora_cfg.rank == 4 and not imported


def test_the_cli_and_a_grid_cell_train_a_user_table_arm_alike(smoke_config, tmp_path, width=8):
    """A user's arm with an embedding file (its trainable list left at everything): the stand-alone run and the
    benchmark's grid cell both freeze the table, take its width, and give the same test predictions."""
    from ehrjax.benchmark.grid import CellData, replicate_rows, run_neural_cell
    from ehrjax.data.batching import DeviceBatcher, to_device
    from ehrjax.data.tasks import build_task_data
    from ehrjax.data.vocab import NUM_SPECIAL
    from ehrjax.train.loop import _code_table, train
    from ehrjax.train.trainer import ProgramCache

    c = smoke_config
    c.finetune.num_patients = 800
    c.task, c.optim.schedule, c.train.metric, c.train.epochs, c.train.patience = "outcome", "constant", "loss", 2, 2
    # No warm-up: the grid clamps it to a tenth of one epoch and the stand-alone run to a tenth of the run.
    c.optim.warmup_steps = 0
    data = build_task_data(c, "outcome")
    rng = np.random.default_rng(0)
    codes = data.vocab.codes[NUM_SPECIAL: data.vocab.code_end]
    path = tmp_path / "vectors.txt"
    path.write_text(f"{len(codes)} {width}\n" + "".join(
        f"{code} " + " ".join(f"{v:.4f}" for v in rng.normal(size=width)) + "\n" for code in codes))  # fmt: skip
    c.arms.user = _arm("user", "neural", "a user's table, trainable list left at everything", code_table=str(path))
    c.arm = "user"
    cli = np.load(train(c).workdir / "predictions.npz")

    train_rows = replicate_rows(data.splits["train"], c.seed, len(data.splits["train"]))
    np.testing.assert_array_equal(train_rows, data.splits["train"])  # the grid's labelled set is the CLI's
    val = data.splits["val"][: c.train.max_eval_patients]
    cell = CellData("outcome", data, None, None, val)
    inputs = resolve_arm(arm_from_config("user", c.arms), model_cfg=c.model, lora_cfg=c.lora, runs={},
                         learned_table=None, import_table=lambda p: _code_table(p, data, c)[0])  # fmt: skip
    assert inputs.model_cfg.embed_dim == width and "code_table" not in inputs.trainable
    per_epoch = DeviceBatcher.from_config(c.data, data.corpus, seed=c.seed, patients=train_rows).num_batches
    runs, _, _ = run_neural_cell(
        inputs, cell, len(train_rows), [c.seed], [c.optim.learning_rate], out=tmp_path / "grid", optim_cfg=c.optim,
        data_cfg=c.data, max_steps=c.train.epochs * per_epoch, eval_steps=1, patience=c.train.patience,
        corpus=to_device(data.corpus, data.labels), programs=ProgramCache(),
    )  # fmt: skip
    grid = np.load(tmp_path / "grid" / runs[0]["predictions"])
    for split in ("val", "test"):
        a, b = cli["split"] == split, grid["split"] == split
        np.testing.assert_array_equal(cli["patient_id"][a], grid["patient_id"][b])
        np.testing.assert_allclose(cli["probability"][a], grid["probability"][b], rtol=1e-6, err_msg=split)
