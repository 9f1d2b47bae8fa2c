"""The one logger setup: every process logs through `logging` to its stderr, one line each."""

from __future__ import annotations

import logging
import sys


def setup(prefix: str = "mailpool") -> None:
    """Lines as `<prefix>: message` on stderr (the supervisor's goes to the terminal or the
    service manager's journal; each job's to the same stderr it inherited)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    root = logging.getLogger("mailpool")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False
