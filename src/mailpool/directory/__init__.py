"""The system distribution directory (the source's WRKDIRE): users, addresses, passwords.

Two backends behind one interface (UserDirectory): the JSON file under the data directory
(the default, one host) and PostgreSQL (several hosts sharing one directory). The CLI opens
the configured one with open_directory(); jobs wrap it in a JobDirectory (cached.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from mailpool.directory.backend import AddressLookup, UserDirectory
from mailpool.directory.file import Directory, FileDirectory
from mailpool.directory.model import (
    DirectoryError,
    DirectoryUnavailable,
    PasswordHashError,
    User,
    normalise_addresses,
    validate_address,
    validate_user_name,
)
from mailpool.directory.passwords import (
    _FOREIGN,
    FOREIGN_SCHEMES,
    _dummy_hash,
    _scrypt,
    check_login,
    hash_password,
    validate_password_hash,
    verify_password,
)

if TYPE_CHECKING:
    from mailpool.config import DirectoryConfig, LoadedConfig
    from mailpool.directory.cached import JobDirectory
    from mailpool.directory.maildrop_lock import SharedMaildropLock
    from mailpool.directory.postgres import PostgresDirectory


def open_postgres(cfg: DirectoryConfig, dsn: str | None = None) -> PostgresDirectory:
    """The PostgreSQL directory of `cfg` (or at `dsn`); nothing connects until first use."""
    from mailpool.config import redact_dsn
    from mailpool.directory.postgres import PostgresDirectory  # psycopg only when used

    dsn = cfg.dsn if dsn is None else dsn
    return PostgresDirectory(dsn, shown=f"PostgreSQL directory {redact_dsn(dsn)!r}",
                             pool_size=cfg.pool_size, connect_timeout=cfg.connect_timeout,
                             query_timeout=cfg.query_timeout)


def open_directory(loaded: LoadedConfig) -> UserDirectory:
    """The directory `[directory] backend` names: the file or the PostgreSQL database."""
    cfg = loaded.config.directory
    if cfg.backend == "postgresql":
        return open_postgres(cfg)
    return FileDirectory(loaded.directory_file)


def open_maildrop_lock(loaded: LoadedConfig) -> SharedMaildropLock:
    """The lock that keeps other hosts out of a maildrop: a PostgreSQL advisory lock with
    the PostgreSQL directory, none beyond the host's own flock with the file."""
    from mailpool.config import redact_dsn
    from mailpool.directory.maildrop_lock import PgMaildropLock, SharedMaildropLock

    cfg = loaded.config.directory
    if cfg.backend != "postgresql":
        return SharedMaildropLock()
    return PgMaildropLock(cfg.dsn, shown=f"PostgreSQL directory {redact_dsn(cfg.dsn)!r}",
                          connect_timeout=cfg.connect_timeout, query_timeout=cfg.query_timeout)


def open_job_directory(loaded: LoadedConfig,
                       journal: Callable[..., Awaitable[None]] | None = None) -> JobDirectory:
    """What a job uses: the configured directory, cached `cache_ttl` seconds, a failure to
    read it journaled as PU through `journal` (a JobContext's journal)."""
    from mailpool.directory.cached import JobDirectory  # trio: only in jobs, not the CLI

    cfg = loaded.config.directory

    async def report(reason: str) -> None:
        if journal is not None:
            await journal("PU", detail=reason)

    return JobDirectory(open_directory(loaded), cfg.cache_ttl,
                        deadline=cfg.connect_timeout + cfg.query_timeout + 1.0, report=report)


__all__ = [
    "FOREIGN_SCHEMES",
    "_FOREIGN",
    "AddressLookup",
    "Directory",
    "DirectoryError",
    "DirectoryUnavailable",
    "FileDirectory",
    "PasswordHashError",
    "User",
    "UserDirectory",
    "_dummy_hash",
    "_scrypt",
    "check_login",
    "hash_password",
    "normalise_addresses",
    "open_directory",
    "open_job_directory",
    "open_maildrop_lock",
    "open_postgres",
    "validate_address",
    "validate_password_hash",
    "validate_user_name",
    "verify_password",
]
