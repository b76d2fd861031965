"""Start N local processes of one ehrjax command as a single `jax.distributed` job (a laptop's stand-in for SLURM
or Kubernetes, and what the multi-process tests run):

    python -m ehrjax.launch --processes 2 -- python -m ehrjax.train --config configs/smoke.py

Each process gets `--config.train.distributed=True` and the coordinator address (a free loopback port), the
process count and its id as config flags, and one CPU device (`JAX_PLATFORMS=cpu`, one device per process).
The launcher waits for all of them; when one fails, or the timeout passes, it kills the others and exits with
the first failure's code. Each process's output goes to `<logs>/process_<i>.log` when `--logs` is given, and
to this terminal otherwise (process 0's only, the others' on failure).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int
    output: str  # stdout and stderr together


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return int(sock.getsockname()[1])


def distributed_flags(port: int, num_processes: int, process_id: int) -> list[str]:
    return ["--config.train.distributed=True", f"--config.train.coordinator_address=localhost:{port}",
            f"--config.train.num_processes={num_processes}", f"--config.train.process_id={process_id}"]  # fmt: skip


def start(
    command: Sequence[str],
    num_processes: int,
    *,
    logs: str | os.PathLike,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    port: int = 0,
    pin_cores: bool = False,
) -> list[subprocess.Popen]:
    """Start `command` (argv of an ehrjax CLI) as `num_processes` processes of one job, each in its own process
    group, with its output in `<logs>/process_<i>.log`. pin_cores: process i runs on CPU core i alone (Linux),
    so that N processes on N cores do not share one."""
    if num_processes < 1:
        raise ValueError(f"--processes must be >= 1, got {num_processes}")
    port = port or free_port()
    folder = Path(logs)
    folder.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ if env is None else env)
    base_env.setdefault("JAX_PLATFORMS", "cpu")
    base_env["XLA_FLAGS"] = " ".join(f for f in base_env.get("XLA_FLAGS", "").split()
                                     if not f.startswith("--xla_force_host_platform_device_count"))  # fmt: skip
    procs = []
    for i in range(num_processes):
        with open(folder / f"process_{i}.log", "w") as out:
            argv = [*command, *distributed_flags(port, num_processes, i)]
            pin = (lambda core=i: os.sched_setaffinity(0, {core})) if pin_cores else None
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=base_env, cwd=cwd,
                                          start_new_session=True, preexec_fn=pin))  # fmt: skip
    return procs


def kill(proc: subprocess.Popen) -> None:
    """SIGKILL a started process and everything it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait(procs: Sequence[subprocess.Popen], logs: str | os.PathLike, *, timeout: float) -> list[ProcessResult]:
    """Wait for every process; the first that exits non-zero, or the timeout, kills the rest (their codes are
    then negative, or 124 on the timeout)."""
    deadline = time.monotonic() + timeout
    codes: list[int | None] = [None] * len(procs)
    while any(c is None for c in codes):
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    timed_out = all(c in (None, 0) for c in codes) and any(c is None for c in codes)
    for i, proc in enumerate(procs):
        if codes[i] is None:
            kill(proc)
            codes[i] = 124 if timed_out else proc.returncode
    return [ProcessResult(i, int(c), (Path(logs) / f"process_{i}.log").read_text(errors="replace"))
            for i, c in enumerate(codes)]  # fmt: skip


def launch(
    command: Sequence[str],
    num_processes: int,
    *,
    timeout: float = 1800.0,
    logs: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    pin_cores: bool = False,
) -> list[ProcessResult]:
    """`start` then `wait`; output kept in `logs` (a folder) or a temporary one."""
    folder = Path(logs) if logs else Path(tempfile.mkdtemp(prefix="ehrjax-launch-"))
    procs = start(command, num_processes, logs=folder, env=env, cwd=cwd, pin_cores=pin_cores)
    try:
        return wait(procs, folder, timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill(proc)


def first_failure(results: Sequence[ProcessResult]) -> ProcessResult | None:
    """The process that failed on its own: the first non-zero, non-killed exit (else the first non-zero)."""
    failed = [r for r in results if r.returncode != 0]
    own = [r for r in failed if r.returncode > 0 and r.returncode != 124]
    return (own or failed or [None])[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ehrjax.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="how many processes (one CPU device each)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before every process is killed")
    parser.add_argument("--logs", default="", help="a folder for process_<i>.log (default: a temporary folder)")
    parser.add_argument("--pin-cores", action="store_true", help="run process i on CPU core i alone")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. python -m ehrjax.train")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("error: launch: no command after --", file=sys.stderr)
        return 2
    try:
        results = launch(command, args.processes, timeout=args.timeout, logs=args.logs or None,
                         pin_cores=args.pin_cores)
    except (ValueError, OSError) as err:
        print(f"error: launch: {err}", file=sys.stderr)
        return 2
    failed = first_failure(results)
    shown = results[0] if failed is None else failed
    sys.stdout.write(shown.output)
    if failed is not None:
        print(f"error: launch: process {failed.process_id} exited with {failed.returncode}; "
              f"the others were stopped", file=sys.stderr)  # fmt: skip
        return failed.returncode if failed.returncode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
