"""Maildir delivery (https://cr.yp.to/proto/maildir.html).

A message is written to tmp/<unique>, fsynced, hard-linked to new/<unique> (link, unlike
rename, never replaces an existing file) and new/ is fsynced: only then is it delivered.
Readers (POP, IMAP) move it to cur/<unique>:2,<flags>. The framework chooses `unique`
from the queue id and recipient index, so after a crash a retry can see the message
is already there and not deliver it twice.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from mailpool.fsutil import fsync_dir, write_all
from mailpool.protocol.pop3 import pop_size

_SUBDIRS = ("tmp", "new", "cur")


def ensure_maildir(path: Path) -> None:
    """Create the Maildir and its tmp/ new/ cur/ (mode 0700), durably, if missing."""
    path = Path(path)
    for d in (path, *(path / s for s in _SUBDIRS)):
        if d.is_dir():
            continue
        missing = [p for p in (d, *d.parents) if not p.exists()]
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A new directory is only durable once its parent is fsynced; otherwise a crash
        # could drop a whole mailbox whose messages had been fsynced.
        for p in missing:
            fsync_dir(p.parent)


def _check_unique(unique: str) -> None:
    if (not unique or "/" in unique or ":" in unique or "," in unique or unique.startswith(".")
            or "\0" in unique):
        raise ValueError(f"invalid Maildir unique name {unique!r}")


def unique_name(queue_id: str, index: int, hostname: str) -> str:
    """The unique name `<queue_id>.R<index>.<hostname>`.

    '/', ':' and ',' in the hostname are written as '\\057', '\\072' and '\\054', as the Maildir
    spec says (',' starts Maildir++'s size fields).
    """
    if "/" in queue_id or ":" in queue_id or not queue_id:
        raise ValueError(f"invalid queue id {queue_id!r}")
    if index < 0:
        raise ValueError(f"negative recipient index {index}")
    host = hostname.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")
    return f"{queue_id}.R{index}.{host}"


def sized_name(unique: str, content: bytes) -> str:
    """The file name a message is stored under: `unique` plus Maildir++'s size fields, as
    Dovecot writes them: S= the file's size, W= its size with CRLF line ends (what POP3's
    LIST and STAT report), so a POP3 login lists a maildrop without reading every message."""
    return f"{unique},S={len(content)},W={pop_size(content)}"


def base_of(name: str) -> str:
    """The unique name a file name starts with (without size fields and the :2, info)."""
    return name.split(":", 1)[0].split(",", 1)[0]


def find(path: Path, unique: str) -> Path | None:
    """Where the message `unique` is in the Maildir (new/ or cur/), or None."""
    _check_unique(unique)
    path = Path(path)
    for sub in ("new", "cur", "new"):  # new/ again: a reader may have moved it meanwhile
        try:
            with os.scandir(path / sub) as it:
                for entry in it:
                    if base_of(entry.name) == unique:
                        return Path(entry.path)
        except FileNotFoundError:
            pass
    return None


def is_delivered(path: Path, unique: str) -> bool:
    """True if new/<unique>, cur/<unique> or cur/<unique>:<info> exists."""
    return find(path, unique) is not None


def deliver(path: Path, unique: str, content: bytes, *, sync: bool = True,
            check: bool = True) -> Path:
    """Deliver `content` durably as `unique`; returns its path in new/.

    With sync=False nothing is fsynced: the caller makes it durable (group commit with
    syncfs) before it reports the delivery or removes the queue file.

    Idempotent: if a message with this unique name is already in new/ or cur/, nothing is
    written and its current path is returned. That look scans both; a caller that knows
    the name was never used (a first attempt: names come from never-reused queue ids)
    passes check=False. The Maildir must exist (ensure_maildir).
    """
    path = Path(path)
    if check:
        existing = find(path, unique)
        if existing is not None:
            return existing
    else:
        _check_unique(unique)
    name = sized_name(unique, content)
    tmp = path / "tmp" / name
    final = path / "new" / name
    # O_TRUNC, not O_EXCL: a leftover tmp/<unique> can only be ours, from a crashed attempt.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        try:
            write_all(fd, content)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if not check:
            # A name never used (a first attempt): rename is one metadata change where
            # link-then-unlink is two, and nothing can hold the name to be replaced.
            os.rename(tmp, final)
            return _synced(final, sync)
        try:
            os.link(tmp, final)
        except FileExistsError:
            pass  # a concurrent attempt delivered the same message: keep that one
        except OSError as e:
            # Filesystems without hard links: fall back to rename (we checked above that
            # nothing holds this name).
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            os.rename(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.unlink(missing_ok=True)
    return _synced(final, sync)


def _synced(final: Path, sync: bool) -> Path:
    if sync:
        fsync_dir(final.parent)
    return final
