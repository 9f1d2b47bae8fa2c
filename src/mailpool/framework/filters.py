"""The source's virus filters ("Filter e-mail to prevent virus proliferation"), as pure logic.

A rule names an originator, a subject, an attachment file name and/or a MIME type, each a
pattern where `*` stands for any run of characters (also none) and the rest is compared
literally and case-insensitively against the whole value. Every criterion a rule gives must
match somewhere in the message (independently: the attachment and the MIME type need not be
the same part); rules are tried in order and the first match wins.

The message is parsed by the standard library's `email` package, never by hand. What the
filters look at:
- originator: the envelope sender as given (`<>` is ""), not the From header;
- subject: every Subject header of the top-level message (RFC 2047 decoded; no header counts
  as ""); the subjects of forwarded messages inside it are not the mail's subject;
- attachment: every `filename` (Content-Disposition) and `name` (Content-Type) parameter of
  every part, nested message/rfc822 parts included, RFC 2231 and RFC 2047 decoded, each also
  without a directory and without the trailing dots and spaces Windows ignores;
- MIME type: the type/subtype of every part, the top level included.

Each part is read twice, through policy.default and through a compat32 view of its raw
headers, and the values of both count: the modern header parser drops parameters it finds
malformed or repeated (`filename="ok.txt"; filename="evil.exe"`), which a mail client may still
use. If the modern parse itself raises (deeply nested comments in a header make its parser
recurse out), the message is parsed again with compat32 alone, which does not parse values.

Bounds: parsing stops once max_parts parts exist or a part would sit deeper than max_depth
(the top-level message is depth 0). The parser's own message factory enforces this, so a
message of a million parts costs max_parts parts of work and nesting never recurses past
max_depth. What was parsed before the bound is filtered as usual; whatever lies beyond it
cannot match (such a message is not treated as a match by itself).

No exception escapes check() for any content: odd bytes and broken MIME become what the
package makes of them (its defects are ignored here), and a value that cannot be read through
one view is taken from the other.
"""

from __future__ import annotations

import email
import email.parser
import email.policy
import email.utils
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.message import Message
from email.policy import EmailPolicy, Policy

from mailpool.config import FilterRule

ACTIONS = ("keep", "discard")
# Longest value quoted in a reason (subjects can be as long as the message).
SHOW_MAX = 200


