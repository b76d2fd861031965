"""`ehrjax.cli`: one-line errors and the process-wide JAX set-up (persistent compilation cache)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from ehrjax.cli import one_line, start_jax

ROOT = Path(__file__).resolve().parents[1]


def test_one_line_joins_a_multi_line_message():
    assert one_line(ValueError("a\\n  b 'c' d")) == "a b 'c' d"


def test_compilation_cache_folder_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = ml_collections.ConfigDict({"distributed": False, "compilation_cache": str(blocker / "cache")})
    with pytest.raises(ValueError, match=r"^train.compilation_cache .*: cannot create the folder") as err:
        start_jax(cfg)
    assert "\n" not in str(err.value)


def test_compilation_cache_is_written_and_read_by_a_second_process(tmp_path):
    """The folder receives the compiled program, and a second process with the same program finds it there."""
    cache = tmp_path / "xla-cache"
    script = (
        "import jax, jax.numpy as jnp, ml_collections\n"
        "from ehrjax.cli import start_jax\n"
        f"start_jax(ml_collections.ConfigDict({{'distributed': False, 'compilation_cache': {str(cache)!r}}}))\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)\n"
        "jax.config.update('jax_explain_cache_misses', True)\n"
        "print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()))\n"
    )

    def run():
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)

    first = run()
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(p.name for p in cache.iterdir())
    assert entries, "nothing written to the cache folder"
    second = run()
    assert second.returncode == 0 and second.stdout == first.stdout
    assert sorted(p.name for p in cache.iterdir()) == entries  # a hit: nothing new compiled and written
