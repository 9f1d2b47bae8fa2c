"""`mailpool journal dump --journal DIR ...`: several hosts' journals merged by time.

Two hosts, mx1 and mx2, each with a journal written by the real writer (several
receivers each). mx1 accepts a message from alice and relays it to mx2, which
delivers it into bob's mailbox: the same Message-ID on both, queue id A1 on mx1
and B1 on mx2. Both hosts also handle unrelated mail, and each has a message
with the queue id Q7 (queue ids are per host).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import threading
from pathlib import Path

import pytest

import mailpool.journal.merge as merge_module
from mailpool.journal.dump import add_dump_arguments, run_dump
from mailpool.journal.format import list_receivers
from mailpool.journal.merge import SourceError, journal_sources, parse_journal_arg
from mailpool.journal.writer import JournalWriter

SEC = 1_000_000_000
T0 = 1_795_953_600 * SEC  # 2026-11-29T12:00:00Z
MID = "<relay-1@mx1.example.test>"
SMTP, FW, CLIENT = "smtp-server/1", "framework/1", "smtp-client/1"


def m(qid: str, **fields: object) -> dict:
    """Fields of a record of the relayed message (queue id and Message-ID)."""
    return {"queue_id": qid, "message_id": MID.strip("<>"), **fields}


# (second, host, code, job, fields): each host's records in its own order, times interleaved
TIMELINE: list[tuple[int, str, str, str, dict]] = [
    (0, "mx2", "JS", "supervisor", {"job_name": SMTP, "pid": 200}),
    (1, "mx1", "94", SMTP, m("A1", ip="192.0.2.10")),
    (1, "mx2", "94", SMTP, {"queue_id": "Q7", "ip": "192.0.2.20"}),  # same second: mx1 first
    (2, "mx1", "91", SMTP, m("A1", originator="alice@mx1.example.test")),
    (3, "mx1", "92", SMTP, m("A1", recipient="bob@mx2.example.test")),
    (3, "mx2", "91", SMTP, {"queue_id": "Q7", "originator": "dave@far.test"}),
    (4, "mx1", "9T", SMTP, m("A1", size=2048)),
    (5, "mx1", "99", SMTP, m("A1")),
    (5, "mx2", "92", SMTP, {"queue_id": "Q7", "recipient": "erin@mx2.example.test"}),
    (6, "mx1", "97", SMTP, m("A1", detail="incoming")),
    (6, "mx2", "99", SMTP, {"queue_id": "Q7", "message_id": "other@far.test"}),
    (7, "mx1", "7A", FW, m("A1")),
    (8, "mx1", "P2", FW, m("A1", recipient="bob@mx2.example.test", tag="SMTP MsgFwd")),
    (9, "mx1", "C6", FW, m("A1", detail="outbound")),
    (9, "mx2", "9V", SMTP, {"ip": "203.0.113.9", "recipient": "x@elsewhere.test"}),
    (10, "mx1", "8B", CLIENT, m("A1", detail="attempt 1")),
    # mx2 receives the relayed message while mx1's client waits for the 250
    (11, "mx2", "95", SMTP, m("B1", ip="192.0.2.10")),
    (12, "mx2", "91", SMTP, m("B1", originator="alice@mx1.example.test")),
    (13, "mx2", "92", SMTP, m("B1", recipient="bob@mx2.example.test")),
    (14, "mx2", "9T", SMTP, m("B1", size=2300)),
    (15, "mx2", "99", SMTP, m("B1")),
    (16, "mx2", "97", SMTP, m("B1", detail="incoming")),
    (17, "mx1", "88", CLIENT, m("A1", detail="mx2.example.test")),
    (18, "mx1", "82", CLIENT, m("A1", recipient="bob@mx2.example.test", detail="250 ok")),
    (19, "mx1", "94", SMTP, {"queue_id": "Q7", "ip": "192.0.2.30"}),  # mx1's own Q7
    (19, "mx2", "7A", FW, m("B1")),
    (20, "mx1", "91", SMTP, {"queue_id": "Q7", "originator": "carol@mx1.example.test"}),
    (21, "mx2", "P2", FW, m("B1", recipient="bob@mx2.example.test", tag="POP LclDel")),
    (22, "mx2", "B8", FW, m("B1", mailbox="/srv/mail/bob")),
    (23, "mx2", "B2", FW, m("B1", recipient="bob@mx2.example.test")),
    (24, "mx1", "92", SMTP, {"queue_id": "Q7", "recipient": "frank@mx1.example.test"}),
]
ORDER = ["mx1", "mx2"]  # the order the journals are given in


def expected(keep=lambda host, fields: True) -> list[tuple[str, int]]:
    """(host, seq) of the TIMELINE records kept, in merged order."""
    seq = dict.fromkeys(ORDER, 0)
    rows = []
    for sec, host, _, _, fields in TIMELINE:
        seq[host] += 1
        if keep(host, fields):
            rows.append((sec, ORDER.index(host), host, seq[host]))
    return [(host, s) for _, _, host, s in sorted(rows)]


def seq_of(host: str, code: str, qid: str | None) -> int:
    """The seq the fixture gives a host's record (seqs are per journal)."""
    records = [(c, f.get("queue_id")) for _, h, c, _, f in TIMELINE if h == host]
    return records.index((code, qid)) + 1


