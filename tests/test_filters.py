"""The source's virus filters, as pure logic: patterns, criteria, MIME walking, hostile input."""

from __future__ import annotations

import fnmatch
import random
import time
from email.message import EmailMessage

import pytest

from mailpool.config import FilterRule
from mailpool.framework import filters as filters_module
from mailpool.framework.filters import FilterMatch, Filters, wildcard

SENDER = "joe@example.org"


def rule(**kw: str) -> FilterRule:
    return FilterRule(**kw)


def check(rules: list[FilterRule], content: bytes, originator: str = SENDER,
          **bounds: int) -> FilterMatch | None:
    return Filters(rules, **bounds).check(originator, content)


def mail(subject: str = "Hello", body: str = "Hi.\n",
         attachments: tuple[tuple[str, str], ...] = ()) -> EmailMessage:
    """A message with (file name, type/subtype) attachments."""
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = "ann@example.net"
    msg["Subject"] = subject
    msg.set_content(body)
    for filename, ctype in attachments:
        maintype, subtype = ctype.split("/")
        msg.add_attachment(b"MZ\x90\x00", maintype=maintype, subtype=subtype, filename=filename)
    return msg


def multipart(*parts: bytes, boundary: bytes = b"BOUND") -> bytes:
    """A raw multipart/mixed message from raw parts (headers, blank line, body)."""
    out = [b"From: joe@example.org\r\nSubject: raw\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n"]
    for part in parts:
        out.append(b"--" + boundary + b"\r\n" + part + b"\r\n")
    out.append(b"--" + boundary + b"--\r\n")
    return b"".join(out)


LOVEBUG = mail("ILOVEYOU", attachments=(("LOVE-LETTER-FOR-YOU.TXT.vbs", "text/vbscript"),))


# -- patterns ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "value", "expected"), [
    ("*", "", True),
    ("*", "anything at all\r\nfolded", True),
    ("*.vbs", "lovebug.vbs", True),
    ("*.vbs", "LOVEBUG.VBS", True),
    ("*.vbs", ".vbs", True),
    ("*.vbs", "lovebug.vbs.txt", False),
    ("*.vbs", "lovebug.vb", False),
    ("*@us.ibm.com", "Joe@US.IBM.com", True),
    ("*@us.ibm.com", "joe@us.ibm.com.evil.org", False),
    ("*@us.ibm.com", "joe@xus.ibm.com", False),
    ("image/*", "image/jpeg", True),
    ("image/*", "application/image", False),
    ("ILOVEYOU", "iloveyou", True),
    ("ILOVEYOU", "Fwd: ILOVEYOU", False),
    ("*ILOVEYOU*", "Fwd: ILOVEYOU!", True),
    ("a*b*c", "aXbYc", True),
    ("a*b*c", "acb", False),
    ("ab*ba", "aba", False),  # the pieces may not overlap
    ("ab*ba", "abba", True),
    ("*ab*ab", "abab", True),
    ("*ab*ab", "aab", False),
    ("**", "x", True),
    ("x?[a].", "X?[A].", True),  # only * is special
    ("x?[a].", "xy[a].", False),
    ("x?[a].", "x?a_", False),
])
def test_wildcard(pattern: str, value: str, expected: bool) -> None:
    assert (wildcard(pattern).fullmatch(value) is not None) is expected


def test_wildcard_agrees_with_fnmatch_on_random_patterns() -> None:
    rng = random.Random(1)
    for _ in range(3000):
        pattern = "".join(rng.choice("aAb*?[") for _ in range(rng.randint(0, 7)))
        value = "".join(rng.choice("aAb?[") for _ in range(rng.randint(0, 9)))
        # fnmatch with ? and [ made literal is the reference.
        literal = pattern.lower().replace("[", "[[]").replace("?", "[?]")
        expected = fnmatch.fnmatchcase(value.lower(), literal)
        assert (wildcard(pattern).fullmatch(value) is not None) is expected, (pattern, value)


def test_wildcard_does_not_backtrack_exponentially() -> None:
    # `.*a.*a.*a.*a.*a.*b` against 100000 a's would not finish; the atomic pieces are linear.
    started = time.perf_counter()
    assert wildcard("*a*a*a*a*a*b").fullmatch("a" * 100_000) is None
    assert time.perf_counter() - started < 2.0


# -- each criterion alone ---------------------------------------------------------------------


