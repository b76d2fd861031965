"""What a neural arm starts from, decided in one place for `python -m ehrjax.train` and every benchmark grid cell.

`resolve_arm` turns an arm's sources into explicit inputs. The rules:

- A pre-trained encoder (`encoder` = `mlm`, `clm`, `med2vec_mlm`) brings its run's parameters and model
  config. Its code table comes with it, and the arm's `code_table` source is then not read again.
- Without one, `code_table` = `mlm` / `clm` takes the table learned by that pre-training, trainable as the arm
  says. `med2vec` or a file path imports a third-party table, which is always **frozen**: `code_table` is
  dropped from the trainable partitions whatever the arm lists, because an imported table is the thing
  being evaluated.
- A table of another width than `model.embed_dim` sets the model's `embed_dim` to the table's width. The
  embedding projection maps `embed_dim` to `hidden_dim`, so every other shape stays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from ehrjax.train.arms import Arm, arm_lora_config


@dataclasses.dataclass(frozen=True)
class ArmInputs:
    """What a neural arm starts from: the model config (its embed_dim may be an imported table's), pre-trained
    parameters (or None), a code table f32[vocab, embed_dim] (or None), what trains, and the LoRA settings."""

    arm: Arm
    model_cfg: ml_collections.ConfigDict
    pretrained: nnx.State | None
    code_table: np.ndarray | None
    trainable: tuple[str, ...]
    lora_cfg: ml_collections.ConfigDict | None


def with_embed_dim(model_cfg: ml_collections.ConfigDict, width: int) -> ml_collections.ConfigDict:
    """`model_cfg` itself when its embed_dim is `width`, else a copy with that embed_dim."""
    if int(model_cfg.embed_dim) == int(width):
        return model_cfg
    out = ml_collections.ConfigDict(model_cfg.to_dict())
    out.embed_dim = int(width)
    return out


def imports_table(arm: Arm) -> bool:
    """Whether the arm imports a third-party table (Med2Vec or a file) rather than starting from a pre-trained
    encoder or a learned table."""
    return arm.encoder == "random" and (arm.code_table == "med2vec" or arm.table_from_file)


def resolve_arm(
    arm: Arm,
    *,
    model_cfg: ml_collections.ConfigDict,
    lora_cfg: ml_collections.ConfigDict,
    runs: Mapping[str, Any],
    learned_table: Callable[[Any], np.ndarray],
    import_table: Callable[[str], np.ndarray],
) -> ArmInputs:
    """The inputs of `arm`. runs: the pre-trained runs by source name (`PretrainedRun`s: `.params`,
    `.model_cfg`); learned_table(run): a run's code table; import_table(source): the table of `med2vec` or a
    file path, rows = vocabulary ids. lora_cfg: the config's `lora` section (the arm may override rank and
    targets)."""
    pretrained = table = None
    trainable = tuple(arm.trainable)
    if arm.encoder != "random":
        run = runs[arm.encoder]
        pretrained, model_cfg = run.params, run.model_cfg
    elif arm.code_table in runs and not imports_table(arm):
        table = learned_table(runs[arm.code_table])
    elif imports_table(arm):
        table = import_table(arm.code_table)
        trainable = tuple(p for p in trainable if p != "code_table")
    if table is not None:
        model_cfg = with_embed_dim(model_cfg, table.shape[1])
    return ArmInputs(arm=arm, model_cfg=model_cfg, pretrained=pretrained, code_table=table, trainable=trainable,
                     lora_cfg=arm_lora_config(arm, lora_cfg))  # fmt: skip
