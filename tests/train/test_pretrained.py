"""A pre-training run directory read back: keys added to the schema after the run was written."""

import json

import ml_collections
from flax import nnx

from ehrjax.config import base_config, fill_defaults, model_config
from ehrjax.models.behrt import Behrt
from ehrjax.train.pretrained import check_run_folder


def old_run(tmp_path, drop: dict[str, tuple[str, ...]]):
    """A run folder whose config.json lacks the keys `drop` names per section (as written before they existed)."""
    config = json.loads(base_config().to_json())
    config["task"] = "mlm"
    config["model"] = json.loads(model_config("tiny").to_json())
    config["data"]["row_len"] = 64
    config["data"]["retired_key"] = 1  # a key the schema no longer has
    for section, keys in drop.items():
        for key in keys:
            del config[section][key]
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config))
    (run / "vocab.json").write_text("{}")
    return run


def test_a_saved_config_without_newer_keys_loads_with_their_defaults(tmp_path):
    run = old_run(tmp_path, {"model": ("mlm_copy", "dropout_bits"), "data": ("bucket_min_len", "pack_min_len")})
    config = check_run_folder(run, task="mlm")
    assert config["model"]["mlm_copy"] is False and config["model"]["dropout_bits"] == 32
    assert config["data"]["bucket_min_len"] == 8 and config["data"]["pack_min_len"] == 32
    # saved values win; keys the schema dropped stay
    assert config["model"]["preset"] == "tiny" and config["model"]["hidden_dim"] == 32
    assert config["data"]["row_len"] == 64 and config["data"]["retired_key"] == 1
    model_cfg = ml_collections.ConfigDict(config["model"])
    model = nnx.eval_shape(lambda: Behrt(model_cfg, 40, mlm_head=True, rngs=nnx.Rngs(params=0)))
    assert model.mlm_head.copy is None  # the copy head of a run that had none


def test_fill_defaults_keeps_a_complete_config_unchanged():
    saved = json.loads(base_config().to_json())
    assert fill_defaults(saved) == saved
    assert fill_defaults({}) == saved