def test_originator_alone_case_insensitive() -> None:
    rules = [rule(originator="*@US.IBM.COM")]
    assert check(rules, b"", originator="fred@us.ibm.com") == FilterMatch(
        0, "keep", 'rule 0: originator "fred@us.ibm.com" matches "*@US.IBM.COM"')
    assert check(rules, b"", originator="<Fred@Us.Ibm.Com>") is not None
    assert check(rules, b"", originator="fred@ibm.com") is None


def test_null_sender_is_empty() -> None:
    assert check([rule(originator="*")], b"", originator="<>") is not None
    assert check([rule(originator="*@*")], b"", originator="<>") is None


def test_subject_alone() -> None:
    rules = [rule(action="discard", subject="iloveyou")]
    assert check(rules, LOVEBUG.as_bytes()) == FilterMatch(
        0, "discard", 'rule 0: subject "ILOVEYOU" matches "iloveyou"')
    assert check(rules, mail("I LOVE YOU").as_bytes()) is None


def test_subject_is_stripped_and_any_subject_header_counts() -> None:
    raw = b"Subject: harmless\r\nSubject:   ILOVEYOU  \r\n\r\nbody\r\n"
    assert check([rule(subject="ILOVEYOU")], raw) is not None


def test_missing_subject_is_empty() -> None:
    raw = b"From: joe@example.org\r\n\r\nbody\r\n"
    assert check([rule(subject="*")], raw) is not None
    assert check([rule(subject="?*")], raw) is None


def test_attachment_alone() -> None:
    rules = [rule(attachment="*.vbs")]
    assert check(rules, LOVEBUG.as_bytes()) == FilterMatch(
        0, "keep", 'rule 0: attachment "LOVE-LETTER-FOR-YOU.TXT.vbs" matches "*.vbs"')
    clean = mail(attachments=(("photo.jpg", "image/jpeg"),))
    assert check(rules, clean.as_bytes()) is None


def test_attachment_star_needs_an_attachment() -> None:
    assert check([rule(attachment="*")], mail().as_bytes()) is None
    assert check([rule(attachment="*")], LOVEBUG.as_bytes()) is not None


def test_mime_type_alone() -> None:
    msg = mail(attachments=(("setup.exe", "application/x-msdownload"),))
    assert check([rule(mime_type="application/x-MSDOWNLOAD")], msg.as_bytes()) == FilterMatch(
        0, "keep",
        'rule 0: MIME type "application/x-msdownload" matches "application/x-MSDOWNLOAD"')
    assert check([rule(mime_type="image/*")], msg.as_bytes()) is None


def test_mime_type_includes_top_level_and_wildcards() -> None:
    msg = mail(attachments=(("a.jpg", "image/jpeg"),))
    assert check([rule(mime_type="multipart/mixed")], msg.as_bytes()) is not None
    assert check([rule(mime_type="IMAGE/*")], msg.as_bytes()) is not None
    assert check([rule(mime_type="text/plain")], mail().as_bytes()) is not None


# -- several criteria, rule order -------------------------------------------------------------


def test_every_criterion_given_must_match() -> None:
    both = rule(originator="*@example.org", attachment="*.vbs")
    assert check([both], LOVEBUG.as_bytes()) == FilterMatch(
        0, "keep", 'rule 0: originator "joe@example.org" matches "*@example.org", '
        'attachment "LOVE-LETTER-FOR-YOU.TXT.vbs" matches "*.vbs"')
    assert check([both], LOVEBUG.as_bytes(), originator="joe@example.net") is None
    assert check([both], mail().as_bytes()) is None
    four = rule(originator="joe@*", subject="*love*", attachment="*.txt.vbs",
                mime_type="text/vbscript")
    assert check([four], LOVEBUG.as_bytes()) is not None
    assert check([rule(originator="joe@*", subject="*love*", attachment="*.txt.vbs",
                       mime_type="image/*")], LOVEBUG.as_bytes()) is None


def test_first_matching_rule_wins() -> None:
    rules = [
        rule(action="keep", subject="nothing like this"),
        rule(action="discard", attachment="*.vbs"),
        rule(action="keep", subject="ILOVEYOU"),
    ]
    assert check(rules, LOVEBUG.as_bytes()) == FilterMatch(
        1, "discard", 'rule 1: attachment "LOVE-LETTER-FOR-YOU.TXT.vbs" matches "*.vbs"')
    assert check(list(reversed(rules)), LOVEBUG.as_bytes()) == FilterMatch(
        0, "keep", 'rule 0: subject "ILOVEYOU" matches "ILOVEYOU"')
    assert check([], LOVEBUG.as_bytes()) is None


