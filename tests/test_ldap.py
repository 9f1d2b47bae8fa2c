"""The LDAP address book: LDIF export read back by OpenLDAP's own tools, and sync-ldap
against a private slapd (tests/ldaphelp.py), including what it must never touch."""

from __future__ import annotations

import argparse
import io
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from hosthelp import CLI_CONFIG
from ldaphelp import ROOT_DN, ROOT_PW, SUFFIX, SUFFIX_LDIF, Slapd, free_port, parse_ldif
from tlshelp import make_certs

from mailpool.cli import CliError, build_parser
from mailpool.cli_ldap import PASSWORD_ENV, add_ldap_commands
from mailpool.config import load_config
from mailpool.directory import Directory, User
from mailpool.ldap_book import LdapBookError, export_ldif, people_dn, sync_ldap

PEOPLE = f"ou=people,{SUFFIX}"
HASH = "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGg="
USERS = [
    User("bob", ["bob@example.test", "robert@example.test"], HASH),
    User("amy", ["amy@example.test"], ""),
    User("postmaster", [], HASH),
]
# Values an LDIF writer gets wrong: non-ASCII, a leading space, ':' or '<', a trailing
# space, RDN specials, and one long enough to fold.
ODD = [
    User("josé", ["jose@example.test"]),
    User(" lead", ['" lead"@example.test']),
    User(":colon", []),
    User("<angle", []),
    User("trail ", []),
    User("a,b+c", []),
    User("x" * 120, [f"{'y' * 60}@example.test"]),
]


@pytest.fixture
def slapd(tmp_path: Path) -> Iterator[Slapd]:
    server = Slapd(tmp_path / "ldap")
    assert server.slapadd(SUFFIX_LDIF).returncode == 0
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ldif(users: list[User], base: str = SUFFIX) -> str:
    out = io.StringIO()
    export_ldif(users, base, out)
    return out.getvalue()


def sync(server: Slapd, users: list[User], **kw):
    return sync_ldap(users, server.url, kw.pop("base", SUFFIX), ROOT_DN,
                     kw.pop("password", ROOT_PW), timeout=2.5, **kw)


def people(server: Slapd) -> dict[str, dict[str, list[str]]]:
    return server.search(PEOPLE, "(objectClass=*)")


def expected(user: User) -> dict[str, list[str]]:
    return {"objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson"],
            "uid": [user.name], "cn": [user.name], "sn": [user.name],
            **({"mail": user.addresses} if user.addresses else {})}


# -- export ----------------------------------------------------------------------------------


def test_export_is_loaded_by_slapadd_into_a_fresh_database(tmp_path: Path) -> None:
    fresh = Slapd(tmp_path / "fresh")
    res = fresh.slapadd(SUFFIX_LDIF + ldif(USERS).removeprefix("version: 1\n"))
    assert res.returncode == 0, res.stderr
    loaded = parse_ldif(fresh.slapcat())
    # slapcat adds operational attributes (entryUUID, createTimestamp...): compare ours only.
    for user in USERS:
        entry = loaded[f"uid={user.name},{PEOPLE}"]
        assert {k: v for k, v in entry.items() if k in expected(user)} == expected(user)
        assert "userPassword" not in entry
    assert loaded[PEOPLE]["ou"] == ["people"]


def test_export_added_with_ldapadd_is_found_by_ldapsearch(slapd: Slapd) -> None:
    res = slapd.ldapadd(ldif(USERS))
    assert res.returncode == 0, res.stderr
    found = people(slapd)
    assert found.pop(PEOPLE)["objectClass"] == ["top", "organizationalUnit"]
    assert found == {f"uid={u.name},{PEOPLE}": expected(u) for u in USERS}
    # What a mail client asks: a name or address prefix, wanting cn and mail.
    hits = slapd.search(SUFFIX, "(|(cn=rob*)(mail=rob*))", "cn", "mail")
    assert list(hits) == [f"uid=bob,{PEOPLE}"]


def test_passwords_never_leave() -> None:
    text = ldif(USERS)
    assert "userPassword" not in text and HASH not in text and "scrypt" not in text


def test_export_is_deterministic_and_sorted() -> None:
    shuffled = random.Random(7).sample(USERS, len(USERS))
    assert ldif(shuffled) == ldif(USERS)
    dns = [line for line in ldif(USERS).splitlines() if line.startswith("dn: uid=")]
    assert dns == [f"dn: uid={n},{PEOPLE}" for n in ("amy", "bob", "postmaster")]


