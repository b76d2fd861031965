"""`python -m ehrjax.probe`: linear probe of a pre-trained encoder on the outcome task.

    python -m ehrjax.probe --config configs/cpu.py --config.init_from=RUN_DIR [--config.output_dir=DIR]

RUN_DIR is an MLM pre-training run (`python -m ehrjax.train --config.task=mlm`): its `config.json` gives the
model, `vocab.json` the vocabulary and `checkpoints/best` (else `latest`) the parameters. The outcome cohort,
packing sizes and seed come from `--config`. Prints the table of `ehrjax.eval.probe.run_probe` (pre-trained
vs random encoder vs bag-of-codes vs oracle, test AUROC with 95% bootstrap CIs); with `output_dir` set, also
writes `probe.json` there.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ehrjax.cli import error_line, one_line, parse_flags

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
    from ml_collections import config_flags

    _FLAGS["config"] = config_flags.DEFINE_config_file("config", "configs/cpu.py", "Config file (get_config()).")


def main(argv: list[str]) -> int:
    """The CLI after flag parsing; returns the exit status (2: a one-line error)."""
    if len(argv) > 1:
        print(f"error: unexpected arguments: {argv[1:]}", file=sys.stderr)
        return 2
    try:
        config = _FLAGS["config"].value
        config.get("name")  # a config file that failed to load raises here
    except OSError as err:
        print(f"error: config: {one_line(err)}", file=sys.stderr)
        return 2
    from absl import flags, logging

    if not flags.FLAGS["verbosity"].present:  # Orbax logs every restore at INFO
        logging.set_verbosity(logging.WARNING)
    if not config.init_from:
        print("error: init_from: set --config.init_from to an MLM pre-training run directory", file=sys.stderr)
        return 2
    if not Path(config.init_from).is_dir():  # before importing JAX: a typo fails fast
        print(f"error: init_from {config.init_from}: not a directory", file=sys.stderr)
        return 2
    from ehrjax.atomic import check_folder_writable

    try:  # where probe.json goes, before minutes of work
        if config.output_dir:
            check_folder_writable(config.output_dir, "output_dir")
    except ValueError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    from ehrjax.data.tasks import build_task_data
    from ehrjax.eval.probe import format_table, load_pretrained_run, run_probe, write_json

    try:
        model_cfg, vocab, params = load_pretrained_run(config.init_from)
        data = build_task_data(config, "outcome", vocab=vocab)
        result = run_probe(model_cfg, params, data, config.data, config.seed)
    except (ValueError, OSError) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
    result = {"init_from": str(Path(config.init_from).absolute()), "config": config.name, **result}
    print(format_table(result))
    if config.output_dir:
        path = Path(config.output_dir) / "probe.json"
        try:
            write_json(path, result)
        except OSError as err:
            print(f"error: output_dir {config.output_dir}: cannot write probe.json ({error_line(err)})",
                  file=sys.stderr)  # fmt: skip
            return 2
        print(f"wrote {path}")
    return 0


def run() -> None:
    from absl import app

    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
