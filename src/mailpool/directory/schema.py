"""The directory's tables in PostgreSQL, created and upgraded by mailpool itself.

`MIGRATIONS[i]` takes the schema from version i to i + 1; each step runs in one transaction
with its row in `schema_version`, under an advisory lock, so hosts and jobs starting at the
same moment upgrade once. A database newer than this mailpool is refused, never written.
Steps are only ever appended: a released step is never edited.
"""

from __future__ import annotations

from typing import Any

from mailpool.directory.model import DirectoryError

# pg_advisory_xact_lock key: "mailpool" read as a big-endian 64-bit integer.
SCHEMA_LOCK = int.from_bytes(b"mailpool", "big")

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    # 1: users (ordered by when they were added) and their addresses; an address belongs to
    # one user, compared case-insensitively (mailpool stores them lowercased anyway).
    (
        """CREATE TABLE users (
               id bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
               name text PRIMARY KEY CHECK (name ~ '^[a-z0-9][a-z0-9._-]{0,63}$'),
               password_hash text NOT NULL DEFAULT ''
           )""",
        """CREATE TABLE addresses (
               user_name text NOT NULL REFERENCES users (name)
                   ON DELETE CASCADE ON UPDATE CASCADE,
               position integer NOT NULL,
               address text NOT NULL CHECK (address LIKE '_%@_%'),
               PRIMARY KEY (user_name, position)
           )""",
        "CREATE UNIQUE INDEX addresses_address_key ON addresses (lower(address))",
    ),
    # 2: when each user last changed, for tools that follow the directory (an LDAP sync
    # sends only what changed since its last run).
    ("ALTER TABLE users ADD COLUMN changed timestamptz NOT NULL DEFAULT now()",),
)
LATEST = len(MIGRATIONS)

_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version integer PRIMARY KEY,
    upgraded timestamptz NOT NULL DEFAULT now()
)"""


def current_version(conn: Any) -> int:
    """The schema's version (0: no mailpool tables yet)."""
    row = conn.execute(
        "SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if not row[0]:
        return 0
    row = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()
    return int(row[0])


def upgrade(conn: Any, target: int = LATEST) -> tuple[int, int]:
    """Bring the schema to `target` (default: the latest); (version before, after).

    `conn` is an autocommit psycopg connection. DirectoryError for a database newer than
    this mailpool knows.
    """
    before = current_version(conn)
    if before == target:
        return before, before  # the common case: one query, no lock
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute(_VERSION_TABLE)
        before = current_version(conn)  # again: another process may have upgraded meanwhile
        if before > LATEST:
            raise DirectoryError(
                f"the directory database has schema version {before}; this mailpool knows "
                f"versions up to {LATEST} (upgrade mailpool)")
        for version in range(before + 1, target + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return before, max(before, target)
