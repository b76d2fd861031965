"""Arms: what a fine-tuning run starts from and what it trains, as data (`config.arms.<name>`).

An arm names a code-table source, an encoder source, the trainable partitions and LoRA settings. A user adds an
arm with config alone, e.g. `--config.arms.my_arm=...` in a config file. Sources:

- code table: `random` (the model's init), `mlm` / `clm` (the table learned by MLM / next-code pre-training),
  `med2vec` (the Med2Vec table, frozen), or a path to an embedding file (any format `ehrjax.embeddings.io` reads);
- encoder: `random`, `mlm` (the MLM pre-trained encoder), `med2vec_mlm` (the encoder pre-trained by MLM on
  top of the frozen Med2Vec table) or `clm` (the encoder of next-code pre-training, `task=clm`; it trained with
  causal attention and is fine-tuned bidirectionally, like every encoder).

`kind` is `neural` for the arms above; `logreg` (bag-of-codes logistic regression) and `oracle` (the
generator's true risk) are reference arms without a model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import ml_collections

from ehrjax.train.optimizer import PARTITIONS

KINDS: tuple[str, ...] = ("neural", "logreg", "trees", "oracle")
CEILINGS: tuple[str, ...] = ("true", "visible")
TABLE_SOURCES: tuple[str, ...] = ("random", "mlm", "clm", "med2vec")
ENCODER_SOURCES: tuple[str, ...] = ("random", "mlm", "med2vec_mlm", "clm")
# The task of the pre-training run behind each pre-trained source (med2vec_mlm: MLM on the frozen Med2Vec table).
SOURCE_TASKS: dict[str, str] = {"mlm": "mlm", "med2vec_mlm": "mlm", "clm": "clm"}
EVERYTHING: tuple[str, ...] = ("code_table", "embeddings", "encoder", "head")


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    kind: str = "neural"
    description: str = ""
    code_table: str = "random"  # TABLE_SOURCES or a file path
    encoder: str = "random"  # ENCODER_SOURCES
    trainable: tuple[str, ...] = EVERYTHING
    lora: bool = False
    lora_rank: int = 0  # 0: config.lora.rank
    lora_targets: tuple[str, ...] = ()  # (): config.lora.targets
    lr_grid: tuple[float, ...] = ()  # the benchmark's learning-rate candidates (chosen per size on validation)
    ceiling: str = "true"  # oracle arms: 'true' (the generator's risk) or 'visible' (given the record)

    @property
    def pretrained_run(self) -> str | None:
        """Which pre-training the arm's weights come from: `mlm`, `med2vec_mlm`, `clm` or None."""
        if self.encoder != "random":
            return self.encoder
        return None

    @property
    def init_task(self) -> str | None:
        """The task of the pre-training run (`init_from`) the arm starts from: `mlm`, `clm` or None."""
        return SOURCE_TASKS.get(self.encoder if self.encoder != "random" else self.code_table)

    @property
    def table_from_file(self) -> bool:
        return self.code_table not in TABLE_SOURCES

    def structure(self) -> tuple[Any, ...]:
        """What decides the compiled program (besides shapes): runs of equal structure share one compile."""
        return (self.trainable, self.lora, self.lora_rank, self.lora_targets)


# Learning-rate candidates per arm family, each spanning 10x: training from scratch (and a random encoder on
# frozen embeddings) around 3e-4; LoRA adapters, which start at zero and move a low-rank update, 3x higher; full
# fine-tuning of a pre-trained model 10x lower, where large steps erase it. Every family's grid was first one
# step (3x) higher; validation loss chose its lowest value in most cells of that study, so each grid moved down
# one step by the same rule (a choice made on validation only; test results played no part).
SCRATCH_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
LORA_LRS: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
FULL_FINETUNE_LRS: tuple[float, ...] = (1e-5, 3e-5, 1e-4)


def _arm(name: str, kind: str, description: str, **kw: Any) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.kind = kind
    c.description = description
    c.code_table = kw.get("code_table", "random")
    c.encoder = kw.get("encoder", "random")
    c.trainable = tuple(kw.get("trainable", EVERYTHING))
    c.lora = kw.get("lora", False)
    c.lora_rank = kw.get("lora_rank", 0)
    c.lora_targets = tuple(kw.get("lora_targets", ()))
    c.lr_grid = tuple(float(x) for x in kw.get("lr_grid", SCRATCH_LRS))
    c.ceiling = kw.get("ceiling", "true")
    return c


