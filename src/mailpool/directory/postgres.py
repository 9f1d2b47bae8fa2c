"""The directory in PostgreSQL, shared by every host of a site (psycopg 3, psycopg-pool).

Synchronous on purpose: the CLI calls it directly and jobs call it in Trio worker threads
(mailpool.directory.cached), which measured faster than psycopg's asyncio API through
trio-asyncio (README, "Directory in PostgreSQL"). Every statement has a server-side
statement_timeout, every connection a connect_timeout, and taking a connection from the
pool a timeout too; a database that cannot answer is DirectoryUnavailable, never a hang.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from mailpool.directory import schema
from mailpool.directory.backend import UserDirectory, lookup_keys
from mailpool.directory.model import (
    DirectoryError,
    DirectoryUnavailable,
    User,
    normalise_addresses,
    validate_user_name,
)
from mailpool.directory.passwords import password_hash_for

log = logging.getLogger("mailpool.directory")
T = TypeVar("T")

# psycopg_pool logs every failed (re)connection as a warning. With no handler of its own
# that reached stderr through logging.lastResort: a CLI error became a dozen lines, and a
# job's stderr filled during an outage. mailpool reports an outage itself (the one-line
# DirectoryUnavailable, a job's rate-limited PU entry); a handler on the root logger still
# gets the pool's records.
logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())

# One user with its addresses in order: every read goes through this.
_SELECT = """SELECT u.name, u.password_hash,
    array(SELECT a.address FROM addresses a WHERE a.user_name = u.name ORDER BY a.position)
    FROM users u"""


def _user(row: tuple[Any, ...]) -> User:
    return User(row[0], list(row[2]), row[1])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PostgresDirectory(UserDirectory):
    remote = True

    def __init__(self, dsn: str, *, shown: str = "", pool_size: int = 2,
                 connect_timeout: float = 5.0, query_timeout: float = 5.0) -> None:
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as exc:
            raise DirectoryError(f"directory.dsn: {_first_line(exc)}") from None
        self.shown = shown or "PostgreSQL"
        self.query_timeout = query_timeout
        # libpq's own limits: connecting (whole seconds, at least 2) and unacknowledged
        # sends (a host that vanished without a reset).
        kwargs: dict[str, Any] = {
            "autocommit": True,
            "connect_timeout": max(2, math.ceil(connect_timeout)),
            "tcp_user_timeout": int((connect_timeout + query_timeout) * 1000),
        }
        if "application_name" not in params:
            kwargs["application_name"] = "mailpool"
        self._pool = ConnectionPool(
            dsn, kwargs=kwargs, min_size=1, max_size=max(1, pool_size), open=False,
            configure=self._configure, timeout=connect_timeout, name="mailpool-directory",
            # Short: a failed attempt gives up soon and the next request starts a fresh one,
            # so the pool is back within seconds of the database (not after a long back-off).
            reconnect_timeout=max(2 * connect_timeout, 5.0), max_lifetime=3600.0)
        self._open_lock = threading.Lock()
        self._ready = False
        self._down_until = 0.0

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        ms = int(self.query_timeout * 1000)
        # statement_timeout also bounds lock waits; a transaction left open (a thread
        # abandoned mid-way) is ended by the server.
        conn.execute(f"SET statement_timeout = {ms}")
        conn.execute(f"SET idle_in_transaction_session_timeout = {max(ms * 2, 1000)}")

    # -- connections -------------------------------------------------------------------

    def _open(self) -> None:
        with self._open_lock:
            if self._ready:
                return
            self._pool.open(wait=False)
            with self._pool.connection() as conn:
                schema.upgrade(conn)
            self._ready = True

    def _run(self, what: str, op: Callable[[psycopg.Connection[Any]], T]) -> T:
        """`op` on a pooled connection. A connection the server closed (a restart) is
        dropped and the request tried on another; whatever else fails is
        DirectoryUnavailable (a refused value: DirectoryError)."""
        if time.monotonic() < self._down_until:
            # Down a moment ago: fail at once rather than have every session wait out the
            # connect timeout again (a flood of RCPTs must not pile up threads).
            raise DirectoryUnavailable(f"{self.shown}: {what}: database unavailable")
        attempts = self._pool.max_size + 1
        for attempt in range(attempts):
            conn: psycopg.Connection[Any] | None = None
            try:
                if not self._ready:
                    self._open()
                with self._pool.connection() as conn:
                    return op(conn)
            except DirectoryError:
                raise
            except (pg_errors.IntegrityError, pg_errors.DataError) as exc:
                raise DirectoryError(f"{what}: {_first_line(exc)}") from None
            except psycopg.OperationalError as exc:
                if conn is not None and conn.broken and attempt + 1 < attempts:
                    continue  # a stale pooled connection (the pool drops it): another
                self._down(what, exc)
            except (PoolTimeout, psycopg.Error) as exc:
                self._down(what, exc)
        raise AssertionError("unreachable")

    def _down(self, what: str, exc: Exception) -> None:
        self._down_until = time.monotonic() + 1.0
        raise DirectoryUnavailable(f"{self.shown}: {what}: {_first_line(exc)}") from None

    def close(self) -> None:
        self._pool.close()

    def describe(self) -> str:
        return self.shown

    def schema_version(self) -> int:
        return self._run("schema version", schema.current_version)

    # -- reading -----------------------------------------------------------------------

    def users(self) -> list[User]:
        return self._run("list users", lambda c: [
            _user(r) for r in c.execute(_SELECT + " ORDER BY u.id").fetchall()])

    def get(self, name: str) -> User | None:
        def op(c: psycopg.Connection[Any]) -> User | None:
            row = c.execute(_SELECT + " WHERE u.name = %s", (name,)).fetchone()
            return _user(row) if row else None

        return self._run("get user", op)

    def lookup(self, address: str) -> User | None:
        return self.lookup_many([address]).get(address)

    def lookup_many(self, addresses: list[str]) -> dict[str, User | None]:
        keys = lookup_keys(addresses)
        found: dict[str, User] = {}
        if keys:
            def op(c: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
                return c.execute(
                    _SELECT + ", addresses k WHERE k.user_name = u.name "
                    "AND lower(k.address) = ANY(%s)", (sorted(set(keys.values())),)).fetchall()

            for row in self._run("look up addresses", op):
                user = _user(row)
                for a in user.addresses:
                    found[a] = user
        return {a: found.get(keys[a]) if a in keys else None for a in addresses}

    # -- editing -----------------------------------------------------------------------

    @staticmethod
    def _owner(c: psycopg.Connection[Any], addresses: list[str], name: str) -> None:
        row = c.execute("SELECT address, user_name FROM addresses WHERE lower(address) = "
                        "ANY(%s) AND user_name <> %s LIMIT 1", (addresses, name)).fetchone()
        if row:
            raise DirectoryError(f"address {row[0]!r}: already belongs to user {row[1]!r}")

    @staticmethod
    def _insert_addresses(c: psycopg.Connection[Any], name: str, addresses: list[str]) -> None:
        with c.cursor() as cur:
            cur.executemany("INSERT INTO addresses (user_name, position, address) "
                            "VALUES (%s, %s, %s)",
                            [(name, i, a) for i, a in enumerate(addresses)])

    def add_user(self, name: str, addresses: list[str], password: str | None, *,
                 password_hash: str | None = None) -> User:
        validate_user_name(name)
        addrs = normalise_addresses(addresses)
        user = User(name, addrs, password_hash_for(name, password, password_hash))
        return self._run("add user", lambda c: self._put(c, user, replace=False))

    def _put(self, c: psycopg.Connection[Any], user: User, *, replace: bool) -> User:
        """Insert `user` (or with `replace`, overwrite the one of that name) in one
        transaction; DirectoryError if it exists (without `replace`) or an address is
        taken by someone else."""
        try:
            with c.transaction():
                self._owner(c, user.addresses, user.name)
                if replace:
                    c.execute("DELETE FROM addresses WHERE user_name = %s", (user.name,))
                    c.execute("INSERT INTO users (name, password_hash) VALUES (%s, %s) "
                              "ON CONFLICT (name) DO UPDATE SET password_hash = "
                              "excluded.password_hash, changed = now()",
                              (user.name, user.password_hash))
                else:
                    row = c.execute("INSERT INTO users (name, password_hash) VALUES (%s, %s) "
                                    "ON CONFLICT (name) DO NOTHING RETURNING name",
                                    (user.name, user.password_hash)).fetchone()
                    if row is None:
                        raise DirectoryError(f"user {user.name!r}: already exists")
                self._insert_addresses(c, user.name, user.addresses)
        except pg_errors.UniqueViolation:
            # an address taken between the check and the insert (another host): by whom
            self._owner(c, user.addresses, user.name)
            raise
        return user

    def put_user(self, user: User, *, replace: bool = False) -> User:
        """Store a user record as it is (its hash unchanged): `directory migrate`."""
        validate_user_name(user.name)
        checked = User(user.name, normalise_addresses(user.addresses), user.password_hash)
        return self._run("store user", lambda c: self._put(c, checked, replace=replace))

    def remove_user(self, name: str) -> User:
        def op(c: psycopg.Connection[Any]) -> User:
            with c.transaction():
                row = c.execute(_SELECT + " WHERE u.name = %s FOR UPDATE", (name,)).fetchone()
                if row is None:
                    raise DirectoryError(f"user {name!r}: no such user")
                c.execute("DELETE FROM users WHERE name = %s", (name,))
            return _user(row)

        return self._run("remove user", op)

    def set_password(self, name: str, password: str | None, *,
                     password_hash: str | None = None) -> None:
        new_hash = password_hash_for(name, password, password_hash)

        def op(c: psycopg.Connection[Any]) -> None:
            cur = c.execute("UPDATE users SET password_hash = %s, changed = now() "
                            "WHERE name = %s", (new_hash, name))
            if cur.rowcount == 0:
                raise DirectoryError(f"user {name!r}: no such user")

        self._run("set password", op)

    def set_addresses(self, name: str, addresses: list[str]) -> User:
        addrs = normalise_addresses(addresses)

        def op(c: psycopg.Connection[Any]) -> User:
            with c.transaction():
                row = c.execute(_SELECT + " WHERE u.name = %s FOR UPDATE", (name,)).fetchone()
                if row is None:
                    raise DirectoryError(f"user {name!r}: no such user")
                self._owner(c, addrs, name)
                c.execute("DELETE FROM addresses WHERE user_name = %s", (name,))
                self._insert_addresses(c, name, addrs)
                c.execute("UPDATE users SET changed = now() WHERE name = %s", (name,))
            return User(name, addrs, _user(row).password_hash)

        return self._run("set addresses", op)

