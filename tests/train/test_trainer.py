"""The trainer built from explicit inputs: vmapped seeds equal sequential seeds, one compile for every labelled-set
size, trainable partitions move and frozen ones do not, LoRA adapters only where targeted."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ehrjax.config import load_config_file
from ehrjax.data.tasks import build_task_data, make_task_data, task_cohort
from ehrjax.train.arms import EVERYTHING
from ehrjax.train.fit import fit
from ehrjax.train.optimizer import param_labels
from ehrjax.train.trainer import ProgramCache, build_trainer, unstack


@pytest.fixture(scope="module")
def outcome():
    config = load_config_file(Path(__file__).resolve().parents[2] / "configs" / "smoke.py")
    config.task = "outcome"
    return config, build_task_data(config, "outcome")


def make(config, data, seeds, *, programs=None, trainable=EVERYTHING, lora_cfg=None, pretrained=None, epochs=2):
    return build_trainer(
        data, model_cfg=config.model, optim_cfg=config.optim, data_cfg=config.data, trainable=trainable,
        seeds=seeds, epochs=epochs, max_eval_patients=150, lora_cfg=lora_cfg, pretrained=pretrained,
        programs=programs or ProgramCache(),
    )  # fmt: skip


def test_vmapped_seeds_match_sequential_seeds(outcome):
    config, data = outcome
    data = data.with_train_size(200)
    together = fit(make(config, data, (0, 1)), patience=5)
    for index, seed in enumerate((0, 1)):
        alone = fit(make(config, data, (seed,)), patience=5)
        for a, b in zip(together.history[index], alone.history[0], strict=True):
            assert a["val_auroc"] == pytest.approx(b["val_auroc"], abs=1e-4)
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        mine = jax.tree.leaves(unstack(together.best_params, index))
        theirs = jax.tree.leaves(unstack(alone.best_params, 0))
        for x, y in zip(mine, theirs, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    assert together.history[0] != together.history[1]  # the seeds are not copies of each other


def test_every_labelled_set_size_reuses_one_compile(outcome):
    config, data = outcome
    programs = ProgramCache()
    for size in (100, 300):
        fit(make(config, data.with_train_size(size), (0, 1), programs=programs, epochs=1), patience=1)
    assert [name for name, *_ in programs.compiles] == ["train", "eval"]


def test_trainable_partitions_move_and_frozen_ones_stay_bitwise(outcome):
    config, data = outcome
    lora = config.lora.copy_and_resolve_references()
    lora.targets = ("q", "v")
    trainer = make(config, data.with_train_size(200), (0,), trainable=("lora", "head"), lora_cfg=lora)
    before = jax.tree.map(np.asarray, trainer.state["params"])
    result = fit(trainer, patience=5)
    after = jax.tree.map(np.asarray, trainer.state["params"])
    labels = jax.tree.leaves(param_labels(unstack(trainer.state["params"], 0)))
    for label, b, a in zip(labels, jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        if label in ("lora", "head"):
            assert not np.array_equal(a, b), label  # trained: every adapter and head array moved
        else:
            np.testing.assert_array_equal(a, b)
    flat = nnx.to_flat_state(unstack(result.best_params, 0))
    adapted = {path[-2] for path, _ in flat if path[-1] in ("lora_a", "lora_b")}
    assert adapted == {"q", "v"}  # adapters exactly on the targeted projections
    lora_b = [np.asarray(v.get_value()) for path, v in flat if path[-1] == "lora_b"]
    assert all(np.abs(b).max() > 0 for b in lora_b)


def test_training_everything_moves_every_parameter(outcome):
    config, data = outcome
    trainer = make(config, data.with_train_size(200), (0,), epochs=1)
    before = nnx.to_flat_state(unstack(trainer.state["params"], 0))
    fit(trainer, patience=5)
    after = dict(nnx.to_flat_state(unstack(trainer.state["params"], 0)))
    still = [path for path, v in before
             if np.array_equal(np.asarray(v.get_value()), np.asarray(after[path].get_value()))]  # fmt: skip
    assert still == [], still  # nothing frozen by mistake


def test_task_data_sizes_are_nested_prefixes_and_the_vocabulary_is_the_labelled_sets(outcome):
    config, data = outcome
    small, large = data.with_train_size(50), data.with_train_size(400)
    np.testing.assert_array_equal(large.splits["train"][:50], small.splits["train"])
    np.testing.assert_array_equal(small.splits["test"], data.splits["test"])
    with pytest.raises(ValueError, match="train size"):
        data.with_train_size(len(data.splits["train"]) + 1)
    cohort = task_cohort(config, "outcome")
    own = make_task_data(cohort, "outcome", max_len=config.data.max_len, train_size=50)
    train_codes = set(np.unique(own.cohort.select(own.splits["train"]).codes))
    expected = {own.cohort.code_names[i] for i in train_codes}
    assert set(own.vocab.codes[5:]) == expected  # built from the 50 labelled patients only
    assert len(own.vocab) < len(data.vocab)


def test_members_with_their_own_labelled_sets_and_rates_match_training_alone(outcome):
    """Members of one vmapped program may train on different labelled sets (so with different batch counts:
    the shorter sit out padding batches) and at different learning rates; each equals its run alone."""
    config, data = outcome
    train = data.splits["train"]
    subsets = [train[:150], train[200:260], train[:150]]
    rates = [1e-3, 1e-3, 3e-3]
    seeds = (0, 1, 0)

    def build(idx):
        return build_trainer(data, model_cfg=config.model, optim_cfg=config.optim, data_cfg=config.data,
                             trainable=EVERYTHING, seeds=[seeds[i] for i in idx], epochs=2, max_eval_patients=200,
                             train_patients=[subsets[i] for i in idx], learning_rates=[rates[i] for i in idx])

    together = build([0, 1, 2])
    assert together.stacked_plan(0).present.sum(axis=0).tolist() == [
        b.num_batches for b in together.train_batchers]
    result = fit(together, patience=5)
    assert result.steps[1] < result.steps[0]  # the small set took fewer steps
    for index in range(3):
        alone = fit(build([index]), patience=5)
        assert result.steps[index] == alone.steps[0]
        for a, b in zip(result.history[index], alone.history[0], strict=True):
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert result.history[0] != result.history[2]  # the learning rate is the member's own


def test_the_step_program_is_keyed_by_every_optimizer_setting_but_the_schedule_state(outcome):
    """Learning rate and warm-up are arrays of the train state (candidates share one program); any other
    optim setting, including one the step might read in future, is a constant of the compiled step."""
    config, data = outcome
    programs = ProgramCache()

    def train_programs(**optim):
        variant = config.copy_and_resolve_references()
        with variant.optim.unlocked():
            variant.optim.update(optim)
        trainer = make(variant, data.with_train_size(100), (0,), programs=programs, epochs=1)
        return {r: trainer.train_step(r).jitted for r in trainer._train}

    base = train_programs()
    assert train_programs(learning_rate=0.3, warmup_steps=7) == base
    assert all(train_programs(weight_decay=0.5)[r] is not p for r, p in base.items())
    assert all(train_programs(some_new_constant=1.0)[r] is not p for r, p in base.items())
    assert programs.num_compiles == 0  # building trainers compiles nothing
