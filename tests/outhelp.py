"""Helpers for outbound tests: Postfix's smtp-sink as a remote MX, ports free on several
loopback addresses, and the host configuration that points mailpool at the suite's DNS.

Every MX host of a test listens on the same port (mailpool's [outbound] port) at its own
loopback address (127.0.0.2, 127.0.0.3, ...), as real MX hosts all listen on 25.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
from hosthelp import _merge, _toml, wait_for

SMTP_SINK = shutil.which("smtp-sink") or (
    "/usr/sbin/smtp-sink" if os.path.exists("/usr/sbin/smtp-sink") else None)

needs_sink = pytest.mark.skipif(
    SMTP_SINK is None,
    reason="Postfix's smtp-sink is not installed (make test installs the postfix package "
           "where apt-get can run as root)")


def free_port(addresses: tuple[str, ...] = ("127.0.0.1",)) -> int:
    """A TCP port free at this moment on every one of `addresses`."""
    for _ in range(100):
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        socks = []
        try:
            for addr in addresses:
                s = socket.socket()
                socks.append(s)
                s.bind((addr, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no port free on all of " + ", ".join(addresses))


class SmtpSink:
    """`smtp-sink` on ip:port, capturing each message into its own file under `dump`.

    `options` are smtp-sink's own switches, e.g. ["-r", "rcpt"] (soft-reject RCPT), ["-f",
    "data"] (hard-reject DATA), ["-q", "dot"] (hang up after the final dot without a reply),
    ["-Q", "mail"] (421 and hang up), ["-N"] (no DSN), ["-p"] (no PIPELINING).
    """

    def __init__(self, root: Path, ip: str, port: int, options: list[str] | None = None
                 ) -> None:
        assert SMTP_SINK is not None
        self.ip, self.port = ip, port
        # Outside pytest's private (0700) temp tree: smtp-sink writes as "nobody" when root.
        self.dump = Path(tempfile.mkdtemp(prefix=f"mailpool-sink-{ip}-"))
        self.log = root / f"sink-{ip}.log"
        args = [SMTP_SINK, "-c", "-d", str(self.dump) + "/%H%M%S."]
        if os.geteuid() == 0:
            # smtp-sink insists on dropping root; the dump directory must be its to write.
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dump, nobody.pw_uid, nobody.pw_gid)
            args += ["-u", "nobody"]
        args += [*(options or []), f"{ip}:{port}", "256"]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for(self._listening, 10, what=f"smtp-sink on {ip}:{port}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"smtp-sink exited: {self.log.read_text()}")
        try:
            socket.create_connection((self.ip, self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def messages(self) -> list[bytes]:
        """Captured transactions, oldest first (smtp-sink's dump format: envelope lines, then
        the message)."""
        files = sorted(self.dump.glob("*"), key=lambda p: (p.stat().st_mtime, p.name))
        return [p.read_bytes() for p in files if p.stat().st_size]

    def wait_messages(self, count: int, timeout: float = 30.0) -> list[bytes]:
        return wait_for(lambda: len(self.messages()) >= count and self.messages(), timeout,
                        what=f"{count} message(s) at smtp-sink {self.ip}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        shutil.rmtree(self.dump, ignore_errors=True)


def outbound_config(dns_port: int, mx_port: int, extra: str = "") -> str:
    """mailpool configured to deliver out: our DNS, MX hosts on `mx_port`, a short schedule;
    `extra` (TOML) changes only the keys it names."""
    base = f"""
[relay]
networks = ["127.0.0.0/8"]

[dns]
nameservers = ["127.0.0.1"]
port = {dns_port}
timeout = 1.0
lifetime = 2.0

[outbound]
port = {mx_port}
connect_timeout = 3.0
greeting_timeout = 5.0
helo_timeout = 5.0
mail_timeout = 5.0
rcpt_timeout = 5.0
data_timeout = 5.0
data_block_timeout = 5.0
data_done_timeout = 5.0
dead_destination_pause = 2.0

[retry]
first_interval = 1.0
first_count = 2
second_interval = 2.0
max_lifetime = 600.0
"""
    merged = _merge(tomllib.loads(base), tomllib.loads(extra))
    return "\n".join(_toml(merged)) + "\n"


def sink_envelope(dump: bytes) -> tuple[str, list[str], list[str], bytes]:
    """(sender, recipients, RCPT parameter texts, message with LF line ends) from one
    smtp-sink dump: X-Mail-Args and X-Rcpt-Args lines, smtp-sink's own Received header,
    then the message as it arrived."""
    lines = dump.split(b"\n")
    sender, rcpts, params = "", [], []
    i = 0
    while i < len(lines) and lines[i].startswith(b"X-"):
        key, _, value = lines[i].decode("latin-1").partition(": ")
        if key == "X-Mail-Args":
            sender = value.split()[0].strip("<>") if value.split() else ""
        elif key == "X-Rcpt-Args":
            words = value.split()
            rcpts.append(words[0].strip("<>"))
            params.append(" ".join(words[1:]))
        i += 1
    if i < len(lines) and lines[i].startswith(b"Received: "):
        i += 1
        while i < len(lines) and lines[i].startswith(b"\t"):
            i += 1
    message = b"\n".join(lines[i:])
    return sender, rcpts, params, message.removesuffix(b"\n")


def now() -> float:
    return time.time()


def established(ip: str, port: int) -> int:
    """TCP connections established to ip:port right now, as the kernel sees them."""
    want = f"{int.from_bytes(socket.inet_aton(ip), 'little'):08X}:{port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[1] == want and fields[3] == "01":  # local address, ESTABLISHED
                count += 1
    return count


class Blackhole:
    """A listener that accepts TCP connections (the kernel does) and never says a word: a
    dead MX that costs every client its whole greeting timeout."""

    def __init__(self, ip: str, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(512)

    def close(self) -> None:
        self.sock.close()
