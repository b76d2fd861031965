"""Fixtures for the model tests: the tiny preset and a LoRA config on every target."""

from __future__ import annotations

import pytest

from ehrjax.config import lora_config, model_config


@pytest.fixture
def tiny_cfg():
    cfg = model_config("tiny")
    cfg.dropout = 0.1
    return cfg


@pytest.fixture
def lora_cfg():
    cfg = lora_config()
    cfg.rank = 4
    cfg.targets = ("q", "k", "v", "o", "mlp_in", "mlp_out")
    return cfg