def test_bad_rules_are_refused() -> None:
    with pytest.raises(ValueError, match="keep or discard"):
        Filters([rule(action="bounce", subject="x")])
    with pytest.raises(ValueError, match="no criterion"):
        Filters([rule(subject="x"), rule(action="discard")])


def test_originator_rules_do_not_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*args: object) -> None:
        raise AssertionError("parsed")
    monkeypatch.setattr(filters_module, "_parse", explode)
    assert check([rule(originator="joe@*")], LOVEBUG.as_bytes()) is not None
    # A content criterion is only looked at once the originator of its rule matched.
    assert check([rule(originator="ann@*", subject="*")], LOVEBUG.as_bytes()) is None


# -- encoded forms ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoded", [
    b"=?utf-8?b?SUxPVkVZT1U=?=",
    b"=?UTF-8?B?SUxPVkVZT1U=?=",
    b"=?iso-8859-1?q?ILOVEYOU?=",
    b"=?utf-8?q?I=4COVE=59OU?=",
    b"=?utf-8?q?ILO?=\r\n =?utf-8?b?VkVZT1U=?=",  # folded, two words joined
])
def test_rfc2047_subject(encoded: bytes) -> None:
    raw = b"From: joe@example.org\r\nSubject: " + encoded + b"\r\n\r\nkiss me\r\n"
    assert check([rule(subject="iloveyou")], raw) == FilterMatch(
        0, "keep", 'rule 0: subject "ILOVEYOU" matches "iloveyou"')


def test_rfc2231_filename_with_charset() -> None:
    raw = multipart(b"Content-Type: application/octet-stream\r\n"
                    b"Content-Disposition: attachment; filename*=utf-8'en'l%C3%B6vebug.vbs\r\n"
                    b"\r\nxx")
    assert check([rule(attachment="l\u00f6vebug.VBS")], raw) == FilterMatch(
        0, "keep", 'rule 0: attachment "l\u00f6vebug.vbs" matches "l\u00f6vebug.VBS"')


def test_rfc2231_filename_continuations() -> None:
    raw = multipart(b"Content-Type: application/octet-stream\r\n"
                    b"Content-Disposition: attachment;\r\n"
                    b" filename*0*=utf-8''LOVE-LETTER-%C3%A9;\r\n"
                    b" filename*1=FOR-YOU.TXT;\r\n"
                    b" filename*2=.vbs\r\n"
                    b"\r\nxx")
    match = check([rule(attachment="*.vbs")], raw)
    assert match is not None
    assert match.reason == 'rule 0: attachment "LOVE-LETTER-\u00e9FOR-YOU.TXT.vbs" matches "*.vbs"'


def test_content_type_name_only() -> None:
    raw = multipart(b"Content-Type: application/octet-stream; name=\"lovebug.vbs\"\r\n\r\nxx")
    assert check([rule(attachment="lovebug.vbs")], raw) is not None
    encoded = multipart(b"Content-Type: application/octet-stream;\r\n"
                        b" name=\"=?utf-8?b?bG92ZWJ1Zy52YnM=?=\"\r\n\r\nxx")
    assert check([rule(attachment="lovebug.vbs")], encoded) is not None


def test_name_and_filename_both_count() -> None:
    raw = multipart(b"Content-Type: application/octet-stream; name=\"evil.vbs\"\r\n"
                    b"Content-Disposition: attachment; filename=\"harmless.txt\"\r\n\r\nxx")
    assert check([rule(attachment="*.txt")], raw) is not None
    assert check([rule(attachment="*.vbs")], raw) is not None


def test_repeated_filename_parameter_is_not_a_hiding_place() -> None:
    # policy.default keeps the first; a client may use the second.
    raw = multipart(b"Content-Type: application/octet-stream\r\n"
                    b"Content-Disposition: attachment; filename=\"ok.txt\"; "
                    b"filename=\"evil.exe\"\r\n\r\nxx")
    assert check([rule(attachment="*.exe")], raw) is not None


