"""The system distribution directory (the source's WRKDIRE): users, addresses, passwords.

One JSON file for the whole host, edited by the CLI while jobs read it. Writers take an
exclusive flock on a sibling `<name>.lock` file, re-read the file, change it and replace
it atomically (temp, fsync, rename, fsync dir), so two concurrent edits cannot lose each
other's changes. Readers never lock: a rename is atomic, and each `users()` call does one
stat to notice that another process replaced the file.
"""

from __future__ import annotations

import base64
import fcntl
import functools
import hashlib
import hmac
import os
import re
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import argon2
import bcrypt
import msgspec

# SHA256-CRYPT / SHA512-CRYPT: the stdlib `crypt` module is deprecated (gone in 3.13) and
# passlib has had no release since 2020. libpass is passlib's maintained fork (it installs
# the same `passlib` package); its SHA-crypt is pure Python on hashlib, no libc crypt(3),
# and it compares checksums with hmac.compare_digest.
from passlib.hash import sha256_crypt, sha512_crypt

from mailpool.fsutil import write_file_durably

T = TypeVar("T")


class DirectoryError(Exception):
    """A bad directory entry or request; the message names the value and why."""


class PasswordHashError(DirectoryError):
    """A foreign password hash refused; the message names the scheme, never the hash."""


class User(msgspec.Struct, frozen=True):
    name: str
    addresses: list[str]
    password_hash: str = ""  # "" = no POP login


class _DirectoryFile(msgspec.Struct):
    version: int = 1
    users: list[User] = []


# -- validation --------------------------------------------------------------------------

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


# -- passwords ---------------------------------------------------------------------------

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2**14, 8, 1


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    # maxmem above the ~128*r*n bytes scrypt needs (OpenSSL's default limit is 32 MiB).
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"),
        salt=salt, n=n, r=r, p=p, dklen=dklen,
        maxmem=256 * r * (n + p) + (1 << 20),
    )  # fmt: skip


def hash_password(password: str) -> str:
    """A salted scrypt hash: "scrypt$n$r$p$salt_b64$hash_b64"."""
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, _SCRYPT_N, _SCRYPT_R, _SCRYPT_P, 32)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(stored: str, password: str) -> bool:
    """True if `password` matches `stored`; False for a wrong password or a bad hash.

    `stored` is the project's scrypt format or a foreign "{SCHEME}..." hash (see below).
    """
    if isinstance(stored, str) and stored.startswith("{"):
        return _verify_foreign(stored, password)
    try:
        scheme, n_s, r_s, p_s, salt_s, hash_s = stored.split("$")
        n, r, p = int(n_s), int(r_s), int(p_s)
        salt = base64.b64decode(salt_s, validate=True)
        expected = base64.b64decode(hash_s, validate=True)
    except (ValueError, AttributeError):
        return False
    # Bounds keep a tampered file from making each login take gigabytes or minutes.
    if (
        scheme != "scrypt"
        or not (2 <= n <= 2**20 and n & (n - 1) == 0)
        or not 1 <= r <= 32
        or not 1 <= p <= 16
        or not 16 <= len(expected) <= 64
    ):
        return False
    return hmac.compare_digest(_scrypt(password, salt, n, r, p, len(expected)), expected)


@functools.cache
def _dummy_hash() -> str:
    return hash_password(secrets.token_urlsafe(16))


# -- foreign hashes: users moved from Dovecot ----------------------------------------------
#
# Dovecot writes "{SCHEME}hash". Such a hash is stored as given (the marker tells the
# verifier which check to run) and checked with the library made for it; new passwords are
# always scrypt. A successful login does not rehash a foreign hash: logins never write the
# directory, and `mailpool user passwd` moves a user to scrypt.

_SCHEME_RE = re.compile(r"\{([A-Za-z0-9.-]{1,32})\}")
# The same idea as the scrypt bounds: a tampered file or a careless import must not make
# each login take gigabytes or minutes.
_ARGON2_MAX_KIB, _ARGON2_MAX_T, _ARGON2_MAX_P = 1 << 20, 16, 16
_BCRYPT_MAX_COST = 16  # 2**16 rounds, seconds per login; Dovecot's default is 5
_SHA_CRYPT_MAX_ROUNDS = 1_000_000  # Dovecot's default is 5000
_HASH_CHARS_RE = re.compile(r"[!-~]+")
_BCRYPT_RE = re.compile(r"\$(2[aby])\$(\d\d)\$[./A-Za-z0-9]{53}")