def test_base_naming_an_ou_is_used_as_given() -> None:
    assert people_dn(SUFFIX) == PEOPLE
    assert people_dn("ou=staff, dc=example,dc=test") == "ou=staff, dc=example,dc=test"
    text = ldif(USERS[:1], "ou=staff,dc=example,dc=test")
    assert "dn: ou=staff,dc=example,dc=test\n" in text and "\nou: staff\n" in text
    assert "dn: uid=bob,ou=staff,dc=example,dc=test\n" in text
    with pytest.raises(LdapBookError, match="not a DN"):
        ldif(USERS, "example.test")


def test_ldif_escaping_by_the_letter() -> None:
    lines = ldif(ODD).splitlines()
    # Non-ASCII: base64 of the UTF-8 bytes, in the DN as well.
    assert "uid:: am9zw6k=" in lines and "cn:: am9zw6k=" in lines
    assert "dn:: dWlkPWpvc8OpLG91PXBlb3BsZSxkYz1leGFtcGxlLGRjPXRlc3Q=" in lines
    assert "uid:: IGxlYWQ=" in lines        # leading space
    assert "uid:: OmNvbG9u" in lines        # leading ':'
    assert "uid:: PGFuZ2xl" in lines        # leading '<'
    assert "uid:: dHJhaWwg" in lines        # trailing space
    assert "dn: uid=a\\,b\\+c,ou=people,dc=example,dc=test" in lines  # RFC 4514 in the DN
    assert "dn: uid=\\ lead,ou=people,dc=example,dc=test" in lines
    assert "dn: uid=trail\\ ,ou=people,dc=example,dc=test" in lines
    # Folded at 76 columns, continuation lines start with one space.
    assert all(len(line) <= 76 for line in lines)
    assert any(line.startswith(" ") for line in lines)
    assert all(line.isascii() for line in lines)


def test_escaped_values_survive_slapadd_and_ldapsearch(slapd: Slapd, tmp_path: Path) -> None:
    res = slapd.ldapadd(ldif(ODD))
    assert res.returncode == 0, res.stderr
    found = {e["uid"][0]: e for e in people(slapd).values() if "uid" in e}
    assert found == {u.name: expected(u) for u in ODD}
    fresh = Slapd(tmp_path / "fresh")
    res = fresh.slapadd(SUFFIX_LDIF + ldif(ODD).removeprefix("version: 1\n"))
    assert res.returncode == 0, res.stderr
    uids = {e["uid"][0] for e in parse_ldif(fresh.slapcat()).values() if "uid" in e}
    assert uids == {u.name for u in ODD}


# -- sync ------------------------------------------------------------------------------------


def counts(result) -> tuple[int, int, int, int]:
    return result.added, result.changed, result.removed, result.unchanged


def test_sync_adds_changes_and_removes(slapd: Slapd) -> None:
    result = sync(slapd, USERS)  # the ou does not exist yet: created
    assert counts(result) == (3, 0, 0, 0) and result.created_ou
    assert people(slapd) == {PEOPLE: {"objectClass": ["top", "organizationalUnit"],
                                      "ou": ["people"]},
                             **{f"uid={u.name},{PEOPLE}": expected(u) for u in USERS}}
    assert counts(sync(slapd, USERS)) == (0, 0, 0, 3)

    bob = User("bob", ["bob@example.test", "bobby@example.test"], HASH)  # one in, one out
    amy = User("amelia", ["amy@example.test"])                           # renamed
    result = sync(slapd, [bob, amy])                                     # postmaster gone
    assert counts(result) == (1, 1, 2, 0)
    assert result.actions == [f"remove uid=amy,{PEOPLE}", f"remove uid=postmaster,{PEOPLE}",
                              f"add uid=amelia,{PEOPLE}", f"change uid=bob,{PEOPLE}: mail"]
    found = people(slapd)
    assert found[f"uid=bob,{PEOPLE}"]["mail"] == ["bob@example.test", "bobby@example.test"]
    assert f"uid=amelia,{PEOPLE}" in found and f"uid=amy,{PEOPLE}" not in found
    assert f"uid=postmaster,{PEOPLE}" not in found

    # A hand edit of a managed entry is put back (cn), an emptied user loses every mail.
    slapd.modify(f"uid=bob,{PEOPLE}", "replace: cn\ncn: Bobby Tables\n")
    result = sync(slapd, [User("bob", []), amy])
    assert counts(result) == (0, 1, 0, 1)
    assert result.actions == [f"change uid=bob,{PEOPLE}: cn, mail"]
    assert people(slapd)[f"uid=bob,{PEOPLE}"] == expected(User("bob", []))