def default_arms() -> ml_collections.ConfigDict:
    """The study's arms (the `*_emb` arms isolate the embeddings; the `*_lora` arms add the encoder)."""
    emb_rest = ("embeddings", "encoder", "head")
    a = ml_collections.ConfigDict()
    a.logreg = _arm("logreg", "logreg", "bag-of-codes counts + age + sex, scikit-learn logistic regression")
    a.trees = _arm("trees", "trees", "gradient-boosted trees on code counts, recency and first-seen times + age, "
                   "sex, visit counts (scikit-learn)")  # fmt: skip
    a.scratch = _arm("scratch", "neural", "random table and encoder, everything trained")
    a.mlm_emb = _arm("mlm_emb", "neural", "MLM-learned table frozen, random encoder, the rest trained",
                     code_table="mlm", trainable=emb_rest)  # fmt: skip
    a.med2vec_emb = _arm("med2vec_emb", "neural", "Med2Vec table frozen, random encoder, the rest trained",
                         code_table="med2vec", trainable=emb_rest)  # fmt: skip
    a.mlm_lora = _arm("mlm_lora", "neural", "MLM-learned table and MLM encoder frozen; LoRA adapters + head",
                      code_table="mlm", encoder="mlm", trainable=("lora", "head"), lora=True,
                      lr_grid=LORA_LRS)  # fmt: skip
    a.med2vec_lora = _arm("med2vec_lora", "neural",
                          "Med2Vec table frozen, encoder MLM-pre-trained on it, frozen; LoRA adapters + head",
                          code_table="med2vec", encoder="med2vec_mlm", trainable=("lora", "head"),
                          lora=True, lr_grid=LORA_LRS)  # fmt: skip
    a.mlm_full = _arm("mlm_full", "neural", "MLM pre-trained table and encoder, everything fine-tuned",
                      code_table="mlm", encoder="mlm", lr_grid=FULL_FINETUNE_LRS)  # fmt: skip
    a.clm_lora = _arm("clm_lora", "neural", "next-code (CLM) learned table and CLM encoder frozen; LoRA adapters + "
                      "head", code_table="clm", encoder="clm", trainable=("lora", "head"), lora=True,
                      lr_grid=LORA_LRS)  # fmt: skip
    a.clm_full = _arm("clm_full", "neural", "next-code (CLM) pre-trained table and encoder, everything fine-tuned",
                      code_table="clm", encoder="clm", lr_grid=FULL_FINETUNE_LRS)  # fmt: skip
    a.oracle = _arm("oracle", "oracle", "the generator's true risk, hidden frailty included (no model is expected "
                    "to reach it)")  # fmt: skip
    a.oracle_visible = _arm("oracle_visible", "oracle", "the risk given what the record shows (the frailty "
                            "integrated out): the realistic ceiling", ceiling="visible")  # fmt: skip
    return a


def reference_arm(description: str, **kw: Any) -> ml_collections.ConfigDict:
    """A neural arm entry for a config file (`c.arms.my_arm = reference_arm("...", code_table="mlm", ...)`)."""
    return _arm("", "neural", description, **kw)


def arm_from_config(name: str, arms: ml_collections.ConfigDict) -> Arm:
    """The arm `name` of `config.arms`, validated (one-line errors naming the key)."""
    if name not in arms:
        raise ValueError(f"arm {name!r} unknown; expected one of {tuple(arms.keys())} (config.arms)")
    c = arms[name]
    key = f"arms.{name}"
    if c.kind not in KINDS:
        raise ValueError(f"{key}.kind {c.kind!r} unknown; expected one of {KINDS}")
    if c.encoder not in ENCODER_SOURCES:
        raise ValueError(f"{key}.encoder {c.encoder!r} unknown; expected one of {ENCODER_SOURCES}")
    if c.code_table not in TABLE_SOURCES and not c.code_table.strip():
        raise ValueError(f"{key}.code_table is empty; expected one of {TABLE_SOURCES} or an embedding file path")
    if c.code_table not in TABLE_SOURCES and not Path(c.code_table).exists():
        raise ValueError(f"{key}.code_table {c.code_table!r}: no such file; expected one of {TABLE_SOURCES} or a file")
    if len({SOURCE_TASKS[s] for s in (c.code_table, c.encoder) if s in SOURCE_TASKS}) > 1:
        raise ValueError(f"{key}: code_table {c.code_table!r} and encoder {c.encoder!r} come from two pre-training "
                         "tasks; an arm starts from one")  # fmt: skip
    trainable = tuple(c.trainable)
    unknown = sorted(set(trainable) - set(PARTITIONS))
    if unknown:
        raise ValueError(f"{key}.trainable has unknown partition(s) {unknown}; expected some of {PARTITIONS}")
    if c.kind == "neural" and not trainable:
        raise ValueError(f"{key}.trainable is empty; name some of {PARTITIONS}")
    if "lora" in trainable and not c.lora:
        raise ValueError(f"{key}.trainable names 'lora' but {key}.lora is False")
    if c.kind == "oracle" and c.ceiling not in CEILINGS:
        raise ValueError(f"{key}.ceiling {c.ceiling!r} unknown; expected one of {CEILINGS}")
    lr_grid = tuple(float(x) for x in c.lr_grid)
    if c.kind == "neural" and (not lr_grid or min(lr_grid) <= 0):
        raise ValueError(f"{key}.lr_grid={list(lr_grid)}: expected positive learning rates")
    if c.lora and "lora" not in trainable:
        raise ValueError(f"{key}.lora is True but 'lora' is not in {key}.trainable: the adapters would stay at zero")
    return Arm(
        name=name, kind=c.kind, description=c.description, code_table=c.code_table, encoder=c.encoder,
        trainable=trainable, lora=bool(c.lora), lora_rank=int(c.lora_rank), lora_targets=tuple(c.lora_targets),
        lr_grid=lr_grid, ceiling=c.ceiling,
    )  # fmt: skip


def arm_lora_config(arm: Arm, lora: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
    """`config.lora` with the arm's rank and targets, or None for an arm without adapters."""
    if not arm.lora:
        return None
    out = ml_collections.ConfigDict(lora.to_dict())
    if arm.lora_rank:
        out.rank = arm.lora_rank
    if arm.lora_targets:
        out.targets = arm.lora_targets
    return out
