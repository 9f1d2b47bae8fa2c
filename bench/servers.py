"""The servers the driver starts, measures and stops, each on a free loopback port.

Every server runs from its own directory under one temporary directory: its
config, spool or queue, mailboxes and log. Nothing is installed or left running
system-wide; `stop()` is safe to call twice and after a failed `start()`.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
DOMAIN = "bench.test"
USER = "bench"
RCPT = f"{USER}@{DOMAIN}"
SENDER = "load@client.test"
POP_PASSWORD = "bench-pass"
NOBODY = 65534  # uid/gid the peers' deliveries run as (Postfix virtual(8), Dovecot)


class ServerError(Exception):
    """A server could not be set up or started; the message says why (shown as 'skipped')."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def is_root() -> bool:
    return os.geteuid() == 0


def wait_banner(port: int, prefix: bytes, timeout: float, proc: subprocess.Popen | None = None,
                host: str = HOST) -> None:
    """Wait until host:port answers with a greeting starting with prefix (220 or +OK)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerError(f"exited with status {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                data = b""
                while b"\n" not in data:
                    chunk = s.recv(1024)
                    if not chunk:
                        break
                    data += chunk
                if data.startswith(prefix):
                    with contextlib.suppress(OSError):
                        s.sendall(b"QUIT\r\n")
                        s.recv(1024)
                    return
                last = f"greeting {data[:60]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise ServerError(f"no {prefix.decode()} greeting on port {port} within {timeout:.0f} s "
                      f"({last})")


def proc_tree(roots: list[int]) -> list[int]:
    """The root pids and all their descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the ")" that closes the command name.
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [p for p in roots if os.path.exists(f"/proc/{p}")]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def proc_cmdline(pid: int) -> list[str] | None:
    """A process's argv from /proc (None when it is gone; [] for a kernel thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


def memory_kb(roots: list[int], classify: Callable[[int, list[str]], str] | None = None,
              ) -> dict[str, Any]:
    """VmRSS and Pss summed over the process tree, in KiB, with the process count; with
    classify, the same per process kind under "by_kind".

    RSS counts pages shared between processes once per process; PSS splits them, so the
    two bound the real cost of a multi-process server.
    """
    rss = pss = 0
    pids = proc_tree(roots)
    by_kind: dict[str, dict[str, int]] = {}
    for pid in pids:
        try:
            p_rss = p_pss = 0
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        p_rss = int(line.split()[1])
                        break
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        p_pss = int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
        rss += p_rss
        pss += p_pss
        if classify is not None:
            kind = classify(pid, proc_cmdline(pid) or [])
            k = by_kind.setdefault(kind, {"rss_kb": 0, "pss_kb": 0, "processes": 0})
            k["rss_kb"] += p_rss
            k["pss_kb"] += p_pss
            k["processes"] += 1
    out: dict[str, Any] = {"rss_kb": rss, "pss_kb": pss, "processes": len(pids)}
    if classify is not None:
        out["by_kind"] = dict(sorted(by_kind.items()))
    return out


def count_maildir(root: Path) -> int:
    """Messages delivered under root: files in every Maildir new/ and cur/ below it."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        if os.path.basename(dirpath) in ("new", "cur"):
            total += len(files)
    return total


def _kill_group(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left after timeout."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    # Children that outlived the leader (a job still draining) go too.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


class Server:
    """One SMTP (or POP3) server under test."""

    kind = "server"
    banner = b"220"
    durable = False  # True when delivered() counts messages in mailboxes

    def __init__(self, label: str, workdir: Path) -> None:
        self.label = label
        self.dir = workdir / label.replace(" ", "_").replace("=", "")
        self.address = HOST  # where it listens (a few bench servers take another loopback)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "server.log"
        self.rcpt = RCPT

    def start(self, timeout: float = 60.0) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    def root_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def memory(self, classify: Callable[[int, list[str]], str] | None = None,
               ) -> dict[str, Any]:
        return memory_kb(self.root_pids(), classify)

    def delivered(self) -> int | None:
        return None

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def _popen(self, argv: list[str], **kw: object) -> subprocess.Popen:
        self.dir.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "ab")  # the child gets its own copy
        try:
            return subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    **kw)  # type: ignore[call-overload]
        finally:
            logf.close()


