"""Stand-alone workflows: pre-train once, fine-tune with LoRA elsewhere; MLM on top of an imported table."""

import json
from pathlib import Path

import numpy as np
import pytest

from ehrjax.train.loop import train


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from tests.train.conftest import load_config

    config = load_config("smoke")
    config.train.epochs = 1
    config.output_dir = str(tmp_path_factory.mktemp("mlm") / "run")
    return train(config)


def test_lora_fine_tuning_keeps_pretrained_weights_frozen(pretrained, smoke_config):
    smoke_config.task = "outcome"
    smoke_config.arm = "mlm_lora"
    smoke_config.init_from = str(pretrained.workdir)
    smoke_config.train.epochs = 1
    result = train(smoke_config)
    base = np.load(Path(pretrained.workdir) / "export" / "model.npz")
    tuned = np.load(Path(result.workdir) / "export" / "model.npz")
    shared = [k for k in base.files if k.startswith(("embeddings/", "encoder/"))]
    assert shared and all(np.array_equal(base[k], tuned[k]) for k in shared)
    adapters = [k for k in tuned.files if k.endswith(("lora_a", "lora_b"))]
    assert adapters and (Path(result.workdir) / "export" / "adapters.safetensors").is_file()
    assert 0 < result.params["trainable_pct"] < 25
    assert json.loads((Path(result.workdir) / "vocab.json").read_text()) == json.loads(
        (Path(pretrained.workdir) / "vocab.json").read_text()
    )


def test_lora_arm_without_a_pretrained_run_is_refused(smoke_config):
    smoke_config.task = "outcome"
    smoke_config.arm = "mlm_lora"
    with pytest.raises(ValueError, match="set init_from"):
        train(smoke_config)


def test_mlm_on_an_imported_table_keeps_it_frozen(pretrained, smoke_config, tmp_path):
    vocab = json.loads((Path(pretrained.workdir) / "vocab.json").read_text())["codes"]
    rng = np.random.default_rng(0)
    dim = smoke_config.model.embed_dim
    clinical = vocab[5:]
    vectors = rng.normal(size=(len(clinical), dim))
    path = tmp_path / "vectors.txt"
    path.write_text(f"{len(clinical)} {dim}\n" + "".join(
        code + " " + " ".join(f"{v:.6f}" for v in row) + "\n" for code, row in zip(clinical, vectors, strict=True)
    ))  # fmt: skip
    smoke_config.embeddings_from = str(path)
    smoke_config.train.epochs = 1
    result = train(smoke_config)
    run = Path(result.workdir)
    coverage = json.loads((run / "embedding_coverage.json").read_text())
    assert coverage["matched"] > 0
    assert result.params["trainable_labels"] == ["embeddings", "encoder", "head"]
    table = np.load(run / "export" / "code_embeddings.npz")["code_embeddings"]
    model_vocab = json.loads((run / "vocab.json").read_text())["codes"]
    row = model_vocab.index(clinical[0])
    imported = np.asarray(vectors[0], dtype=np.float32)
    # rescaled on import (documented in ehrjax.embeddings.io), then never updated: the direction survives
    cosine = table[row] @ imported / np.linalg.norm(table[row]) / np.linalg.norm(imported)
    assert cosine > 0.999
