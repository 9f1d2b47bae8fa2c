"""Crash tests: kill -9 of the whole host (supervisor and every job) at the bad moments,
then restart on the same data directory.

A message is accepted exactly when its 250 is sent: before that a crash must leave no
trace of it; after that it must be delivered, exactly once, whatever else crashes.
The journal survives a torn last record.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
from pathlib import Path
from typing import Any

from hosthelp import Host, wait_for

# Small pools: these tests start a host seven times and every job is a fresh Python
# process. No POP. A framework job stopped with SIGSTOP must not be replaced for missing
# its heartbeats while the test runs.
CONFIG = """
[pool.smtp-server]
initial_jobs = 1
threshold = 1
additional_jobs = 1

[pool.pop-server]
start_jobs = false

[pool.framework]
heartbeat_timeout = 600.0
"""


def start_line(host: Host) -> str:
    """The supervisor's last "started" log line (it says how much it found queued)."""
    lines = [ln for ln in host.log_path.read_text().splitlines() if " started pid " in ln]
    assert lines, host.log_path.read_text()
    return lines[-1]


def spool_leftovers(host: Host) -> list[Path]:
    spool = host.data / "spool"
    return [p for d in ("incoming", "tmp") for p in (spool / d).glob("*")]


def live_framework_pids(host: Host) -> list[int]:
    records = host.journal("--code", "JS,JE", "--job", "framework")
    started = {r["pid"] for r in records if r["code"] == "JS"}
    ended = {r["pid"] for r in records if r["code"] == "JE"}
    return sorted(started - ended)


def test_kill_during_data_leaves_nothing(host: Any, raw_smtp: Any) -> None:
    h = host(CONFIG, name="crash-data")
    h.add_user("bob", "bob@example.test")
    c = raw_smtp(h.smtp)
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example.test")[0] == 250
    assert c.cmd("MAIL FROM:<alice@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<bob@example.test>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: never accepted\r\n\r\nthe first half of the bo")
    h.kill()  # kill -9 of the supervisor and every job, mid-DATA

    assert spool_leftovers(h) == []
    assert h.maildir_files("bob") == []
    h.start()
    assert "(0 queued, " in start_line(h)
    # Prove the restarted host works and had nothing else to do: one new message,
    # delivered alone.
    with smtplib.SMTP(*h.smtp, local_hostname="client.example.test", timeout=20) as s:
        s.sendmail("alice@remote.test", ["bob@example.test"], b"Subject: after\r\n\r\nok\r\n")
    (path,) = h.wait_delivered("bob", 1)
    assert path.read_bytes().endswith(b"Subject: after\r\n\r\nok\r\n")
    assert h.journal("--code", "94") and all(
        r["queue_id"] == path.name.split(".")[0] for r in h.journal("--code", "94"))
    wait_for(lambda: not spool_leftovers(h), what="empty spool")


def test_kill_after_250_delivers_exactly_once(host: Any) -> None:
    h = host(CONFIG, name="crash-250")
    h.add_user("bob", "bob@example.test")
    # Freeze delivery: with every framework job stopped, the accepted message can only
    # be in the incoming queue when the host dies.
    pids = live_framework_pids(h)
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    message = b"Subject: accepted\r\n\r\nmust arrive once\r\n"
    with smtplib.SMTP(*h.smtp, local_hostname="client.example.test", timeout=20) as s:
        s.ehlo()
        s.mail("alice@remote.test")
        s.rcpt("bob@example.test")
        code, text = s.data(message)
        assert code == 250, text
        h.kill()  # right after the 250, before QUIT
    queue_id = re.search(rb"queued as (\S+)", text).group(1).decode()
    assert live_framework_pids(h) == pids  # no other framework job ever ran

    assert [p.name for p in h.queue_files()] == [queue_id]
    assert h.maildir_files("bob") == []

    h.start()
    assert "(1 queued, " in start_line(h)
    (path,) = h.wait_delivered("bob", 1)
    assert path.name.startswith(queue_id + ".")
    assert path.read_bytes().endswith(message)
    wait_for(lambda: not spool_leftovers(h), what="queue file removed")
    b2 = h.journal("--code", "B2", "--queue-id", queue_id)
    assert len(b2) == 1

    h.kill()
    h.start()
    assert "(0 queued, " in start_line(h)
    assert h.maildir_files("bob") == [path]
    assert spool_leftovers(h) == []
    h.stop()
    assert h.maildir_files("bob") == [path]
    assert len(h.journal("--code", "B2", "--queue-id", queue_id)) == 1


def receivers(host: Host) -> list[Path]:
    return sorted((host.data / "journal").glob("receiver-*.jrn"))


def test_torn_journal_tail_is_repaired_on_start(host: Any) -> None:
    h = host(CONFIG, name="crash-jrn")
    h.add_user("bob", "bob@example.test")
    with smtplib.SMTP(*h.smtp, local_hostname="client.example.test", timeout=20) as s:
        s.sendmail("alice@remote.test", ["bob@example.test"], b"Subject: j\r\n\r\nx\r\n")
    h.wait_delivered("bob", 1)
    wait_for(lambda: h.journal("--code", "B2"), what="B2")
    assert h.stop() == 0
    before = h.journal()
    ok = h.cli("journal", "dump", "--verify")
    assert ok.stdout.startswith("OK: ")

    last = receivers(h)[-1]
    size = last.stat().st_size
    os.truncate(last, size - 5)  # the last record loses its last bytes (a torn write)
    cut = h.cli("journal", "dump", "--verify", check=False)
    assert cut.returncode != 0
    assert f"corrupt: {last.name} bytes " in cut.stdout, cut.stdout
    # The dump still reads every whole record.
    assert h.journal() == before[:-1]

    h.start()
    assert h.stop() == 0
    res = h.cli("journal", "dump", "--verify", check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.startswith("OK: ")
    after = h.journal()
    assert after[: len(before) - 1] == before[:-1]
    # The restarted writer continued right after the last whole record: no gap, no reuse.
    assert [r["seq"] for r in after] == list(range(1, len(after) + 1))
    assert len(after) > len(before)