@dataclass(frozen=True)
class TlsFiles:
    """One server certificate (PEM), its key and the CA that issued it, for every server."""

    cert: Path
    key: Path
    ca: Path
    name: str  # the certificate's host name: the client's SNI and the name it verifies
    kind: str = "ECDSA P-256 (trustme)"


def make_tls_files(directory: Path, name: str = "mailpool.bench.test") -> TlsFiles:
    """A fresh CA (trustme: in process, no OpenSSL config) and a certificate from it for
    name and 127.0.0.1; the key is the runner's only (a server reads it before it drops
    privileges)."""
    try:
        import trustme
    except ImportError:
        raise ServerError("trustme not installed (pip install -e '.[test]')") from None
    directory.mkdir(parents=True, exist_ok=True)
    # ECDSA P-256, trustme's default, said here since the figures depend on it.
    ca = trustme.CA(key_type=trustme.KeyType.ECDSA)
    issued = ca.issue_cert(name, HOST, key_type=trustme.KeyType.ECDSA)
    files = TlsFiles(directory / "cert.pem", directory / "key.pem", directory / "ca.pem", name)
    files.key.touch(mode=0o600)
    issued.private_key_pem.write_to_path(str(files.key))
    files.cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    ca.cert_pem.write_to_path(str(files.ca))
    return files


def mailpool_command() -> list[str]:
    exe = Path(sys.executable).parent / "mailpool"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("mailpool")
    return [found] if found else [sys.executable, "-m", "mailpool.cli"]


class Mailpool(Server):
    """`mailpool serve` with a generated config: pool overrides, journal on or off, and with
    tls its port 25 listener offering STARTTLS."""

    kind = "mailpool"
    durable = True

    def __init__(self, label: str, workdir: Path, pool: dict[str, int | float | bool] | None = None,
                 journal: bool = True, pop_users: int = 0, tls: TlsFiles | None = None) -> None:
        super().__init__(label, workdir)
        self.pool = pool or {}
        self.journal = journal
        self.pop_users = pop_users
        self.tls = tls
        self.pop_port = 0
        self.config = self.dir / "mailpool.toml"
        self.data = self.dir / "var"

    def write_config(self) -> None:
        self.port, self.pop_port, admin = free_port(), free_port(), free_port()
        lines = [
            "[host]", 'name = "mailpool.bench.test"', f'local_domains = ["{DOMAIN}"]',
            # The bench's files are the runner's: jobs stay who started them.
            f'user = "{getpass.getuser()}"', "",
            "[listen]", f'smtp = "{HOST}:{self.port}"', f'pop3 = "{HOST}:{self.pop_port}"',
            f'admin = "{HOST}:{admin}"', "",
            "[paths]", 'data = "var"', "",
            "[journal]", f"enabled = {'true' if self.journal else 'false'}", "",
        ]
        if self.tls is not None:
            lines += ["[tls]", f'certificate = "{self.tls.cert}"', f'key = "{self.tls.key}"', ""]
        if self.pool:
            lines.append("[pool.smtp-server]")
            for key, value in self.pool.items():
                text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
                lines.append(f"{key} = {text}")
        self.config.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str, stdin: str = "", timeout: float = 60.0,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*mailpool_command(), *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=timeout,
                              cwd=self.dir, input=stdin)

    def add_user(self, name: str, address: str, password: str | None = None) -> None:
        args = ["user", "add", name, "--address", address]
        if password is not None:
            args.append("--password-stdin")
        res = self.cli(*args, stdin=f"{password}\n" if password is not None else "")
        if res.returncode != 0:
            raise ServerError(f"`mailpool {' '.join(args)}` failed: "
                              f"{(res.stderr or res.stdout).strip()[:200]}")

    def start(self, timeout: float = 60.0) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_config()
        self.add_user(USER, RCPT)
        for i in range(self.pop_users):
            self.add_user(f"pop{i}", f"pop{i}@{DOMAIN}", POP_PASSWORD)
        self.proc = self._popen([*mailpool_command(), "serve", "--config", str(self.config)],
                                cwd=self.dir)
        try:
            wait_banner(self.port, b"220", timeout, self.proc)
        except ServerError as exc:
            raise ServerError(f"{exc}: {self.log_tail()}") from None

    def pop_available(self) -> bool:
        try:
            wait_banner(self.pop_port, b"+OK", 3.0, self.proc)
        except ServerError:
            return False
        return True

    def delivered(self) -> int | None:
        return count_maildir(self.data / "mailboxes")


