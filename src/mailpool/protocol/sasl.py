"""Server side of the SASL mechanisms PLAIN (RFC 4616) and LOGIN, sans-IO.

One shape for the SMTP (RFC 4954) and POP3 (RFC 5034) cores: a ``SaslServer`` runs one
exchange at a time. ``start(mechanism, initial_response)`` opens it, ``step(line)`` takes
each client line after that; both return a ``Challenge`` (send it, base64 encoded, and
read another line), the final ``Credentials``, or a ``SaslError`` naming what went wrong.
After ``Credentials`` or an error the exchange is over. Checking the password against the
directory is the driver's; nothing here does I/O.

Lines are handed over as received, without their line end: base64 text, ``*`` to cancel.
A line is limited to ``MAX_RESPONSE_LINE`` octets counted with a CRLF end (RFC 4954 4 sizes
buffers for 12288); a core whose line reader had to drop a longer line calls ``too_long()``.

Identities (authzid, authcid, the LOGIN user name) are strict UTF-8 without control
characters: they end up in logs and in the journal. Passwords are decoded UTF-8 with
"surrogateescape", so ``password.encode("utf-8", "surrogateescape")`` gives back the exact
octets the client sent (as the POP3 PASS command does).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "MAX_RESPONSE_LINE",
    "MECHANISMS",
    "Challenge",
    "Credentials",
    "SaslError",
    "SaslServer",
    "Step",
]

MAX_RESPONSE_LINE: Final = 12288  # octets of one client line, CRLF included
MECHANISMS: Final = ("PLAIN", "LOGIN")

# The LOGIN mechanism has no RFC: these are the challenges every client expects.
_LOGIN_USER: Final = b"Username:"
_LOGIN_PASSWORD: Final = b"Password:"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class SaslError(enum.Enum):
    """Why an exchange ended without credentials."""

    UNSUPPORTED = "unsupported"  # start(): a mechanism this server does not offer
    BAD_BASE64 = "bad-base64"  # a line (or initial response) that is not base64
    CANCELLED = "cancelled"  # the client sent "*"
    TOO_LONG = "too-long"  # a line over MAX_RESPONSE_LINE
    MALFORMED = "malformed"  # decoded, but not what the mechanism defines
    AUTHZID = "authzid"  # PLAIN asked to act as another identity: never allowed here


@dataclass(frozen=True)
class Challenge:
    """Send ``encoded()`` to the client (SMTP "334 ", POP3 "+ "), then read a line."""

    data: bytes

    def encoded(self) -> bytes:
        return base64.b64encode(self.data)


@dataclass(frozen=True)
class Credentials:
    authzid: str  # "" or equal to username
    username: str
    password: str = field(repr=False)


Step = Challenge | Credentials | SaslError


def _decode_base64(text: bytes) -> bytes | None:
    """Canonical RFC 4648 base64 (alphabet, padding, zero pad bits); None when it is not.
    Comparing with the re-encoding also refuses what Python's decoder lets through, such
    as padding after a complete group ("YWJj==")."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if base64.b64encode(data) == text else None


def _identity(raw: bytes) -> str | None:
    """A user name or authorization identity: non-empty UTF-8 without control characters."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text or _CONTROL_RE.search(text):
        return None
    return text


def _password(raw: bytes) -> str | None:
    if not raw or b"\0" in raw:
        return None
    return raw.decode("utf-8", "surrogateescape")


class SaslServer:
    """One connection's SASL exchanges (one at a time), for the ``mechanisms`` offered."""

    __slots__ = ("_username", "mechanism", "mechanisms")

    def __init__(self, mechanisms: Iterable[str] = MECHANISMS) -> None:
        self.mechanisms: tuple[str, ...] = tuple(m.upper() for m in mechanisms)
        unknown = set(self.mechanisms) - set(MECHANISMS)
        if unknown:
            raise ValueError(f"mechanisms not implemented: {sorted(unknown)}")
        self.mechanism: str | None = None  # of the exchange under way
        self._username: str | None = None  # LOGIN, between its two challenges

    @property
    def active(self) -> bool:
        """Whether an exchange is under way (its next line goes to step())."""
        return self.mechanism is not None

    def start(self, mechanism: str, initial_response: bytes | None) -> Step:
        """Open an exchange. ``initial_response`` is the base64 argument of the AUTH
        command, or None when it had none; "=" stands for an empty response (RFC 4954 4)."""
        if self.active:
            raise RuntimeError("a SASL exchange is already under way")
        name = mechanism.upper()
        if name not in self.mechanisms:
            return SaslError.UNSUPPORTED
        self.mechanism = name
        self._username = None
        if initial_response is None:
            return Challenge(b"" if name == "PLAIN" else _LOGIN_USER)
        if initial_response == b"=":
            return self._consume(b"")
        return self._response(initial_response)

    def step(self, line: bytes) -> Step:
        """The client's line answering the last challenge, without its line end."""
        if not self.active:
            raise RuntimeError("no SASL exchange is under way")
        if len(line) + 2 > MAX_RESPONSE_LINE:
            return self.too_long()
        if line == b"*":  # RFC 4954 4, RFC 5034 4: the client cancels
            return self._end(SaslError.CANCELLED)
        return self._response(line)

    def too_long(self) -> SaslError:
        """The client's line was over MAX_RESPONSE_LINE (and dropped): the exchange ends."""
        self._end(SaslError.TOO_LONG)
        return SaslError.TOO_LONG

    def _response(self, text: bytes) -> Step:
        data = _decode_base64(text)
        if data is None:
            return self._end(SaslError.BAD_BASE64)
        return self._consume(data)

    def _consume(self, data: bytes) -> Step:
        if self.mechanism == "PLAIN":
            return self._end(self._plain(data))
        if self._username is None:
            self._username = _identity(data)
            if self._username is None:
                return self._end(SaslError.MALFORMED)
            return Challenge(_LOGIN_PASSWORD)
        password = _password(data)
        if password is None:
            return self._end(SaslError.MALFORMED)
        return self._end(Credentials("", self._username, password))

    @staticmethod
    def _plain(data: bytes) -> Credentials | SaslError:
        """RFC 4616 2: [authzid] NUL authcid NUL passwd."""
        parts = data.split(b"\0")
        if len(parts) != 3:
            return SaslError.MALFORMED
        raw_authzid, raw_authcid, raw_password = parts
        username = _identity(raw_authcid)
        password = _password(raw_password)
        authzid = _identity(raw_authzid) if raw_authzid else ""
        if username is None or password is None or authzid is None:
            return SaslError.MALFORMED
        if authzid and authzid != username:
            return SaslError.AUTHZID
        return Credentials(authzid, username, password)

    def _end(self, result: Step) -> Step:
        self.mechanism = None
        self._username = None
        return result
