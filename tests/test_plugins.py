"""Content-check plug-ins: asyncio coroutines run inside Trio through the trio-asyncio adapter.

The checks below are loaded by dotted path from this module, as a configuration names them.
Timeouts run on pytest-trio's autojump clock: a hanging check costs no real time, and the
times asserted are the Trio clock's.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import trio

from mailpool.checks import example
from mailpool.plugins import (
    TEMPFAIL,
    Accept,
    CheckEnvelope,
    Checks,
    CheckSpec,
    Quarantine,
    Reject,
    Verdict,
    load_check,
)
from mailpool.protocol.smtp_syntax import Reply

HERE = __name__
ENVELOPE = CheckEnvelope(peer_ip="192.0.2.7", helo="client.example", originator="a@example.org",
                         recipients=("b@example.net", "c@example.net"), size=42)
MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n"

# What the checks below saw and did, reset per test.
calls: list[Any] = []


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    calls.clear()


def spec(name: str, **kw: Any) -> CheckSpec:
    return CheckSpec(function=f"{HERE}:{name}", **kw)


async def run_checks(specs: list[CheckSpec], envelope: CheckEnvelope = ENVELOPE,
                     message: bytes = MESSAGE) -> Verdict:
    checks = Checks.build(specs)
    async with checks.open():
        return await checks.run(envelope, message)


# --- checks loaded by path -------------------------------------------------------------------


async def accepting(envelope: CheckEnvelope, message: bytes) -> Verdict:
    calls.append(("accepting", envelope, message))
    return Accept()


async def rejecting(envelope: CheckEnvelope, message: bytes) -> Verdict:
    calls.append("rejecting")
    return Reject(554, "5.7.1", "Message refused by policy")


async def quarantining(envelope: CheckEnvelope, message: bytes) -> Verdict:
    calls.append("quarantining")
    return Quarantine("looks odd")


async def raising(envelope: CheckEnvelope, message: bytes) -> Verdict:
    calls.append("raising")
    raise KeyError("no such thing")


async def own_cancel(envelope: CheckEnvelope, message: bytes) -> Verdict:
    # asyncio code that lets a CancelledError of its own escape (nobody cancelled it).
    raise asyncio.CancelledError()


async def not_a_verdict(envelope: CheckEnvelope, message: bytes) -> Any:
    return True


async def hanging(envelope: CheckEnvelope, message: bytes) -> Verdict:
    calls.append(("hanging", trio.current_time()))
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        calls.append(("cancelled", trio.current_time()))
        raise
    return Accept()


async def stubborn(envelope: CheckEnvelope, message: bytes) -> Verdict:
    """Swallows its cancellation and carries on for 30 seconds more."""
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        calls.append(("swallowed", trio.current_time()))
    await asyncio.sleep(30)
    calls.append(("stubborn done", trio.current_time()))
    return Reject(550, "5.7.1", "too late to count")


async def sleeping(envelope: CheckEnvelope, message: bytes) -> Verdict:
    loop = asyncio.get_running_loop()
    before = loop.time()
    await asyncio.sleep(0.5)
    calls.append(("sleeping", loop, loop.time() - before, asyncio.current_task() is not None))
    return Accept()


async def first(envelope: CheckEnvelope, message: bytes) -> Verdict:
    calls.append("first")
    return Accept()


async def second(envelope: CheckEnvelope, message: bytes) -> Verdict:
    calls.append("second")
    return Quarantine("second says so")


async def third(envelope: CheckEnvelope, message: bytes) -> Verdict:
    calls.append("third")
    return Reject(550, "5.7.1", "never reached")


async def with_options(envelope: CheckEnvelope, message: bytes, *, word: str,
                       code: int = 550) -> Verdict:
    if word.encode() in message:
        return Reject(code, f"{code // 100}.7.1", f"contains {word}")
    return Accept()


def not_async(envelope: CheckEnvelope, message: bytes) -> Verdict:
    return Accept()


class Handler:
    """aiosmtpd style: the check is a method."""

    @staticmethod
    async def check(envelope: CheckEnvelope, message: bytes) -> Verdict:
        return Quarantine("by method")


handler = Handler()


class CallableCheck:
    async def __call__(self, envelope: CheckEnvelope, message: bytes) -> Verdict:
        return Quarantine("by callable object")


callable_check = CallableCheck()
NOT_CALLABLE = 42


# --- verdicts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    (250, "2.0.0", "fine"),              # not a refusal
    (399, "3.0.0", "no"),
    (600, "5.0.0", "no"),
    (True, "5.0.0", "a bool is no code"),
    (550, "4.7.1", "class differs"),
    (450, "5.7.1", "class differs"),
    (550, "5.7", "short enhanced code"),
    (550, "5.1000.1", "subject too long"),
    (550, "5.7.1", ""),
    (550, "5.7.1", "two\r\n250 lines"),
    (550, "5.7.1", "bare\nLF"),
    (550, "5.7.1", "naïve non-ASCII"),
    (550, "5.7.1", "x" * 501),           # "550 5.7.1 " + 501 + CRLF = 513 octets
])
def test_reject_refuses_what_cannot_be_a_reply(args: tuple[Any, str, str]) -> None:
    with pytest.raises(ValueError):
        Reject(*args)


def test_reject_fits_the_wire_exactly() -> None:
    longest = Reject(550, "5.7.1", "x" * 500)
    wire = Reply(longest.code, longest.enhanced, (longest.text,)).format()
    assert len(wire) == 512
    assert Reply(451, TEMPFAIL.enhanced, (TEMPFAIL.text,)).format() == (
        b"451 4.3.0 Temporary content check failure\r\n")
    # The name of the check that answered does not change what the verdict is.
    assert Reject(550, "5.7.1", "no", check="a:b") == Reject(550, "5.7.1", "no")


@pytest.mark.parametrize("reason", ["", "two\nlines", "tab\there"])
def test_quarantine_reason_is_one_printable_line(reason: str) -> None:
    with pytest.raises(ValueError):
        Quarantine(reason)


# --- loading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, why", [
    ("mailpool.checks.example", "package.module:function"),
    ("mailpool.checks.example:", "package.module:function"),
    (":check", "package.module:function"),
    ("mailpool.checks.example:check:x", "package.module:function"),
    ("mailpool checks:check", "package.module:function"),
    ("mailpool.checks.nonesuch:check", "cannot import mailpool.checks.nonesuch"),
    ("mailpool.checks.example:nonesuch", "mailpool.checks.example has no nonesuch"),
    (f"{HERE}:not_async", "not an async function (function)"),
    (f"{HERE}:Handler", "not an async function (type)"),
    (f"{HERE}:NOT_CALLABLE", "not an async function (int)"),
])
def test_loader_names_the_bad_path(path: str, why: str) -> None:
    with pytest.raises(ValueError) as err:
        load_check(path)
    assert f"content check {path!r}" in str(err.value)
    assert why in str(err.value)


def test_loader_checks_options_against_the_signature() -> None:
    with pytest.raises(ValueError, match=r"with_options'.*does not take.*colour="):
        load_check(f"{HERE}:with_options", {"word": "x", "colour": "red"})
    with pytest.raises(ValueError, match="does not take"):
        load_check(f"{HERE}:with_options")  # `word` is required
    with pytest.raises(ValueError, match="does not take"):
        load_check("mailpool.checks.example:check", {"markr": "X-Bad"})


def test_build_checks_timeout_and_on_error() -> None:
    with pytest.raises(ValueError, match=r"accepting'.*timeout 0 must be above 0"):
        Checks.build([spec("accepting", timeout=0)])
    with pytest.raises(ValueError, match=r"accepting'.*timeout nan"):
        Checks.build([spec("accepting", timeout=float("nan"))])
    with pytest.raises(ValueError, match=r"accepting'.*on_error 'drop' is not one of "
                                         r"accept, tempfail"):
        Checks.build([spec("accepting", on_error="drop")])


# --- the adapter ---------------------------------------------------------------------------------


async def test_accept_passes_the_envelope_and_message_unchanged() -> None:
    assert await run_checks([spec("accepting")]) == Accept()
    assert calls == [("accepting", ENVELOPE, MESSAGE)]
    assert calls[0][2] is MESSAGE  # the bytes themselves, not a copy


async def test_reject_names_its_check() -> None:
    verdict = await run_checks([spec("rejecting")])
    assert verdict == Reject(554, "5.7.1", "Message refused by policy")
    assert isinstance(verdict, Reject) and verdict.check == f"{HERE}:rejecting"


async def test_quarantine_names_its_check() -> None:
    verdict = await run_checks([spec("quarantining")])
    assert verdict == Quarantine("looks odd")
    assert isinstance(verdict, Quarantine) and verdict.check == f"{HERE}:quarantining"


async def test_methods_callables_and_options_load() -> None:
    assert await run_checks([spec("handler.check")]) == Quarantine("by method")
    assert await run_checks([spec("callable_check")]) == Quarantine("by callable object")
    opts = [spec("with_options", options={"word": "body", "code": 451})]
    assert await run_checks(opts) == Reject(451, "4.7.1", "contains body")
    opts = [spec("with_options", options={"word": "absent"})]
    assert await run_checks(opts) == Accept()


@pytest.mark.parametrize("on_error, expected", [("accept", Accept()), ("tempfail", TEMPFAIL)])
async def test_a_raising_check_gets_on_error_and_one_log_line(
        on_error: str, expected: Verdict, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailpool.checks")
    verdict = await run_checks([spec("raising", on_error=on_error), spec("first")])
    assert verdict == expected
    # tempfail stops there; accept goes on to the next check.
    assert calls == (["raising"] if on_error == "tempfail" else ["raising", "first"])
    if isinstance(verdict, Reject):
        assert verdict.check == f"{HERE}:raising"
    [record] = caplog.records
    assert record.getMessage() == (
        f"content check {HERE}:raising failed: KeyError('no such thing') (client 192.0.2.7): "
        + ("accepted" if on_error == "accept" else "answered 451 4.3.0"))


@pytest.mark.parametrize("name, problem", [
    ("own_cancel", "failed: CancelledError()"),
    ("not_a_verdict", "answered True, not a verdict"),
])
async def test_no_asyncio_exception_or_odd_answer_leaves_run(
        name: str, problem: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailpool.checks")
    assert await run_checks([spec(name, on_error="tempfail")]) == TEMPFAIL
    [record] = caplog.records
    assert problem in record.getMessage()


async def test_a_hanging_check_times_out_on_the_trio_clock(
        autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mailpool.checks")
    checks = Checks.build([spec("hanging", timeout=2.5, on_error="tempfail")])
    async with checks.open():
        start = trio.current_time()
        verdict = await checks.run(ENVELOPE, MESSAGE)
        assert trio.current_time() - start == pytest.approx(2.5)
    assert verdict == TEMPFAIL
    # The asyncio task itself was cancelled at the deadline, not abandoned.
    assert [c[0] for c in calls] == ["hanging", "cancelled"]
    assert calls[1][1] - calls[0][1] == pytest.approx(2.5)
    [record] = caplog.records
    assert "hanging timed out after 2.5s" in record.getMessage()


async def test_the_deadline_holds_against_a_check_that_swallows_cancellation(
        autojump_clock: trio.abc.Clock) -> None:
    checks = Checks.build([spec("stubborn", timeout=1.0)])
    async with checks.open():
        start = trio.current_time()
        assert await checks.run(ENVELOPE, MESSAGE) == Accept()  # on_error accept
        assert trio.current_time() - start == pytest.approx(1.0)
    # Closing the loop waited for it: no asyncio task outlives the job's loop.
    assert [c[0] for c in calls] == ["swallowed", "stubborn done"]
    assert calls[1][1] - start == pytest.approx(31.0)


async def test_asyncio_sleep_and_the_running_loop(autojump_clock: trio.abc.Clock) -> None:
    checks = Checks.build([spec("sleeping")])
    async with checks.open():
        loop = checks.loop
        assert loop is not None
        start = trio.current_time()
        assert await checks.run(ENVELOPE, MESSAGE) == Accept()
        assert trio.current_time() - start == pytest.approx(0.5)
        assert await checks.run(ENVELOPE, MESSAGE) == Accept()
    assert checks.loop is None
    # Both calls ran in the job's one loop, as asyncio tasks, on the Trio clock.
    assert [(c[1], c[2], c[3]) for c in calls] == [(loop, pytest.approx(0.5), True)] * 2


async def test_sessions_share_the_loop_concurrently(autojump_clock: trio.abc.Clock) -> None:
    checks = Checks.build([spec("sleeping")])
    verdicts: list[Verdict] = []

    async def session() -> None:
        verdicts.append(await checks.run(ENVELOPE, MESSAGE))

    async with checks.open():
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(session)
        assert trio.current_time() - start == pytest.approx(0.5)  # not 1.5
    assert verdicts == [Accept()] * 3


async def test_checks_run_in_order_and_the_first_refusal_wins() -> None:
    verdict = await run_checks([spec("first"), spec("second"), spec("third")])
    assert verdict == Quarantine("second says so")
    assert isinstance(verdict, Quarantine) and verdict.check == f"{HERE}:second"
    assert calls == ["first", "second"]
    calls.clear()
    verdict = await run_checks([spec("third"), spec("second")])
    assert verdict == Reject(550, "5.7.1", "never reached")
    assert calls == ["third"]


async def test_the_callers_cancellation_reaches_the_check(autojump_clock: trio.abc.Clock) -> None:
    checks = Checks.build([spec("hanging", timeout=60)])
    async with checks.open():
        with trio.move_on_after(3) as scope:  # e.g. the job's drain deadline
            await checks.run(ENVELOPE, MESSAGE)
        assert scope.cancelled_caught
        await trio.sleep(0)
    assert [c[0] for c in calls] == ["hanging", "cancelled"]
    assert calls[1][1] - calls[0][1] == pytest.approx(3.0)


async def test_run_outside_open_is_a_programming_error() -> None:
    checks = Checks.build([spec("accepting")])
    with pytest.raises(RuntimeError, match=r"inside Checks\.open\(\)"):
        await checks.run(ENVELOPE, MESSAGE)


async def test_no_checks_open_no_loop() -> None:
    checks = Checks.build([])
    assert len(checks) == 0 and not checks
    async with checks.open():
        assert checks.loop is None
        assert await checks.run(ENVELOPE, MESSAGE) == Accept()
    assert checks.loop is None


def test_no_checks_import_neither_asyncio_nor_trio_asyncio() -> None:
    # A fresh interpreter: this test process has long imported both.
    code = textwrap.dedent("""
        import sys, trio
        from mailpool.plugins import Accept, CheckEnvelope, Checks
        async def main():
            checks = Checks.build([])
            async with checks.open():
                env = CheckEnvelope("192.0.2.1", "h", "", ("r@example.net",), 1)
                assert await checks.run(env, b"x") == Accept()
        trio.run(main)
        print(sorted(m for m in ("asyncio", "trio_asyncio") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout == "[]\n"


# --- the example check ---------------------------------------------------------------------------


def test_header_fields_reads_only_the_header_section() -> None:
    message = (b"Received: from a\r\n\tby b; Tue, 1 Jan 2030 00:00:00 +0000\r\n"
               b"Subject : obsolete blank before the colon\r\n"
               b"X-Raw: caf\xc3\xa9 \xff\r\n"
               b"\r\n"
               b"From: in the body, not a header\r\n")
    assert list(example.header_fields(message)) == [
        ("Received", "from a\tby b; Tue, 1 Jan 2030 00:00:00 +0000"),
        ("Subject", "obsolete blank before the colon"),
        ("X-Raw", "café \ufffd"),
    ]
    # Bare LF line ends; no body at all; a line that is no field starts the body.
    assert list(example.header_fields(b"A: 1\nB:2")) == [("A", "1"), ("B", "2")]
    assert list(example.header_fields(b"A: 1\r\nnot a field\r\nFrom: x\r\n")) == [("A", "1")]
    assert list(example.header_fields(b" leading blank\r\nFrom: x\r\n")) == []
    assert list(example.header_fields(b"")) == []


@pytest.mark.parametrize("marker, parsed", [
    ("X-Spam-Flag: YES", ("X-Spam-Flag", "YES")),
    ("X-Quarantine", ("X-Quarantine", None)),
    (" X-Q :  on ", ("X-Q", "on")),
])
def test_parse_marker(marker: str, parsed: tuple[str, str | None]) -> None:
    assert example.parse_marker(marker) == parsed


@pytest.mark.parametrize("marker", ["", ": YES", "Bad Name: YES"])
def test_parse_marker_refuses_no_field_name(marker: str) -> None:
    with pytest.raises(ValueError):
        example.parse_marker(marker)


EXAMPLE = "mailpool.checks.example:check"


async def test_example_refuses_a_message_without_from() -> None:
    verdict = await run_checks([CheckSpec(EXAMPLE)],
                               message=b"To: b@example.net\r\nSubject: hi\r\n\r\nFrom: body\r\n")
    assert isinstance(verdict, Reject) and verdict.check == EXAMPLE
    # What the SMTP session sends for it, byte for byte.
    assert Reply(verdict.code, verdict.enhanced, (verdict.text,)).format() == (
        b"550 5.6.0 Message has no From header\r\n")


async def test_example_accepts_and_quarantines() -> None:
    assert await run_checks([CheckSpec(EXAMPLE)]) == Accept()
    lower = b"fROM: a@example.org\r\n\r\n"  # field names are case-insensitive
    assert await run_checks([CheckSpec(EXAMPLE)], message=lower) == Accept()
    marked = b"From: a@example.org\r\nx-spam-flag: yes\r\n\r\nbody\r\n"
    verdict = await run_checks([CheckSpec(EXAMPLE)], message=marked)
    assert verdict == Quarantine("marked X-Spam-Flag: YES")
    not_marked = b"From: a@example.org\r\nX-Spam-Flag: NO\r\n\r\nX-Spam-Flag: YES\r\n"
    assert await run_checks([CheckSpec(EXAMPLE)], message=not_marked) == Accept()


async def test_example_marker_option() -> None:
    any_value = [CheckSpec(EXAMPLE, options={"marker": "X-Hold"})]
    message = b"From: a@example.org\r\nX-Hold:\r\n\r\n"
    assert await run_checks(any_value, message=message) == Quarantine("marked X-Hold")
    assert await run_checks(any_value) == Accept()
    # A missing From outranks the marker.
    assert await run_checks(any_value, message=b"X-Hold: 1\r\n\r\n") == Reject(
        550, "5.6.0", "Message has no From header")


async def test_example_reads_a_long_header_section(autojump_clock: trio.abc.Clock) -> None:
    fields = b"".join(b"X-Trace-%d: hop\r\n" % i for i in range(3 * example.YIELD_EVERY))
    message = fields + b"From: last@example.org\r\n\r\nbody\r\n"
    assert await run_checks([CheckSpec(EXAMPLE)], message=message) == Accept()
    assert await run_checks([CheckSpec(EXAMPLE)], message=fields + b"\r\n") == Reject(
        550, "5.6.0", "Message has no From header")
