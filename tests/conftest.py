"""Shared fixtures: real mailpool hosts that never outlive their test (or module).

`host` (per test) and `module_host` (per module, for tests that can share one host) are
factories: `host(extra_config=...)` builds and starts a hosthelp.Host under a short temp
directory (the control socket path must stay under the 108-byte AF_UNIX limit). Every
process group a host ever started, including earlier runs of a restarted host, is killed
with SIGKILL at teardown, whatever state the test left it in.

`raw_smtp` connects a byte-level SMTP client for what smtplib cannot send (bare CR/LF in
a body, half a DATA section, silence).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hosthelp import Host  # tests/ is on sys.path (pytest's rootdir-relative import)

if TYPE_CHECKING:
    from pghelp import PgCluster


class TrackedHost(Host):
    """A Host that remembers every `mailpool serve` it started, for the final kill."""

    def __init__(self, root: Path, extra_config: str = "") -> None:
        super().__init__(root, extra_config)
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, wait_jobs: dict[str, int] | None = None) -> Host:
        try:
            return super().start(wait_jobs)
        finally:
            if self.proc is not None and self.proc not in self.started:
                self.started.append(self.proc)

    def kill_all(self) -> None:
        for proc in self.started:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


class HostFactory:
    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.hosts: list[TrackedHost] = []

    def __call__(self, extra_config: str = "", *, name: str = "host", start: bool = True,
                 wait_jobs: dict[str, int] | None = None) -> TrackedHost:
        host = TrackedHost(self.tmp_path_factory.mktemp(name), extra_config)
        self.hosts.append(host)
        if start:
            host.start(wait_jobs)
        return host

    def cleanup(self) -> None:
        for host in self.hosts:
            host.kill_all()


@pytest.fixture
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostFactory]:
    factory = HostFactory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def module_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostFactory]:
    factory = HostFactory(tmp_path_factory)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A private PostgreSQL cluster for the whole run (tests/pghelp.py), skipped with the
    reason where the server cannot run here. `.stop()`/`.start()` (or `with .stopped():`)
    take the database down mid-test; `pg_dsn` gives each test a database of its own."""
    from pghelp import start_cluster  # psycopg only for the tests that use it

    try:
        cluster = start_cluster()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"no private PostgreSQL cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
def pg_dsn(pg_cluster: PgCluster) -> Iterator[str]:
    """A fresh database on the private cluster; the cluster is running again afterwards
    whatever the test did to it."""
    if not pg_cluster.running:
        pg_cluster.start()
    yield pg_cluster.new_database()
    if not pg_cluster.running:
        pg_cluster.start()


class RawSmtp:
    """A byte-exact SMTP client: send anything, read replies as (code, [text lines])."""

    def __init__(self, address: tuple[str, int], timeout: float = 20.0) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes | None:
        """One reply line without its CRLF; None at EOF."""
        while b"\r\n" not in self.buf:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply_or_eof(self) -> tuple[int, list[str]] | None:
        lines: list[str] = []
        while True:
            raw = self.line()
            if raw is None:
                if lines or self.buf:
                    raise AssertionError(f"connection closed inside a reply: {lines} {self.buf!r}")
                return None
            text = raw.decode("ascii")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    def reply(self) -> tuple[int, list[str]]:
        got = self.reply_or_eof()
        if got is None:
            raise AssertionError("connection closed where a reply was expected")
        return got

    def cmd(self, text: str) -> tuple[int, list[str]]:
        self.send(text.encode("latin-1") + b"\r\n")
        return self.reply()

    def replies_until_eof(self) -> list[tuple[int, list[str]]]:
        out = []
        while (got := self.reply_or_eof()) is not None:
            out.append(got)
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_smtp() -> Iterator[Callable[..., RawSmtp]]:
    clients: list[RawSmtp] = []

    def connect(address: tuple[str, int], timeout: float = 20.0) -> RawSmtp:
        client = RawSmtp(address, timeout)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()
