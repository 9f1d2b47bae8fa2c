import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailpool.directory import (
    Directory,
    DirectoryError,
    User,
    hash_password,
    validate_address,
    validate_user_name,
    verify_password,
)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "directory.json"


def test_empty_when_missing(path: Path) -> None:
    d = Directory(path)
    assert d.users() == []
    assert d.get("bob") is None
    assert d.lookup("bob@example.org") is None
    assert not d.authenticate("bob", "x")


def test_add_list_remove(path: Path) -> None:
    d = Directory(path)
    bob = d.add_user("bob", ["Bob@Example.ORG", "robert@example.org"], None)
    assert bob == User("bob", ["bob@example.org", "robert@example.org"], "")
    d.add_user("carol", ["carol@example.org"], None)
    assert [u.name for u in d.users()] == ["bob", "carol"]
    assert d.get("bob") == bob
    assert d.lookup("ROBERT@example.org") == bob
    assert d.lookup("carol@EXAMPLE.org").name == "carol"
    assert d.lookup("nobody@example.org") is None
    assert d.lookup("not an address") is None
    assert d.remove_user("bob") == bob
    assert [u.name for u in d.users()] == ["carol"]
    assert d.lookup("bob@example.org") is None
    with pytest.raises(DirectoryError, match="bob"):
        d.remove_user("bob")
    # the file is private and plain JSON
    assert path.stat().st_mode & 0o777 == 0o600
    assert json.loads(path.read_text())["users"][0]["name"] == "carol"


def test_duplicates_refused(path: Path) -> None:
    d = Directory(path)
    d.add_user("bob", ["bob@example.org"], None)
    with pytest.raises(DirectoryError, match="already exists"):
        d.add_user("bob", ["other@example.org"], None)
    with pytest.raises(DirectoryError, match="bob"):
        d.add_user("carol", ["carol@example.org", "BOB@example.org"], None)
    assert [u.name for u in d.users()] == ["bob"]
    # one user listing the same address twice keeps one copy
    assert d.add_user("dave", ["d@x.org", "D@X.org"], None).addresses == ["d@x.org"]


def test_set_addresses(path: Path) -> None:
    d = Directory(path)
    d.add_user("bob", ["bob@example.org"], None)
    d.add_user("carol", ["carol@example.org"], None)
    assert d.set_addresses("bob", ["b@example.org"]).addresses == ["b@example.org"]
    assert d.lookup("bob@example.org") is None
    assert d.lookup("b@example.org").name == "bob"
    with pytest.raises(DirectoryError, match="carol"):
        d.set_addresses("bob", ["carol@example.org"])
    with pytest.raises(DirectoryError, match="no such user"):
        d.set_addresses("eve", ["e@example.org"])


@pytest.mark.parametrize(
    "name",
    ["../x", "a/b", "", ".", "..", "UPPER?", "Bob", "a..b", "-a", ".a", "a b", "x" * 65, "é", 5],
)
def test_bad_user_names(path: Path, name: object) -> None:
    with pytest.raises(DirectoryError):
        validate_user_name(name)  # type: ignore[arg-type]
    with pytest.raises(DirectoryError):
        Directory(path).add_user(name, ["a@example.org"], None)  # type: ignore[arg-type]
    assert not path.exists()


@pytest.mark.parametrize("name", ["a", "bob", "b.o_b-1", "0", "x" * 64])
def test_good_user_names(name: str) -> None:
    validate_user_name(name)


@pytest.mark.parametrize(
    ("addr", "norm"),
    [
        ("Bob@Example.COM", "bob@example.com"),
        ("first.last+tag@mail.example.org", "first.last+tag@mail.example.org"),
        ("o'neil@x.org", "o'neil@x.org"),
        ('"bob"@x.org', "bob@x.org"),
        ('"A B"@x.org', '"a b"@x.org'),
        ('"a\\"b"@x.org', '"a\\"b"@x.org'),
        ("postmaster@localhost", "postmaster@localhost"),
    ],
)
def test_good_addresses(addr: str, norm: str) -> None:
    assert validate_address(addr) == norm


