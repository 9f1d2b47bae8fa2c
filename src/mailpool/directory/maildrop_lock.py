"""The maildrop lock that several hosts share: a PostgreSQL advisory lock.

A POP3 session holds its maildrop locked from login to the end (RFC 1939 4). On one host
the flock on <mailbox>/.pop3.lock (mailpool.maildrop) is enough; with the mailboxes on
shared storage and the directory in PostgreSQL, two hosts must not open one maildrop at
once either, and flock over network file systems cannot be trusted for that. So with the
PostgreSQL backend a session also takes `pg_try_advisory_lock` on a key derived from the
user name, on one connection each POP3 job keeps for its locks: the server releases every
lock of a job whose connection ends (the job died), so a crash never leaves a maildrop
locked. Losing that connection while sessions hold locks loses those locks too (as a
Dovecot lock file can be lost): it is logged, and the next lock opens a new connection.

Synchronous (libpq); jobs call it in worker threads under a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import threading
from typing import Any

from mailpool.directory.model import DirectoryUnavailable

log = logging.getLogger("mailpool.directory")


def lock_key(user: str) -> int:
    """The advisory lock key of a user's maildrop: a signed 64-bit hash of the name."""
    digest = hashlib.blake2b(b"mailpool maildrop\0" + user.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class SharedMaildropLock:
    """No lock beyond the host's own flock: the file directory (one host)."""

    shared = False

    def acquire(self, user: str) -> bool:
        return True

    def release(self, user: str) -> None:
        pass

    def close(self) -> None:
        pass


class PgMaildropLock(SharedMaildropLock):
    shared = True

    def __init__(self, dsn: str, *, shown: str, connect_timeout: float,
                 query_timeout: float) -> None:
        self.dsn = dsn
        self.shown = shown
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self._mutex = threading.Lock()  # one connection, used by every session's thread
        self._conn: Any = None
        self._held: set[str] = set()

    def _connection(self) -> Any:
        import psycopg  # only hosts with the PostgreSQL directory need it

        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if self._held:
            log.warning("maildrop locks lost with their database connection: %s",
                        ", ".join(sorted(self._held)))
            self._held.clear()
        self._conn = None
        conn = psycopg.connect(self.dsn, autocommit=True,
                               connect_timeout=max(2, math.ceil(self.connect_timeout)),
                               application_name="mailpool maildrop locks")
        conn.execute(f"SET statement_timeout = {int(self.query_timeout * 1000)}")
        self._conn = conn
        return conn

    def acquire(self, user: str) -> bool:
        """True when this job now holds the user's maildrop; False when another session
        (on any host) does. DirectoryUnavailable when the database cannot say."""
        import psycopg

        with self._mutex:
            if user in self._held:
                return False  # another session of this job (the flock catches it first)
            try:
                row = self._connection().execute(
                    "SELECT pg_try_advisory_lock(%s)", (lock_key(user),)).fetchone()
            except psycopg.Error as exc:
                self._drop()
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise DirectoryUnavailable(f"{self.shown}: maildrop lock: {first}") from None
            if row and row[0]:
                self._held.add(user)
                return True
            return False

    def release(self, user: str) -> None:
        import psycopg

        with self._mutex:
            if user not in self._held:
                return
            self._held.discard(user)
            conn = self._conn
            if conn is None or conn.closed or conn.broken:
                return  # the lock went with its connection
            try:
                conn.execute("SELECT pg_advisory_unlock(%s)", (lock_key(user),))
            except psycopg.Error:
                self._drop()  # a closed connection has released its locks anyway

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # it is being thrown away
                self._conn.close()
        self._conn = None
        self._held.clear()

    def close(self) -> None:
        with self._mutex:
            self._drop()
