"""The directory in PostgreSQL, on the private cluster (tests/pghelp.py): its schema, the same
behaviour as the file backend, outages, the job's cache in front of it, and the CLI."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import psycopg
import pytest
from hosthelp import MAILPOOL, config_text, wait_for

from mailpool.config import DirectoryConfig
from mailpool.directory import (
    DirectoryError,
    DirectoryUnavailable,
    FileDirectory,
    UserDirectory,
    open_postgres,
    schema,
)
from mailpool.directory.cached import REPORT_INTERVAL, JobDirectory
from mailpool.directory.postgres import PostgresDirectory

if TYPE_CHECKING:
    from pghelp import PgCluster

T = TypeVar("T")

# A published SHA-crypt vector (Drepper's SHA-crypt.txt) for "Hello world!", as Dovecot keeps it.
SHA512 = ("{SHA512-CRYPT}$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJues"
          "I68u4OTLiBFdcbYEdFCoEOfaS35inz1")


def pg(dsn: str, **kw: float) -> PostgresDirectory:
    return open_postgres(DirectoryConfig(backend="postgresql", dsn=dsn, **kw))


@pytest.fixture
def pgdir(pg_dsn: str) -> Iterator[PostgresDirectory]:
    d = pg(pg_dsn, connect_timeout=1.0, query_timeout=2.0)
    yield d
    d.close()


def _try(fn: Callable[[], T]) -> T | Exception:
    """fn's result, or the exception it raised (for threads and polling)."""
    try:
        return fn()
    except Exception as exc:
        return exc


def versions(cluster: PgCluster, dsn: str) -> list[int]:
    return [r[0] for r in cluster.sql(dsn, "SELECT version FROM schema_version ORDER BY 1")]


# -- schema ------------------------------------------------------------------------------


def test_schema_is_created_at_first_use(pg_cluster: PgCluster, pg_dsn: str) -> None:
    d = pg(pg_dsn)
    table = "SELECT to_regclass('users') IS NOT NULL"
    assert pg_cluster.sql(pg_dsn, table) == [(False,)]  # opening alone connects nothing
    assert d.users() == []
    assert pg_cluster.sql(pg_dsn, table) == [(True,)]
    assert versions(pg_cluster, pg_dsn) == list(range(1, schema.LATEST + 1))
    assert d.schema_version() == schema.LATEST
    d.close()


def test_a_newer_schema_is_refused_and_left_alone(pg_cluster: PgCluster, pg_dsn: str) -> None:
    pg_cluster.sql(pg_dsn, "CREATE TABLE schema_version (version integer PRIMARY KEY, "
                           "upgraded timestamptz NOT NULL DEFAULT now())")
    pg_cluster.sql(pg_dsn, "INSERT INTO schema_version VALUES (%s)", (schema.LATEST + 1,))
    d = pg(pg_dsn)
    with pytest.raises(DirectoryError) as info:
        d.users()
    assert not isinstance(info.value, DirectoryUnavailable)  # permanent, not "try later"
    assert f"schema version {schema.LATEST + 1}" in str(info.value)
    assert "upgrade mailpool" in str(info.value)
    with pytest.raises(DirectoryError, match="upgrade mailpool"):
        d.add_user("bob", ["bob@example.test"], None)
    # nothing written: no tables of this mailpool's, no version row of its own
    assert pg_cluster.sql(pg_dsn, "SELECT to_regclass('users')") == [(None,)]
    assert versions(pg_cluster, pg_dsn) == [schema.LATEST + 1]
    d.close()


def test_simultaneous_first_use_upgrades_once(pg_cluster: PgCluster, pg_dsn: str) -> None:
    # Hold the upgrade lock so every opener has found version 0 and waits on it: a real race.
    holder = psycopg.connect(pg_dsn, autocommit=True)
    holder.execute("BEGIN")
    holder.execute("SELECT pg_advisory_xact_lock(%s)", (schema.SCHEMA_LOCK,))
    dirs = [pg(pg_dsn, query_timeout=20.0) for _ in range(6)]
    results: list[object] = []
    threads = [threading.Thread(target=lambda d=d: results.append(_try(d.users)))
               for d in dirs]
    for t in threads:
        t.start()
    waiting = ("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
               "WHERE d.datname = current_database() AND l.locktype = 'advisory' "
               "AND NOT l.granted")
    wait_for(lambda: pg_cluster.sql(pg_dsn, waiting)[0][0] == len(dirs), 20,
             "every opener waiting for the schema lock")
    holder.execute("COMMIT")
    holder.close()
    for t in threads:
        t.join(30)
    assert results == [[]] * len(dirs)
    assert versions(pg_cluster, pg_dsn) == list(range(1, schema.LATEST + 1))
    for d in dirs:
        d.close()


