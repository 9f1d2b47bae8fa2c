"""The journal on a running host: CHGJRN through the CLI, rotation by size, journaling off."""

from __future__ import annotations

import smtplib

from hosthelp import wait_for

from mailpool.journal.format import list_receivers

MESSAGE = b"Subject: journal\r\n\r\nbody\r\n"


def send(host, to: str = "bob@example.test") -> None:
    with smtplib.SMTP(*host.smtp, timeout=30) as client:
        client.sendmail("alice@remote.test", [to], MESSAGE)


def test_rotate_attaches_a_new_receiver_on_the_running_host(host) -> None:
    h = host()
    h.add_user("bob", "bob@example.test")
    send(h)
    h.wait_delivered("bob", 1)
    before = list_receivers(h.data / "journal")
    out = h.cli("journal", "rotate").stdout
    after = list_receivers(h.data / "journal")
    assert len(after) == len(before) + 1 and str(after[-1][1]) in out
    send(h)
    h.wait_delivered("bob", 2)
    # The second message's records are in the new receiver, the sequence unbroken.
    wait_for(lambda: after[-1][1].stat().st_size > 0, what="records in the new receiver")
    assert h.cli("journal", "dump", "--verify").returncode == 0
    seqs = [r["seq"] for r in h.journal()]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_receivers_rotate_by_size(host) -> None:
    h = host("[journal]\nreceiver_max_bytes = 4096\n")
    h.add_user("bob", "bob@example.test")
    for _ in range(6):
        send(h)
    h.wait_delivered("bob", 6)
    assert len(list_receivers(h.data / "journal")) > 1
    assert h.cli("journal", "dump", "--verify").returncode == 0
    assert len([r for r in h.journal("--code", "B2")]) == 6


def test_journaling_off_delivers_and_writes_nothing(host) -> None:
    h = host("[journal]\nenabled = false\n")
    h.add_user("bob", "bob@example.test")
    send(h)
    h.wait_delivered("bob", 1)
    assert h.journal() == []
    res = h.cli("journal", "rotate", check=False)
    assert res.returncode != 0 and "journaling is turned off" in res.stderr
