"""Journal format, writer, reader and code table."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mailpool.journal.codes import CODES, FUNCTIONS, check_writable, explain
from mailpool.journal.format import (
    HEADER,
    INCOMPLETE,
    MAGIC,
    MAX_BODY,
    Corrupt,
    Record,
    decode_record,
    encode_record,
    iso_time,
    list_receivers,
)
from mailpool.journal.reader import Good, follow, iter_records, scan_path, verify, verify_report
from mailpool.journal.writer import JournalWriter, NullJournal

T0 = 1_795_953_601_123_456_789  # 2026-11-29T12:00:01.123456789Z


def rec(seq: int = 1, code: str = "94", **fields: object) -> Record:
    return Record(seq, T0 + seq, "LG", code, "smtp-server/3", dict(fields))


def write_n(directory: Path, n: int, **kw: object) -> JournalWriter:
    w = JournalWriter(directory, **kw)  # type: ignore[arg-type]
    w.open()
    for i in range(n):
        w.write("92", "smtp-server/1", {"queue_id": f"q{i}", "recipient": f"u{i}@example.org"})
    return w


def seqs(directory: Path) -> list[int]:
    return [r.seq for r in iter_records(directory)]


def good_items(path: Path) -> list[Good]:
    return [i for i in scan_path(path) if isinstance(i, Good)]


# --- format -----------------------------------------------------------------


def test_round_trip() -> None:
    r = Record(
        7,
        T0,
        "LG",
        "99",
        "smtp-server/3 é",
        {"queue_id": "Q1", "message_id": "a@b", "size": 1234, "raw": b"\x00\xff", "n": None},
    )
    data = encode_record(r)
    assert data.startswith(MAGIC)
    assert decode_record(data) == (r, len(data))
    # at an offset inside a larger buffer
    buf = b"xyz" + data + encode_record(rec(8))
    assert decode_record(buf, 3) == (r, 3 + len(data))
    assert decode_record(buf, 3 + len(data)) == (rec(8), len(buf))


def test_empty_payload_and_job() -> None:
    r = Record(1, 0, "LG", "JS", "", {})
    assert decode_record(encode_record(r)) == (r, len(encode_record(r)))


def test_every_prefix_is_incomplete() -> None:
    data = encode_record(rec(1, queue_id="Q"))
    for cut in range(len(data)):
        assert decode_record(data[:cut]) is INCOMPLETE, cut


def test_corruption_detected() -> None:
    data = encode_record(rec(1, queue_id="Q", originator="a@b"))
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x41
        res = decode_record(bytes(bad))
        # a flipped length byte may also read as "needs more bytes"
        assert isinstance(res, Corrupt) or res is INCOMPLETE, i
    assert decode_record(b"garbage!garbage!") == Corrupt("bad magic")
    huge = MAGIC + (MAX_BODY + 1).to_bytes(4, "big") + b"\0\0\0\0"
    assert isinstance(decode_record(huge + b"\0" * 100), Corrupt)
    tiny = MAGIC + (3).to_bytes(4, "big") + b"\0\0\0\0abc"
    assert isinstance(decode_record(tiny), Corrupt)


def test_valid_crc_but_bad_body_is_corrupt() -> None:
    import zlib

    body = b"\0" * 30  # type/code NUL bytes: not a record
    data = HEADER.pack(MAGIC, len(body), zlib.crc32(body)) + body
    assert isinstance(decode_record(data), Corrupt)


def test_encode_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        encode_record(Record(1, 0, "LG", "9", "j", {}))
    with pytest.raises(ValueError):
        encode_record(Record(-1, 0, "LG", "94", "j", {}))
    with pytest.raises(ValueError):
        encode_record(Record(1, 0, "LG", "94", "j", {"big": "x" * MAX_BODY}))
    with pytest.raises(ValueError):
        encode_record(Record(1, 0, "LG", "94", "j", {"obj": object()}))


def test_iso_time_microseconds_utc() -> None:
    assert iso_time(T0) == "2026-11-29T12:00:01.123456+00:00"
    assert iso_time(0) == "1970-01-01T00:00:00.000000+00:00"
    assert Record(1, T0, "LG", "94", "j", {}).time.microsecond == 123456


# --- codes ------------------------------------------------------------------

DOCUMENTED = (
    "8B 88 82 83 8C 8D 8E 8F 87 86 8K "
    "94 91 92 9T 99 95 97 96 9S 9V "
    "7A 7O 7L 7M 7H 71 72 7R 7G 7P "
    "AP A1 A2 B8 B2 BR B1 CN C6 C1 C2 EH E1 E2 ET G8 G2 GQ H1 IH I1 I2 IG OW P2"
).split()
PROJECT = "JS JE JH JW JR JC JT DL DF DR DD PU".split()


def test_code_table_complete() -> None:
    for code in DOCUMENTED + PROJECT:
        info = CODES[code]
        assert info.code == code
        assert info.explanation and "\n" not in info.explanation
        assert info.function == FUNCTIONS[code[0]].name
    assert set(FUNCTIONS) >= set("789ABCDEFGHILMOPJ")
    assert {f for f, i in FUNCTIONS.items() if i.reserved} == set("FHLM")
    assert CODES["7O"].reserved and CODES["H1"].reserved
    assert explain("94") == "Mail received (local)"
    assert "SMTP server" in explain("9Z")
    assert "ZZ" in explain("ZZ")


def test_check_writable() -> None:
    check_writable("JE")
    with pytest.raises(ValueError, match="unknown"):
        check_writable("9Z")
    with pytest.raises(ValueError, match="reserved"):
        check_writable("7O")


# --- writer -----------------------------------------------------------------


def test_writer_basic(tmp_path: Path) -> None:
    d = tmp_path / "journal"
    w = JournalWriter(d)
    w.open()
    assert w.current_path == d / "receiver-00000001.jrn"
    assert w.next_seq == 1
    s = w.write("99", "smtp-server/1", {"queue_id": "Q", "message_id": " <m@x> "}, time_ns=T0)
    assert s == 1
    assert w.write("JS", "supervisor", {"pid": 42}) == 2
    w.sync()
    w.close()
    w.close()  # idempotent
    assert w.current_path is None
    records = list(iter_records(d))
    fields = {"queue_id": "Q", "message_id": "m@x"}  # brackets and blanks stripped
    assert records[0] == Record(1, T0, "LG", "99", "smtp-server/1", fields)
    assert records[1].fields == {"pid": 42}


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    with JournalWriter(tmp_path) as w:
        with pytest.raises(ValueError):
            w.write("XX", "j", {})
        with pytest.raises(ValueError):
            w.write("H1", "j", {})
        with pytest.raises(ValueError):
            w.write("94", "j", {"seq": 3})
        with pytest.raises(ValueError):
            w.write("94", "j", {1: "x"})  # type: ignore[dict-item]
        assert w.write("94", "j", {}) == 1  # failures used no seq
    with pytest.raises(RuntimeError):
        w.write("94", "j", {})


def test_rotation_by_size(tmp_path: Path) -> None:
    w = write_n(tmp_path, 40, max_receiver_bytes=500)
    w.close()
    receivers = list_receivers(tmp_path)
    assert len(receivers) > 3
    for _, path in receivers:
        assert 0 < path.stat().st_size <= 500
    assert seqs(tmp_path) == list(range(1, 41))
    assert verify(tmp_path) == []


def test_oversized_record_gets_its_own_receiver(tmp_path: Path) -> None:
    with JournalWriter(tmp_path, max_receiver_bytes=100) as w:
        w.write("94", "j", {"detail": "x" * 300})
        w.write("94", "j", {"detail": "y" * 300})
    assert [n for n, _ in list_receivers(tmp_path)] == [1, 2]
    assert seqs(tmp_path) == [1, 2]


def test_rotate_command(tmp_path: Path) -> None:
    w = write_n(tmp_path, 3)
    first = w.current_path
    new = w.rotate()
    assert new == tmp_path / "receiver-00000002.jrn" == w.current_path != first
    assert new.exists() and new.stat().st_size == 0
    w.write("97", "smtp-server/1", {"queue_id": "Q"})
    w.close()
    assert seqs(tmp_path) == [1, 2, 3, 4]
    assert [p.stat().st_size > 0 for _, p in list_receivers(tmp_path)] == [True, True]


def test_seq_continues_across_reopen(tmp_path: Path) -> None:
    write_n(tmp_path, 5).close()
    w = write_n(tmp_path, 3)
    assert w.next_seq == 9
    w.rotate()  # leaves an empty last receiver: seq must come from the older one
    w.close()
    w = JournalWriter(tmp_path)
    w.open()
    assert w.next_seq == 9
    assert w.current_path == tmp_path / "receiver-00000002.jrn"
    w.write("94", "j", {})
    w.close()
    assert seqs(tmp_path) == list(range(1, 10))
    assert verify(tmp_path) == []


@pytest.mark.parametrize("cut_back", [1, 2, 5, 9, 10, 11, 20, -1])
def test_torn_tail_truncated_on_open(tmp_path: Path, cut_back: int) -> None:
    write_n(tmp_path, 4).close()
    path = tmp_path / "receiver-00000001.jrn"
    items = good_items(path)
    last = items[-1]
    size = path.stat().st_size
    # cut inside the last record: 1 byte in, header only, etc.
    cut = last.start + 1 if cut_back == -1 else size - cut_back
    assert last.start < cut < size
    with path.open("r+b") as f:
        f.truncate(cut)
    problems = verify(tmp_path)
    assert len(problems) == 1 and problems[0].kind == "corrupt"
    assert (problems[0].start, problems[0].end) == (last.start, cut)
    w = JournalWriter(tmp_path)
    w.open()
    assert w.truncated_bytes == cut - last.start
    assert path.stat().st_size == last.start
    assert w.next_seq == 4  # seq 4 was never complete, so it was never seen
    w.write("94", "j", {})
    w.close()
    assert verify(tmp_path) == []
    assert seqs(tmp_path) == [1, 2, 3, 4]


def test_garbage_tail_truncated(tmp_path: Path) -> None:
    write_n(tmp_path, 2).close()
    path = tmp_path / "receiver-00000001.jrn"
    good_size = path.stat().st_size
    with path.open("ab") as f:
        f.write(b"\x00" * 37 + MAGIC + b"\xff" * 5)
    w = JournalWriter(tmp_path)
    w.open()
    assert path.stat().st_size == good_size
    assert w.next_seq == 3
    w.close()
    assert verify(tmp_path) == []


def test_only_garbage_receiver(tmp_path: Path) -> None:
    write_n(tmp_path, 3).close()
    (tmp_path / "receiver-00000002.jrn").write_bytes(b"junk" * 10)
    w = JournalWriter(tmp_path)
    w.open()
    assert w.next_seq == 4
    assert (tmp_path / "receiver-00000002.jrn").stat().st_size == 0
    w.close()


def test_corrupt_middle_reported_and_resynced(tmp_path: Path) -> None:
    write_n(tmp_path, 6).close()
    path = tmp_path / "receiver-00000001.jrn"
    items = good_items(path)
    third = items[2]
    data = bytearray(path.read_bytes())
    data[third.start + HEADER.size + 3] ^= 0xFF  # inside the body: CRC mismatch
    path.write_bytes(bytes(data))
    problems = verify(tmp_path)
    kinds = [(p.kind, p.start, p.end) for p in problems]
    assert ("corrupt", third.start, third.end) in kinds
    gap = [p for p in problems if p.kind == "gap"]
    assert [(p.first_seq, p.last_seq) for p in gap] == [(3, 3)]
    assert "receiver-00000001.jrn" in str(problems[0])
    assert f"bytes {third.start}..{third.end}" in str(problems[0])
    assert seqs(tmp_path) == [1, 2, 4, 5, 6]


def test_inserted_garbage_is_one_range(tmp_path: Path) -> None:
    write_n(tmp_path, 4).close()
    path = tmp_path / "receiver-00000001.jrn"
    items = good_items(path)
    data = path.read_bytes()
    # garbage that even contains MAGIC and a plausible-looking length
    junk = b"\x01\x02" + MAGIC + (40).to_bytes(4, "big") + b"\x00" * 30 + MAGIC
    at = items[2].start
    path.write_bytes(data[:at] + junk + data[at:])
    problems = verify(tmp_path)
    assert len(problems) == 1
    assert (problems[0].kind, problems[0].start, problems[0].end) == ("corrupt", at, at + len(junk))
    assert seqs(tmp_path) == [1, 2, 3, 4]


def test_garbage_candidate_running_past_eof_does_not_hide_records(tmp_path: Path) -> None:
    # a fake header whose length reaches past EOF, followed by real records
    real = encode_record(rec(2)) + encode_record(rec(3))
    fake = MAGIC + (len(real) + 50).to_bytes(4, "big") + b"\0\0\0\0"
    (tmp_path / "receiver-00000001.jrn").write_bytes(encode_record(rec(1)) + fake + real)
    assert seqs(tmp_path) == [1, 2, 3]
    problems = verify(tmp_path)
    assert [(p.kind, p.end - p.start) for p in problems] == [("corrupt", len(fake))]


def test_missing_seq_ranges(tmp_path: Path) -> None:
    (tmp_path / "receiver-00000001.jrn").write_bytes(
        b"".join(encode_record(rec(s)) for s in (1, 2, 5, 6))
    )
    (tmp_path / "receiver-00000002.jrn").write_bytes(
        b"".join(encode_record(rec(s)) for s in (10, 11))
    )
    problems = verify(tmp_path)
    assert [(p.kind, p.first_seq, p.last_seq, p.receiver.name) for p in problems] == [
        ("gap", 3, 4, "receiver-00000001.jrn"),
        ("gap", 7, 9, "receiver-00000002.jrn"),
    ]
    assert "seq 3..4 missing" in str(problems[0])
    report = verify_report(tmp_path)
    assert (report.records, report.receivers, report.first_seq, report.last_seq) == (6, 2, 1, 11)


def test_seq_out_of_order_reported(tmp_path: Path) -> None:
    (tmp_path / "receiver-00000001.jrn").write_bytes(
        b"".join(encode_record(rec(s)) for s in (1, 2, 2, 3))
    )
    problems = verify(tmp_path)
    assert [p.kind for p in problems] == ["order"]


def test_iter_records_from_seq(tmp_path: Path) -> None:
    write_n(tmp_path, 30, max_receiver_bytes=400).close()
    assert len(list_receivers(tmp_path)) > 2
    assert seqs(tmp_path)[:2] == [1, 2]
    assert [r.seq for r in iter_records(tmp_path, from_seq=17)] == list(range(17, 31))
    assert list(iter_records(tmp_path, from_seq=99)) == []


def test_null_journal() -> None:
    j = NullJournal()
    j.open()
    assert j.write("94", "j", {"x": 1}) == 0
    j.sync()
    j.rotate()
    j.close()
    with pytest.raises(ValueError):
        j.write("ZZ", "j", {})


# --- follow -----------------------------------------------------------------


def test_follow_across_rotation(tmp_path: Path) -> None:
    w = write_n(tmp_path, 3)
    w.sync()
    go = threading.Event()
    stop = threading.Event()
    errors: list[BaseException] = []

    def append() -> None:
        try:
            if not go.wait(30):
                return
            w.write("94", "j", {"n": 4})  # into the first receiver
            w.rotate()
            for i in range(5, 9):
                w.write("94", "j", {"n": i})
            w.rotate()
            w.write("94", "j", {"n": 9})
            w.close()
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    writer = threading.Thread(target=append)
    watchdog = threading.Timer(30, stop.set)  # a hang fails instead of blocking the suite
    writer.start()
    watchdog.start()
    seen: list[int] = []
    try:
        for r in follow(tmp_path, 0.01, stop=stop):
            seen.append(r.seq)
            if r.seq == 3:
                go.set()  # everything after this is appended while following
            if r.seq == 9:
                break
    finally:
        go.set()
        watchdog.cancel()
        writer.join()
    assert not errors
    assert seen == list(range(1, 10))
    assert len(list_receivers(tmp_path)) == 3


def test_follow_from_seq_and_stop(tmp_path: Path) -> None:
    write_n(tmp_path, 10, max_receiver_bytes=300).close()
    stop = threading.Event()
    got = []
    for r in follow(tmp_path, 0.01, from_seq=6, stop=stop):
        got.append(r.seq)
        if len(got) == 5:
            stop.set()  # the generator ends at its next poll
    assert got == [6, 7, 8, 9, 10]


def test_follow_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        next(iter(follow(tmp_path / "nope")))


def test_write_encoded_frames_job_payloads_and_refuses_bad_ones(tmp_path: Path) -> None:
    from mailpool.journal.writer import prepare_payload

    w = JournalWriter(tmp_path)
    w.open()
    good = prepare_payload({"queue_id": "q1", "message_id": "<m@x>", "size": None})
    last = w.write_encoded("smtp-server/1", [
        ("94", 1_000, good),
        ("ZZ", 1_001, good),                 # unknown code: skipped
        ("91", 1_002, b"\xc1not msgpack"),   # not a payload: skipped
        ("91", 1_003, prepare_payload({"originator": "a@b"})),
    ])
    w.close()
    recs = list(iter_records(tmp_path))
    assert [r.code for r in recs] == ["94", "91"] and last == recs[-1].seq
    assert recs[0].fields == {"queue_id": "q1", "message_id": "m@x"}  # brackets gone
    assert recs[0].job == "smtp-server/1" and recs[1].time_ns == 1_003
    assert verify(tmp_path) == []
