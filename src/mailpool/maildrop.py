"""A user's Maildir seen as a POP3 maildrop: lock, list, read, delete.

The lock is an flock on <mailbox>/.pop3.lock: the kernel drops it when the holding
process dies, so it never outlives its session's job. Each session opens its own file
description, so two sessions in one job exclude each other too.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from mailpool.framework.maildir import ensure_maildir
from mailpool.fsutil import fsync_dir
from mailpool.protocol.pop3 import pop_size

_PRINTABLE = {chr(c) for c in range(0x21, 0x7F)}


@dataclass(frozen=True)
class DropMessage:
    uid: str
    path: Path
    size: int


def uid_for(base: str) -> str:
    """UIDL value: the Maildir base name (unique, never reused), hashed when unsuitable."""
    if 1 <= len(base) <= 70 and set(base) <= _PRINTABLE:
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def stored_pop_size(name: str) -> int | None:
    """The W= (CRLF) size in a Maildir++ file name, as this host and Dovecot write it."""
    for field in name.split(":", 1)[0].split(",")[1:]:
        if field.startswith("W=") and field[2:].isdigit():
            return int(field[2:])
    return None


class Maildrop:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_fd: int | None = None

    def lock(self) -> bool:
        ensure_maildir(self.path)
        fd = os.open(self.path / ".pop3.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the description releases the flock
            self._lock_fd = None

    def scan(self) -> list[DropMessage]:
        """Move new/ into cur/ (seen by a reader, as Maildir readers do) and list cur/."""
        new, cur = self.path / "new", self.path / "cur"
        moved = False
        for entry in os.scandir(new):
            if entry.name.startswith("."):
                continue
            os.rename(entry.path, cur / f"{entry.name}:2,")
            moved = True
        if moved:
            fsync_dir(cur)
            fsync_dir(new)
        out = []
        seen: set[str] = set()
        for entry in sorted(os.scandir(cur), key=lambda e: e.name):
            if entry.name.startswith(".") or not entry.is_file():
                continue
            uid = uid_for(entry.name.split(":", 1)[0])
            if uid in seen:
                # Two files with one base name (a copied or hand-edited Maildir): POP3 needs
                # unique uids, so the later one is named by its whole file name instead.
                uid = hashlib.sha1(entry.name.encode("utf-8", "surrogateescape")).hexdigest()
            seen.add(uid)
            size = stored_pop_size(entry.name)
            if size is None:  # a file without W= (delivered elsewhere): read it once
                size = pop_size(Path(entry.path).read_bytes())
            out.append(DropMessage(uid=uid, path=Path(entry.path), size=size))
        return out

    def delete(self, messages: list[DropMessage]) -> int:
        """Unlink the messages and make that durable; returns how many were removed."""
        removed = 0
        for msg in messages:
            try:
                msg.path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        fsync_dir(self.path / "cur")
        return removed
