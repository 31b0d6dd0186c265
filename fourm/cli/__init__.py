"""Command-line entry points, one module per command."""

from __future__ import annotations

import sys


def run_with_clean_errors(main_fn) -> None:
    """`absl.app.run(main_fn)`, printing bad-input errors as one line (exit 1), not a traceback."""
    from absl import app

    def wrapped(argv):
        try:
            main_fn(argv)
        except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
            # Bad input (config, checkpoint, artifact): the message says what and where.
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    app.run(wrapped)
