"""`mailpool journal dump` logic: filters, formats, follow, verify, message selectors and
the one-line-per-message summary."""

from __future__ import annotations

import argparse
import csv
import io
import json
import threading
from pathlib import Path

import pytest

import mailpool.journal.dump as dump_module
from mailpool.journal.dump import CSV_COLUMNS, add_dump_arguments, run_dump
from mailpool.journal.format import Record, list_receivers
from mailpool.journal.selection import parse_address_pattern
from mailpool.journal.summary import MessageSummary, shorten_recipients
from mailpool.journal.writer import JournalWriter

SEC = 1_000_000_000
T0 = 1_795_953_600 * SEC  # 2026-11-29T12:00:00Z

# (code, job, fields) written one second apart from T0; seq = index + 1
FLOW = [
    ("JS", "supervisor", {"job_name": "smtp-server/1", "pid": 100}),  # 1
    ("94", "smtp-server/1", {"queue_id": "Q1", "originator": "a@x.org"}),  # 2
    ("91", "smtp-server/1", {"queue_id": "Q1", "originator": "a@x.org"}),  # 3
    ("92", "smtp-server/1", {"queue_id": "Q1", "recipient": "b@y.org"}),  # 4
    ("9T", "smtp-server/1", {"queue_id": "Q1", "size": 1234}),  # 5
    ("99", "smtp-server/1", {"queue_id": "Q1", "message_id": "<m1@x.org>"}),  # 6
    ("97", "smtp-server/1", {"queue_id": "Q1"}),  # 7
    ("94", "smtp-server/2", {"queue_id": "Q2", "originator": "c@x.org"}),  # 8
    ("99", "smtp-server/2", {"queue_id": "Q2", "message_id": "m2@x.org"}),  # 9
    ("7A", "framework/1", {"queue_id": "Q1"}),  # 10
    ("B8", "framework/1", {"queue_id": "Q1", "mailbox": "/srv/mail/b", "detail": "new, 1 part"}),
    ("9V", "smtp-server/2", {"ip": "192.0.2.7", "detail": "relay refused"}),  # 12
    ("DR", "pop-server/1", {"user": "b", "detail": "uid-1", "size": 1234}),  # 13
]


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    d = tmp_path / "journal"
    with JournalWriter(d, max_receiver_bytes=400) as w:  # several receivers
        for i, (code, job, fields) in enumerate(FLOW):
            w.write(code, job, fields, time_ns=T0 + i * SEC + 123_456_000)
    assert len(list_receivers(d)) > 1
    return d


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailpool journal dump")
    add_dump_arguments(p)
    return p