UNMANAGED = f"""\
dn: cn=Plumber,{PEOPLE}
objectClass: inetOrgPerson
cn: Plumber
sn: Plumber
mail: plumber@elsewhere.test

dn: uid=carol,{PEOPLE}
objectClass: inetOrgPerson
objectClass: pkiUser
uid: carol
cn: Carol
sn: Carol

dn: ou=rooms,{PEOPLE}
objectClass: organizationalUnit
ou: rooms

dn: uid=dave,{SUFFIX}
objectClass: inetOrgPerson
uid: dave
cn: dave
sn: dave
"""


def test_sync_leaves_unmanaged_entries_alone(slapd: Slapd) -> None:
    sync(slapd, USERS)
    assert slapd.ldapadd(UNMANAGED).returncode == 0
    before = slapd.search()
    # carol is in the directory now, but uid=carol belongs to someone else (an extra class).
    carol = User("carol", ["carol@example.test"])
    result = sync(slapd, [*USERS, carol, User("dave", [])])
    assert counts(result) == (1, 0, 0, 3)  # dave under the ou; the one at the top untouched
    assert result.foreign == [f"uid=carol,{PEOPLE}"]
    after = slapd.search()
    assert after.pop(f"uid=dave,{PEOPLE}") == expected(User("dave", []))
    assert after == before
    # Removing everybody removes mailpool's entries only.
    result = sync(slapd, [])
    assert counts(result) == (0, 0, 4, 0) and result.foreign == []
    assert set(people(slapd)) == {PEOPLE, f"cn=Plumber,{PEOPLE}", f"uid=carol,{PEOPLE}",
                                  f"ou=rooms,{PEOPLE}"}
    assert f"uid=dave,{SUFFIX}" in slapd.search()


def test_dry_run_writes_nothing(slapd: Slapd) -> None:
    before = slapd.search()
    planned = sync(slapd, USERS, dry_run=True)
    assert slapd.search() == before
    assert counts(planned) == (3, 0, 0, 0) and planned.actions[0] == f"add {PEOPLE}"
    assert counts(sync(slapd, USERS)) == counts(planned)
    before = slapd.search()
    planned = sync(slapd, USERS[:1], dry_run=True)
    assert counts(planned) == (0, 0, 2, 1) and slapd.search() == before


def test_errors_are_one_clear_line(slapd: Slapd) -> None:
    dead = f"ldap://127.0.0.1:{free_port()}"
    cases = [
        (dict(), dead, f"{dead}: cannot connect: [Errno 111] Connection refused"),
        (dict(password="wrong"), slapd.url,
         f"{slapd.url}: bind as {ROOT_DN} refused: invalid credentials"),
        (dict(base="dc=nope,dc=test"), slapd.url,
         f"{slapd.url}: dc=nope,dc=test does not exist (no such object): check --base"),
        (dict(base="ou=a,ou=b,dc=example,dc=test", dry_run=True), slapd.url,
         f"{slapd.url}: ou=b,dc=example,dc=test does not exist"),
        (dict(), "http://127.0.0.1/", "expected ldap://HOST[:PORT] or ldaps://HOST[:PORT]"),
        (dict(base="example.test"), slapd.url, "'example.test' is not a DN"),
    ]
    for kw, url, message in cases:
        with pytest.raises(LdapBookError) as info:
            sync_ldap(USERS, url, kw.pop("base", SUFFIX), ROOT_DN, kw.pop("password", ROOT_PW),
                      timeout=5, **kw)
        assert str(info.value).startswith(message) or message in str(info.value), info.value
        assert "\n" not in str(info.value)


