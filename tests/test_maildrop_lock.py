"""The maildrop lock two hosts share through PostgreSQL (directory/maildrop_lock.py), on a
private cluster: what the flock cannot promise across machines."""

from __future__ import annotations

from typing import Any

import pytest

from mailpool.directory import DirectoryUnavailable
from mailpool.directory.maildrop_lock import PgMaildropLock, SharedMaildropLock, lock_key


def locks(dsn: str) -> PgMaildropLock:
    return PgMaildropLock(dsn, shown="test directory", connect_timeout=2.0, query_timeout=2.0)


def test_keys_are_stable_and_distinct() -> None:
    assert lock_key("erin") == lock_key("erin")
    assert lock_key("erin") != lock_key("erin2")
    assert -(2**63) <= lock_key("erin") < 2**63


def test_one_host_at_a_time(pg_dsn: str) -> None:
    host_a, host_b = locks(pg_dsn), locks(pg_dsn)
    try:
        assert host_a.acquire("erin")
        assert not host_b.acquire("erin")     # the other host is kept out
        assert not host_a.acquire("erin")     # and a second session of the same job too
        assert host_b.acquire("frank")        # other users are independent
        host_a.release("erin")
        assert host_b.acquire("erin")
    finally:
        host_a.close()
        host_b.close()


def test_a_dead_job_leaves_no_lock_behind(pg_dsn: str) -> None:
    dead, other = locks(pg_dsn), locks(pg_dsn)
    try:
        assert dead.acquire("gina")
        dead.close()  # what the server sees when the job's process dies: the connection ends
        assert other.acquire("gina")
    finally:
        other.close()


def test_database_down_is_a_temporary_failure_and_recovers(pg_cluster: Any,
                                                          pg_dsn: str) -> None:
    lock = locks(pg_dsn)
    try:
        assert lock.acquire("hank")
        with pg_cluster.stopped():
            with pytest.raises(DirectoryUnavailable, match="maildrop lock"):
                lock.acquire("ivy")
            lock.release("hank")  # nothing to give back: the lock went with the connection
        assert lock.acquire("hank")  # a new connection, the lock free again
    finally:
        lock.close()


def test_file_directory_needs_no_shared_lock() -> None:
    lock = SharedMaildropLock()
    assert not lock.shared and lock.acquire("anyone") and lock.acquire("anyone")