@pytest.mark.parametrize(
    "addr",
    [
        "",
        "bob",
        "@example.org",
        "bob@",
        "a..b@x.org",
        ".a@x.org",
        "a.@x.org",
        "a b@x.org",
        "bob@-x.org",
        "bob@x-.org",
        "bob@x..org",
        "bob@x_y.org",
        "bob@[192.0.2.1]",
        "bob@x.org.",
        "bøb@x.org",
        '"unterminated@x.org',
        '""@x.org',
        "a" * 65 + "@x.org",
        "a@" + "b" * 64 + ".org",
        None,
    ],
)
def test_bad_addresses(addr: object) -> None:
    with pytest.raises(DirectoryError) as exc:
        validate_address(addr)  # type: ignore[arg-type]
    assert repr(addr) in str(exc.value)


def test_password_hash() -> None:
    h = hash_password("s3cret pass")
    assert "s3cret" not in h
    assert h.startswith("scrypt$16384$8$1$")
    assert verify_password(h, "s3cret pass")
    assert not verify_password(h, "s3cret pasS")
    assert not verify_password(h, "")
    assert hash_password("s3cret pass") != h  # salted
    for bad in ("", "junk", "scrypt$1$2$3$4$5", "md5$16384$8$1$AAAA$AAAA", h + "$x"):
        assert not verify_password(bad, "s3cret pass")
    # a tampered cost parameter is refused rather than computed
    assert not verify_password(h.replace("$16384$", "$1073741824$"), "s3cret pass")


def test_authenticate(path: Path) -> None:
    d = Directory(path)
    d.add_user("bob", ["bob@example.org"], "hunter2")
    d.add_user("carol", ["carol@example.org"], None)
    assert "hunter2" not in path.read_text()
    assert d.authenticate("bob", "hunter2")
    assert not d.authenticate("bob", "hunter3")
    assert not d.authenticate("nobody", "hunter2")
    assert not d.authenticate("carol", "")  # no password = no login
    d.set_password("bob", "correct horse")
    assert not d.authenticate("bob", "hunter2")
    assert d.authenticate("bob", "correct horse")
    d.set_password("carol", "pw")
    assert d.authenticate("carol", "pw")
    d.set_password("carol", None)
    assert not d.authenticate("carol", "pw")
    with pytest.raises(DirectoryError):
        d.set_password("nobody", "pw")
    with pytest.raises(DirectoryError):
        d.set_password("bob", "")


def test_reload_after_other_instance_edits(path: Path) -> None:
    reader = Directory(path)
    writer = Directory(path)
    assert reader.users() == []
    writer.add_user("bob", ["bob@example.org"], None)
    assert reader.lookup("bob@example.org").name == "bob"
    for i in range(5):
        writer.add_user(f"u{i}", [f"u{i}@example.org"], None)
        assert reader.get(f"u{i}") is not None
    writer.remove_user("bob")
    assert reader.get("bob") is None
    assert len(reader.users()) == 5


def test_damaged_file(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(DirectoryError, match=r"directory\.json"):
        Directory(path).users()
    path.write_text(json.dumps({"users": [{"name": "../x", "addresses": []}]}))
    with pytest.raises(DirectoryError, match=r"directory\.json"):
        Directory(path).users()


ADD_SCRIPT = """
import sys
from mailpool.directory import Directory
d = Directory(sys.argv[1])
tag = sys.argv[2]
for i in range(15):
    d.add_user(f"{tag}{i}", [f"{tag}{i}@example.org"], None)
"""


def test_concurrent_adds_from_processes(path: Path) -> None:
    procs = [
        subprocess.Popen([sys.executable, "-c", ADD_SCRIPT, str(path), tag])
        for tag in ("a", "b", "c")
    ]
    for p in procs:
        assert p.wait() == 0
    names = {u.name for u in Directory(path).users()}
    assert names == {f"{t}{i}" for t in "abc" for i in range(15)}
    # no temporary files left behind; only the file and its lock
    assert sorted(os.listdir(path.parent)) == ["directory.json", "directory.json.lock"]