def test_ldaps_and_starttls_verify_the_server(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs", "127.0.0.1", "localhost")
    server = Slapd(tmp_path / "ldap", certs=(certs.cert, certs.key))
    assert server.slapadd(SUFFIX_LDIF).returncode == 0
    server.start()
    try:
        ca = str(certs.ca_file)
        assert counts(sync_ldap(USERS, server.ldaps_url, SUFFIX, ROOT_DN, ROOT_PW, timeout=5,
                                ca_file=ca)) == (3, 0, 0, 0)
        assert counts(sync_ldap(USERS, server.url, SUFFIX, ROOT_DN, ROOT_PW, timeout=5,
                                starttls=True, ca_file=ca)) == (0, 0, 0, 3)
        with pytest.raises(LdapBookError, match=r"CERTIFICATE_VERIFY_FAILED.*--ca-file"):
            sync_ldap(USERS, server.ldaps_url, SUFFIX, ROOT_DN, ROOT_PW, timeout=5)
    finally:
        server.stop()
    other = make_certs(tmp_path / "other", "mail.example.test")
    server = Slapd(tmp_path / "ldap2", certs=(other.cert, other.key)).start()
    try:
        with pytest.raises(LdapBookError, match=r"IP address mismatch"):
            sync_ldap(USERS, server.url, SUFFIX, ROOT_DN, ROOT_PW, timeout=5, starttls=True,
                      ca_file=str(other.ca_file))
    finally:
        server.stop()


# -- the commands ----------------------------------------------------------------------------


@pytest.fixture
def loaded(tmp_path: Path):
    config = tmp_path / "mailpool.toml"
    config.write_text(CLI_CONFIG.format(data=tmp_path / "var"))
    result = load_config(config)
    directory = Directory(result.directory_file)
    directory.add_user("bob", ["bob@example.test"], "secret")
    directory.add_user("amy", ["amy@example.test", "a@example.test"], None)
    return result


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_ldap_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_export_command(loaded, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("export", "--ldif")
    assert args.handler(args, loaded) == 0
    text = capsys.readouterr().out
    assert text == ldif(Directory(loaded.directory_file).users())  # default base from domain
    assert f"dn: uid=bob,{PEOPLE}" in text and "userPassword" not in text
    target = tmp_path / "book.ldif"
    args = parse("export", "--ldif", "--base", "ou=staff,dc=x", "--output", str(target))
    assert args.handler(args, loaded) == 0
    assert "dn: uid=amy,ou=staff,dc=x\n" in target.read_text()
    assert "2 entries written" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("export")  # --ldif is the format and must be said


def test_sync_command(loaded, slapd: Slapd, tmp_path: Path, monkeypatch,
                      capsys: pytest.CaptureFixture[str]) -> None:
    common = ["sync-ldap", "--url", slapd.url, "--base", SUFFIX, "--bind-dn", ROOT_DN]
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    args = parse(*common)
    with pytest.raises(CliError, match="no bind password"):
        args.handler(args, loaded)

    args = parse(*common, "--dry-run")
    monkeypatch.setenv(PASSWORD_ENV, ROOT_PW)
    assert args.handler(args, loaded) == 0
    out = capsys.readouterr().out
    assert f"would add uid=amy,{PEOPLE}" in out
    assert "2 added, 0 changed, 0 removed, 0 unchanged (dry run: nothing written)" in out
    assert people(slapd) == {}

    secret = tmp_path / "bind.pw"
    secret.write_text(ROOT_PW + "\n")
    args = parse(*common, "--bind-password-file", str(secret))
    monkeypatch.delenv(PASSWORD_ENV)
    assert args.handler(args, loaded) == 0
    assert capsys.readouterr().out == f"{slapd.url}: 2 added, 0 changed, 0 removed, " \
                                      "0 unchanged\n"
    assert people(slapd)[f"uid=amy,{PEOPLE}"]["mail"] == ["amy@example.test", "a@example.test"]

    monkeypatch.setattr("sys.stdin", io.StringIO("wrong\n"))
    args = parse(*common, "--bind-password-stdin")
    with pytest.raises(CliError) as info:
        args.handler(args, loaded)
    assert str(info.value) == f"{slapd.url}: bind as {ROOT_DN} refused: invalid credentials"
    with pytest.raises(SystemExit):
        parse(*common, "--timeout", "0")


def test_every_ldap_option_has_help_text() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_ldap_commands(sub)
    for name, leaf in sub.choices.items():
        for action in leaf._actions:
            assert action.help, (name, action.option_strings)


def test_through_mailpool_main(loaded, slapd: Slapd, monkeypatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """`mailpool directory ...` as the user runs it: errors are one line, exit 1."""
    import mailpool.cli

    def build() -> argparse.ArgumentParser:
        # Until the lead wires add_ldap_commands into `mailpool directory`, do it here.
        parser = build_parser()
        group = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "directory" not in group.choices:
            add_ldap_commands(group.add_parser("directory").add_subparsers(required=True))
        return parser

    monkeypatch.setattr(mailpool.cli, "build_parser", build)
    monkeypatch.setenv(PASSWORD_ENV, "wrong")
    rc = mailpool.cli.main(["directory", "sync-ldap", "--url", slapd.url, "--base", SUFFIX,
                            "--bind-dn", ROOT_DN, "--config", str(loaded.path)])
    err = capsys.readouterr().err
    assert rc == 1 and err == f"mailpool: {slapd.url}: bind as {ROOT_DN} refused: " \
                              "invalid credentials\n"
    rc = mailpool.cli.main(["directory", "export", "--ldif", "--base", "dc=example,",
                            "--config", str(loaded.path)])
    assert rc == 1 and capsys.readouterr().err == \
        "mailpool: --base: 'dc=example,' is not a DN (expected e.g. dc=example,dc=test)\n"
    assert mailpool.cli.main(["directory", "export", "--ldif",
                              "--config", str(loaded.path)]) == 0
    assert f"dn: uid=bob,{PEOPLE}" in capsys.readouterr().out
