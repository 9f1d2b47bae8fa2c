"""The example content check: a message needs a From header, and a marked one is quarantined.

RFC 5322 3.6 requires a From field in every message; one without it is refused with
550 5.6.0. A message carrying the marker header (by default SpamAssassin's
"X-Spam-Flag: YES", set by a filter upstream) is kept in quarantine. Configure it as

    [[check]]
    function = "mailpool.checks.example:check"
    options = { marker = "X-Spam-Flag: YES" }   # optional: "Name: value", or "Name" alone

The header section is read the way Postfix's cleanup reads it: lines up to the first empty
line; a line starting with a space or tab continues the field before it; the first line that
is neither a field nor a continuation ends the section (the rest is body).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

from mailpool.plugins import Accept, CheckEnvelope, Quarantine, Reject, Verdict

DEFAULT_MARKER = "X-Spam-Flag: YES"
NO_FROM = Reject(550, "5.6.0", "Message has no From header")
# Fields read between two yields to the asyncio loop: a header section of many thousand
# lines must not hold up the other sessions' checks on the same loop.
YIELD_EVERY = 512
# field-name = 1*ftext (printable ASCII but ":"); obsolete syntax allows blanks before ":".
_FIELD_RE = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def header_fields(message: bytes) -> Iterator[tuple[str, str]]:
    """(name, unfolded value) of each field of the header section, in order. Values keep
    their inner blanks and are stripped at both ends; bytes that are not UTF-8 are
    replaced. Only the header section is looked at, never the body."""
    name: str | None = None
    value: list[bytes] = []
    pos, end = 0, len(message)
    while pos < end:
        cut = message.find(b"\n", pos)
        cut = end if cut < 0 else cut
        line = message[pos:cut].removesuffix(b"\r")
        pos = cut + 1
        if line[:1] in (b" ", b"\t") and name is not None:
            value.append(line)
            continue
        if name is not None:
            yield name, b"".join(value).decode("utf-8", "replace").strip()
            name = None
        m = _FIELD_RE.match(line)
        if m is None:
            return  # the empty line, or a line that starts the body
        name = m.group(1).decode("ascii")
        value = [line[m.end():]]
    if name is not None:
        yield name, b"".join(value).decode("utf-8", "replace").strip()


def parse_marker(marker: str) -> tuple[str, str | None]:
    """"Name: value" -> (name, value); "Name" -> (name, None): any value. ValueError when
    the name is not a field name."""
    name, colon, value = marker.partition(":")
    name = name.strip()
    if not name or not all("!" <= ch <= "~" for ch in name):
        raise ValueError(f"marker {marker!r} does not start with a header field name")
    return name, (value.strip() if colon else None)


async def check(envelope: CheckEnvelope, message: bytes, *,
                marker: str = DEFAULT_MARKER) -> Verdict:
    want_name, want_value = parse_marker(marker)
    has_from = False
    marked = False
    for i, (name, value) in enumerate(header_fields(message), start=1):
        if i % YIELD_EVERY == 0:
            await asyncio.sleep(0)
        has_from = has_from or name.lower() == "from"
        if name.lower() == want_name.lower() and (
                want_value is None or value.lower() == want_value.lower()):
            marked = True
    if not has_from:
        return NO_FROM
    if marked:
        return Quarantine(f"marked {marker.strip()}")
    return Accept()
