"""One host per data directory: an exclusive lock the supervisor holds while it runs.

A second `mailpool serve` on the same data (other ports or not) would share the spool and
write its own sequence numbers into the same journal; it stops at once instead, naming the
pid that holds the lock. The kernel drops the lock when the holder dies, however it dies.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class AlreadyServing(Exception):
    """Another supervisor holds the data directory."""


def hold_data_directory(data_dir: Path) -> int:
    """Take the lock (a descriptor to keep open for the process's life, not inherited by
    jobs); AlreadyServing, naming the holder, when another supervisor has it."""
    path = data_dir / "run" / "serve.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise AlreadyServing(f"data directory {data_dir} is in use by the mailpool supervisor "
                             f"with pid {holder}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
