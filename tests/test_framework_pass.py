"""The framework pass on real files: local copies, forwarding and notices, and a pass run
again after a crash (between its two halves) writing nothing twice."""

from __future__ import annotations

import time
from pathlib import Path

from mailpool.directory import Directory
from mailpool.framework.notice_queue import NoticeSettings
from mailpool.framework.passes import Framework
from mailpool.framework.spool import Envelope, Spool
from mailpool.outbound.state import OutboundState, RecipientState, load_state, save_state

CONTENT = b"From: alice@remote.test\r\nSubject: hi\r\n\r\nbody\r\n"


def setup(tmp_path: Path) -> tuple[Spool, Framework, str]:
    spool = Spool(tmp_path / "spool")
    directory = Directory(tmp_path / "directory.json")
    directory.add_user("bob", ["bob@example.test"], None)
    framework = Framework(
        spool=spool, directory=directory, mailbox_root=tmp_path / "mailboxes",
        hostname="mail.example.test", local_domains=["example.test"], postmaster="postmaster",
        router="", notices=NoticeSettings(hostname="mail.example.test",
                                          sender="MAILER-DAEMON@mail.example.test",
                                          nondelivery_copy="", max_original_size=65536,
                                          postmaster="postmaster@example.test"))
    qid = spool.new_queue_id()
    spool.store("incoming", Envelope(
        queue_id=qid, message_id="m1@remote.test", originator="alice@remote.test",
        recipients=["bob@example.test", "x@far.test", "ghost@example.test", "y@Far.Test"],
        received_ns=time.time_ns(), size=len(CONTENT),
        notify=["SUCCESS", "", "", "NEVER"], orcpt=["", "", "", ""]), CONTENT)
    return spool, framework, qid


def test_one_pass_delivers_forwards_and_reports(tmp_path: Path) -> None:
    spool, framework, qid = setup(tmp_path)
    fp = framework.deliver(qid, again=False)
    assert fp is not None
    framework.complete(fp)
    box = list((tmp_path / "mailboxes" / "bob" / "new").iterdir())
    assert len(box) == 1
    assert box[0].read_bytes() == (b"Return-Path: <alice@remote.test>\r\n"
                                   b"Delivered-To: bob@example.test\r\n" + CONTENT)
    out, content = spool.load("outbound", qid)
    assert out.recipients == ["x@far.test", "y@Far.Test"] and content == CONTENT
    assert out.notify == ["", "NEVER"]  # DSN requests travel with their recipients
    assert [(i.queue, i.destinations) for i in fp.handed] == [
        ("outbound", ["far.test"]), ("incoming", []), ("incoming", [])]
    ndr, cod = spool.load_envelope("incoming", f"{qid}-NDR"), spool.load_envelope(
        "incoming", f"{qid}-COD")
    assert ndr.originator == "" and ndr.recipients == ["alice@remote.test"]
    assert ndr.notice == "failure" and cod.notice == "success"
    codes = [code for code, _ in fp.take_entries()]
    assert codes == ["7A", "7H", "71", "72", "72", "72", "72",
                     "P2", "B8", "B2", "P2", "P2", "P2", "C6", "C1", "C2", "C2",
                     "7P", "7G", "AP", "A1", "A2", "7R", "7G", "BR", "B1", "B2"]
    assert spool.find(qid) == "outbound"  # off the incoming queue


def test_a_pass_run_again_writes_nothing_twice(tmp_path: Path) -> None:
    spool, framework, qid = setup(tmp_path)
    assert framework.deliver(qid, again=False) is not None  # ... and the job dies here
    # Meanwhile the client took the forwarded copy and recorded an attempt.
    save_state(spool, qid, OutboundState(recipients=[RecipientState(), RecipientState()],
                                         attempts=1, next_attempt=123.0))
    outbound = spool.path("outbound", qid)
    before = outbound.stat().st_ino
    fp = framework.deliver(qid, again=True)
    assert fp is not None
    framework.complete(fp)
    assert len(list((tmp_path / "mailboxes" / "bob" / "new").iterdir())) == 1
    assert outbound.stat().st_ino == before  # the queue file was left alone
    assert load_state(spool, qid, 2).attempts == 1
    notices = sorted(p.name for p in (tmp_path / "spool" / "incoming").iterdir())
    assert notices == [f"{qid}-COD", f"{qid}-NDR"]