# -- the same behaviour as the file backend --------------------------------------------------


@pytest.fixture(params=["file", "postgresql"])
def anydir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UserDirectory]:
    if request.param == "file":
        yield FileDirectory(tmp_path / "directory.json")
        return
    d = pg(request.getfixturevalue("pg_dsn"))
    yield d
    d.close()


def test_crud_parity(anydir: UserDirectory) -> None:
    d = anydir
    bob = d.add_user("bob", ["Bob@Example.TEST", "b2@example.test", "bob@example.test"], "pw1")
    assert bob.addresses == ["bob@example.test", "b2@example.test"]
    d.add_user("zed", ["zed@example.test"], None)
    d.add_user("amy", ["amy@example.test"], None, password_hash=SHA512)
    before = d.users()
    assert [u.name for u in before] == ["bob", "zed", "amy"]  # the order they were added
    with pytest.raises(DirectoryError, match="'bob': already exists"):
        d.add_user("bob", ["other@example.test"], None)
    with pytest.raises(DirectoryError, match=r"'b2@example\.test': already belongs to user 'bob'"):
        d.add_user("carol", ["B2@EXAMPLE.test"], None)
    with pytest.raises(DirectoryError, match="user name"):
        d.add_user("Bad/Name", ["x@example.test"], None)
    assert d.users() == before  # refused edits change nothing
    assert d.get("carol") is None

    assert d.lookup("BOB@EXAMPLE.TEST") == bob
    assert d.lookup("nobody@example.test") is None and d.lookup("no address") is None
    assert d.lookup_many(["B2@example.test", "amy@example.test", "x@example.test", "junk"]) == {
        "B2@example.test": bob, "amy@example.test": d.get("amy"),
        "x@example.test": None, "junk": None}

    # passwords: scrypt, a {SCHEME} hash kept byte for byte, none
    assert d.authenticate("bob", "pw1") and not d.authenticate("bob", "pw2")
    d.set_password("bob", "pw2")
    assert d.authenticate("bob", "pw2") and not d.authenticate("bob", "pw1")
    assert d.get("amy").password_hash == SHA512 and d.authenticate("amy", "Hello world!")
    d.set_password("bob", None, password_hash=SHA512)
    assert d.get("bob").password_hash == SHA512 and d.authenticate("bob", "Hello world!")
    d.set_password("bob", None)
    assert d.get("bob").password_hash == "" and not d.authenticate("bob", "")
    with pytest.raises(DirectoryError, match="no such user"):
        d.set_password("nobody", "pw")
    assert not d.authenticate("nobody", "pw")

    # addresses: replaced in order, the old ones freed, another user's refused
    moved = d.set_addresses("bob", ["New@Example.test", "b2@example.test"])
    assert moved.addresses == ["new@example.test", "b2@example.test"]
    assert d.get("bob").addresses == moved.addresses and d.lookup("bob@example.test") is None
    with pytest.raises(DirectoryError, match="already belongs to user 'amy'"):
        d.set_addresses("bob", ["amy@example.test"])
    assert d.get("bob").addresses == moved.addresses
    with pytest.raises(DirectoryError, match="no such user"):
        d.set_addresses("nobody", ["n@example.test"])

    # removing frees the name and the addresses
    assert d.remove_user("zed").addresses == ["zed@example.test"]
    assert d.get("zed") is None and d.lookup("zed@example.test") is None
    with pytest.raises(DirectoryError, match="no such user"):
        d.remove_user("zed")
    d.add_user("zed", ["ZED@example.test"], None)
    assert [u.name for u in d.users()] == ["bob", "amy", "zed"]


# -- outages ----------------------------------------------------------------------------------


def test_database_down_is_unavailable_quickly_then_back(pg_cluster: PgCluster,
                                                        pg_dsn: str) -> None:
    d = pg(pg_dsn + " password=secret", connect_timeout=1.0, query_timeout=2.0)
    d.add_user("bob", ["bob@example.test"], "pw")
    calls = [d.users, lambda: d.get("bob"), lambda: d.lookup("bob@example.test"),
             lambda: d.add_user("amy", ["amy@example.test"], None), lambda: d.remove_user("bob")]
    with pg_cluster.stopped():
        # the first call waits out connect_timeout; the next ones, within a second of it,
        # fail at once; after that second a call tries to connect again
        for pause, call in zip([0, 0, 0, 0, 1.1], calls, strict=True):
            time.sleep(pause)
            start = time.monotonic()
            with pytest.raises(DirectoryUnavailable) as info:
                call()
            assert time.monotonic() - start < 1.0 + 3.0
            assert "PostgreSQL directory" in str(info.value) and "secret" not in str(info.value)
    # the same object, no reopening: the pool reconnects by itself
    wait_for(lambda: _try(lambda: [u.name for u in d.users()]) == ["bob"], 10,
             "the directory back")
    assert d.lookup("BOB@example.test").name == "bob" and d.get("amy") is None
    d.close()


