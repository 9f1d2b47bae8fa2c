"""The test suite's private PostgreSQL cluster (tests/pghelp.py), for the bench's sections
that need a database (bench.twohost, bench.directory_calls): initdb into a temporary
directory, started on a free port of 127.0.0.1, destroyed at the end."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"


def start_cluster() -> Any:
    """A running private cluster (tests/pghelp.PgCluster: .dsn(), .new_database(),
    .destroy()); an exception saying why there cannot be one (no server binaries, ...)."""
    # The bench's one reach into tests/: pghelp is a plain module there (tests/ is not a
    # package), so that directory goes on sys.path, last, shadowing nothing.
    if str(TESTS) not in sys.path:
        sys.path.append(str(TESTS))
    import pghelp

    return pghelp.start_cluster()


def postmaster_pid(cluster: Any) -> int | None:
    """The cluster's postmaster (every backend is its child), from postmaster.pid."""
    try:
        return int((Path(cluster.data) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