def count(host: str) -> int:
    return sum(1 for _, h, _, _, _ in TIMELINE if h == host)


def qid_is(*wanted: tuple[str, str]):
    return lambda host, fields: (host, fields.get("queue_id")) in wanted


@pytest.fixture
def hosts(tmp_path: Path) -> dict[str, Path]:
    dirs = {name: tmp_path / name / "journal" for name in ORDER}
    for name, d in dirs.items():
        with JournalWriter(d, max_receiver_bytes=600) as w:  # several receivers
            for sec, host, code, job, fields in TIMELINE:
                if host == name:
                    w.write(code, job, fields, time_ns=T0 + sec * SEC + 250_000_000)
        assert len(list_receivers(d)) > 1
    return dirs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailpool journal dump")
    add_dump_arguments(p)
    return p


def dump(default: Path, *argv: str, stop: threading.Event | None = None) -> tuple[int, str]:
    out = io.StringIO()
    status = run_dump(parser().parse_args(list(argv)), default, out, stop=stop)
    return status, out.getvalue()


def journals(hosts: dict[str, Path], *names: str) -> list[str]:
    argv = []
    for name in names or ORDER:
        argv += ["--journal", str(hosts[name])]
    return argv


def merged_json(hosts: dict[str, Path], *argv: str) -> list[dict]:
    status, text = dump(hosts["mx1"], "--format", "json", *journals(hosts), *argv)
    assert status == 0
    return [json.loads(line) for line in text.splitlines()]


def keys(objs: list[dict]) -> list[tuple[str, int]]:
    return [(o["host"], o["seq"]) for o in objs]


def test_records_are_merged_by_time(hosts: dict[str, Path]) -> None:
    objs = merged_json(hosts)
    assert keys(objs) == expected()
    assert len(objs) == len(TIMELINE)
    times = [o["time"] for o in objs]
    assert times == sorted(times)
    # a journal's own records keep their order; equal times go to the journal given first
    assert keys(objs)[1:3] == [("mx1", 1), ("mx2", 2)]
    status, text = dump(hosts["mx1"], "--format", "json", *journals(hosts, "mx2", "mx1"))
    assert status == 0
    swapped = [(o["host"], o["seq"]) for o in map(json.loads, text.splitlines())]
    assert swapped[1:3] == [("mx2", 2), ("mx1", 1)]


def test_host_label_in_every_format(hosts: dict[str, Path]) -> None:
    status, text = dump(hosts["mx1"], *journals(hosts))
    assert status == 0
    lines = text.splitlines()
    assert lines[0] == (
        "mx2       1 2026-11-29T12:00:00.250000+00:00 LG JS supervisor  "
        "Prestart job started: job_name=smtp-server/1 pid=200"
    )
    assert lines[1].startswith("mx1       1 2026-11-29T12:00:01.250000+00:00 LG 94 ")
    status, text = dump(hosts["mx1"], "--format", "csv", *journals(hosts))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["host"], int(r["seq"])) for r in rows] == expected()
    assert text.startswith("seq,time,") and text.splitlines()[0].endswith(",host")
    # labels given on the command line
    argv = ["--journal", f"accept={hosts['mx1']}", "--journal", f"deliver={hosts['mx2']}"]
    status, text = dump(hosts["mx1"], "--format", "json", *argv, "--head", "3")
    assert [json.loads(x)["host"] for x in text.splitlines()] == ["deliver", "accept", "deliver"]
    status, text = dump(hosts["mx1"], *argv, "--head", "2")
    assert [line.split()[:2] for line in text.splitlines()] == [["deliver", "1"], ["accept", "1"]]


