"""Hardening, end to end: one host per data directory, privileges, per-client limits,
deadlines a client cannot stretch, and hostile input side by side with a normal client."""

from __future__ import annotations

import json
import os
import pwd
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from hosthelp import MAILPOOL, Host, wait_for

from mailpool.supervisor.privileges import drop_to, unreachable

NO_EXCEPTIONS = "[smtp]\nclient_limit_exceptions = []\n"


def smtp_ok(h: Host, rcpt: str = "bob@example.test") -> None:
    """A normal client is served, on time."""
    start = time.monotonic()
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        assert s.sendmail("a@remote.test", [rcpt], b"Subject: ok\r\n\r\nfine\r\n") == {}
    assert time.monotonic() - start < 5


# --- one host per data directory -------------------------------------------------------


def test_a_second_serve_on_the_same_data_directory_exits_naming_the_pid(host: Any) -> None:
    h = host()
    other = h.root / "other.toml"
    text = h.config_path.read_text().replace('smtp = "127.0.0.1:0"', 'smtp = "127.0.0.1:0"')
    other.write_text(text.replace('data = "var"', f'data = "{h.data}"'))
    res = subprocess.run([*MAILPOOL, "serve", "--config", str(other)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert f"pid {h.proc.pid}" in line and str(h.data) in line
    # The first host is untouched: still managed through its control socket.
    assert h.pool_stats()["smtp-server"]["jobs"]["current"] >= 1
    sock = h.data / "run" / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert h.cli("journal", "dump", "--verify").returncode == 0


def test_a_listen_error_names_the_address_and_port(host: Any) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        h = host(f'[listen]\nsmtp = "127.0.0.1:{port}"\n', start=False)
        res = subprocess.run([*MAILPOOL, "serve", "--config", str(h.config_path)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 1
        assert f"127.0.0.1:{port}" in res.stderr and "listen.smtp" in res.stderr
    finally:
        busy.close()


# --- privileges ------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="privileges are dropped only by root")


def mailpool_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("mailpool")
    except KeyError:
        pytest.skip("no mailpool user (make test creates it when run as root)")


@needs_root
def test_the_drop_gives_the_data_to_the_user_and_becomes_it(tmp_path: Path) -> None:
    user = mailpool_user()
    data = Path(tempfile.mkdtemp(prefix="mailpool-drop-"))
    os.chmod(data, 0o755)
    (data / "spool").mkdir()
    (data / "spool" / "file").write_bytes(b"x")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops for good; the test process stays root
        try:
            said = drop_to("mailpool", data, check_interpreter=False)
            os.write(write, json.dumps([said, os.getuid(), os.getgid(),
                                        os.getgroups()]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        said, uid, gid, groups = json.loads(f.read())
    os.waitpid(pid, 0)
    assert (uid, gid, groups) == (user.pw_uid, user.pw_gid, [])
    assert said.startswith("running as mailpool")
    for path in (data, data / "spool", data / "spool" / "file"):
        assert (path.stat().st_uid, path.stat().st_gid) == (user.pw_uid, user.pw_gid)


@needs_root
def test_started_as_root_on_a_privileged_port_every_process_runs_as_the_user(host: Any
                                                                              ) -> None:
    user = mailpool_user()
    blocked = unreachable(Path(sys.executable).resolve(), user.pw_uid, user.pw_gid, os.X_OK)
    if blocked:
        pytest.skip(f"user mailpool cannot run this Python: {blocked}")
    root = Path(tempfile.mkdtemp(prefix="mailpool-priv-"))
    os.chmod(root, 0o755)
    port = next(p for p in range(700, 1000) if _free(p))
    h = Host(root, f'[host]\nuser = "mailpool"\n[listen]\nsmtp = "127.0.0.1:{port}"\n')
    h.add_user("bob", "bob@example.test")
    try:
        h.start()
        smtp_ok(h)
        h.wait_delivered("bob", 1)
        pids = [h.proc.pid, *_children(h.proc.pid)]
        uids = {_uid(p) for p in pids}
        assert uids == {user.pw_uid}, uids
        spool_file = next((h.data / "mailboxes" / "bob" / "new").iterdir())
        assert spool_file.stat().st_uid == user.pw_uid
    finally:
        h.kill()


def _free(port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except OSError:
                continue
            if ppid == pid:
                out.append(int(entry.name))
    return out


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[2])  # effective
    raise AssertionError(pid)


# --- per-client limits -------------------------------------------------------------------------


def test_idle_connections_from_one_address_do_not_starve_another(host: Any) -> None:
    # The hostile client comes from 127.0.0.2, the normal one from 127.0.0.1; loopback is
    # not exempt here.
    h = host(NO_EXCEPTIONS + "max_connections_per_client = 5\n")
    h.add_user("bob", "bob@example.test")
    idle = []
    for _ in range(20):
        s = socket.create_connection(h.smtp, source_address=("127.0.0.2", 0))
        idle.append(s)
    try:
        refused = 0
        for s in idle:
            s.settimeout(10)
            first = s.recv(200)
            refused += first.startswith(b"421 4.7.0")
        assert refused == 15  # five held, the rest refused at once
        smtp_ok(h)  # 127.0.0.1 is served on time
        records = wait_for(lambda: len(h.journal("--code", "9S")) >= 15 and
                           h.journal("--code", "9S"), 10, what="9S records")
        assert {r["ip"] for r in records} == {"127.0.0.2"}
    finally:
        for s in idle:
            s.close()


# --- storage threshold ------------------------------------------------------------------------


def test_below_the_storage_threshold_mail_waits_and_resumes(host: Any, raw_smtp: Any) -> None:
    huge = "[storage]\nmin_free_mb = 1000000000\ncheck_interval = 0.2\n"
    h = host(huge, start=False)
    h.add_user("bob", "bob@example.test")
    # A message already accepted (on the incoming queue when the host starts) ...
    from mailpool.framework.spool import Envelope, Spool

    spool = Spool(h.data / "spool")
    qid = spool.new_queue_id()
    spool.store("incoming", Envelope(queue_id=qid, message_id="busy@remote.test",
                                     originator="a@remote.test", recipients=["bob@example.test"],
                                     received_ns=time.time_ns()), b"Subject: wait\r\n\r\nx\r\n")
    h.start()
    # ... is parked on the busy queue, and new mail is refused for now.
    wait_for(lambda: h.queue_files("busy"), 20, what="the message on the busy queue")
    c = raw_smtp(h.smtp)
    c.reply()
    c.cmd("EHLO client.example.test")
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.test>") == (452, ["4.3.1 Insufficient system storage"])
    c.cmd("QUIT")
    # Room again (the threshold lowered, a reload): back on the incoming queue, delivered.
    h.config_path.write_text(h.config_path.read_text().replace("1000000000", "0"))
    os.kill(h.proc.pid, signal.SIGHUP)
    h.wait_delivered("bob", 1, timeout=30)
    codes = [r["code"] for r in h.journal("--queue-id", qid)]
    assert codes.index("7L") < codes.index("7M") < codes.index("B2"), codes
