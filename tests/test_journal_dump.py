"""`mailpool journal dump` logic: filters, formats, follow, verify."""

from __future__ import annotations

import argparse
import csv
import io
import json
import threading
from pathlib import Path

import pytest

from mailpool.journal.dump import CSV_COLUMNS, add_dump_arguments, run_dump
from mailpool.journal.format import list_receivers
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
    assert list(objs[0])[:5] == ["seq", "time", "type", "code", "job"]


def test_csv_format(journal: Path) -> None:
    status, text = dump(journal, "--format", "csv")
    assert status == 0
    rows = list(csv.reader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert ",".join(rows[0]) == (
        "seq,time,type,code,job,queue_id,message_id,originator,recipient,size,ip,detail,explanation"
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
    assert seqs(journal, "-n", "3") == [1, 2, 3]
    assert seqs(journal, "--from-seq", "9", "-n", "2") == [9, 10]
    assert seqs(journal, "--queue-id", "Q1", "-n", "2", "--from-seq", "5") == [5, 6]
    assert seqs(journal, "-n", "0") == []


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
    """Output that tells the test when a record line with a given seq is out."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = threading.Event()
        self.trigger = ""

    def write(self, s: str) -> int:
        n = super().write(s)
        if self.trigger and self.trigger in self.getvalue():
            self.seen.set()
        return n


def run_follow(journal: Path, argv: list[str], sink: LineSink, append) -> int:
    """Run the dump with --follow while `append(writer)` runs once `sink.seen` fires."""
    stop = threading.Event()
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
    status = run_follow(journal, ["--format", "json", "-n", str(n)], sink, append)
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

    status = run_follow(journal, ["--message-id", "<m3@x.org>", "-n", "5"], sink, append)
    assert status == 0
    assert [int(line.split()[0]) for line in sink.getvalue().splitlines()] == [14, 15, 17, 18, 19]


def test_follow_message_id_existing_then_new(journal: Path) -> None:
    sink = LineSink()
    sink.trigger = "\n11,"

    def append(w: JournalWriter) -> None:
        w.rotate()
        w.write("B2", "framework/1", {"queue_id": "Q1", "recipient": "b@y.org"})  # 14

    status = run_follow(
        journal, ["--message-id", "m1@x.org", "-n", "9", "--format", "csv"], sink, append
    )
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(sink.getvalue())))
    assert [int(r["seq"]) for r in rows] == [2, 3, 4, 5, 6, 7, 10, 11, 14]
