"""A private PostgreSQL cluster for the tests: Debian's `postgresql` server binaries,
`initdb` into a temporary directory, `pg_ctl start` on a free port of 127.0.0.1 with its unix
socket in that directory, stopped at the end. Nothing of the machine's own clusters is used.

Run as root, the cluster belongs to the `postgres` user (initdb refuses root); otherwise to
whoever runs the suite. pg_ctl's output goes to a log file, never a pipe: the server it
starts inherits the descriptors and would hold a pipe open for its whole life.

`PgCluster.stop()` and `.start()` may be called mid-test (the database "goes down"); the
port stays the same, so connection strings stay valid.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

SUPERUSER = "postgres"


def server_bindir() -> Path | None:
    """The newest installed server's bin directory (Debian keeps them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self, bindir: Path, root: Path) -> None:
        self.bindir = bindir
        self.root = root
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self.port = free_port()
        self.running = False
        self._dbs = 0
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            # initdb refuses root: the cluster is the postgres user's, as on any Debian host.
            pw = pwd.getpwnam("postgres")
            os.chown(root, pw.pw_uid, pw.pw_gid)
            self.log_path.touch()
            os.chown(self.log_path, pw.pw_uid, pw.pw_gid)  # pg_ctl -l appends as postgres
            self._as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _run(self, *args: str, timeout: float = 120.0) -> None:
        with open(self.log_path, "ab") as log:
            res = subprocess.run([str(self.bindir / args[0]), *args[1:]], stdout=log,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=self.root, timeout=timeout, **self._as)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({res.returncode}): "
                               + self.log_path.read_text(errors="replace")[-2000:])

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--no-locale", "--no-sync")

    def start(self) -> None:
        """Start (again) on the same port; returns once it accepts connections."""
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=300 -c shared_buffers=16MB")
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log_path), "-w",
                  "-t", "60", "-o", options)
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` ends sessions cleanly, `immediate` is a crash."""
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", mode, "-w", "-t", "60")
        self.running = False

    @contextlib.contextmanager
    def stopped(self, mode: str = "fast") -> Iterator[None]:
        """The database down for the block, back (same port) after it."""
        self.stop(mode)
        try:
            yield
        finally:
            self.start()

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER, password: str = "") -> str:
        dsn = f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"
        return dsn + (f" password={password}" if password else "")

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10)

    def new_database(self, prefix: str = "mailpool") -> str:
        """A fresh, empty database for one test; its connection string."""
        self._dbs += 1
        name = f"{prefix}_{os.getpid()}_{self._dbs}"
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def sql(self, dsn: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement as the superuser on `dsn`'s database; its rows (if any)."""
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def destroy(self) -> None:
        if self.running:
            with contextlib.suppress(Exception):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster() -> PgCluster:
    """A running private cluster, or RuntimeError saying why there cannot be one."""
    bindir = server_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found (Debian package "
                           "`postgresql`; tests/install_tools.sh installs it)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no `postgres` user to own "
                               "the cluster (initdb refuses root)") from None
    # Short and world-traversable: the unix socket path must stay under 108 bytes, and the
    # postgres user must reach it (pytest's own temp directories are root's, mode 0700).
    root = Path(tempfile.mkdtemp(prefix="mailpool-pg-", dir="/tmp"))
    cluster = PgCluster(bindir, root)
    try:
        cluster.init()
        for attempt in range(3):
            try:
                cluster.start()
                break
            except RuntimeError:
                if attempt == 2:
                    raise
                cluster.port = free_port()  # taken between the probe and the start
                time.sleep(0.5)
    except BaseException:
        cluster.destroy()
        raise
    return cluster