def dump(journal: Path, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = run_dump(parser().parse_args(list(argv)), journal, out)
    return status, out.getvalue()


def dump_json(journal: Path, *argv: str) -> list[dict]:
    status, text = dump(journal, "--format", "json", *argv)
    assert status == 0
    return [json.loads(line) for line in text.splitlines()]


def seqs(journal: Path, *argv: str) -> list[int]:
    return [o["seq"] for o in dump_json(journal, *argv)]


def test_all_records_in_order(journal: Path) -> None:
    assert seqs(journal) == list(range(1, len(FLOW) + 1))


def test_text_format(journal: Path) -> None:
    status, text = dump(journal)
    assert status == 0
    lines = text.splitlines()
    assert len(lines) == len(FLOW)
    assert lines[1] == (
        "      2 2026-11-29T12:00:01.123456+00:00 LG 94 smtp-server/1  "
        "Mail received (local): queue_id=Q1 originator=a@x.org"
    )
    assert 'detail="new, 1 part"' in lines[10]
    assert "message_id=m1@x.org" in lines[5]
    assert "Relay refused" in lines[11] and "ip=192.0.2.7" in lines[11]


def test_json_format(journal: Path) -> None:
    objs = dump_json(journal)
    b8 = objs[10]
    assert b8["seq"] == 11
    assert b8["time"] == "2026-11-29T12:00:10.123456+00:00"
    assert (b8["type"], b8["code"], b8["job"]) == ("LG", "B8", "framework/1")
    assert b8["queue_id"] == "Q1" and b8["mailbox"] == "/srv/mail/b"
    assert b8["detail"] == "new, 1 part"
    assert objs[5]["message_id"] == "m1@x.org"  # stored without brackets
    assert objs[4]["size"] == 1234
    assert objs[11]["ip"] == "192.0.2.7"
    assert list(objs[0])[:6] == ["host", "seq", "time", "type", "code", "job"]
    # one journal given as <data>/journal: the host is the data directory's name
    assert {o["host"] for o in objs} == {journal.parent.name}


def test_csv_format(journal: Path) -> None:
    status, text = dump(journal, "--format", "csv")
    assert status == 0
    rows = list(csv.reader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert ",".join(rows[0]) == (
        "seq,time,type,code,job,queue_id,message_id,originator,recipient,size,ip,detail,"
        "explanation,host"
    )
    by_seq = {r["seq"]: r for r in csv.DictReader(io.StringIO(text))}
    assert len(by_seq) == len(FLOW)
    r = by_seq["5"]
    assert (r["code"], r["queue_id"], r["size"], r["originator"]) == ("9T", "Q1", "1234", "")
    assert r["explanation"] == "Size of received mail in bytes"
    assert by_seq["6"]["message_id"] == "m1@x.org"
    # fields without a column are kept, appended to detail
    assert by_seq["11"]["detail"] == "new, 1 part mailbox=/srv/mail/b"
    assert by_seq["2"]["time"] == "2026-11-29T12:00:01.123456+00:00"
    assert by_seq["2"]["host"] == journal.parent.name


def test_code_filter(journal: Path) -> None:
    assert seqs(journal, "--code", "94,9V") == [2, 8, 12]
    assert seqs(journal, "--code", "94", "--code", "9v") == [2, 8, 12]
    assert seqs(journal, "--code", " 99 , dr") == [6, 9, 13]


def test_time_filters(journal: Path) -> None:
    # record i is at T0 + (i-1) s + 0.123456 s
    assert seqs(journal, "--since", "2026-11-29T12:00:05") == list(range(6, 14))
    assert seqs(journal, "--until", "2026-11-29T12:00:02Z") == [1, 2]
    window = ["--since", "2026-11-29T13:00:03+01:00", "--until", "2026-11-29T12:00:06"]
    assert seqs(journal, *window) == [4, 5, 6]
    assert seqs(journal, "--since", "2026-11-30") == []
    assert seqs(journal, "--until", "2026-11-29") == []
    # since inclusive, until exclusive: exactly at a record's time
    assert seqs(journal, "--since", "2026-11-29T12:00:03.123456") == list(range(4, 14))
    assert seqs(journal, "--until", "2026-11-29T12:00:03.123456") == [1, 2, 3]


@pytest.mark.parametrize("mid", ["m1@x.org", "<m1@x.org>", " <m1@x.org> "])
def test_message_id_pulls_queue_id_records(journal: Path, mid: str) -> None:
    # 94 91 92 9T precede the 99 and carry only the queue id; so do 97 7A B8
    assert seqs(journal, "--message-id", mid) == [2, 3, 4, 5, 6, 7, 10, 11]


def test_message_id_combined_with_code(journal: Path) -> None:
    assert seqs(journal, "--message-id", "m2@x.org") == [8, 9]
    assert seqs(journal, "--message-id", "<m1@x.org>", "--code", "B8,94") == [2, 11]
    assert seqs(journal, "--message-id", "nope@x.org") == []


def test_queue_id_job_from_seq_limit(journal: Path) -> None:
    assert seqs(journal, "--queue-id", "Q2") == [8, 9]
    assert seqs(journal, "--job", "framework/1") == [10, 11]
    assert seqs(journal, "--job", "smtp-server") == [2, 3, 4, 5, 6, 7, 8, 9, 12]
    assert seqs(journal, "--job", "smtp-server/2") == [8, 9, 12]
    assert seqs(journal, "--from-seq", "9") == [9, 10, 11, 12, 13]
    # -n: the newest N, shown oldest first; --head: the oldest N
    assert seqs(journal, "-n", "3") == [11, 12, 13]
    assert seqs(journal, "--head", "3") == [1, 2, 3]
    assert seqs(journal, "--from-seq", "9", "-n", "2") == [12, 13]
    assert seqs(journal, "--from-seq", "9", "--head", "2") == [9, 10]
    assert seqs(journal, "--queue-id", "Q1", "-n", "2", "--from-seq", "5") == [10, 11]
    assert seqs(journal, "--queue-id", "Q1", "--head", "2", "--from-seq", "5") == [5, 6]
    assert seqs(journal, "-n", "0") == []
    assert seqs(journal, "--head", "0") == []


def test_namespace_built_by_hand(journal: Path) -> None:
    out = io.StringIO()
    args = argparse.Namespace(code="94,9V", message_id=None, format="json")
    assert run_dump(args, journal, out) == 0
    assert [json.loads(x)["seq"] for x in out.getvalue().splitlines()] == [2, 8, 12]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--since", "yesterday"], "--since"),
        (["--until", "2026-13-01"], "--until"),
        (["--code", "ZZ"], "ZZ"),
        (["-n", "-3"], "-n"),
        (["--from-seq", "x"], "--from-seq"),
        (["--format", "xml"], "--format"),
        (["--sender", ""], "--sender"),
        (["--sender", "a b@x.org"], "--sender"),
        (["--recipient", "<a@x.org"], "--recipient"),
        (["--recipient", "a@x\x01.org"], "--recipient"),
        (["--head", "-1"], "--head"),
        (["--head", "x"], "--head"),
    ],
)
def test_bad_options_are_one_line_errors(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_bad_raw_values_in_run_dump(journal: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    assert run_dump(argparse.Namespace(since="not-a-time"), journal, out) == 2
    err = capsys.readouterr().err
    assert "--since" in err and "not-a-time" in err
    assert len(err.strip().splitlines()) == 1
    assert out.getvalue() == ""


def test_missing_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-journal"
    for argv in ([], ["--verify"], ["--follow"]):
        status, text = dump(missing, *argv)
        assert status == 1 and text == ""
        err = capsys.readouterr().err
        assert str(missing) in err and len(err.strip().splitlines()) == 1


def test_verify_ok(journal: Path) -> None:
    status, text = dump(journal, "--verify")
    assert status == 0
    assert text.count("\n") == 1
    assert text.startswith("OK") and f"{len(FLOW)} records" in text


def test_verify_problems(journal: Path) -> None:
    receivers = list_receivers(journal)
    # corrupt a byte in the first record of the second receiver, drop the third
    second = receivers[1][1]
    data = bytearray(second.read_bytes())
    data[20] ^= 0xFF
    second.write_bytes(bytes(data))
    receivers[2][1].unlink()
    status, text = dump(journal, "--verify")
    assert status == 1
    lines = text.splitlines()
    assert any(line.startswith("corrupt:") and second.name in line for line in lines)
    assert any(line.startswith("gap:") and "missing" in line for line in lines)
    assert not any(line.startswith("OK") for line in lines)
    # the dump still shows what is readable
    status, text = dump(journal)
    assert status == 0 and text


def test_empty_journal(tmp_path: Path) -> None:
    d = tmp_path / "j"
    d.mkdir()
    assert dump(d) == (0, "")
    status, text = dump(d, "--verify")
    assert status == 0 and text.startswith("OK: 0 records")
    status, text = dump(d, "--format", "csv")
    assert text.splitlines() == [",".join(CSV_COLUMNS)]


class LineSink(io.StringIO):
    """Output that tells the test when a record line with a given seq is out, and
    ends the follow once the `last` text is out."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()
        self.trigger = ""
        self.last = ""
        self.stop = threading.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if self.trigger and self.trigger in self.getvalue():
            self.seen.set()
        if self.last and self.last in self.getvalue():
            self.stop.set()
        return n


def run_follow(journal: Path, argv: list[str], sink: LineSink, append) -> int:
    """Run the dump with --follow while `append(writer)` runs once `sink.seen` fires."""
    stop = sink.stop
    errors: list[BaseException] = []

    def appender() -> None:
        try:
            if sink.seen.wait(30):
                w = JournalWriter(journal, max_receiver_bytes=400)
                w.open()
                append(w)
                w.close()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=appender)
    watchdog = threading.Timer(30, stop.set)  # a bug fails the test instead of hanging it
    thread.start()
    watchdog.start()
    try:
        args = parser().parse_args([*argv, "--follow", "--poll-interval", "0.01"])
        status = run_dump(args, journal, sink, stop=stop)
    finally:
        sink.seen.set()
        watchdog.cancel()
        thread.join()
    assert not errors
    return status


def test_follow_sees_existing_and_new_receivers(journal: Path) -> None:
    sink = LineSink()
    sink.trigger = '"seq":13'

    def append(w: JournalWriter) -> None:
        w.write("8B", "smtp-client/1", {"queue_id": "Q9"})  # 14, current receiver
        w.rotate()
        w.write("88", "smtp-client/1", {"queue_id": "Q9"})  # 15, new receiver
        w.write("82", "smtp-client/1", {"queue_id": "Q9", "recipient": "z@z.org"})  # 16

    n = len(FLOW) + 3
    status = run_follow(journal, ["--format", "json", "--head", str(n)], sink, append)
    assert status == 0
    got = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert [o["seq"] for o in got] == list(range(1, n + 1))
    assert got[-1]["recipient"] == "z@z.org"


def test_follow_message_id_learns_new_queue_ids(journal: Path) -> None:
    with JournalWriter(journal) as w:  # the message already has one queue id
        w.write("99", "smtp-server/1", {"queue_id": "Q3a", "message_id": "m3@x.org"})  # 14
    sink = LineSink()
    sink.trigger = "     14 "  # following by now: the rest arrives live

    def append(w: JournalWriter) -> None:
        # a new queue id whose first entries precede the 99 that names the message
        w.write("94", "smtp-server/1", {"queue_id": "Q3b", "originator": "d@x.org"})  # 15
        w.write("92", "smtp-server/1", {"queue_id": "Q4", "recipient": "other@y.org"})  # 16
        w.rotate()
        w.write("9T", "smtp-server/1", {"queue_id": "Q3b", "size": 99})  # 17
        w.write("99", "smtp-server/1", {"queue_id": "Q3b", "message_id": "m3@x.org"})  # 18
        w.write("97", "smtp-server/1", {"queue_id": "Q3b"})  # 19

    status = run_follow(journal, ["--message-id", "<m3@x.org>", "--head", "5"], sink, append)
    assert status == 0
    assert [int(line.split()[0]) for line in sink.getvalue().splitlines()] == [14, 15, 17, 18, 19]


def test_follow_message_id_existing_then_new(journal: Path) -> None:
    sink = LineSink()
    sink.trigger = "\n11,"

    def append(w: JournalWriter) -> None:
        w.rotate()
        w.write("B2", "framework/1", {"queue_id": "Q1", "recipient": "b@y.org"})  # 14

    status = run_follow(
        journal, ["--message-id", "m1@x.org", "--head", "9", "--format", "csv"], sink, append
    )
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(sink.getvalue())))
    assert [int(r["seq"]) for r in rows] == [2, 3, 4, 5, 6, 7, 10, 11, 14]


def test_follow_newest_n_then_live(journal: Path) -> None:
    # like tail -n 2 -f: the newest two records that exist, then what arrives
    sink = LineSink()
    sink.trigger = "     13 "
    sink.last = "     15 "

    def append(w: JournalWriter) -> None:
        w.write("8B", "smtp-client/1", {"queue_id": "Q9"})  # 14
        w.rotate()
        w.write("88", "smtp-client/1", {"queue_id": "Q9"})  # 15

    assert run_follow(journal, ["-n", "2"], sink, append) == 0
    assert [int(line.split()[0]) for line in sink.getvalue().splitlines()] == [12, 13, 14, 15]


def test_follow_n_zero_shows_only_new_records(
    journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = LineSink()
    sink.last = "     14 "
    real_follow = dump_module.follow_merged

    def following(*args, **kwargs):  # nothing existing is printed: append once live
        sink.seen.set()
        yield from real_follow(*args, **kwargs)

    monkeypatch.setattr(dump_module, "follow_merged", following)

    def append(w: JournalWriter) -> None:
        w.write("8B", "smtp-client/1", {"queue_id": "Q9"})  # 14

    assert run_follow(journal, ["-n", "0"], sink, append) == 0
    assert [int(line.split()[0]) for line in sink.getvalue().splitlines()] == [14]


def test_follow_sender_holds_records_until_the_sender_is_known(journal: Path) -> None:
    sink = LineSink()
    sink.trigger = "     11 "
    sink.last = "     19 "

    def append(w: JournalWriter) -> None:
        w.write("94", "smtp-server/1", {"queue_id": "Q5", "ip": "192.0.2.9"})  # 14: held
        w.write("94", "smtp-server/1", {"queue_id": "Q6", "ip": "192.0.2.9"})  # 15: never
        w.rotate()
        w.write("91", "smtp-server/1", {"queue_id": "Q5", "originator": "A@X.ORG"})  # 16
        w.write("91", "smtp-server/1", {"queue_id": "Q6", "originator": "z@x.org"})  # 17
        w.write("7G", "smtp-client/1", {"queue_id": "Q5", "new_queue_id": "Q5N"})  # 18
        w.write("AP", "smtp-client/1", {"queue_id": "Q5N", "detail": "failure"})  # 19

    status = run_follow(journal, ["--sender", "a@x.org", "-n", "3"], sink, append)
    assert status == 0
    # the newest three of Q1's (2 3 4 5 6 7 10 11), then Q5 and its notice live
    got = [int(line.split()[0]) for line in sink.getvalue().splitlines()]
    assert got == [7, 10, 11, 14, 16, 18, 19]


# --- a journal of several messages: --sender, --recipient, --summary ----------------

ALICE, BOB, CAROL = "alice@example.test", "bob@example.test", "Carol@Example.test"
SMTP, SMTP2, FW, CLIENT = "smtp-server/1", "smtp-server/2", "framework/1", "smtp-client/1"
Entry = tuple[str, str, dict]


def ids(qid: str) -> dict:
    return {"queue_id": qid, "message_id": f"{qid.lower()}@example.test"}


def received(qid: str, sender: str, rcpts: list[str], size: int, job: str = SMTP) -> list[Entry]:
    return [
        ("94", job, {"ip": "192.0.2.1", **ids(qid)}),
        ("91", job, {"originator": sender, **ids(qid)}),
        *(("92", job, {"recipient": r, **ids(qid)}) for r in rcpts),
        ("9T", job, {"size": size, **ids(qid)}),
        ("99", job, ids(qid)),
        ("97", job, {"detail": "incoming", **ids(qid)}),
    ]


def inserted(qid: str, sender: str, rcpts: list[str]) -> list[Entry]:
    return [
        ("7A", FW, ids(qid)),
        ("7H", FW, ids(qid)),
        ("71", FW, {"originator": sender, **ids(qid)}),
        *(("72", FW, {"recipient": r, **ids(qid)}) for r in rcpts),
    ]


def local(qid: str, rcpt: str) -> list[Entry]:
    return [
        ("P2", FW, {"recipient": rcpt, "tag": "POP LclDel", "detail": "POP LclDel", **ids(qid)}),
        ("B8", FW, {"mailbox": "/srv/mail/x", "detail": "/srv/mail/x", **ids(qid)}),
        ("B2", FW, {"recipient": rcpt, **ids(qid)}),
    ]


def forwarded(qid: str, sender: str, rcpt: str) -> list[Entry]:
    return [
        ("P2", FW, {"recipient": rcpt, "tag": "SMTP MsgFwd", "detail": "SMTP MsgFwd", **ids(qid)}),
        ("C6", FW, {"detail": "outbound", **ids(qid)}),
        ("C1", FW, {"originator": sender, **ids(qid)}),
        ("C2", FW, {"recipient": rcpt, **ids(qid)}),
    ]


def notice(qid: str, job: str, failed: str, new: str, to: str) -> list[Entry]:
    """A non-delivery notice `new` about `failed`, to `to` (7P 7G, then AP A1 A2)."""
    return [
        ("7P", job, {"recipient": failed, **ids(qid)}),
        ("7G", job, {"detail": "failure notice", "new_queue_id": new,
                     "new_message_id": f"{new.lower()}@example.test", **ids(qid)}),
        ("AP", job, {"detail": "failure", **ids(new)}),
        ("A1", job, {"originator": "", **ids(new)}),
        ("A2", job, {"recipient": to, **ids(new)}),
    ]  # fmt: skip


MAIL: list[Entry] = [
    ("JS", "supervisor", {"job_name": SMTP, "pid": 100}),
    # Q1: local delivery to two users
    *received("Q1", ALICE, [BOB, CAROL], 1200),
    # Q2: received while Q1 goes on; delivered to a remote server
    *received("Q2", "Bob@Example.TEST", ["dave@remote.test"], 2500, SMTP2),
    *inserted("Q1", ALICE, [BOB, CAROL]),
    *local("Q1", BOB),
    *local("Q1", CAROL),
    ("9V", SMTP, {"ip": "203.0.113.9", "recipient": "victim@elsewhere.test",
                  "detail": "relay refused (not a local domain)"}),
    *inserted("Q2", "Bob@Example.TEST", ["dave@remote.test"]),
    *forwarded("Q2", "Bob@Example.TEST", "dave@remote.test"),
    # Q3: deferred now, bounced later
    *received("Q3", ALICE, ["erin@far.test"], 800),
    ("8B", CLIENT, ids("Q2")),
    ("88", CLIENT, {"detail": "mx.remote.test (TLS: TLSv1.3)", **ids("Q2")}),
    ("82", CLIENT, {"recipient": "dave@remote.test", "detail": "250 ok", **ids("Q2")}),
    *inserted("Q3", ALICE, ["erin@far.test"]),
    *forwarded("Q3", ALICE, "erin@far.test"),
    ("8B", CLIENT, ids("Q3")),
    ("8C", CLIENT, {"detail": "connection refused", **ids("Q3")}),
    # Q4 and Q7: filtered (discarded, kept in quarantine)
    *received("Q4", "spam@bad.test", [BOB], 5000),
    *inserted("Q4", "spam@bad.test", [BOB]),
    ("OW", FW, {"detail": "discarded: virus Eicar", **ids("Q4")}),
    *received("Q7", "mallory@bad.test", [CAROL], 700),
    *inserted("Q7", "mallory@bad.test", [CAROL]),
    ("OW", FW, {"detail": "kept in quarantine: rule 3", **ids("Q7")}),
    # Q5: one local user delivered, one unknown: partial; its notice stays queued
    *received("Q5", CAROL, [BOB, "nobody@example.test"], 900),
    *inserted("Q5", CAROL, [BOB, "nobody@example.test"]),
    *local("Q5", BOB),
    ("P2", FW, {"recipient": "nobody@example.test", "tag": "", **ids("Q5")}),
    *notice("Q5", FW, "nobody@example.test", "Q5-NDR", CAROL),
    # Q3 again: the retry fails for good, the notice is delivered to alice
    ("8E", CLIENT, ids("Q3")),
    ("8B", CLIENT, ids("Q3")),
    ("83", CLIENT, {"recipient": "erin@far.test", "detail": "550 5.1.1 unknown", **ids("Q3")}),
    ("87", CLIENT, {"detail": "failure notice", **ids("Q3")}),
    *notice("Q3", CLIENT, "erin@far.test", "Q3-NDR1", ALICE),
    *inserted("Q3-NDR1", "", [ALICE]),
    *local("Q3-NDR1", ALICE),
    # Q6: the local copy is delivered, the remote one deferred
    *received("Q6", ALICE, [BOB, "frank@remote.test"], 1500),
    *inserted("Q6", ALICE, [BOB, "frank@remote.test"]),
    *local("Q6", BOB),
    *forwarded("Q6", ALICE, "frank@remote.test"),
    ("8B", CLIENT, ids("Q6")),
    ("8C", CLIENT, {"detail": "451 try later", **ids("Q6")}),
]  # fmt: skip


@pytest.fixture
def mail(tmp_path: Path) -> Path:
    d = tmp_path / "mail-journal"
    with JournalWriter(d, max_receiver_bytes=2000) as w:  # several receivers
        for i, (code, job, fields) in enumerate(MAIL):
            w.write(code, job, fields, time_ns=T0 + i * SEC + 123_456_000)
    assert len(list_receivers(d)) > 2
    return d


def of(*qids: str) -> list[int]:
    """Seqs of every MAIL record of these queue ids (the expected selection)."""
    return [i + 1 for i, (_, _, f) in enumerate(MAIL) if f.get("queue_id") in qids]


def seq_of(code: str, qid: str | None) -> int:
    (seq,) = [i + 1 for i, (c, _, f) in enumerate(MAIL) if c == code and f.get("queue_id") == qid]
    return seq


def at(seq: int) -> str:
    """The time the fixtures give record `seq`, as the dump prints it."""
    return f"2026-11-29T12:{(seq - 1) // 60:02d}:{(seq - 1) % 60:02d}.123456+00:00"


def test_sender_exact_is_case_insensitive_and_follows_notices(mail: Path) -> None:
    # alice's Q1, Q3, Q6, and Q3-NDR1: the notice Q3's 7G names
    expected = of("Q1", "Q3", "Q3-NDR1", "Q6")
    assert seqs(mail, "--sender", ALICE) == expected
    assert seqs(mail, "--sender", "<ALICE@Example.Test>") == expected
    assert seqs(mail, "--sender", "bob@example.test") == of("Q2")  # sent as Bob@Example.TEST
    assert seqs(mail, "--sender", "nobody@example.test") == []
    assert seqs(mail, "--sender", "alice@example") == []  # exact: no prefix match


def test_sender_wildcard_and_null_sender(mail: Path) -> None:
    assert seqs(mail, "--sender", "*@bad.test") == of("Q4", "Q7")
    assert seqs(mail, "--sender", "*@BAD.*") == of("Q4", "Q7")
    assert seqs(mail, "--sender", "al*@*") == of("Q1", "Q3", "Q3-NDR1", "Q6")
    assert seqs(mail, "--sender", "<>") == of("Q5-NDR", "Q3-NDR1")
    queue_ids = {f["queue_id"] for _, _, f in MAIL if "queue_id" in f}
    assert seqs(mail, "--sender", "*") == of(*queue_ids)  # every message, nothing else


def test_recipient_exact_and_wildcard(mail: Path) -> None:
    # bob's messages, and Q5's notice (Q5 is selected, its 7G names Q5-NDR)
    assert seqs(mail, "--recipient", "BOB@example.test") == of("Q1", "Q4", "Q5", "Q5-NDR", "Q6")
    # Carol: a recipient of Q1 and Q7, of the notice about Q5 (Q5 is from her)
    assert seqs(mail, "--recipient", "carol@example.test") == of("Q1", "Q7", "Q5-NDR")
    assert seqs(mail, "--recipient", "*@remote.test") == of("Q2", "Q6")
    # a recipient known only from 83/7P/82 records still selects its message
    assert seqs(mail, "--recipient", "erin@*") == of("Q3", "Q3-NDR1")
    # a relay refusal has no queue id: the record is its own message
    assert seqs(mail, "--recipient", "*@elsewhere.test") == [seq_of("9V", None)]


def test_sender_and_recipient_combine_with_each_other_and_record_filters(mail: Path) -> None:
    assert seqs(mail, "--sender", ALICE, "--recipient", "*@far.test") == of("Q3", "Q3-NDR1")
    assert seqs(mail, "--sender", ALICE, "--recipient", "dave@remote.test") == []
    got = seqs(mail, "--sender", ALICE, "--code", "83,B2")
    b2 = [i + 1 for i, (c, _, f) in enumerate(MAIL) if c == "B2" and f["queue_id"] != "Q5"]
    assert got == sorted([seq_of("83", "Q3"), *b2])
    since = seq_of("8E", "Q3")
    got = seqs(mail, "--sender", ALICE, "--since", at(since)[:19], "--until", at(since + 3))
    assert got == [since, since + 1, since + 2]  # 8E 8B 83 of Q3
    assert seqs(mail, "--recipient", BOB, "-n", "2") == of("Q6")[-2:]
    assert seqs(mail, "--recipient", BOB, "--head", "2") == of("Q1")[:2]
    assert seqs(mail, "--sender", ALICE, "--message-id", "q6@example.test") == of("Q6")
    assert seqs(mail, "--sender", ALICE, "--queue-id", "Q3-NDR1") == of("Q3-NDR1")


def test_sender_text_output_is_the_plain_dump_of_those_records(mail: Path) -> None:
    status, text = dump(mail, "--sender", "*@bad.test", "--code", "OW")
    assert status == 0
    ow4, ow7 = seq_of("OW", "Q4"), seq_of("OW", "Q7")
    explanation = "Message rejected by filtering (discarded, kept or rewritten)"
    assert text == (
        f"{ow4:>7} {at(ow4)} LG OW framework/1  {explanation}: "
        'detail="discarded: virus Eicar" queue_id=Q4 message_id=q4@example.test\n'
        f"{ow7:>7} {at(ow7)} LG OW framework/1  {explanation}: "
        'detail="kept in quarantine: rule 3" queue_id=Q7 message_id=q7@example.test\n'
    )


SUMMARY = {
    "Q1": f"from={ALICE} to=bob@example.test,{CAROL} size=1200 state=delivered",
    "Q2": "from=Bob@Example.TEST to=dave@remote.test size=2500 state=delivered",
    None: 'from=- to=victim@elsewhere.test size=- state="relay refused"',
    "Q3": f"from={ALICE} to=erin@far.test size=800 state=bounced",
    "Q4": "from=spam@bad.test to=bob@example.test size=5000 state=discarded",
    "Q7": f"from=mallory@bad.test to={CAROL} size=700 state=quarantined",
    "Q5": "from=Carol@Example.test to=bob@example.test,nobody@example.test size=900 state=partial",
    "Q5-NDR": f"from=<> to={CAROL} size=- state=queued",
    "Q3-NDR1": f"from=<> to={ALICE} size=- state=delivered",
    "Q6": f"from={ALICE} to=bob@example.test,frank@remote.test size=1500 state=deferred",
}


def summary_line(qid: str | None) -> str:
    first = seq_of("9V", None) if qid is None else of(qid)[0]
    return f"{at(first)} {qid or '-'} {SUMMARY[qid]}"


def summary(mail: Path, *argv: str) -> list[str]:
    status, text = dump(mail, "--summary", *argv)
    assert status == 0
    return text.splitlines()


def test_summary_text_one_line_per_message(mail: Path) -> None:
    assert summary(mail) == [summary_line(q) for q in SUMMARY]
    assert summary_line("Q3") == (
        "2026-11-29T12:00:34.123456+00:00 Q3 from=alice@example.test to=erin@far.test "
        "size=800 state=bounced"
    )
    assert summary(mail, "-n", "2") == [summary_line("Q3-NDR1"), summary_line("Q6")]
    assert summary(mail, "--head", "2") == [summary_line("Q1"), summary_line("Q2")]
    assert summary(mail, "-n", "0") == [] == summary(mail, "--head", "0")
    assert summary(mail, "-n", "100") == summary(mail) == summary(mail, "--head", "100")


def test_summary_with_filters_chooses_messages_and_shows_them_whole(mail: Path) -> None:
    assert summary(mail, "--sender", ALICE) == [
        summary_line(q) for q in ("Q1", "Q3", "Q3-NDR1", "Q6")
    ]
    assert summary(mail, "--recipient", "*@elsewhere.test") == [summary_line(None)]
    assert summary(mail, "--recipient", CAROL) == [summary_line(q) for q in ("Q1", "Q7", "Q5-NDR")]
    # the messages with a record since Q3's retry, each line from all its records
    since = at(seq_of("8E", "Q3"))
    assert summary(mail, "--since", since) == [summary_line(q) for q in ("Q3", "Q3-NDR1", "Q6")]
    assert summary(mail, "--sender", "*@bad.test", "--since", since) == []
    assert summary(mail, "--sender", ALICE, "--until", at(seq_of("94", "Q3"))) == [
        summary_line("Q1")
    ]
    assert summary(mail, "--code", "83,OW") == [summary_line(q) for q in ("Q3", "Q4", "Q7")]
    assert summary(mail, "--code", "9V") == [summary_line(None)]
    assert summary(mail, "--queue-id", "Q2") == [summary_line("Q2")]
    assert summary(mail, "--message-id", "<q5@example.test>") == [summary_line("Q5")]
    assert summary(mail, "--job", "smtp-client", "--sender", ALICE, "-n", "1") == [
        summary_line("Q6")
    ]


def test_summary_json(mail: Path) -> None:
    status, text = dump(mail, "--summary", "--format", "json", "--sender", "*@example.test")
    assert status == 0
    objs = [json.loads(line) for line in text.splitlines()]
    assert [o["queue_id"] for o in objs] == ["Q1", "Q2", "Q3", "Q5", "Q5-NDR", "Q3-NDR1", "Q6"]
    assert objs[0] == {
        "host": "mail-journal",
        "time": at(2),
        "queue_id": "Q1",
        "sender": ALICE,
        "recipients": [BOB, CAROL],
        "size": 1200,
        "state": "delivered",
    }
    assert objs[4] == {
        "host": "mail-journal",
        "time": at(of("Q5-NDR")[0]),
        "queue_id": "Q5-NDR",
        "sender": "",
        "recipients": [CAROL],
        "size": None,
        "state": "queued",
    }
    status, text = dump(mail, "--summary", "--format", "json", "--recipient", "victim@*")
    assert json.loads(text) == {
        "host": "mail-journal",
        "time": at(seq_of("9V", None)),
        "queue_id": None,
        "sender": None,
        "recipients": ["victim@elsewhere.test"],
        "size": None,
        "state": "relay refused",
    }


def test_summary_csv(mail: Path) -> None:
    status, text = dump(mail, "--summary", "--format", "csv", "--code", "83,OW,9V")
    assert status == 0
    assert text == (
        "time,queue_id,sender,recipients,size,state,host\n"
        f"{at(seq_of('9V', None))},,,victim@elsewhere.test,,relay refused,mail-journal\n"
        f"{at(of('Q3')[0])},Q3,{ALICE},erin@far.test,800,bounced,mail-journal\n"
        f"{at(of('Q4')[0])},Q4,spam@bad.test,bob@example.test,5000,discarded,mail-journal\n"
        f"{at(of('Q7')[0])},Q7,mallory@bad.test,{CAROL},700,quarantined,mail-journal\n"
    )
    status, text = dump(mail, "--summary", "--format", "csv", "--recipient", "nobody@*")
    assert list(csv.reader(io.StringIO(text))) == [
        ["time", "queue_id", "sender", "recipients", "size", "state", "host"],
        [at(of("Q5")[0]), "Q5", CAROL, "bob@example.test,nobody@example.test",
         "900", "partial", "mail-journal"],
        [at(of("Q5-NDR")[0]), "Q5-NDR", "<>", CAROL, "", "queued", "mail-journal"],
    ]
    assert dump(mail, "--summary", "--format", "csv", "--sender", "x@y")[1] == (
        "time,queue_id,sender,recipients,size,state,host\n"
    )


def test_summary_of_an_empty_journal(tmp_path: Path) -> None:
    d = tmp_path / "j"
    d.mkdir()
    assert dump(d, "--summary") == (0, "")
    assert dump(d, "--summary", "--sender", "a@b") == (0, "")


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["-n", "2", "--head", "2"], "--head"),
        (["--summary", "--follow"], "--summary"),
    ],
)
def test_options_that_exclude_each_other(
    journal: Path, argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, text = dump(journal, *argv)
    assert status == 2 and text == ""
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"sender": " "}, "--sender: empty address pattern"),
        ({"recipient": "a@b c"}, "--recipient: bad address pattern"),
        ({"head": "many"}, "--head: not a number"),
    ],
)
def test_bad_raw_pattern_in_run_dump(
    journal: Path, values: dict, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    assert run_dump(argparse.Namespace(**values), journal, out) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert out.getvalue() == ""


def test_namespace_built_by_hand_with_new_options(mail: Path) -> None:
    out = io.StringIO()
    args = argparse.Namespace(sender="*@BAD.TEST", summary=True, head="1", format="csv")
    assert run_dump(args, mail, out) == 0
    assert out.getvalue().splitlines()[1:] == [
        f"{at(of('Q4')[0])},Q4,spam@bad.test,bob@example.test,5000,discarded,mail-journal"
    ]


# --- the summary's rules, record by record -----------------------------------------


def condensed(*entries: tuple[str, dict]) -> MessageSummary:
    s = MessageSummary("Q", 0)
    for seq, (code, fields) in enumerate(entries, 1):
        s.add(Record(seq, seq, "LG", code, "j", {"queue_id": "Q", **fields}))
    return s


def test_summary_states() -> None:
    rcpt = {"recipient": "r@x"}
    assert condensed(("94", {}), ("92", rcpt)).state == "queued"
    assert condensed(("92", rcpt), ("8C", {})).state == "deferred"
    assert condensed(("92", rcpt), ("8D", {})).state == "deferred"
    assert condensed(("92", rcpt), ("86", {})).state == "deferred"
    assert condensed(("92", rcpt), ("8C", {}), ("8E", {})).state == "queued"
    assert condensed(("92", rcpt), ("8C", {}), ("8F", {}), ("82", rcpt)).state == "delivered"
    assert condensed(("92", rcpt), ("B8", {}), ("B2", rcpt)).state == "delivered"
    # a B2 with no B8 before it names a new COD notice's recipient: not a delivery
    assert condensed(("BR", {}), ("B1", {"originator": ""}), ("B2", rcpt)).state == "queued"
    assert condensed(("92", rcpt), ("83", rcpt)).state == "bounced"
    assert condensed(("92", rcpt), ("7P", rcpt)).state == "bounced"
    # an 83 with no recipient (why no notice was sent) changes nothing
    assert condensed(("92", rcpt), ("83", {"detail": "no notice"})).state == "queued"
    two = (("92", rcpt), ("92", {"recipient": "s@x"}), ("82", {"recipient": "S@X"}))
    assert condensed(*two).state == "queued"
    assert condensed(*two, ("8C", {})).state == "deferred"
    assert condensed(*two, ("83", rcpt)).state == "partial"
    assert condensed(("88", {})).state == "delivered"  # no recipient record kept
    assert condensed(("OW", {"detail": "discarded: x"}), ("8C", {})).state == "discarded"
    kept = ("OW", {"detail": "kept in quarantine: x"})
    assert condensed(("92", rcpt), kept).state == "quarantined"
    assert condensed(("92", rcpt), kept, ("QD", {})).state == "deleted"
    released = condensed(("92", rcpt), kept, ("QR", {}), ("B8", {}), ("B2", rcpt))
    assert released.state == "delivered"


def test_summary_fields() -> None:
    s = condensed(
        ("94", {}),
        ("91", {"originator": "a@x"}),
        ("92", {"recipient": "B@x"}),
        ("92", {"recipient": "b@X"}),  # the same recipient
        ("9T", {"size": 10}),
        ("71", {"originator": "other@x"}),  # the first originator stays
        ("DR", {"size": 99}),  # only 9T and ET give the size
    )
    assert (s.sender, s.recipients, s.size, s.time_ns) == ("a@x", ["B@x"], 10, 0)
    assert condensed(("EH", {}), ("ET", {"size": 7})).size == 7


def test_recipients_are_shortened_in_text() -> None:
    many = [f"user{i:03d}@example.test" for i in range(5)]  # 20 characters each
    assert shorten_recipients(many) == ",".join(many[:2]) + ",+3"
    assert shorten_recipients(many, width=62) == ",".join(many[:3]) + ",+2"
    assert shorten_recipients(["x" * 80 + "@y", "b@y"]) == "x" * 80 + "@y,+1"
    assert shorten_recipients(["a@y"]) == "a@y"
    assert shorten_recipients([]) == ""


def test_address_patterns() -> None:
    p = parse_address_pattern("*@Example.TEST")
    assert p.matches("a@example.test") and p.matches("<B@EXAMPLE.test>")
    assert not p.matches("a@example.test.evil") and not p.matches("a@sub.example.testx")
    q = parse_address_pattern("a?b[1]@x")  # only * is special
    assert q.matches("A?B[1]@X") and not q.matches("axb1@x")
    null = parse_address_pattern("<>")
    assert null.matches("") and not null.matches("a@x")
    with pytest.raises(ValueError):
        parse_address_pattern("  ")
