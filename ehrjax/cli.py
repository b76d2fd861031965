"""What the command-line entry points share: absl flag parsing whose errors are one line and exit 2, and the
process-wide JAX set-up a run's config asks for."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from absl import flags


def one_line(err: BaseException) -> str:
    """An exception's message on one line (absl and ml_collections messages span several, with quotes)."""
    text = str(err).replace("\\n", " ").replace("\\'", "'").strip("'\"")
    return " ".join(text.split())


def error_line(err: BaseException) -> str:
    """The one line a CLI prints for an error: an OSError as `PATH: reason` (a read-only folder, a full disk,
    a file where a folder should be), anything else as `one_line`."""
    if isinstance(err, OSError) and not isinstance(err, ValueError):
        from ehrjax.atomic import os_error_line

        return one_line(ValueError(os_error_line(err)))
    return one_line(err)


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run(..., flags_parser=parse_flags)`: an unknown `--config.key`, a bad value or a missing config file
    prints one line and exits 2 instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as err:
        print(f"error: config: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


def start_jax(train_cfg: Any) -> None:
    """Process-wide JAX set-up of a run, before any computation (the `train` section of its config):
    `distributed` calls `jax.distributed.initialize()` (coordinator, process count and id from the cluster
    environment); `compilation_cache`, a folder, turns on XLA's persistent compilation cache there, so a repeated
    or resumed run loads its compiled programs instead of compiling them again (about 5 s each on 2 CPU cores).
    Raises a one-line ValueError for a cache folder that cannot be created."""
    import jax

    if train_cfg.get("distributed", False):
        jax.distributed.initialize()
    path = train_cfg.get("compilation_cache", "")
    if not path:
        return
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"train.compilation_cache {path}: cannot create the folder ({err.strerror or err})") from err
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # programs that take time to compile
