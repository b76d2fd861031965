"""What the command-line entry points share: absl flag parsing whose errors are one line and exit 2."""

from __future__ import annotations

import sys

from absl import flags


def one_line(err: BaseException) -> str:
    """An exception's message on one line (absl and ml_collections messages span several, with quotes)."""
    text = str(err).replace("\\n", " ").replace("\\'", "'").strip("'\"")
    return " ".join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run(..., flags_parser=parse_flags)`: an unknown `--config.key`, a bad value or a missing config file
    prints one line and exits 2 instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as err:
        print(f"error: config: {one_line(err)}", file=sys.stderr)
        sys.exit(2)
