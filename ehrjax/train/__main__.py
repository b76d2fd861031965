"""`python -m ehrjax.train --config configs/cpu.py [--config.key=value ...]`: one training run.

    python -m ehrjax.train --config configs/cpu.py --config.task=mlm
    python -m ehrjax.train --config configs/cpu.py --config.task=outcome --config.arm=mlm_lora \\
        --config.init_from=results/cpu-mlm-scratch-<stamp>
    python -m ehrjax.train --config configs/cpu.py --config.resume=results/<run>   # continue a killed run
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ehrjax.atomic import dumps_strict
from ehrjax.cli import error_line, parse_flags, start_jax

_CONFIG = config_flags.DEFINE_config_file("config", "configs/cpu.py", "Experiment config file (get_config()).")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO; keep the console for progress
        logging.set_verbosity(logging.WARNING)
    from ehrjax.train.loop import TrainingDiverged, train

    try:
        config = _CONFIG.value
        config.get("name")  # a config file that failed to load raises here, not at parse time
    except OSError as err:  # the config file could not be loaded
        print(f"error: config: {error_line(err)}", file=sys.stderr)
        return 2
    try:
        start_jax(config.train)
        result = train(config)
    except (ValueError, TrainingDiverged, OSError) as err:  # OSError: a read-only folder, a full disk
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    print(dumps_strict(result.as_dict(), indent=2))  # strict JSON: a metric that is NaN prints as null
    print(f"run directory: {result.workdir}")
    return 0


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
