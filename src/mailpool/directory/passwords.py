"""Password hashing and checking: the project's salted scrypt, and Dovecot's {SCHEME}
hashes kept as imported (users moved from Dovecot log in without a password reset)."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from typing import NamedTuple

# The foreign schemes' libraries (argon2-cffi, bcrypt, libpass for SHA256/512-CRYPT) are
# imported at a scheme's first use: about 5 MiB that every job would otherwise carry for
# the users moved from Dovecot that many sites never have. libpass is passlib's maintained
# fork (same `passlib` package); its SHA-crypt is pure Python on hashlib and compares
# checksums with hmac.compare_digest.
from mailpool.directory.model import DirectoryError, PasswordHashError, User

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


def _argon2_scheme(kind_name: str) -> _Scheme:
    prefix = f"$argon2{kind_name.lower()}$"

    def check(value: str) -> None:
        import argon2

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
        import argon2

        try:
            return argon2.low_level.verify_secret(value.encode("ascii"), secret,
                                                  argon2.Type[kind_name])
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
    import bcrypt

    if value.startswith("$2y$"):
        value = "$2b$" + value[4:]
    return bcrypt.checkpw(secret[:72], value.encode("ascii"))


def _sha_crypt_scheme(handler_name: str) -> _Scheme:
    def handler() -> type:
        import passlib.hash

        return getattr(passlib.hash, handler_name)

    def check(value: str) -> None:
        rounds = handler().from_string(value).rounds  # ValueError naming what is malformed
        if rounds > _SHA_CRYPT_MAX_ROUNDS:
            raise ValueError(f"rounds={rounds} is above {_SHA_CRYPT_MAX_ROUNDS}")

    def verify(value: str, secret: bytes) -> bool:
        return bool(handler().verify(secret, value))

    return _Scheme("libpass", check, verify)


_FOREIGN: dict[str, _Scheme] = {
    "ARGON2I": _argon2_scheme("I"),
    "ARGON2ID": _argon2_scheme("ID"),
    "BLF-CRYPT": _Scheme("bcrypt", _bcrypt_check, _bcrypt_verify),
    "SHA256-CRYPT": _sha_crypt_scheme("sha256_crypt"),
    "SHA512-CRYPT": _sha_crypt_scheme("sha512_crypt"),
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


def password_hash_for(name: str, password: str | None, password_hash: str | None) -> str:
    """What to store for a new password: scrypt of `password`, a checked foreign
    `password_hash` as given, or "" (no POP login) for neither."""
    if password_hash is not None:
        if password is not None:
            raise DirectoryError(f"password for {name!r}: give a password or a hash, not both")
        return validate_password_hash(password_hash)
    if password is None:
        return ""
    if not isinstance(password, str) or not password:
        raise DirectoryError(f"password for {name!r}: must be a non-empty string")
    return hash_password(password)


def check_login(user: User | None, password: str) -> bool:
    """The password check of a login, for a user already looked up (None: unknown)."""
    if user is None or not user.password_hash:
        # Same scrypt cost as for a real user, so timing does not reveal who exists.
        verify_password(_dummy_hash(), password)
        return False
    return verify_password(user.password_hash, password)