def _secret(password: str) -> bytes:
    # POP decodes passwords with surrogateescape: this gives back the bytes the client sent,
    # which are what Dovecot hashed.
    return password.encode("utf-8", "surrogateescape")


class _Scheme(NamedTuple):
    """One foreign scheme: `check` raises ValueError(reason) for a hash it cannot use."""

    library: str
    check: Callable[[str], None]
    verify: Callable[[str, bytes], bool]


def _argon2_scheme(kind: argon2.Type) -> _Scheme:
    prefix = f"$argon2{kind.name.lower()}$"

    def check(value: str) -> None:
        if not value.startswith(prefix):
            raise ValueError(f"expected a {prefix}v=19$m=...,t=...,p=...$salt$hash string")
        try:
            p = argon2.extract_parameters(value)
        except argon2.exceptions.InvalidHashError:
            raise ValueError(f"not a valid {prefix} string") from None
        if not 8 * p.parallelism <= p.memory_cost <= _ARGON2_MAX_KIB:
            raise ValueError(f"memory m={p.memory_cost} KiB is outside 8*p..{_ARGON2_MAX_KIB}")
        if not 1 <= p.time_cost <= _ARGON2_MAX_T:
            raise ValueError(f"passes t={p.time_cost} is outside 1..{_ARGON2_MAX_T}")
        if not 1 <= p.parallelism <= _ARGON2_MAX_P:
            raise ValueError(f"lanes p={p.parallelism} is outside 1..{_ARGON2_MAX_P}")

    def verify(value: str, secret: bytes) -> bool:
        try:
            return argon2.low_level.verify_secret(value.encode("ascii"), secret, kind)
        except argon2.exceptions.VerifyMismatchError:
            return False

    return _Scheme("argon2-cffi", check, verify)


def _bcrypt_check(value: str) -> None:
    m = _BCRYPT_RE.fullmatch(value)
    if m is None:
        raise ValueError("expected $2y$ (or $2a$, $2b$), a two-digit cost, $ and 53 characters "
                         "of ./A-Za-z0-9")
    if not 4 <= int(m.group(2)) <= _BCRYPT_MAX_COST:
        raise ValueError(f"cost {m.group(2)} is outside 04..{_BCRYPT_MAX_COST}")


def _bcrypt_verify(value: str, secret: bytes) -> bool:
    # $2y$ is crypt_blowfish's name (Dovecot's default) for what OpenBSD calls $2b$; the
    # library checks $2b$. Blowfish reads at most 72 bytes: Dovecot accepted longer
    # passwords by ignoring the rest, so do the same (the library refuses them instead).
    if value.startswith("$2y$"):
        value = "$2b$" + value[4:]
    return bcrypt.checkpw(secret[:72], value.encode("ascii"))


def _sha_crypt_scheme(handler: type) -> _Scheme:
    def check(value: str) -> None:
        rounds = handler.from_string(value).rounds  # ValueError naming what is malformed
        if rounds > _SHA_CRYPT_MAX_ROUNDS:
            raise ValueError(f"rounds={rounds} is above {_SHA_CRYPT_MAX_ROUNDS}")

    def verify(value: str, secret: bytes) -> bool:
        return bool(handler.verify(secret, value))

    return _Scheme("libpass", check, verify)


_FOREIGN: dict[str, _Scheme] = {
    "ARGON2I": _argon2_scheme(argon2.Type.I),
    "ARGON2ID": _argon2_scheme(argon2.Type.ID),
    "BLF-CRYPT": _Scheme("bcrypt", _bcrypt_check, _bcrypt_verify),
    "SHA256-CRYPT": _sha_crypt_scheme(sha256_crypt),
    "SHA512-CRYPT": _sha_crypt_scheme(sha512_crypt),
}
FOREIGN_SCHEMES: tuple[str, ...] = tuple(sorted(_FOREIGN))