def test_path_and_trailing_dots_in_file_names() -> None:
    for name in (b"lovebug.vbs.", b"lovebug.vbs. . ", b"C:\\\\temp\\\\lovebug.vbs",
                 b"../lovebug.vbs"):
        raw = multipart(b"Content-Type: application/octet-stream\r\n"
                        b"Content-Disposition: attachment; filename=\"" + name + b"\"\r\n\r\nxx")
        assert check([rule(attachment="lovebug.vbs")], raw) is not None, name
    raw = multipart(b"Content-Type: application/octet-stream\r\n"
                    b"Content-Disposition: attachment; filename=\"lovebug.vbs.txt\"\r\n\r\nxx")
    assert check([rule(attachment="lovebug.vbs")], raw) is None


def test_reason_escapes_control_characters() -> None:
    raw = b"Subject: =?utf-8?q?I=0ALOVE=22YOU=E2=80=AE?=\r\n\r\nx\r\n"
    match = check([rule(subject="i*you*")], raw)
    assert match is not None
    assert match.reason == 'rule 0: subject "I\\x0aLOVE\\"YOU\\u202e" matches "i*you*"'


# -- walking ----------------------------------------------------------------------------------


def forwarded(inner: EmailMessage) -> EmailMessage:
    outer = mail("Fwd: a message for you")
    outer.add_attachment(inner)  # a message/rfc822 part
    return outer


def test_attachment_inside_forwarded_message() -> None:
    raw = forwarded(LOVEBUG).as_bytes()
    assert b"Content-Type: message/rfc822" in raw
    assert check([rule(attachment="*.vbs")], raw) is not None
    assert check([rule(mime_type="text/vbscript")], raw) is not None
    # The subject is the mail's own, not the forwarded message's.
    assert check([rule(subject="ILOVEYOU")], raw) is None
    assert check([rule(subject="Fwd: *")], raw) is not None


def test_forwarded_twice_inside_nested_multiparts() -> None:
    raw = forwarded(forwarded(LOVEBUG)).as_bytes()
    assert check([rule(attachment="LOVE-LETTER-FOR-YOU.TXT.vbs")], raw) is not None


def test_not_mime_at_all() -> None:
    raw = b"From: joe@example.org\r\nSubject: plain old mail\r\n\r\nfilename=\"x.vbs\"\r\n"
    assert check([rule(mime_type="text/plain")], raw) is not None
    assert check([rule(attachment="*")], raw) is None
    assert check([rule(subject="plain*")], raw) is not None


def test_eight_bit_file_name_is_matched_as_the_package_gives_it() -> None:
    raw = multipart(b"Content-Type: application/octet-stream\r\n"
                    b"Content-Disposition: attachment; filename=\"\xe9t\xe9.vbs\"\r\n\r\nxx")
    assert check([rule(attachment="*.vbs")], raw) is not None
    assert check([rule(attachment="\u00e9t\u00e9.vbs")], raw) is None  # not latin-1 decoded


def test_undecodable_rfc2231_charset() -> None:
    raw = multipart(b"Content-Type: application/octet-stream\r\n"
                    b"Content-Disposition: attachment; filename*=no-such-charset''%FF%FE.exe"
                    b"\r\n\r\nxx")
    assert check([rule(attachment="*.exe")], raw) is not None


def test_hostile_header_that_breaks_the_modern_parser() -> None:
    # Nested comments make policy.default's header parser recurse until RecursionError.
    raw = multipart(b"Content-Type: application/x-msdownload; x=" + b"(" * 5000 + b";\r\n"
                    b" name=\"evil.exe\"\r\n"
                    b"Content-Disposition: attachment\r\n\r\nMZ")
    assert check([rule(attachment="*.exe")], raw) is not None
    assert check([rule(mime_type="application/x-msdownload")], raw) is not None
    assert check([rule(subject="raw")], raw) is not None


def test_garbage_never_raises() -> None:
    rng = random.Random(7)
    rules = [rule(subject="*virus*"), rule(attachment="*.exe"), rule(mime_type="nothing/*")]
    samples = [b"", b"\r\n", b"\x00" * 100, b"\xff" * 1000, b"Subject\r\n\r\n",
               b"Content-Type: multipart/mixed; boundary=\r\n\r\n--\r\n--\r\n",
               b"Content-Type: multipart/mixed\r\n\r\n--x\r\n",
               b"Content-Type: message/rfc822\r\n\r\n" * 3,
               b"Content-Type: \xff/\xfe; name=\xff\r\nSubject: =?x?q?\xff?=\r\n\r\n\xff"]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
                for _ in range(200)]
    samples += [LOVEBUG.as_bytes()[: rng.randint(0, 800)] for _ in range(50)]
    for sample in samples:
        Filters(rules).check(SENDER, sample)  # must not raise
    assert Filters([rule(mime_type="text/plain")]).check("\udcff<", b"\xff\xfe") is not None