def test_one_journal_text_is_unchanged_but_json_names_the_host(hosts: dict[str, Path]) -> None:
    _status, text = dump(hosts["mx2"], "--head", "1")
    assert text.startswith("      1 2026-11-29T12:00:00.250000+00:00 LG JS supervisor  ")
    _status, text = dump(hosts["mx2"], "--format", "json", "--head", "1")
    assert json.loads(text)["host"] == "mx2"
    out = io.StringIO()
    args = parser().parse_args(["--format", "json", "--head", "1"])
    assert run_dump(args, hosts["mx2"], out, host="mx2.example.test") == 0
    assert json.loads(out.getvalue())["host"] == "mx2.example.test"


def test_message_id_across_hosts(hosts: dict[str, Path]) -> None:
    want = expected(qid_is(("mx1", "A1"), ("mx2", "B1")))
    for mid in (MID, MID.strip("<>")):
        assert keys(merged_json(hosts, "--message-id", mid)) == want
    # the whole life: accepted on mx1, relayed, received and delivered on mx2
    objs = merged_json(hosts, "--message-id", MID)
    assert [(o["host"], o["code"]) for o in objs][:2] == [("mx1", "94"), ("mx1", "91")]
    assert [(o["host"], o["code"]) for o in objs][-4:] == [
        ("mx2", "7A"), ("mx2", "P2"), ("mx2", "B8"), ("mx2", "B2")
    ]  # fmt: skip
    # each host's Q7 is its own message: --queue-id matches on both hosts
    assert keys(merged_json(hosts, "--queue-id", "Q7")) == expected(
        qid_is(("mx1", "Q7"), ("mx2", "Q7"))
    )
    assert keys(merged_json(hosts, "--message-id", "other@far.test")) == expected(
        qid_is(("mx2", "Q7"))
    )


def test_sender_and_recipient_over_the_merge(hosts: dict[str, Path]) -> None:
    relayed = expected(qid_is(("mx1", "A1"), ("mx2", "B1")))
    assert keys(merged_json(hosts, "--sender", "ALICE@*")) == relayed
    assert keys(merged_json(hosts, "--recipient", "bob@mx2.example.test")) == relayed
    assert keys(merged_json(hosts, "--sender", "carol@*")) == expected(qid_is(("mx1", "Q7")))
    assert keys(merged_json(hosts, "--recipient", "*@elsewhere.test")) == [
        ("mx2", seq_of("mx2", "9V", None))
    ]


def test_newest_and_oldest_over_the_merge(hosts: dict[str, Path]) -> None:
    everything = expected()
    assert keys(merged_json(hosts, "-n", "4")) == everything[-4:]
    assert keys(merged_json(hosts, "--head", "4")) == everything[:4]
    relayed = expected(qid_is(("mx1", "A1"), ("mx2", "B1")))
    assert keys(merged_json(hosts, "--message-id", MID, "-n", "3")) == relayed[-3:]
    assert keys(merged_json(hosts, "--code", "94,95", "-n", "2")) == [
        ("mx2", seq_of("mx2", "95", "B1")), ("mx1", seq_of("mx1", "94", "Q7"))
    ]  # fmt: skip


def test_summary_per_host_and_queue_id(hosts: dict[str, Path]) -> None:
    status, text = dump(hosts["mx1"], "--summary", *journals(hosts))
    assert status == 0
    assert text.splitlines() == [
        "mx1 2026-11-29T12:00:01.250000+00:00 A1 from=alice@mx1.example.test "
        "to=bob@mx2.example.test size=2048 state=delivered",
        "mx2 2026-11-29T12:00:01.250000+00:00 Q7 from=dave@far.test "
        "to=erin@mx2.example.test size=- state=queued",
        "mx2 2026-11-29T12:00:09.250000+00:00 - from=- to=x@elsewhere.test size=- "
        'state="relay refused"',
        "mx2 2026-11-29T12:00:11.250000+00:00 B1 from=alice@mx1.example.test "
        "to=bob@mx2.example.test size=2300 state=delivered",
        "mx1 2026-11-29T12:00:19.250000+00:00 Q7 from=carol@mx1.example.test "
        "to=frank@mx1.example.test size=- state=queued",
    ]
    status, text = dump(hosts["mx1"], "--summary", "--format", "json", *journals(hosts),
                        "--message-id", MID, "-n", "1")  # fmt: skip
    assert json.loads(text) == {
        "host": "mx2", "time": "2026-11-29T12:00:11.250000+00:00", "queue_id": "B1",
        "sender": "alice@mx1.example.test", "recipients": ["bob@mx2.example.test"],
        "size": 2300, "state": "delivered",
    }  # fmt: skip
    status, text = dump(hosts["mx1"], "--summary", "--format", "csv", *journals(hosts),
                        "--queue-id", "Q7")  # fmt: skip
    assert [[r[-1], *r[:2]] for r in csv.reader(io.StringIO(text))] == [
        ["host", "time", "queue_id"],
        ["mx2", "2026-11-29T12:00:01.250000+00:00", "Q7"],
        ["mx1", "2026-11-29T12:00:19.250000+00:00", "Q7"],
    ]