def _split_foreign(value: str) -> tuple[str, _Scheme, str]:
    """(marker as written, scheme, hash) or PasswordHashError; scheme names are
    case-insensitive, as in Dovecot."""
    supported = ", ".join(FOREIGN_SCHEMES)
    m = _SCHEME_RE.match(value)
    if m is None:
        raise PasswordHashError(
            f"expected a Dovecot-style {{SCHEME}}hash with SCHEME one of {supported}")
    marker = m.group(0)
    scheme = _FOREIGN.get(m.group(1).upper())
    if scheme is None:
        raise PasswordHashError(f"{marker}: scheme not supported (supported: {supported})")
    return marker, scheme, value[m.end():]


def validate_password_hash(value: str) -> str:
    """Check a Dovecot-style "{SCHEME}hash" and return it unchanged, to be stored as given.

    The scheme must be one of FOREIGN_SCHEMES and its library must accept the hash, within
    cost bounds; otherwise PasswordHashError naming the scheme (never echoing the hash).
    One trial check with a random password proves the library can use the hash, so a login
    will not fail on something only it refuses (bcrypt's strict salt encoding, say).
    """
    if not isinstance(value, str) or not value:
        raise PasswordHashError("empty; expected a Dovecot-style {SCHEME}hash")
    marker, scheme, body = _split_foreign(value)
    if not _HASH_CHARS_RE.fullmatch(body):
        raise PasswordHashError(f"{marker} hash: empty, or has spaces, control or non-ASCII "
                                "characters")
    try:
        scheme.check(body)
    except ValueError as e:
        raise PasswordHashError(f"{marker} hash: {e}") from None
    try:
        scheme.verify(body, secrets.token_urlsafe(16).encode())
    except Exception as e:
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise PasswordHashError(f"{marker} hash: refused by {scheme.library}: {reason}") from None
    return value


def _verify_foreign(stored: str, password: str) -> bool:
    try:
        _, scheme, body = _split_foreign(stored)
        scheme.check(body)  # the bounds again: the file may have been edited by hand
        return scheme.verify(body, _secret(password))
    except Exception:
        # Fail closed whatever a library raises for a damaged hash or an odd password
        # (their error types differ by library and version): a login gets no, never a crash.
        return False


# -- the directory -----------------------------------------------------------------------

_StatKey = tuple[int, int, int, int, int]


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class _Snapshot:
    def __init__(self, key: _StatKey | None, users: list[User], source: Path) -> None:
        self.key = key
        self.users = users
        self.by_name: dict[str, User] = {}
        self.by_address: dict[str, User] = {}
        for u in users:
            try:
                validate_user_name(u.name)
                addresses = [validate_address(a) for a in u.addresses]
            except DirectoryError as e:
                raise DirectoryError(f"{source}: {e}") from None
            if u.name in self.by_name:
                raise DirectoryError(f"{source}: user {u.name!r} appears twice")
            self.by_name[u.name] = u
            for a in addresses:
                other = self.by_address.get(a)
                if other is not None and other.name != u.name:
                    raise DirectoryError(
                        f"{source}: address {a!r} belongs to both {other.name!r} and {u.name!r}"
                    )
                self.by_address[a] = u


