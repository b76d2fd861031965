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
    `distributed` joins a multi-process job (`start_distributed`); `compilation_cache`, a folder, turns on XLA's
    persistent compilation cache there, so a repeated or resumed run loads its compiled programs instead of
    compiling them again (about 5 s each on 2 CPU cores). Raises a one-line ValueError for a cache folder that
    cannot be created."""
    import jax

    if train_cfg.get("distributed", False):
        start_distributed(train_cfg.get("coordinator_address", ""), train_cfg.get("num_processes", 0),
                          train_cfg.get("process_id", -1), train_cfg.get("heartbeat_timeout_s", 100))  # fmt: skip
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


def start_distributed(
    coordinator_address: str = "", num_processes: int = 0, process_id: int = -1, heartbeat_timeout_s: int = 100
) -> None:
    """`jax.distributed.initialize()`: every process of a job calls it before any computation. Unset arguments
    ('' / 0 / -1) are detected from the cluster (SLURM, Open MPI, Kubernetes) or `JAX_COORDINATOR_ADDRESS`;
    processes started by hand pass all three. A process that dies ends the others within about
    `heartbeat_timeout_s` seconds (JAX's coordination service reports which). CPU processes exchange
    gradients over gloo. One-line ValueErrors for inconsistent arguments."""
    import jax

    if num_processes < 0 or (num_processes and not -1 <= process_id < num_processes):
        raise ValueError(f"train.process_id must be in [0, train.num_processes={num_processes}), got {process_id}")
    if heartbeat_timeout_s <= 0:
        raise ValueError(f"train.heartbeat_timeout_s must be > 0, got {heartbeat_timeout_s}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes or None,
        process_id=None if process_id < 0 else process_id,
        heartbeat_timeout_seconds=int(heartbeat_timeout_s),
    )