def test_verify_each_journal(hosts: dict[str, Path]) -> None:
    status, text = dump(hosts["mx1"], "--verify", *journals(hosts))
    assert status == 0
    lines = text.splitlines()
    assert [line.split(": ")[0] for line in lines] == ["mx1", "mx2"]
    assert lines[1].startswith(f"mx2: OK: {count('mx2')} records in ")
    second = list_receivers(hosts["mx2"])[1][1]
    data = bytearray(second.read_bytes())
    data[20] ^= 0xFF
    second.write_bytes(bytes(data))
    status, text = dump(hosts["mx1"], "--verify", *journals(hosts))
    assert status == 1
    lines = text.splitlines()
    assert lines[0].startswith(f"mx1: OK: {count('mx1')} records")
    assert any(line.startswith(f"mx2: corrupt: {second.name} ") for line in lines)


def test_from_seq_takes_one_journal(hosts: dict[str, Path], capsys) -> None:
    status, text = dump(hosts["mx1"], *journals(hosts), "--from-seq", "3")
    assert status == 2 and text == ""
    err = capsys.readouterr().err
    assert "--from-seq" in err and "per journal" in err and len(err.strip().splitlines()) == 1
    last = count("mx2")
    status, text = dump(hosts["mx1"], *journals(hosts, "mx2"), "--from-seq", str(last - 1),
                        "--format", "json")  # fmt: skip
    assert status == 0
    assert [(o["host"], o["seq"]) for o in map(json.loads, text.splitlines())] == [
        ("mx2", last - 1), ("mx2", last)
    ]  # fmt: skip


def test_errors_name_the_directory(hosts: dict[str, Path], tmp_path: Path, capsys) -> None:
    missing = tmp_path / "mx3" / "journal"
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("x")
    for bad, words in ((missing, "does not exist"), (a_file, "is not a directory")):
        for extra in ([], ["--summary"], ["--verify"], ["--follow"]):
            status, text = dump(hosts["mx1"], *journals(hosts), "--journal", str(bad), *extra)
            assert status == 1 and text == ""
            err = capsys.readouterr().err.strip()
            assert str(bad) in err and words in err and len(err.splitlines()) == 1


def test_unreadable_directory(hosts: dict[str, Path], monkeypatch, capsys) -> None:
    real = merge_module.list_receivers

    def list_receivers(directory: Path):  # as an unprivileged user would see mode 000
        if directory == hosts["mx2"]:
            raise PermissionError(13, "Permission denied", str(directory))
        return real(directory)

    monkeypatch.setattr(merge_module, "list_receivers", list_receivers)
    status, text = dump(hosts["mx1"], *journals(hosts))
    assert status == 1 and text == ""
    err = capsys.readouterr().err.strip()
    assert err == (
        f"mailpool journal dump: cannot read journal directory {hosts['mx2']}: Permission denied"
    )