class Directory:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._lock = threading.Lock()
        self._snap = _Snapshot(None, [], self.path)

    # -- reading --------------------------------------------------------------------------

    def _read(self) -> _Snapshot:
        try:
            with open(self.path, "rb") as f:
                # fstat of the open file, not the path: the key must describe what we read.
                key = _stat_key(os.fstat(f.fileno()))
                data = f.read()
        except FileNotFoundError:
            return _Snapshot(None, [], self.path)
        try:
            doc = msgspec.json.decode(data, type=_DirectoryFile)
        except msgspec.DecodeError as e:
            raise DirectoryError(f"{self.path}: {e}") from None
        if doc.version != 1:
            raise DirectoryError(f"{self.path}: unsupported version {doc.version}")
        return _Snapshot(key, doc.users, self.path)

    def _current(self) -> _Snapshot:
        try:
            key: _StatKey | None = _stat_key(os.stat(self.path))
        except FileNotFoundError:
            key = None
        with self._lock:
            if key != self._snap.key:
                self._snap = self._read()
            return self._snap

    def users(self) -> list[User]:
        """All users, in the order they were added; reflects edits by other processes."""
        return list(self._current().users)

    def get(self, name: str) -> User | None:
        return self._current().by_name.get(name)

    def lookup(self, address: str) -> User | None:
        """The user owning `address` (case-insensitive, exact match), or None."""
        try:
            key = validate_address(address)
        except DirectoryError:
            return None
        return self._current().by_address.get(key)

    def authenticate(self, name: str, password: str) -> bool:
        user = self.get(name)
        if user is None or not user.password_hash:
            # Same scrypt cost as for a real user, so timing does not reveal who exists.
            verify_password(_dummy_hash(), password)
            return False
        return verify_password(user.password_hash, password)

    # -- editing --------------------------------------------------------------------------

    def _edit(self, change: Callable[[_Snapshot], tuple[list[User], T]]) -> T:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            users, result = change(self._read())
            data = msgspec.json.format(msgspec.json.encode(_DirectoryFile(users=users)), indent=2)
            write_file_durably(self.path.parent, self.path.name, data + b"\n", mode=0o600)
        finally:
            os.close(fd)  # releases the flock
        return result

    @staticmethod
    def _addresses(addresses: list[str]) -> list[str]:
        if isinstance(addresses, str):
            raise DirectoryError(f"addresses {addresses!r}: expected a list of addresses")
        out: list[str] = []
        for a in addresses:
            norm = validate_address(a)
            if norm not in out:
                out.append(norm)
        return out

    @staticmethod
    def _hash(name: str, password: str | None, password_hash: str | None) -> str:
        if password_hash is not None:
            if password is not None:
                raise DirectoryError(f"password for {name!r}: give a password or a hash, "
                                     "not both")
            return validate_password_hash(password_hash)
        if password is None:
            return ""
        if not isinstance(password, str) or not password:
            raise DirectoryError(f"password for {name!r}: must be a non-empty string")
        return hash_password(password)

    @staticmethod
    def _check_free(snap: _Snapshot, name: str, addresses: list[str]) -> None:
        for a in addresses:
            owner = snap.by_address.get(a)
            if owner is not None and owner.name != name:
                raise DirectoryError(f"address {a!r}: already belongs to user {owner.name!r}")

    def add_user(self, name: str, addresses: list[str], password: str | None, *,
                 password_hash: str | None = None) -> User:
        """Add a user; DirectoryError if the name exists or an address is taken.

        `password` is hashed with scrypt; `password_hash` instead keeps a Dovecot-style
        "{SCHEME}hash" as given (PasswordHashError if it is unusable); neither: no POP login.
        """
        validate_user_name(name)
        addrs = self._addresses(addresses)
        # scrypt (or the foreign hash's trial check) outside the lock
        user = User(name, addrs, self._hash(name, password, password_hash))

        def change(snap: _Snapshot) -> tuple[list[User], User]:
            if name in snap.by_name:
                raise DirectoryError(f"user {name!r}: already exists")
            self._check_free(snap, name, addrs)
            return [*snap.users, user], user

        return self._edit(change)

    def remove_user(self, name: str) -> User:
        """Remove a user and return it; DirectoryError if unknown."""

        def change(snap: _Snapshot) -> tuple[list[User], User]:
            user = self._existing(snap, name)
            return [u for u in snap.users if u.name != name], user

        return self._edit(change)

    @staticmethod
    def _existing(snap: _Snapshot, name: str) -> User:
        user = snap.by_name.get(name)
        if user is None:
            raise DirectoryError(f"user {name!r}: no such user")
        return user

    def set_password(self, name: str, password: str | None, *,
                     password_hash: str | None = None) -> None:
        """Set (or with None, clear: no POP login) a user's password, or with
        `password_hash` store a Dovecot-style "{SCHEME}hash" as given."""
        new_hash = self._hash(name, password, password_hash)

        def change(snap: _Snapshot) -> tuple[list[User], None]:
            new = msgspec.structs.replace(self._existing(snap, name), password_hash=new_hash)
            return [new if u.name == name else u for u in snap.users], None

        self._edit(change)

    def set_addresses(self, name: str, addresses: list[str]) -> User:
        """Replace a user's addresses; DirectoryError if one belongs to someone else."""
        addrs = self._addresses(addresses)

        def change(snap: _Snapshot) -> tuple[list[User], User]:
            new = msgspec.structs.replace(self._existing(snap, name), addresses=addrs)
            self._check_free(snap, name, addrs)
            return [new if u.name == name else u for u in snap.users], new

        return self._edit(change)
