"""The LDAP address book (the source's "Use LDAP for addresses"): the directory published
as LDIF, or kept in step on an LDAP server, so mail clients can look addresses up.

Each user becomes one inetOrgPerson entry `uid=NAME,ou=people,BASE` with cn and sn (the
user name: the directory has no other name), uid, and one mail value per address. The
password hash is never written: the address book is public, logins stay with mailpool.

`users` is a plain list of mailpool.directory.User, so the caller picks the directory
backend; nothing here reads the directory itself.
"""

from __future__ import annotations

import base64
import math
import os
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO
from urllib.parse import urlsplit

from mailpool.directory import User

PERSON_CLASSES = ("top", "person", "organizationalPerson", "inetOrgPerson")
_OURS = {c.lower() for c in PERSON_CLASSES}
_COMPARED = ("cn", "sn", "mail")  # what sync keeps in step; uid is the RDN
_WRAP = 76  # OpenLDAP's default ldif-wrap


class LdapBookError(Exception):
    """One line naming the URL or DN and what went wrong."""


@dataclass(frozen=True)
class Entry:
    dn: str
    attrs: dict[str, list[str]]  # insertion order is the LDIF order


# -- DNs and entries -------------------------------------------------------------------------


def _escape_rdn(value: str) -> str:
    # RFC 4514 2.4: the specials anywhere, '#' or space first, space last, NUL as hex.
    out = re.sub(r'([,+"\\<>;=])', r"\\\1", value).replace("\0", "\\00")
    if out[:1] in ("#", " "):
        out = "\\" + out
    if value.endswith(" "):
        out = out[:-1] + "\\ "
    return out


_ATTR_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9-]*|[0-9]+(?:\.[0-9]+)*")
_UNESCAPED = re.compile(r"(?:\\.|[^,\\])+")  # one RDN: up to an unescaped comma
_FIRST_AVA = re.compile(r"(?:\\.|[^+\\])*")  # up to an unescaped plus


def _rdns(dn: str) -> list[tuple[str, str]]:
    """[(attribute, value)] of each RDN's first AVA, unescaped; LdapBookError naming the DN
    if it is not one. Spaces around ',' and '=' are allowed, as servers allow them."""
    rdns: list[tuple[str, str]] = []
    pieces = _UNESCAPED.findall(dn)
    if not dn.strip() or ",".join(pieces) != dn:  # an empty RDN (",,", a trailing ",")
        pieces = []
    for piece in pieces:
        ava = _FIRST_AVA.match(piece).group()  # the first of a multi-valued RDN
        attr, eq, raw = ava.partition("=")
        raw = raw.lstrip(" ")
        while raw.endswith(" ") and (len(raw) - 1 - len(raw[:-1].rstrip("\\"))) % 2 == 0:
            raw = raw[:-1]  # an unescaped trailing space (an odd run of "\\" escapes it)
        if not eq or not _ATTR_TYPE.fullmatch(attr.strip()) or not raw:
            break
        rdns.append((attr.strip(), _unescape(raw)))
    else:
        if rdns:
            return rdns
    raise LdapBookError(f"{dn!r} is not a DN (expected e.g. dc=example,dc=test)")


def _unescape(raw: str) -> str:
    # RFC 4514: "\XX" is one byte of the UTF-8 value, "\c" the character c itself.
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i] == "\\" and re.fullmatch(r"[0-9A-Fa-f]{2}", raw[i + 1:i + 3]):
            out += bytes.fromhex(raw[i + 1:i + 3])
            i += 3
            continue
        if raw[i] == "\\" and i + 1 < len(raw):
            i += 1
        out += raw[i].encode()
        i += 1
    return out.decode("utf-8", "replace")


def people_dn(base_dn: str) -> str:
    """Where the entries go: BASE itself if it names an ou, else ou=people,BASE."""
    attr, _ = _rdns(base_dn)[0]
    return base_dn if attr.lower() == "ou" else f"ou=people,{base_dn}"


def ou_entry(people: str) -> Entry:
    attr, value = _rdns(people)[0]
    return Entry(people, {"objectClass": ["top", "organizationalUnit"], attr: [value]})


def user_entry(user: User, people: str) -> Entry:
    attrs = {"objectClass": list(PERSON_CLASSES), "uid": [user.name], "cn": [user.name],
             "sn": [user.name]}
    if user.addresses:
        attrs["mail"] = list(dict.fromkeys(user.addresses))  # LDAP refuses duplicate values
    return Entry(f"uid={_escape_rdn(user.name)},{people}", attrs)


def book_entries(users: Iterable[User], base_dn: str) -> list[Entry]:
    """The ou, then one entry per user sorted by name: the same input gives the same LDIF."""
    people = people_dn(base_dn)
    ordered = sorted(users, key=lambda u: u.name)
    return [ou_entry(people), *(user_entry(u, people) for u in ordered)]


# -- LDIF (RFC 2849) -------------------------------------------------------------------------