# -- the job's view: JobDirectory (cached.py) -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_job_cache_on_postgresql(pg_cluster: PgCluster, pg_dsn: str,
                                       pgdir: PostgresDirectory) -> None:
    other = pg(pg_dsn)  # another host editing the shared directory
    other.add_user("bob", ["bob@example.test"], "pw")
    clock, reports = Clock(), []

    async def report(reason: str) -> None:
        reports.append(reason)

    jd = JobDirectory(pgdir, 10.0, deadline=10.0, report=report, clock=clock)
    bob = await jd.lookup("BOB@example.test")
    assert bob is not None and bob.name == "bob"
    other.remove_user("bob")
    clock.now += 9.9  # cached for cache_ttl: by address and by name
    assert await jd.lookup("bob@example.test") == bob and await jd.get("bob") == bob
    assert await jd.check_password(await jd.get("bob"), "pw")
    clock.now += 0.2
    assert await jd.lookup("bob@example.test") is None and await jd.get("bob") is None

    # a miss is never kept: a user added on another host is found at once
    assert await jd.lookup("amy@example.test") is None
    other.add_user("amy", ["amy@example.test"], None)
    amy = await jd.lookup("amy@example.test")
    assert amy is not None and amy.name == "amy"
    await jd.prefetch(["amy@example.test", "nobody@example.test"])
    other.close()

    with pg_cluster.stopped():
        # what the job already knows still answers; an unknown address is a DirectoryError
        assert await jd.lookup("amy@example.test") == amy
        assert jd.lookup_now("nobody@example.test") is None  # the prefetched miss
        for _ in range(3):
            with pytest.raises(DirectoryUnavailable):
                await jd.lookup("carol@example.test")
        assert len(reports) == 1 and "PostgreSQL directory" in reports[0]
        clock.now += REPORT_INTERVAL + 1  # one report per interval in a long outage
        with pytest.raises(DirectoryError):
            await jd.get("carol")
        assert len(reports) == 2
    # and the job's next miss reaches the database again
    wait_for(lambda: _try(lambda: pgdir.get("amy")) == amy, 10, "the directory back")
    assert (await jd.lookup("nobody@example.test")) is None


# -- the CLI ------------------------------------------------------------------------------------


def run(config: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAILPOOL, *args, "--config", str(config)], input=input,
                          capture_output=True, text=True, timeout=60)