def test_truncated_multipart_keeps_what_arrived() -> None:
    raw = multipart(b"Content-Type: image/gif\r\n"
                    b"Content-Disposition: attachment; filename=\"a.gif\"\r\n\r\nGIF89a",
                    b"Content-Type: application/x-msdownload\r\n"
                    b"Content-Disposition: attachment; filename=\"setup.exe\"\r\n\r\nMZ")
    cut = raw[: raw.index(b"MZ") - 2]  # inside the second part, no closing boundary
    assert check([rule(attachment="setup.exe")], cut) is not None
    cut = raw[: raw.index(b"Content-Disposition: attachment; filename=\"setup")]
    assert check([rule(attachment="a.gif")], cut) is not None
    assert check([rule(mime_type="application/x-msdownload")], cut) is not None
    assert check([rule(attachment="setup.exe")], cut) is None


# -- bounds -----------------------------------------------------------------------------------


def many_parts(count: int, virus_at: int) -> bytes:
    parts = [b"Content-Type: image/gif\r\nContent-Disposition: attachment; "
             b"filename=\"p%d.gif\"\r\n\r\nGIF89a" % i for i in range(count)]
    parts[virus_at] = parts[virus_at].replace(b".gif\"", b".vbs\"")
    return multipart(*parts)


def test_five_thousand_parts_are_bounded() -> None:
    rules = [rule(attachment="*.vbs")]
    # The top level is part 1: with max_parts=1000 the 999th subpart (index 998) is the last.
    assert check(rules, many_parts(5000, 998)) is not None
    assert check(rules, many_parts(5000, 999)) is None
    assert check(rules, many_parts(5000, 4000)) is None
    assert check(rules, many_parts(5000, 4000), max_parts=6000) is not None


def test_a_hundred_thousand_parts_cost_only_the_bound() -> None:
    # Parsing all 100000 parts takes tens of seconds; the bound stops the parser itself.
    content = many_parts(100_000, 99_999)
    started = time.perf_counter()
    assert check([rule(attachment="*.vbs")], content) is None
    assert time.perf_counter() - started < 10.0


def nested_multipart(depth: int, leaf: bytes) -> bytes:
    head = b"".join(b"Content-Type: multipart/mixed; boundary=\"b%d\"\r\n\r\n--b%d\r\n" % (i, i)
                    for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return head + leaf + tail


def nested_rfc822(depth: int, leaf: bytes) -> bytes:
    return b"Content-Type: message/rfc822\r\n\r\n" * depth + leaf


LEAF = b"Content-Type: application/x-msdownload\r\n" \
       b"Content-Disposition: attachment; filename=\"deep.exe\"\r\n\r\nMZ"


@pytest.mark.parametrize("nest", [nested_multipart, nested_rfc822])
def test_deep_nesting_is_bounded(nest: object) -> None:
    assert callable(nest)
    rules = [rule(attachment="deep.exe")]
    # The leaf sits at depth `depth`; max_depth 10 reaches it at 10, not at 11.
    assert check(rules, nest(10, LEAF)) is not None
    assert check(rules, nest(11, LEAF)) is None
    assert check(rules, nest(11, LEAF), max_depth=11) is not None
    # Far past the interpreter's recursion limit: no RecursionError, just no match.
    started = time.perf_counter()
    assert check(rules, nest(50_000, LEAF)) is None
    assert time.perf_counter() - started < 10.0
    assert check([rule(mime_type="multipart/mixed"), rule(mime_type="message/rfc822")],
                 nest(50_000, LEAF)) is not None


def test_parts_before_a_deep_nest_still_count() -> None:
    deep = nested_multipart(500, LEAF)
    raw = multipart(b"Content-Type: text/plain; name=\"early.vbs\"\r\n\r\nx", deep)
    assert check([rule(attachment="early.vbs")], raw) is not None
