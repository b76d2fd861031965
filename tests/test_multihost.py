"""Two real local processes joined by jax.distributed (one CPU device each): the multi-process helpers and
the launcher that starts them."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ehrjax.launch import first_failure, launch, main
from ehrjax.multihost import agree, is_writer, multiprocess, put_global, sync

ROOT = Path(__file__).resolve().parents[1]

# Each process builds the same host plan, puts only its own rows, and the sum over the global array, the
# agreed value and the barrier must come out the same on both.
PROGRAM = textwrap.dedent("""
    import sys, time
    from absl import app, flags
    from ml_collections import config_flags
    from ehrjax.config import base_config

    def main(argv):
        from ehrjax.cli import start_jax
        config = config_flags.DEFINE_config_dict("config", base_config())
        flags.FLAGS(sys.argv)
        start_jax(flags.FLAGS.config.train)
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from ehrjax.multihost import agree, is_writer, put_global, sync
        mesh = Mesh(np.asarray(jax.devices()), ("data",))
        host = np.arange(24, dtype=np.int32).reshape(2, 4, 3)
        x = put_global(host, NamedSharding(mesh, P(None, "data", None)))
        local = sorted(int(s.data.sum()) for s in x.addressable_shards)
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
        stamp = agree(1000 + jax.process_index())
        sync("test")
        print(f"RESULT {jax.process_index()} {jax.process_count()} {int(total)} {local} {stamp} {is_writer()}")

    main(sys.argv)
""")


def test_one_process_helpers_are_plain_jax():
    assert not multiprocess() and is_writer()
    assert agree(7) == 7
    sync("nothing to wait for")
    x = put_global({"a": np.arange(3)}, None)
    np.testing.assert_array_equal(np.asarray(x["a"]), np.arange(3))


def test_two_processes_share_a_global_array(tmp_path):
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    results = launch([sys.executable, str(script)], 2, timeout=120, logs=tmp_path / "logs", cwd=ROOT)
    assert [r.returncode for r in results] == [0, 0], results[0].output[-2000:] + results[1].output[-2000:]
    lines = sorted(next(ln for ln in r.output.splitlines() if ln.startswith("RESULT")) for r in results)
    # rows 0-1 of each batch on process 0 and rows 2-3 on process 1: each holds only its own share
    assert lines == ["RESULT 0 2 276 [102] 1000 True", "RESULT 1 2 276 [174] 1000 False"]


def test_a_failing_process_stops_the_others(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import sys, time\nif sys.argv[-1].endswith('=1'):\n    sys.exit(3)\ntime.sleep(60)\n")
    results = launch([sys.executable, str(script)], 2, timeout=30, logs=tmp_path / "logs")
    assert results[1].returncode == 3 and results[0].returncode < 0
    assert first_failure(results).process_id == 1


def test_launch_cli_reports_the_failure(tmp_path, capsys):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.exit(5 if sys.argv[-1].endswith('=0') else 0)\n")
    assert main(["--processes", "2", "--logs", str(tmp_path / "l"), "--", sys.executable, str(script)]) == 5
    assert "process 0 exited with 5" in capsys.readouterr().err
    assert main(["--processes", "2", "--"]) == 2


@pytest.mark.parametrize("settings, message", [
    ({"process_id": 2}, r"train.process_id must be in \[0, train.num_processes=2\)"),
    ({"process_id": 0, "heartbeat_timeout_s": 0}, "train.heartbeat_timeout_s must be > 0"),
])  # fmt: skip
def test_bad_distributed_settings_are_one_line_errors(settings, message):
    from ehrjax.cli import start_distributed

    with pytest.raises(ValueError, match=message):
        start_distributed("localhost:1", 2, **settings)