class AiosmtpdFsync(Server):
    kind = "aiosmtpd-fsync"
    durable = True

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        self.maildir = self.dir / "Maildir"
        bench_root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": str(bench_root)}
        self.proc = self._popen([sys.executable, "-m", "bench.peers.aiosmtpd_fsync",
                                 "--host", HOST, "--port", str(self.port),
                                 "--maildir", str(self.maildir)], env=env, cwd=bench_root)
        wait_banner(self.port, b"220", timeout, self.proc)

    def delivered(self) -> int | None:
        return count_maildir(self.maildir)


def postfix_tool(name: str) -> str | None:
    for cand in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


class SmtpSink(Server):
    """Postfix's smtp-sink: answers everything, stores nothing (the ceiling)."""

    kind = "smtp-sink"

    def __init__(self, label: str, workdir: Path, max_sessions: int = 1100) -> None:
        super().__init__(label, workdir)
        self.max_sessions = max_sessions

    def start(self, timeout: float = 30.0) -> None:
        exe = postfix_tool("smtp-sink")
        if exe is None:
            raise ServerError("smtp-sink not found (Debian package postfix)")
        self.port = free_port()
        argv = [exe, "-m", str(self.max_sessions)]
        if is_root():
            argv += ["-u", "nobody"]  # smtp-sink refuses to keep root privileges
        self.proc = self._popen([*argv, f"{HOST}:{self.port}", "1024"])
        wait_banner(self.port, b"220", timeout, self.proc)


MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class MasterDaemon(Server):
    """A peer run as `EXE -c CONF start|stop` that writes its master's pid to a file."""

    exe: str
    conf: Path

    def pid_file(self) -> Path:
        raise NotImplementedError

    def master_pid(self) -> int | None:
        try:
            return int(self.pid_file().read_text().split()[0])
        except (OSError, ValueError, IndexError, AttributeError):
            return None

    def root_pids(self) -> list[int]:
        pid = self.master_pid()
        return [pid] if pid else []

    def _control(self, verb: str) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run([self.exe, "-c", str(self.conf), verb], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30, stdin=subprocess.DEVNULL)

    def stop_daemon(self, extra_verb: str | None = None) -> None:
        """Stop politely, then harder (`extra_verb`, then SIGKILL of the whole tree)."""
        if not getattr(self, "started", False):
            return
        pid = self.master_pid()
        self._control("stop")
        if pid and not _wait_gone(pid, 10):
            if extra_verb:
                self._control(extra_verb)
            if not _wait_gone(pid, 5):
                for p in proc_tree([pid]):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
        self.started = False


