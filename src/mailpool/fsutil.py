"""Durability helpers shared by the spool, Maildir delivery and the directory file.

Linux only. The pattern everywhere is: write a temporary name, fsync it, rename it into
place, fsync the directory (the rename is only durable once its directory is). For group
commit, many writers skip the fsyncs and one `syncfs` makes all of them durable at once.
"""

from __future__ import annotations

import functools
import os
import secrets
from pathlib import Path
from typing import Any


@functools.cache
def _syncfs() -> Any:
    """libc's syncfs, loaded by the first caller only (the supervisor and the CLI; jobs
    never do, and ctypes costs each process memory). CDLL(None): the C library this
    Python already runs on, no ldconfig lookup."""
    import ctypes

    fn = ctypes.CDLL(None, use_errno=True).syncfs
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that entries created, renamed or removed in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until everything is written (a regular file may take a short write)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        view = view[n:]


def write_file_durably(
    directory: str | os.PathLike[str],
    name: str,
    data: bytes | bytearray | memoryview | list[bytes | memoryview],
    *,
    mode: int = 0o600,
    sync: bool = True,
    tmp_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Atomically replace `directory/name` with `data` (one buffer or several, written in
    order); durable on return when `sync`.

    Readers see either the old file or the new one, never a partial file. The temporary
    file is a dotfile in the same directory, or in `tmp_dir` (same filesystem: a rename
    cannot cross filesystems), where a crash can leave it without a reader tripping on it.
    """
    directory = Path(directory)
    final = directory / name
    tmp = Path(tmp_dir or directory) / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        try:
            for chunk in data if isinstance(data, list) else [data]:
                write_all(fd, chunk)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        fsync_dir(directory)
    return final


def syncfs(path: str | os.PathLike[str]) -> None:
    """syncfs(2) on the filesystem holding `path`: one call makes every write on it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _syncfs()(fd) != 0:
            import ctypes

            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), os.fspath(path))
    finally:
        os.close(fd)


# Descriptors a job needs besides its sessions: its channel, spool and Maildir files, the
# log, DNS and database sockets, TLS and a margin.
FD_RESERVE = 64


def session_limit() -> int:
    """The most sessions a job can hold: the open files limit it raises itself to (the hard
    one, see raise_fd_limit) less FD_RESERVE."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = max(soft, 1 << 20) if hard == resource.RLIM_INFINITY else hard
    return max(1, limit - FD_RESERVE)


def raise_fd_limit() -> int:
    """Lift the soft limit on open files to the hard one: a job with many sessions (and the
    supervisor holding waiting connections) needs one descriptor each. Returns the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft
