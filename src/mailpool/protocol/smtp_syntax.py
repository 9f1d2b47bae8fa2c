"""SMTP grammar shared by the server and client cores: no state machine, no I/O.

- Sentinels returned by the sans-IO cores (``NEED_DATA``, ``PAUSED``).
- Path and ESMTP parameter syntax (RFC 5321 4.1.2), xtext (RFC 3461 4).
- Replies (RFC 5321 4.2, enhanced codes RFC 2034/3463): the ``Reply`` value, its wire form,
  and ``ReplyParser`` which turns received bytes into ``Reply`` objects, bounded.
- ``LineReader``: cuts LF-terminated lines off a buffer without ever holding more than one
  line's limit of an unfinished line.
- ``received_with``: the protocol a Received header names (RFC 3848).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ADL_RE",
    "ATEXT",
    "DOMAIN_RE",
    "ENHANCED_RE",
    "MAILBOX_RE",
    "MAX_DOMAIN",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "NEED_DATA",
    "PARAM_RE",
    "PAUSED",
    "TOO_LONG",
    "LineReader",
    "Reply",
    "ReplyParser",
    "ReplySyntaxError",
    "Sentinel",
    "address_literal_ok",
    "enhanced_of",
    "hello_argument_ok",
    "is_mailbox",
    "parse_params",
    "parse_path",
    "path_length_ok",
    "received_with",
    "split_path",
    "xtext_decode",
    "xtext_encode",
]


class Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = Sentinel("NEED_DATA")
PAUSED: Final = Sentinel("PAUSED")
TOO_LONG: Final = Sentinel("TOO_LONG")  # LineReader: an over-long line has ended


# -- address and parameter syntax (RFC 5321 4.1.2) ------------------------------------------

ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{ATEXT}+(?:\.{ATEXT}+)*"
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_SUB_DOMAIN = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
DOMAIN_RE: Final = re.compile(_DOMAIN)
MAILBOX_RE: Final = re.compile(
    rf"(?:{_DOT_STRING}|{_QUOTED_STRING})@(?:({_DOMAIN})|\[([^\[\]\\]*)\])"
)
ADL_RE: Final = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
PARAM_RE: Final = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?")
_SNUM_RE = re.compile(r"[0-9]{1,3}")


def address_literal_ok(literal: str) -> bool:
    """The text between [ and ] of an address literal: IPv4 or "IPv6:" + IPv6."""
    if literal[:5].lower() == "ipv6:":
        addr = literal[5:]
        if "%" in addr:  # zone ids are not part of RFC 5321 IPv6-addr
            return False
        try:
            ipaddress.IPv6Address(addr)
        except ValueError:
            return False
        return True
    parts = literal.split(".")
    return len(parts) == 4 and all(_SNUM_RE.fullmatch(p) and int(p) <= 255 for p in parts)


def is_mailbox(addr: str) -> bool:
    """RFC 5321 Mailbox: local-part "@" (domain / address-literal)."""
    m = MAILBOX_RE.fullmatch(addr)
    if m is None:
        return False
    return m.group(2) is None or address_literal_ok(m.group(2))


def split_path(text: str) -> tuple[str, str] | None:
    """Split "<path> params" into (path without brackets, params). None = no <...>."""
    if not text.startswith("<"):
        return None
    in_quote = False
    i = 1
    while i < len(text):
        c = text[i]
        if in_quote and c == "\\":
            i += 2  # quoted-pair: the next char is literal, even '"' or '>'
            continue
        if c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            rest = text[i + 1 :]
            if rest and rest[0] not in " \t":
                return None
            return text[1:i], rest
        i += 1
    return None


def parse_path(path: str, *, null_ok: bool, postmaster_ok: bool) -> str | None:
    """Validate a path's content; return the mailbox (source route dropped) or None."""
    if path == "":
        return "" if null_ok else None
    if postmaster_ok and path.lower() == "postmaster":
        return path
    if path.startswith("@"):
        m = ADL_RE.match(path)
        if m is None:
            return None
        path = path[m.end() :]  # RFC 5321 4.1.1.3: source routes MUST be ignored
    return path if is_mailbox(path) else None


# RFC 5321 4.5.3.1.1-3. Counted as sent: a quoted local part with its quotes, the path
# with its "<" and ">" (which is why a mailbox can have at most 254 octets).
MAX_LOCAL_PART: Final = 64
MAX_DOMAIN: Final = 255
MAX_PATH: Final = 256
_HELLO_LITERAL_RE = re.compile(r"\[([!-Z^-~]*)\]")  # inside: printable ASCII except [ \ ]


def path_length_ok(path: str) -> bool:
    """The size limits of RFC 5321 4.5.3.1 for a path's content as sent (between "<" and
    ">", source route included). Within MAX_PATH the domain cannot exceed MAX_DOMAIN, so
    that leaves the local part to check."""
    if len(path) + 2 > MAX_PATH:
        return False
    if path.startswith("@"):
        m = ADL_RE.match(path)
        if m is not None:
            path = path[m.end() :]
    local, at, _domain = path.rpartition("@")
    return not at or len(local) <= MAX_LOCAL_PART


def hello_argument_ok(arg: str) -> bool:
    """HELO/EHLO argument (RFC 5321 4.1.1.1): one domain or address literal, nothing else.
    Neither grammar admits a space, a control character or an 8-bit octet."""
    if len(arg) > MAX_DOMAIN:
        return False
    m = _HELLO_LITERAL_RE.fullmatch(arg)
    if m is not None:
        return address_literal_ok(m.group(1))
    return DOMAIN_RE.fullmatch(arg) is not None


def parse_params(text: str) -> dict[str, str | None] | str:
    """Parse esmtp-params; return the dict (UPPER keys), or the first malformed token."""
    params: dict[str, str | None] = {}
    for token in text.split():
        m = PARAM_RE.fullmatch(token)
        if m is None:
            return token
        params[m.group(1).upper()] = m.group(2)
    return params


# -- xtext (RFC 3461 4) ---------------------------------------------------------------------

_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_HEXCHAR_RE = re.compile(r"\+([0-9A-F]{2})")


def xtext_decode(s: str) -> str | None:
    """Decode xtext; None when malformed. Decoded octets are read as UTF-8 (the inverse of
    xtext_encode), falling back to Latin-1 so that any valid xtext decodes."""
    if not _XTEXT_RE.fullmatch(s):
        return None
    if "+" not in s:
        return s
    raw = _HEXCHAR_RE.sub(lambda m: chr(int(m.group(1), 16)), s).encode("latin-1")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def xtext_encode(s: str) -> str:
    """Encode text as xtext: "+", "=", controls, space and non-ASCII (as UTF-8) become +XX."""
    out: list[str] = []
    for ch in s:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


# -- replies ----------------------------------------------------------------------------

ENHANCED_RE: Final = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
_ENHANCED_PREFIX_RE = re.compile(r"([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")
_REPLY_LINE_RE = re.compile(r"([2-5][0-9]{2})([- ]|$)(.*)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str | None
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code <= 299

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code <= 499

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code <= 599

    def format(self) -> bytes:
        """The wire form; the enhanced code starts every line, as servers write it."""
        if not self.lines:
            raise ValueError("a reply has at least one line")
        out = bytearray()
        last = len(self.lines) - 1
        for i, line in enumerate(self.lines):
            if "\r" in line or "\n" in line:
                raise ValueError("reply text must not contain CR or LF")
            text = " ".join(p for p in (self.enhanced, line) if p)
            sep = "-" if i < last else " "
            wire = f"{self.code}{sep}{text}" if text or sep == "-" else f"{self.code}"
            out += wire.encode("ascii", "replace") + b"\r\n"
        return bytes(out)


def enhanced_of(reply: Reply) -> str:
    """The reply's enhanced status code, or the class default (X.0.0) when it has none."""
    if reply.enhanced is not None:
        return reply.enhanced
    return f"{reply.code // 100}.0.0" if reply.code >= 400 else "2.0.0"


class ReplySyntaxError(ValueError):
    """A reply that breaks RFC 5321 4.2 grammar or the parser's bounds."""

    def __init__(self, message: str, text: str) -> None:
        super().__init__(f"{message}: {text[:80]!r}")
        self.text = text


class LineReader:
    """Cuts lines ending in LF (CRLF, or a bare LF: lenient reading) off ``buffer``.

    ``max_line`` counts the octets of a line including its line end. A line that cannot
    fit any more is dropped from the buffer as it arrives (so the buffer never holds more
    than ``max_line`` octets of an unfinished line) and reported as ``TOO_LONG`` once its
    end arrives. The buffer is shared: the owner may consume it by other means too.
    """

    __slots__ = ("buffer", "discarding", "max_line")

    def __init__(self, buffer: bytearray, max_line: int) -> None:
        self.buffer = buffer
        self.max_line = max_line
        self.discarding = False  # inside an over-long line whose end has not come yet

    def read_line(self) -> bytes | Sentinel:
        """The next line without its line end, ``NEED_DATA`` or ``TOO_LONG``."""
        buf = self.buffer
        end = buf.find(b"\n")
        if end < 0:
            # Any line continuing this buffer is already longer than allowed.
            if len(buf) >= self.max_line:
                self.discarding = True
                buf.clear()
            return NEED_DATA
        raw = bytes(buf[: end + 1])
        del buf[: end + 1]
        if self.discarding or len(raw) > self.max_line:
            self.discarding = False
            return TOO_LONG
        return raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]


class ReplyParser:
    """Turns received bytes into complete ``Reply`` objects (multi-line aware), bounded by
    ``max_line`` octets per line (line end included) and ``max_lines`` lines per reply.
    A line is a code whose first digit is 2-5 (SMTP has no 1yz or 6yz replies), then "-",
    " " or the line end; text is read as UTF-8 with replacement.

    Feed bytes with ``feed``; ``next_reply`` returns the next complete reply or None, and
    raises ``ReplySyntaxError`` on a malformed or over-long reply (the parser is then
    unusable: the stream cannot be resynchronised).
    """

    def __init__(self, *, max_line: int = 2048, max_lines: int = 200) -> None:
        self._buf = bytearray()
        self._reader = LineReader(self._buf, max_line)
        self._max_lines = max_lines
        self._code = ""
        self._lines: list[str] = []

    @property
    def buffered(self) -> bool:
        """Whether any octet of a reply not yet returned has been received."""
        return bool(self._buf) or bool(self._lines)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_reply(self) -> Reply | None:
        buf, limit = self._buf, self._reader.max_line
        while True:
            # Checked before the reader drops anything, so the error can show the line, and
            # without waiting for the end of a line that is already too long.
            if buf.find(b"\n", 0, limit) < 0 and len(buf) >= limit:
                raise ReplySyntaxError("reply line too long", buf[:limit].decode("latin-1"))
            raw = self._reader.read_line()
            if not isinstance(raw, bytes):  # NEED_DATA: TOO_LONG was ruled out above
                return None
            line = raw.decode("utf-8", "replace")
            m = _REPLY_LINE_RE.fullmatch(line)
            if m is None or "\r" in line:
                raise ReplySyntaxError("malformed reply line", line)
            code, sep, text = m.groups()
            if self._lines and code != self._code:
                raise ReplySyntaxError("reply code changed within a reply", line)
            if len(self._lines) >= self._max_lines:
                raise ReplySyntaxError("too many lines in one reply", line)
            self._code = code
            self._lines.append(text)
            if sep != "-":
                return self._finish()

    def _finish(self) -> Reply:
        code, lines = int(self._code), self._lines
        self._code, self._lines = "", []
        # An enhanced code counts only when its class matches the reply's (a "250 5.1.1"
        # is text); then every line's leading code is split off.
        m = _ENHANCED_PREFIX_RE.match(lines[0])
        if m is None or m.group(1)[0] != str(code)[0]:
            return Reply(code, None, tuple(lines))
        stripped = []
        for line in lines:
            lm = _ENHANCED_PREFIX_RE.match(line)
            stripped.append(line[lm.end() :] if lm else line)
        return Reply(code, m.group(1), tuple(stripped))


# -- trace fields (RFC 5321 4.4) -----------------------------------------------------------


def received_with(esmtp: bool, tls: bool, auth: bool) -> str:
    """The protocol of a Received header's "with" clause (RFC 5321 4.4, RFC 3848): "SMTP"
    after HELO; after EHLO "ESMTP", "S" added under TLS and "A" once authenticated. STARTTLS
    and AUTH are EHLO extensions, so a HELO session has neither."""
    if not esmtp:
        return "SMTP"
    return "ESMTP" + ("S" if tls else "") + ("A" if auth else "")