class Postfix(MasterDaemon):
    """A private Postfix instance: smtpd on a loopback port, virtual(8) Maildir delivery.

    Everything else is Postfix's default (process limit 100, in_flow_delay 1s, ...),
    as a user would run it; virtual(8) fsyncs each Maildir file before it reports
    the message delivered, and the queue file is fsynced before smtpd's 250.
    """

    kind = "postfix"
    durable = True

    def start(self, timeout: float = 60.0) -> None:
        if not is_root():
            raise ServerError("needs root (postfix -c DIR start)")
        exe = postfix_tool("postfix")
        if exe is None:
            raise ServerError("postfix not found (Debian package postfix)")
        self.exe = exe
        d = self.dir
        self.conf, self.queue = d / "conf", d / "queue"
        self.vmail = d / "vmail"
        for sub in (self.conf, self.queue, d / "data", self.vmail):
            sub.mkdir(parents=True, exist_ok=True)
        for p in (d, self.vmail):
            p.chmod(0o755)
        shutil.chown(d / "data", user="postfix")
        os.chown(self.vmail, NOBODY, NOBODY)
        self.port = free_port()
        self.log = d / "postfix.log"
        (self.conf / "main.cf").write_text("\n".join(self.main_cf()) + "\n")
        self.write_maps()
        (self.conf / "master.cf").write_text(self.master_cf())
        self.started = True  # from here on stop() cleans up, whatever start() did
        out = d / "start.out"
        with open(out, "wb") as f:
            res = subprocess.run([exe, "-c", str(self.conf), "start"], stdout=f, stderr=f,
                                 timeout=60, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise ServerError(f"postfix start failed: "
                              f"{out.read_text(errors='replace').strip()[:200]} {self.log_tail()}")
        wait_banner(self.port, b"220", timeout)

    def main_cf(self) -> list[str]:
        """main.cf, one setting a line (a later line for the same key wins)."""
        d = self.dir
        return [
            "compatibility_level = 3.6",
            f"queue_directory = {self.queue}",
            f"data_directory = {d / 'data'}",
            "mail_owner = postfix",
            "setgid_group = postdrop",
            "myhostname = postfix.bench.test",
            f"mydomain = {DOMAIN}",
            f"myorigin = {DOMAIN}",
            "mydestination =",
            f"inet_interfaces = {HOST}",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            f"virtual_mailbox_domains = {DOMAIN}",
            f"virtual_mailbox_base = {self.vmail}",
            f"virtual_mailbox_maps = texthash:{self.conf / 'vmailbox'}",
            f"virtual_uid_maps = static:{NOBODY}",
            f"virtual_gid_maps = static:{NOBODY}",
            "alias_maps =",
            "alias_database =",
            "local_recipient_maps =",
            f"maillog_file = {self.log}",
            f"maillog_file_prefixes = {d}",
            "biff = no",
            "append_dot_mydomain = no",
            "smtputf8_enable = no",
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
            "default_transport = error",
            "relay_transport = error",
        ]

    def master_cf(self) -> str:
        return MASTER_CF.format(listen=f"{HOST}:{self.port}")

    def write_maps(self) -> None:
        (self.conf / "vmailbox").write_text(f"{RCPT} {USER}/Maildir/\n")

    def pid_file(self) -> Path:
        return self.queue / "pid" / "master.pid"

    def stop(self) -> None:
        # Postfix's own "abort" first, before the SIGKILL of the base class.
        self.stop_daemon(extra_verb="abort")

    def delivered(self) -> int | None:
        return count_maildir(self.vmail)


class PostfixTls(Postfix):
    """The private Postfix with smtpd offering STARTTLS (security level "may") with tls's
    certificate, otherwise as Postfix's defaults and a stock master.cf have it: tlsmgr runs,
    no session cache database (empty by default: set explicitly, the no-cache comparison)."""

    def __init__(self, label: str, workdir: Path, tls: TlsFiles) -> None:
        super().__init__(label, workdir)
        self.tls = tls

    def main_cf(self) -> list[str]:
        return [*super().main_cf(),
                "smtpd_tls_security_level = may",
                f"smtpd_tls_cert_file = {self.tls.cert}",
                f"smtpd_tls_key_file = {self.tls.key}",
                "smtpd_tls_loglevel = 0",
                "smtpd_tls_session_cache_database ="]

    def master_cf(self) -> str:
        return super().master_cf() + "tlsmgr    unix  -       -       n       1000?   1  tlsmgr\n"


class PostfixRelay(Postfix):
    """The private Postfix relaying instead: `routes` maps each domain to its next hop
    ("[127.0.0.2]:2525", no DNS) through transport_maps, with the smtp transport deferred
    until release(), so its queue can be filled first and then emptied at once.

    Concurrency stays Postfix's default; it is per next hop, so each domain gets its own.
    """

    QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

    def __init__(self, label: str, workdir: Path, routes: dict[str, str]) -> None:
        super().__init__(label, workdir)
        self.routes = routes

    def main_cf(self) -> list[str]:
        return [*super().main_cf(),
                f"relay_domains = {', '.join(self.routes)}",
                f"transport_maps = texthash:{self.conf / 'transport'}",
                "defer_transports = smtp"]

    def master_cf(self) -> str:
        return super().master_cf() + "smtp      unix  -       -       n       -       -  smtp\n"

    def write_maps(self) -> None:
        super().write_maps()
        (self.conf / "transport").write_text(
            "".join(f"{domain} smtp:{hop}\n" for domain, hop in self.routes.items()))

    def queued(self, queues: tuple[str, ...] = QUEUES) -> int:
        """Messages in these queues (queue files, counted on disk: no showq process)."""
        total = 0
        for name in queues:
            for _dirpath, _dirs, files in os.walk(self.queue / name):
                total += len(files)
        return total

    def program_pids(self, program: str) -> list[int]:
        return [p for p in proc_tree(self.root_pids())
                if os.path.basename((proc_cmdline(p) or [""])[0]) == program]

    def release(self, timeout: float = 15.0) -> None:
        """Stop deferring smtp: clear defer_transports and reload, then wait until the queue
        manager that read the old setting is gone (a flush it took would defer again)."""
        old = self.program_pids("qmgr")
        for argv in ([postfix_tool("postconf") or "postconf", "-c", str(self.conf), "-e",
                      "defer_transports ="],
                     [self.exe, "-c", str(self.conf), "reload"]):
            res = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                                 stdin=subprocess.DEVNULL)
            if res.returncode != 0:
                raise ServerError(f"{' '.join(argv[:1] + argv[3:])}: "
                                  f"{(res.stderr or res.stdout).strip()[:200]}")
        for pid in old:
            if not _wait_gone(pid, timeout):
                raise ServerError(f"qmgr {pid} still running {timeout:.0f} s after reload")

    def flush(self) -> None:
        """`postqueue -f`: every deferred message due now."""
        exe = postfix_tool("postqueue") or "postqueue"
        res = subprocess.run([exe, "-c", str(self.conf), "-f"], capture_output=True, text=True,
                             timeout=30, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise ServerError(f"postqueue -f: {(res.stderr or res.stdout).strip()[:200]}")


class Dovecot(MasterDaemon):
    """A private Dovecot serving POP3 only, from Maildirs the driver fills directly."""

    kind = "dovecot"
    banner = b"+OK"

    def start(self, timeout: float = 30.0) -> None:
        if not is_root():
            raise ServerError("needs root (dovecot -c FILE)")
        exe = postfix_tool("dovecot")
        if exe is None or not Path("/usr/lib/dovecot/pop3").exists():
            raise ServerError("dovecot POP3 not found (Debian package dovecot-pop3d)")
        self.exe = exe
        d = self.dir
        self.mail = d / "mail"
        for sub in (d / "run", d / "state", self.mail):
            sub.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        os.chown(self.mail, NOBODY, NOBODY)
        self.port = free_port()
        self.log = d / "dovecot.log"
        users = d / "users"
        users.write_text("".join(f"{u}:{{PLAIN}}{POP_PASSWORD}::::::\n"
                                 for u in self.users))
        self.conf = d / "dovecot.conf"
        self.conf.write_text(f"""\
base_dir = {d / 'run'}
state_dir = {d / 'state'}
instance_name = bench-{self.port}
protocols = pop3
listen = {HOST}
log_path = {self.log}
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:{self.mail}/%u/Maildir
first_valid_uid = 1
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {users}
}}
userdb {{
  driver = static
  args = uid={NOBODY} gid={NOBODY} home={self.mail}/%u
}}
service pop3-login {{
  inet_listener pop3 {{
    address = {HOST}
    port = {self.port}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
""")
        self.started = True  # from here on stop() cleans up, whatever start() did
        # The daemon keeps its stdout/stderr: a file, not a pipe we would wait on forever.
        out = d / "start.out"
        with open(out, "wb") as f:
            res = subprocess.run([exe, "-c", str(self.conf)], stdout=f, stderr=f,
                                 timeout=30, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise ServerError(f"dovecot failed: {out.read_text(errors='replace').strip()[:300]}")
        wait_banner(self.port, b"+OK", timeout)

    users: list[str] = []

    def fill(self, users: list[str], count: int, message: bytes) -> None:
        """Put count copies of message into each user's Maildir/new (before start)."""
        self.users = users
        for user in users:
            new = self.dir / "mail" / user / "Maildir" / "new"
            for sub in ("tmp", "new", "cur"):
                (new.parent / sub).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (new / f"{1700000000 + i}.M{i}P1.bench").write_bytes(message)
            for p in [new.parent.parent, *new.parent.parent.rglob("*")]:
                os.chown(p, NOBODY, NOBODY)

    def pid_file(self) -> Path:
        return self.dir / "run" / "master.pid"

    def stop(self) -> None:
        self.stop_daemon()