_SAFE = re.compile(r"[\x21-\x39\x3b\x3d-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def _ldif_line(attr: str, value: str) -> str:
    # Plain only for printable ASCII that does not start with space, ':' or '<' and does not
    # end with a space (RFC 2849 SAFE-STRING, plus its advice on trailing spaces); all else,
    # non-ASCII (UTF-8) and control characters included, is base64 after "::".
    if value == "" or _SAFE.fullmatch(value):
        line = f"{attr}: {value}" if value else f"{attr}:"
    else:
        line = f"{attr}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}"
    # Fold: continuation lines start with one space (the output is ASCII, so no character
    # is ever cut in half).
    parts = [line[:_WRAP]] + [" " + line[i:i + _WRAP - 1]
                              for i in range(_WRAP, len(line), _WRAP - 1)]
    return "\n".join(parts) + "\n"


def export_ldif(users: Iterable[User], base_dn: str, out: TextIO) -> int:
    """Write the address book as LDIF to `out`; returns the number of user entries.

    The ou entry comes first so `ldapadd` or `slapadd` can load it under an existing base;
    there is no userPassword, whatever the users' password hashes.
    """
    entries = book_entries(users, base_dn)
    out.write("version: 1\n")
    for entry in entries:
        out.write("\n" + _ldif_line("dn", entry.dn))
        for attr, values in entry.attrs.items():
            for value in values:
                out.write(_ldif_line(attr, value))
    return len(entries) - 1


# -- sync with a server (ldap3) --------------------------------------------------------------


@dataclass
class SyncResult:
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    created_ou: bool = False
    foreign: list[str] = field(default_factory=list)  # users' DNs held by entries not ours
    actions: list[str] = field(default_factory=list)  # one line per write, in order


def _server(url: str, timeout: float, starttls: bool, ca_file: str | None):
    import ldap3

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname or port == -1 \
            or parts.path not in ("", "/") or parts.query:
        raise LdapBookError(f"{url!r}: expected ldap://HOST[:PORT] or ldaps://HOST[:PORT]")
    ldaps = parts.scheme == "ldaps"
    if ldaps and starttls:
        raise LdapBookError(f"{url}: StartTLS is for ldap:// URLs (ldaps:// is TLS already)")
    tls = None
    if ldaps or starttls:
        if ca_file is not None and not os.access(ca_file, os.R_OK):
            raise LdapBookError(f"{ca_file}: no such CA file, or not readable")
        tls = _tls_class()(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
    return ldap3.Server(parts.hostname, port=port or (636 if ldaps else 389), use_ssl=ldaps,
                        tls=tls, get_info=ldap3.NONE, connect_timeout=timeout)


def _tls_class() -> type:
    import ldap3

    class VerifyingTls(ldap3.Tls):
        """ldap3 turns the ssl module's host name check off and runs its own, which on
        Python 3.12+ (no ssl.match_hostname) cannot match IP addresses: wrap with a default
        context instead, so the ssl module checks chain and name as for any TLS client."""

        def wrap_socket(self, connection, do_handshake: bool = False) -> None:
            context = ssl.create_default_context(cafile=self.ca_certs_file)
            connection.socket = context.wrap_socket(
                connection.socket, server_hostname=connection.server.host,
                do_handshake_on_connect=do_handshake)

    return VerifyingTls


def _managed(entry: dict) -> str | None:
    """The uid of a search result that mailpool manages (RDN uid=, only inetOrgPerson's
    classes: anything with more, a posixAccount say, is someone else's), else None."""
    classes = {c.lower() for c in entry["attributes"].get("objectClass", [])}
    uids = [u.lower() for u in entry["attributes"].get("uid", [])]
    rdn = _rdn_uid(entry["dn"])
    if rdn is not None and uids == [rdn] and "inetorgperson" in classes and classes <= _OURS:
        return rdn
    return None


def _rdn_uid(dn: str) -> str | None:
    attr, value = _rdns(dn)[0]
    return value.lower() if attr.lower() == "uid" else None


def _differs(attr: str, have: list[str], want: list[str]) -> bool:
    if attr == "mail":  # caseIgnoreIA5Match, unordered
        return sorted({v.lower() for v in have}) != sorted({v.lower() for v in want})
    return sorted(have) != sorted(want)


def _describe(exc: Exception) -> str:
    from ldap3.core.exceptions import LDAPOperationResult

    if isinstance(exc, LDAPOperationResult):
        return f"{exc.description}" + (f" ({exc.message})" if exc.message else "")
    # ldap3 nests the OS or TLS error in tuple reprs and prefixes: keep the reason only.
    text = re.sub(r" \(_ssl\.c:\d+\)", "", str(exc)).replace("\\'", "'")
    text = re.sub(r"^[(\"']+|[)\"',]+$", "", text)
    text = re.sub(r"^.*?(error|opening): (?=\S)", "", text)
    if "issuer" in text or "self-signed" in text or "self signed" in text:
        text += " (is the CA in --ca-file?)"
    return text or type(exc).__name__


# (the action line for the result, the ldap3 Connection method, its arguments)
_Op = tuple[str, str, tuple]


def _plan(found: list[dict], wanted: dict[str, Entry], result: SyncResult) -> list[_Op]:
    """The writes that make `found` (one level under the ou) match `wanted`; counts them."""
    import ldap3

    existing: dict[str, dict] = {}
    for entry in found:
        uid = _managed(entry)
        if uid is not None:
            existing[uid] = entry
        elif (other := _rdn_uid(entry["dn"])) in wanted:
            result.foreign.append(entry["dn"])
            wanted = {k: v for k, v in wanted.items() if k != other}  # neither add nor change
    ops: list[_Op] = []
    for uid in sorted(existing.keys() - wanted.keys()):
        result.removed += 1
        ops.append((f"remove {existing[uid]['dn']}", "delete", (existing[uid]["dn"],)))
    for uid, want in sorted(wanted.items()):
        if uid not in existing:
            result.added += 1
            ops.append((f"add {want.dn}", "add", (want.dn, None, want.attrs)))
            continue
        have = existing[uid]
        changes = {a: [(ldap3.MODIFY_REPLACE, want.attrs.get(a, []))] for a in _COMPARED
                   if _differs(a, have["attributes"].get(a, []), want.attrs.get(a, []))}
        if changes:
            result.changed += 1
            ops.append((f"change {have['dn']}: {', '.join(changes)}", "modify",
                        (have["dn"], changes)))
        else:
            result.unchanged += 1
    return ops


def _search(conn, url: str, people: str, result: SyncResult) -> tuple[list[dict], list[_Op]]:
    """The entries one level under the ou; if the ou is missing, the op that creates it
    (after checking its parent, so that a dry run finds a wrong base as well)."""
    import ldap3
    from ldap3.core.exceptions import LDAPNoSuchObjectResult

    try:
        found = conn.extend.standard.paged_search(
            people, "(objectClass=*)", search_scope=ldap3.LEVEL, paged_size=500,
            attributes=["objectClass", "uid", *_COMPARED], generator=False)
        return [e for e in found if e.get("type") == "searchResEntry"], []
    except LDAPNoSuchObjectResult:
        pass
    parent = ",".join(_UNESCAPED.findall(people)[1:])
    if parent:
        try:
            conn.search(parent, "(objectClass=*)", search_scope=ldap3.BASE, attributes=["1.1"])
        except LDAPNoSuchObjectResult:
            raise LdapBookError(f"{url}: {parent} does not exist (no such object): "
                                "check --base") from None
    result.created_ou = True
    ou = ou_entry(people)
    return [], [(f"add {people}", "add", (ou.dn, None, ou.attrs))]


def sync_ldap(users: Iterable[User], url: str, base_dn: str, bind_dn: str, password: str, *,
              timeout: float, dry_run: bool = False, starttls: bool = False,
              ca_file: str | None = None) -> SyncResult:
    """Make the entries under people_dn(base_dn) match `users`: add, change, remove.

    Only entries `_managed` recognises are changed or removed; an entry of someone else's
    that holds a user's DN is left alone and listed in `foreign`. The ou is created if
    missing (its parent must exist). With `dry_run` the connection is read-only and the
    result says what would be done. Every failure is one LdapBookError naming the URL and
    the step or DN at fault.
    """
    import ldap3
    from ldap3.core.exceptions import (
        LDAPException,
        LDAPInvalidCredentialsResult,
        LDAPSocketOpenError,
    )

    people = people_dn(base_dn)
    wanted = {u.name.lower(): user_entry(u, people) for u in users}
    server = _server(url, timeout, starttls, ca_file)
    result = SyncResult()
    # ldap3 packs receive_timeout into SO_RCVTIMEO as whole seconds: it must be an int.
    conn = ldap3.Connection(server, user=bind_dn, password=password,
                            receive_timeout=max(1, math.ceil(timeout)), raise_exceptions=True,
                            read_only=dry_run)
    step = "connect"
    try:
        conn.open()
        if starttls:
            step = "StartTLS"
            conn.start_tls()
        step = f"bind as {bind_dn}"
        conn.bind()
        step = f"search {people}"
        found, ops = _search(conn, url, people, result)
        ops += _plan(found, wanted, result)
        for action, method, args in ops:
            step = action
            result.actions.append(action)
            if not dry_run:
                getattr(conn, method)(*args)
    except LdapBookError:
        raise
    except LDAPInvalidCredentialsResult:
        raise LdapBookError(f"{url}: bind as {bind_dn} refused: invalid credentials") from None
    except LDAPSocketOpenError as exc:
        raise LdapBookError(f"{url}: cannot connect: {_describe(exc)}") from None
    except (LDAPException, OSError) as exc:
        raise LdapBookError(f"{url}: {step}: {_describe(exc)}") from None
    except Exception as exc:
        # ldap3 decoding something that is not LDAP (a web server on that port, say).
        raise LdapBookError(f"{url}: {step}: unexpected answer ({type(exc).__name__}); "
                            "is this an LDAP server?") from None
    finally:
        try:
            conn.unbind()
        except Exception:
            pass  # the connection is gone anyway; the first error is the one that matters
    return result
