from pathlib import Path

import pytest

from ehrjax.config import load_config_file

ROOT = Path(__file__).resolve().parents[2]


def load_config(name: str):
    return load_config_file(ROOT / "configs" / f"{name}.py")


@pytest.fixture
def smoke_config(tmp_path):
    config = load_config("smoke")
    config.output_dir = str(tmp_path / "run")
    return config