def run_together(config: Path, *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Independent commands at once (each CLI start costs most of a second)."""
    procs = [subprocess.Popen([*MAILPOOL, *args, "--config", str(config)], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL) for args in commands]
    outputs = [p.communicate(timeout=60) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out)
            for p, out in zip(procs, outputs, strict=True)]


def ok(config: Path, *args: str, input: str | None = None) -> str:
    res = run(config, *args, input=input)
    assert res.returncode == 0, res.stderr + res.stdout
    return res.stdout


def one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    return res.stderr


@pytest.fixture
def configs(tmp_path: Path, pg_dsn: str) -> tuple[Path, Path, str]:
    """Two configurations of one host (one data directory): the file backend, and the
    database at `pg_dsn` with a password in the connection string."""
    dsn = pg_dsn + " password=secret"
    file_cfg = tmp_path / "file.toml"
    file_cfg.write_text(config_text())
    pg_cfg = tmp_path / "pg.toml"
    pg_cfg.write_text(config_text(
        f"[directory]\nbackend = \"postgresql\"\ndsn = {json.dumps(dsn)}\nconnect_timeout = 1.0\n"))
    return file_cfg, pg_cfg, dsn


def names(config: Path) -> list[str]:
    return [u["name"] for u in json.loads(ok(config, "user", "list", "--json"))["users"]]


def test_cli_users_config_and_status_on_postgresql(configs: tuple[Path, Path, str],
                                                   pg_dsn: str) -> None:
    _, cfg, _ = configs
    ok(cfg, "user", "add", "bob", "--address", "bob@example.test", "--password-stdin",
       input="pw1\n")
    ok(cfg, "user", "add", "amy", "--address", "amy@example.test", "--password-hash", SHA512)
    listed = json.loads(ok(cfg, "user", "list", "--json"))["users"]
    assert listed == [{"name": "bob", "addresses": ["bob@example.test"], "pop_login": True},
                      {"name": "amy", "addresses": ["amy@example.test"], "pop_login": True}]
    ok(cfg, "user", "passwd", "bob", "--password-stdin", input="pw2\n")
    assert "removed" in ok(cfg, "user", "remove", "amy")
    d = pg(pg_dsn)
    assert [u.name for u in d.users()] == ["bob"] and d.authenticate("bob", "pw2")
    d.close()

    check, status_json, status_text = run_together(
        cfg, ["config", "check"], ["directory", "status", "--json"], ["directory", "status"])
    assert check.returncode == 0 and "password=***" in check.stdout
    assert "secret" not in check.stdout
    status = json.loads(status_json.stdout)
    assert status == {"backend": "postgresql", "where": status["where"], "users": 1,
                      "schema_version": schema.LATEST, "schema_latest": schema.LATEST}
    assert "password=***" in status["where"] and "secret" not in status["where"]
    assert f"version {schema.LATEST}" in status_text.stdout


def test_cli_migrate_from_the_file(configs: tuple[Path, Path, str], pg_dsn: str) -> None:
    file_cfg, pg_cfg, dsn = configs
    source = FileDirectory(file_cfg.parent / "var" / "directory.json")  # the host's file
    source.add_user("alice", ["alice@example.test"], "pw-a")
    source.add_user("bob", ["bob@example.test"], None, password_hash=SHA512)
    source.add_user("frank", ["frank@example.test"], None)
    d = pg(pg_dsn)

    status, no_dsn, bad_dsn = run_together(
        file_cfg, ["directory", "status", "--json"],
        ["directory", "migrate", "--to", "postgresql"],
        ["directory", "migrate", "--to", "postgresql", "--dsn", "host=db password=secret junk"])
    assert json.loads(status.stdout) == {"backend": "file", "where": str(source.path),
                                         "users": 3, "exists": True}
    assert "directory.dsn" in one_line_error(no_dsn)
    assert "--dsn" in one_line_error(bad_dsn) and "secret" not in bad_dsn.stderr
    out = ok(file_cfg, "directory", "migrate", "--to", "postgresql", "--dsn", dsn, "--dry-run")
    assert "3 copied" in out and "dry run" in out and d.users() == []
    out = ok(file_cfg, "directory", "migrate", "--to", "postgresql", "--dsn", dsn)
    assert "3 copied, 0 unchanged, 0 replaced, 0 refused" in out
    assert 'backend = "postgresql"' in out and "secret" not in out
    assert d.users() == source.users()  # hashes as they were
    assert names(pg_cfg) == ["alice", "bob", "frank"]
    assert d.authenticate("alice", "pw-a") and d.authenticate("bob", "Hello world!")

    out = ok(pg_cfg, "directory", "migrate", "--to", "postgresql")  # again: nothing to do
    assert "0 copied, 3 unchanged" in out and 'backend = "postgresql"' not in out

    # conflicts: alice changed in the file, frank's address taken by erin in the database
    source.set_password("alice", "pw-new")
    d.remove_user("frank")
    d.add_user("erin", ["frank@example.test"], None)
    res = run(pg_cfg, "directory", "migrate", "--to", "postgresql")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "'alice'" in res.stderr and "--replace" in res.stderr
    assert "'frank'" in res.stderr and "'erin'" in res.stderr
    assert "0 copied, 1 unchanged, 0 replaced, 2 refused" in res.stdout
    assert d.authenticate("alice", "pw-a") and d.get("frank") is None
    res = run(pg_cfg, "directory", "migrate", "--to", "postgresql", "--replace")
    assert res.returncode == 1 and "1 replaced, 1 refused" in res.stdout
    assert d.authenticate("alice", "pw-new") and not d.authenticate("alice", "pw-a")
    d.remove_user("erin")
    out = ok(pg_cfg, "directory", "migrate", "--to", "postgresql")
    assert "1 copied, 2 unchanged, 0 replaced, 0 refused" in out
    assert d.users() == source.users()
    d.close()


def test_cli_with_the_database_down(pg_cluster: PgCluster,
                                    configs: tuple[Path, Path, str]) -> None:
    _, cfg, _ = configs
    ok(cfg, "user", "add", "bob", "--address", "bob@example.test")
    with pg_cluster.stopped():
        start = time.monotonic()
        for res in run_together(cfg, ["user", "list"], ["directory", "status"]):
            err = one_line_error(res)
            assert "PostgreSQL directory" in err and "password=***" in err
            assert "secret" not in err
        assert time.monotonic() - start < 15  # connect_timeout 1 s, and Python's start-up
    assert names(cfg) == ["bob"]
