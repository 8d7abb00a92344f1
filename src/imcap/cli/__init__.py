"""The `imcap` command: a thin layer that turns arguments into options and calls the Python API.

One module per command; each imports torch and transformers inside its body, so that `imcap --help` and
the one-line errors of bad arguments answer at once.
"""

from __future__ import annotations

import sys

from imcap.cli import caption, evaluate, explain, models, serve, train  # noqa: F401  (registers them)
from imcap.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
