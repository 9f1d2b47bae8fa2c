"""What every directory backend shares: the user record, the errors, and the rules for
names and addresses (checked the same way whichever backend stores them)."""

from __future__ import annotations

import re

import msgspec


class DirectoryError(Exception):
    """A bad directory entry or request; the message names the value and why."""


class DirectoryUnavailable(DirectoryError):
    """The directory cannot be read or written now (the database is down or too slow).

    Always temporary: callers answer 4xx / [SYS/TEMP] and keep mail queued, never a
    permanent refusal. The message says why without the connection string's secrets.
    """


class PasswordHashError(DirectoryError):
    """A foreign password hash refused; the message names the scheme, never the hash."""


class User(msgspec.Struct, frozen=True):
    name: str
    addresses: list[str]
    password_hash: str = ""  # "" = no POP login


_USER_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# RFC 5322 atext, as used by the RFC 5321 Dot-string.
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_ATOM_RE = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
# RFC 5321 Quoted-string: qtextSMTP or quoted-pairSMTP.
_QUOTED_RE = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"')
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def validate_user_name(name: str) -> None:
    """User names become Maildir directory names: a small, path-safe alphabet only."""
    if not isinstance(name, str):
        raise DirectoryError(f"user name {name!r}: not a string")
    if not _USER_RE.fullmatch(name):
        raise DirectoryError(
            f"user name {name!r}: must be 1-64 characters of a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    if ".." in name:
        raise DirectoryError(f"user name {name!r}: must not contain '..'")


def validate_address(addr: str) -> str:
    """Check `local@domain` and return it normalised (both parts lowercased).

    The local part is an RFC 5321 Dot-string or Quoted-string (a quoted one that is a
    valid Dot-string anyway is unquoted, RFC 5321 4.1.2); the domain is a host name
    (no address literals, no non-ASCII). RFC 5321 lets the receiving host decide whether
    local parts are case-sensitive; like most hosts we treat them case-insensitively, so
    "Bob@Example.COM" and "bob@example.com" are the same mailbox.
    """
    if not isinstance(addr, str):
        raise DirectoryError(f"address {addr!r}: not a string")
    local, at, domain = addr.rpartition("@")
    if not at or not local or not domain:
        raise DirectoryError(f"address {addr!r}: must be local-part@domain")
    if not addr.isascii():
        raise DirectoryError(f"address {addr!r}: non-ASCII characters are not supported")
    local = local.lower()
    domain = domain.lower()
    if not _DOT_ATOM_RE.fullmatch(local):
        m = _QUOTED_RE.fullmatch(local)
        if m is None:
            raise DirectoryError(
                f"address {addr!r}: local part {local!r} is neither a dot-atom nor a quoted string"
            )
        text = re.sub(r"\\(.)", r"\1", m.group(1))
        if not text:
            raise DirectoryError(f"address {addr!r}: empty local part")
        if _DOT_ATOM_RE.fullmatch(text):
            local = text
        else:
            local = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if len(local.encode()) > 64:
        raise DirectoryError(f"address {addr!r}: local part longer than 64 octets")
    if len(domain) > 253:
        raise DirectoryError(f"address {addr!r}: domain longer than 253 octets")
    for label in domain.split("."):
        if not _LABEL_RE.fullmatch(label):
            raise DirectoryError(
                f"address {addr!r}: domain {domain!r} has an invalid label {label!r} "
                "(letters, digits and inner hyphens, 1-63 characters)"
            )
    result = f"{local}@{domain}"
    if len(result) > 254:
        raise DirectoryError(f"address {addr!r}: longer than 254 octets")
    return result


def normalise_addresses(addresses: list[str]) -> list[str]:
    """Each address validated and lowercased, duplicates dropped, order kept."""
    if isinstance(addresses, str):
        raise DirectoryError(f"addresses {addresses!r}: expected a list of addresses")
    out: list[str] = []
    for a in addresses:
        norm = validate_address(a)
        if norm not in out:
            out.append(norm)
    return out


def lookup_key(address: str) -> str | None:
    """The normalised form an address is looked up by; None for one that no user can own."""
    try:
        return validate_address(address)
    except DirectoryError:
        return None
