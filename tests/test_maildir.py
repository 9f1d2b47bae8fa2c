import os
from pathlib import Path

import pytest

from mailpool.framework.maildir import (
    deliver,
    ensure_maildir,
    find,
    is_delivered,
    sized_name,
    unique_name,
)
from mailpool.maildrop import Maildrop, stored_pop_size

CONTENT = b"From: a@example.org\r\nSubject: t\r\n\r\nbody\r\n" + bytes(range(256))


@pytest.fixture
def md(tmp_path: Path) -> Path:
    path = tmp_path / "mail" / "bob"
    ensure_maildir(path)
    return path


def test_ensure_maildir(md: Path) -> None:
    for sub in ("tmp", "new", "cur"):
        assert (md / sub).is_dir()
        assert (md / sub).stat().st_mode & 0o777 == 0o700
    ensure_maildir(md)  # idempotent


def test_deliver_lands_in_new(md: Path) -> None:
    name = unique_name("1hr4373ejfl41008gf6er6", 0, "mx.example.org")
    path = deliver(md, name, CONTENT)
    # Maildir++ size fields: S= the file, W= with CRLF line ends as POP3 sends it
    # (CONTENT's bytes hold a bare LF, +1, and it does not end in CRLF, +2).
    assert path == md / "new" / f"{name},S={len(CONTENT)},W={len(CONTENT) + 3}"
    assert path.read_bytes() == CONTENT
    assert path.stat().st_nlink == 1
    assert os.listdir(md / "tmp") == []
    assert is_delivered(md, name)
    assert not is_delivered(md, unique_name("1hr4373ejfl41008gf6er6", 1, "mx.example.org"))


def test_is_delivered_in_cur(md: Path) -> None:
    name = unique_name("q1", 2, "host")
    path = deliver(md, name, CONTENT)
    # a POP/IMAP reader marks it seen
    seen = md / "cur" / f"{path.name}:2,S"
    os.rename(path, seen)
    assert is_delivered(md, name)
    assert find(md, name) == seen
    os.rename(seen, md / "cur" / name)  # a file from before the size fields
    assert is_delivered(md, name)
    # a name that merely starts the same is another message
    assert not is_delivered(md, unique_name("q1", 2, "hos"))


def test_deliver_is_idempotent(md: Path) -> None:
    name = unique_name("q2", 0, "host")
    first = deliver(md, name, CONTENT)
    assert deliver(md, name, b"other") == first
    assert first.read_bytes() == CONTENT
    seen = md / "cur" / f"{first.name}:2,RS"
    os.rename(first, seen)
    assert deliver(md, name, CONTENT) == seen
    assert os.listdir(md / "new") == []
    assert os.listdir(md / "tmp") == []


def test_deliver_over_leftover_tmp(md: Path) -> None:
    name = unique_name("q3", 0, "host")
    (md / "tmp" / sized_name(name, CONTENT)).write_bytes(b"partial from a crash")
    path = deliver(md, name, CONTENT)
    assert path.read_bytes() == CONTENT
    assert os.listdir(md / "tmp") == []


def test_many_deliveries(md: Path) -> None:
    names = [unique_name("q4", i, "host") for i in range(50)]
    for i, n in enumerate(names):
        deliver(md, n, b"%d" % i)
    assert sorted(os.listdir(md / "new")) == sorted(
        sized_name(n, b"%d" % i) for i, n in enumerate(names))
    assert all(is_delivered(md, n) for n in names)


def test_not_delivered_when_maildir_missing(tmp_path: Path) -> None:
    assert not is_delivered(tmp_path / "nobody", "x.R0.host")


def test_unique_name() -> None:
    assert unique_name("abc", 3, "mx.example.org") == "abc.R3.mx.example.org"
    assert unique_name("abc", 0, "a/b:c") == "abc.R0.a\\057b\\072c"
    with pytest.raises(ValueError):
        unique_name("a/b", 0, "h")
    with pytest.raises(ValueError):
        unique_name("abc", -1, "h")


def test_bad_unique_rejected(md: Path) -> None:
    for bad in ("", "../x", "a/b", "a:2,S", ".hidden"):
        with pytest.raises(ValueError):
            deliver(md, bad, b"x")


def test_a_login_lists_sizes_from_the_names(md: Path) -> None:
    """POP3 LIST sizes come from W= without reading the files; others are read once."""
    ours = deliver(md, unique_name("q5", 0, "host"), b"Subject: a\nbare LF\r\n")
    (md / "cur" / "foreign.host:2,").write_bytes(b"Subject: b\n\nx\n")
    assert stored_pop_size(ours.name) == len(b"Subject: a\r\nbare LF\r\n")
    assert stored_pop_size("foreign.host:2,") is None
    drop = Maildrop(md)
    sizes = {m.path.name.split(",")[0].split(":")[0]: m.size for m in drop.scan()}
    assert sizes == {"q5.R0.host": 21, "foreign.host": len(b"Subject: b\r\n\r\nx\r\n")}
    os.chmod(md / "cur" / f"{ours.name}:2,", 0)  # unreadable: the name alone must do
    if os.geteuid() != 0:
        assert {m.size for m in drop.scan()} == {21, 17}