def test_unreadable_receiver(hosts: dict[str, Path], monkeypatch, capsys) -> None:
    victim = list_receivers(hosts["mx2"])[0][1]
    real_open = Path.open

    def opening(self: Path, *args, **kwargs):
        if self == victim:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", opening)
    status, text = dump(hosts["mx1"], *journals(hosts))
    assert status == 1 and text == ""
    err = capsys.readouterr().err.strip()
    assert f"cannot read {victim} in journal directory {hosts['mx2']}" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--journal", ""], "empty journal directory"),
        (["--journal", "mx 1=/x"], "bad host label"),
        (["--journal", "mx1="], "no directory after mx1="),
    ],
)
def test_bad_journal_values_are_one_line_errors(argv: list[str], needle: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--journal" in err and needle in err and "Traceback" not in err


def test_journals_that_cannot_be_told_apart(hosts: dict[str, Path], capsys) -> None:
    same = ["--journal", str(hosts["mx1"]), "--journal", str(hosts["mx1"].parent / ".." / "mx1"
                                                               / "journal")]  # fmt: skip
    twice = ["--journal", f"a={hosts['mx1']}", "--journal", f"a={hosts['mx2']}"]
    for argv, needle in ((same, "given twice"), (twice, "host label a names two journals")):
        status, text = dump(hosts["mx1"], *argv)
        assert status == 2 and text == ""
        err = capsys.readouterr().err.strip()
        assert needle in err and len(err.splitlines()) == 1
    # a namespace built by hand takes raw strings
    out = io.StringIO()
    args = argparse.Namespace(journal=[str(hosts["mx1"]), f"b={hosts['mx2']}"], format="csv")
    assert run_dump(args, hosts["mx1"], out) == 0
    assert {r["host"] for r in csv.DictReader(io.StringIO(out.getvalue()))} == {"mx1", "b"}


def test_derived_labels() -> None:
    def labels(*values: str) -> list[str]:
        given = [parse_journal_arg(v) for v in values]
        return [s.label for s in journal_sources(given, Path("/default/journal"))]

    assert labels() == ["default"]
    assert labels("/srv/mx1/journal", "/srv/mx2/journal") == ["mx1", "mx2"]
    assert labels("/srv/mx1/var/journal", "/srv/mx2/var/journal") == ["mx1/var", "mx2/var"]
    assert labels("/a/var/journal", "/b/var/journal", "/b/spool") == ["a/var", "b/var", "spool"]
    assert labels("var=/a/var/journal", "/b/var/journal") == ["var", "b/var"]
    assert labels("/srv/mx1/journals/one") == ["one"]
    assert labels("./a=b") == ["a=b"]
    with pytest.raises(SourceError):
        journal_sources([(None, Path("/x/journal")), (None, Path("/x"))], Path("/d"))


def test_follow_polls_every_journal(hosts: dict[str, Path]) -> None:
    n1, n2 = count("mx1"), count("mx2")
    new = [("mx1", n1 + 1), ("mx2", n2 + 1), ("mx2", n2 + 2)]
    out = LineSink(last=[f'"host":"{h}","seq":{s},' for h, s in new])
    stop = out.stop

    def append() -> None:
        if not out.wait_for(f'"host":"mx1","seq":{n1},'):  # the existing records are out
            return
        for name, code, qid in (("mx2", "8B", "Q7"), ("mx1", "7A", "Q7"), ("mx2", "88", "Q7")):
            with JournalWriter(hosts[name], max_receiver_bytes=600) as w:
                w.write(code, CLIENT, {"queue_id": qid})

    thread = threading.Thread(target=append)
    watchdog = threading.Timer(30, stop.set)  # a bug fails the test instead of hanging it
    thread.start()
    watchdog.start()
    try:
        argv = [*journals(hosts), "--format", "json", "-n", "2", "--follow",
                "--poll-interval", "0.01"]  # fmt: skip
        status = run_dump(parser().parse_args(argv), hosts["mx1"], out, stop=stop)
    finally:
        out.seen.set()
        watchdog.cancel()
        thread.join()
    assert status == 0
    got = [(o["host"], o["seq"]) for o in map(json.loads, out.getvalue().splitlines())]
    # the newest two of the merge, then the new records of both journals
    assert got[:2] == expected()[-2:]
    assert sorted(got[2:]) == new
    assert got[2:].index(new[1]) < got[2:].index(new[2])  # a journal's own order


class LineSink(io.StringIO):
    """Output that lets a test wait for a line, and ends the follow once `last` is out."""

    def __init__(self, last: list[str]) -> None:
        super().__init__()
        self.last, self.stop, self.seen = last, threading.Event(), threading.Event()
        self.trigger = ""

    def wait_for(self, text: str) -> bool:
        self.trigger = text
        if text in self.getvalue():
            return True
        return self.seen.wait(30) and text in self.getvalue()

    def write(self, s: str) -> int:
        n = super().write(s)
        text = self.getvalue()
        if self.trigger and self.trigger in text:
            self.seen.set()
        if all(x in text for x in self.last):
            self.stop.set()
        return n


def test_follow_summary_is_still_refused(hosts: dict[str, Path], capsys) -> None:
    status, _text = dump(hosts["mx1"], *journals(hosts), "--summary", "--follow")
    assert status == 2 and "--summary" in capsys.readouterr().err