def wildcard(pattern: str) -> re.Pattern[str]:
    """Compile a filter pattern: `*` is any run of characters, all else literal, no case.

    Use with fullmatch(). The pieces between stars are matched leftmost inside atomic groups,
    which is exact for star-only patterns and never backtracks into a piece, so a pattern
    like `*a*a*a*b` cannot take exponential time over a long hostile subject.
    """
    pieces = pattern.split("*")
    if len(pieces) == 1:
        body = re.escape(pattern)
    else:
        middle = "".join(f"(?>.*?{re.escape(p)})" for p in pieces[1:-1] if p)
        body = re.escape(pieces[0]) + middle + ".*" + re.escape(pieces[-1])
    return re.compile(body, re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class FilterMatch:
    index: int  # which rule (0-based, as filter[index] in the configuration)
    action: str  # "keep" | "discard"
    reason: str  # e.g. 'rule 2: attachment "lovebug.vbs" matches "*.vbs"'


@dataclass
class _Facts:
    """What the rules can look at in one message: ordered sets (dicts), in message order."""

    subjects: dict[str, None] = field(default_factory=dict)
    names: dict[str, None] = field(default_factory=dict)
    types: dict[str, None] = field(default_factory=dict)

    def values(self, criterion: str) -> Iterable[str]:
        if criterion == "subject":
            return self.subjects
        return self.names if criterion == "attachment" else self.types


# Criteria in the order they are checked and reported: (rule field, label in the reason).
_CRITERIA = (
    ("originator", "originator"),
    ("subject", "subject"),
    ("attachment", "attachment"),
    ("mime_type", "MIME type"),
)


class _Rule:
    def __init__(self, index: int, rule: FilterRule) -> None:
        if rule.action not in ACTIONS:
            raise ValueError(f"filter[{index}].action: {rule.action!r}: must be keep or discard")
        self.index = index
        self.action = rule.action
        # (field, label, pattern as written, compiled) for each criterion given.
        self.criteria = [
            (name, label, getattr(rule, name), wildcard(getattr(rule, name)))
            for name, label in _CRITERIA
            if getattr(rule, name)
        ]
        if not self.criteria:
            # A rule without criteria would keep or discard every message.
            raise ValueError(f"filter[{index}]: names no criterion")


class Filters:
    """The configured rules, compiled once; check() is then pure and cannot raise."""

    def __init__(
        self, rules: Sequence[FilterRule], *, max_parts: int = 1000, max_depth: int = 10
    ) -> None:
        if max_parts < 1 or max_depth < 0:
            raise ValueError("max_parts must be >= 1 and max_depth >= 0")
        self._rules = [_Rule(i, rule) for i, rule in enumerate(rules)]
        self._max_parts = max_parts
        self._max_depth = max_depth
        used = {name for rule in self._rules for name, *_ in rule.criteria}
        self._needs_parse = bool(used & {"subject", "attachment", "mime_type"})
        self._needs_body = bool(used & {"attachment", "mime_type"})

    def check(self, originator: str, content: bytes) -> FilterMatch | None:
        sender = _envelope_address(originator)
        facts: _Facts | None = None
        for rule in self._rules:
            found: list[str] = []
            for name, label, pattern, regex in rule.criteria:
                if name == "originator":
                    values: Iterable[str] = (sender,)
                else:
                    if facts is None:  # parsed at most once, and only if a rule needs it
                        facts = self._facts(content)
                    values = facts.values(name)
                hit = next((v for v in values if _matches(name, v, regex)), None)
                if hit is None:
                    break
                found.append(f"{label} {_show(hit)} matches {_show(pattern)}")
            else:
                reason = f"rule {rule.index}: " + ", ".join(found)
                return FilterMatch(rule.index, rule.action, reason)
        return None

    def _facts(self, content: bytes) -> _Facts:
        facts = _Facts()
        if not self._needs_parse:
            return facts
        bounds = (self._max_parts, self._max_depth, self._needs_body)
        modern = True
        root = _parse(content, email.policy.default, *bounds)
        if root is None:  # the modern parser raised; compat32 does not parse header values
            modern = False
            root = _parse(content, email.policy.compat32, *bounds)
        if root is not None:
            for view in _views(root, modern):
                facts.subjects.update(dict.fromkeys(s.strip() for s in _subjects(view)))
            if self._needs_body:
                for part in _walk(root):
                    for view in _views(part, modern):
                        facts.types.update(dict.fromkeys(_content_types(view)))
                        facts.names.update(dict.fromkeys(_file_names(view)))
        if not facts.subjects:  # no Subject header: the subject is empty
            facts.subjects[""] = None
        return facts


def _matches(name: str, value: str, regex: re.Pattern[str]) -> bool:
    if regex.fullmatch(value):
        return True
    if name != "attachment":
        return False
    # A file name also counts as its last path element and without the trailing dots and
    # spaces Windows ignores: `..\\lovebug.vbs. ` opens as lovebug.vbs.
    base = re.split(r"[/\\]", value)[-1]
    return any(regex.fullmatch(alt) for alt in (base, value.rstrip(" ."), base.rstrip(" .")))


def _envelope_address(originator: str) -> str:
    address = originator.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    return address


class _Bound(Exception):
    """Raised inside the parser to stop it at max_parts / max_depth."""


class _Budget:
    def __init__(self, max_parts: int, max_depth: int) -> None:
        self.parts_left = max_parts
        self.max_depth = max_depth
        self.root: _Part | None = None

    def new_part(self, policy: Policy) -> _Part:
        if self.parts_left <= 0:
            raise _Bound
        self.parts_left -= 1
        part = _Part(policy, self)
        if self.root is None:
            self.root = part
        return part


class _Part(Message):
    """A message part that knows its depth; the parser attaches every child through attach()."""

    def __init__(self, policy: Policy, budget: _Budget) -> None:
        super().__init__(policy)
        self.budget = budget
        self.depth = 0
        self._fetched: dict[tuple[str, str], object] = {}

    def get(self, name: str, failobj: object = None) -> object:  # type: ignore[override]
        """Message.get, remembering each parsed header: the parser asks for the content type
        of every part five times, and policy.default parses the header anew each time."""
        wanted = name.lower()
        for key in self.raw_items():
            if key[0].lower() == wanted:
                if key not in self._fetched:
                    self._fetched[key] = self.policy.header_fetch_parse(*key)
                return self._fetched[key]
        return failobj

    def attach(self, payload: Message) -> None:  # type: ignore[override]
        if isinstance(payload, _Part):
            payload.depth = self.depth + 1
            if payload.depth > self.budget.max_depth:
                raise _Bound
        super().attach(payload)


def _parse(content: bytes, policy: Policy, max_parts: int, max_depth: int,
           body: bool) -> Message | None:
    """Parse within the bounds; None if the parser fails (not counting hitting the bound)."""
    budget = _Budget(max_parts, max_depth)
    bounded = policy.clone(message_factory=budget.new_part)
    try:
        if body:
            email.message_from_bytes(content, policy=bounded)
        else:
            email.parser.BytesParser(policy=bounded).parsebytes(content, headersonly=True)
    except _Bound:
        pass  # keep what was parsed before the bound
    except Exception:  # RecursionError included: hostile headers nest comments deeply
        return None
    return budget.root


def _walk(root: Message) -> Iterator[Message]:
    """Every part, depth first, without recursion (the parse already bounded the tree)."""
    stack = [root]
    while stack:
        part = stack.pop()
        yield part
        payload = part.get_payload() if part.is_multipart() else None
        if isinstance(payload, list):
            stack.extend(reversed([p for p in payload if isinstance(p, Message)]))


def _views(part: Message, modern: bool) -> Iterator[Message]:
    """The part as parsed by policy.default (if it was) and a compat32 view of its raw headers."""
    if modern:
        yield part
    view = Message(policy=email.policy.compat32)
    try:
        for name, value in part.raw_items():
            view[name] = value
        view.set_default_type(part.get_default_type())
    except Exception:
        return
    yield view


def _is_compat(view: Message) -> bool:
    return not isinstance(view.policy, EmailPolicy)


def _subjects(view: Message) -> list[str]:
    try:
        values = view.get_all("subject") or []
        if _is_compat(view):  # raw (or a Header for 8-bit bytes): unfold, then decode
            return [_decode_words("".join(str(v).splitlines())) for v in values]
        return [str(v) for v in values]
    except Exception:
        return []


def _content_types(view: Message) -> list[str]:
    try:
        return [view.get_content_type()]
    except Exception:
        return []


def _file_names(view: Message) -> list[str]:
    names = []
    for header, param in (("content-disposition", "filename"), ("content-type", "name")):
        try:
            params = view.get_params(header=header) or []
            for key, value in params[1:]:  # the first is the type or disposition itself
                if key.lower() != param:
                    continue
                name = email.utils.collapse_rfc2231_value(value).strip()
                names.append(_decode_words(name) if _is_compat(view) else name)
        except Exception:
            continue
    return names


def _decode_words(value: str) -> str:
    """RFC 2047 encoded words in a raw compat32 value; the value itself if they do not decode."""
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value)))
    except Exception:
        return value


def _show(value: str) -> str:
    """Quote a value for a reason line: no control characters or lone surrogates reach a log."""
    text = value if len(value) <= SHOW_MAX else value[:SHOW_MAX] + "..."
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return '"' + "".join(out) + '"'
