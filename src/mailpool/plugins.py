"""Content checks as asyncio plug-ins, and the one adapter that runs them inside a Trio job.

A check is an asyncio coroutine function, as the Python mail ecosystem writes them (aiosmtpd
handlers and the like): it may await asyncio.sleep, asyncio streams or asyncio libraries.

    async def check(envelope: CheckEnvelope, message: bytes) -> Verdict

It gets the envelope and the message as the client sent it (dot-unstuffed, CRLF line ends)
and answers Accept(), Reject(code, enhanced, text) or Quarantine(reason). A check is named
in the configuration as "package.module:function"; options given there are passed to every
call as keyword arguments (checked against the function's signature when it is loaded).

The adapter, Checks, runs the checks in order and the first verdict that is not Accept wins.
trio-asyncio supplies the asyncio loop: one per job, opened by Checks.open() only when some
check is configured. trio-asyncio patches asyncio's policy functions when it is imported
(a mechanism newer Pythons deprecate), so neither it nor asyncio is imported before then:
a job without checks pays nothing. Each call has a Trio deadline; a check that times out,
raises (asyncio.CancelledError included) or answers something that is not a verdict gets
its `on_error` verdict (accept, or tempfail: 451 4.3.0) and one log line. Only Trio's own
cancellation of the caller ever leaves Checks.run().
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol

import trio

from mailpool.protocol.smtp_syntax import ENHANCED_RE

log = logging.getLogger("mailpool.checks")

# What a check's failure (timeout, exception, not a verdict) turns into.
ON_ERROR = ("accept", "tempfail")
DEFAULT_TIMEOUT = 10.0
# A reply line is at most 512 octets, CRLF included (RFC 5321 4.5.3.1.5).
_MAX_REPLY_LINE = 512
_PATH_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


# --- the plug-in API (asyncio side) ----------------------------------------------------------


@dataclass(frozen=True)
class CheckEnvelope:
    """The SMTP envelope of the message being checked."""

    peer_ip: str
    helo: str
    originator: str  # the MAIL FROM address; "" for the null sender <>
    recipients: tuple[str, ...]
    size: int  # octets of the message as received
    authenticated_user: str | None = None


@dataclass(frozen=True)
class Accept:
    """Let the message through (to the next check, then the queue)."""


@dataclass(frozen=True)
class Reject:
    """Refuse the message at the end of DATA: `code enhanced text` goes to the client.

    Only 4xx (try again later) and 5xx (permanent) answers, with an RFC 3463 enhanced code
    of the same class; the text is one line of printable ASCII. `check` names the check
    that answered (filled in by the adapter; not compared).
    """

    code: int
    enhanced: str
    text: str
    check: str = field(default="", kw_only=True, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.code, bool) or not isinstance(self.code, int) or not (
                400 <= self.code <= 599):
            raise ValueError(f"reject code {self.code!r} is not a 4xx or 5xx reply")
        if not isinstance(self.enhanced, str) or not ENHANCED_RE.fullmatch(self.enhanced):
            raise ValueError(f"enhanced status code {self.enhanced!r} is not class.subject"
                             ".detail (RFC 3463)")
        if self.enhanced[0] != str(self.code)[0]:
            raise ValueError(f"enhanced status code {self.enhanced} does not match the "
                             f"class of reply code {self.code}")
        if not isinstance(self.text, str) or not self.text or not all(
                " " <= ch <= "~" for ch in self.text):
            raise ValueError(f"reject text {self.text!r} is not one line of printable ASCII")
        room = _MAX_REPLY_LINE - len(f"{self.code} {self.enhanced} \r\n")
        if len(self.text) > room:
            raise ValueError(f"reject text is {len(self.text)} characters; at most {room} fit "
                             "in a reply line")


@dataclass(frozen=True)
class Quarantine:
    """Accept the message but keep it off delivery (the quarantine queue), for `reason`.

    `check` names the check that answered (filled in by the adapter; not compared)."""

    reason: str
    check: str = field(default="", kw_only=True, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason or not self.reason.isprintable():
            raise ValueError(f"quarantine reason {self.reason!r} is not one printable line")


Verdict = Accept | Reject | Quarantine
CheckFunction = Callable[[CheckEnvelope, bytes], Awaitable[Verdict]]
TEMPFAIL = Reject(451, "4.3.0", "Temporary content check failure")


# --- configuration and loading ------------------------------------------------------------


class CheckSettings(Protocol):
    """What the adapter reads of one configured check (config's [[check]] tables fit)."""

    @property
    def function(self) -> str: ...
    @property
    def timeout(self) -> float: ...
    @property
    def on_error(self) -> str: ...
    @property
    def options(self) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class CheckSpec:
    """One configured check, for code and tests that have no config file."""

    function: str
    timeout: float = DEFAULT_TIMEOUT
    on_error: str = "accept"
    options: Mapping[str, Any] = field(default_factory=dict)


def load_check(path: str, options: Mapping[str, Any] | None = None) -> CheckFunction:
    """The coroutine function named "package.module:function" (the part after the colon may
    be dotted, e.g. "module:Class.method"), with `options` bound as keyword arguments.

    Raises ValueError naming `path` when it is malformed, cannot be imported, names nothing,
    names something that is not an async function, or does not take these options.
    """
    if not isinstance(path, str) or not _PATH_RE.fullmatch(path):
        raise ValueError(f"content check {path!r}: expected \"package.module:function\"")
    module_name, _, attrs = path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:  # any import failure of a plug-in is a configuration error
        raise ValueError(f"content check {path!r}: cannot import {module_name}: "
                         f"{type(exc).__name__}: {exc}") from exc
    for attr in attrs.split("."):
        try:
            target = getattr(target, attr)
        except AttributeError:
            raise ValueError(f"content check {path!r}: {module_name} has no {attrs}") from None
    if not (inspect.iscoroutinefunction(target)
            or inspect.iscoroutinefunction(type(target).__call__)):  # async __call__
        raise ValueError(f"content check {path!r}: not an async function "
                         f"({type(target).__name__})")
    opts = dict(options or {})
    try:
        inspect.signature(target).bind(None, b"", **opts)
    except TypeError as exc:
        raise ValueError(f"content check {path!r}: does not take (envelope, message"
                         f"{''.join(f', {k}=' for k in opts)}): {exc}") from None
    except ValueError:
        pass  # no signature to inspect (some builtins): the first call will tell
    return partial(target, **opts) if opts else target


@dataclass(frozen=True)
class _Check:
    name: str
    call: CheckFunction
    timeout: float
    on_error: str


# --- the adapter (Trio side) ------------------------------------------------------------------


class Checks:
    """The configured content checks of one job, run through one trio-asyncio loop."""

    def __init__(self, checks: Sequence[_Check]) -> None:
        self._checks = tuple(checks)
        self._loop: Any = None  # trio_asyncio's loop while open()
        self._nursery: trio.Nursery | None = None

    @classmethod
    def build(cls, specs: Iterable[CheckSettings]) -> Checks:
        """Load every check; ValueError naming the first one that is wrong. With no specs
        this costs nothing, and neither does open() or run() afterwards."""
        checks = []
        for spec in specs:
            if not spec.timeout > 0:
                raise ValueError(f"content check {spec.function!r}: timeout {spec.timeout!r} "
                                 "must be above 0")
            if spec.on_error not in ON_ERROR:
                raise ValueError(f"content check {spec.function!r}: on_error "
                                 f"{spec.on_error!r} is not one of {', '.join(ON_ERROR)}")
            checks.append(_Check(spec.function, load_check(spec.function, spec.options),
                                 float(spec.timeout), spec.on_error))
        return cls(checks)

    def __len__(self) -> int:
        return len(self._checks)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self._checks)

    @property
    def loop(self) -> Any:
        """The asyncio loop the checks run in while open() (None otherwise or when there
        are no checks)."""
        return self._loop

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Checks]:
        """Around the job's work: the asyncio loop (and the Trio tasks that call into it)
        live this long. With no checks it opens nothing and imports nothing."""
        if not self._checks:
            yield self
            return
        if self._loop is not None:
            raise RuntimeError("content checks are already open")
        import trio_asyncio  # patches asyncio's policy functions: only when checks exist

        async with trio_asyncio.open_loop() as loop, trio.open_nursery() as nursery:
            self._loop, self._nursery = loop, nursery
            try:
                yield self
            finally:
                self._loop = self._nursery = None
                nursery.cancel_scope.cancel()

    async def run(self, envelope: CheckEnvelope, message: bytes) -> Verdict:
        """Each check in order; the first verdict that is not Accept, or Accept."""
        for check in self._checks:
            verdict = await self._run_one(check, envelope, message)
            if not isinstance(verdict, Accept):
                return verdict
        return Accept()

    async def _run_one(self, check: _Check, envelope: CheckEnvelope,
                       message: bytes) -> Verdict:
        import asyncio

        import trio_asyncio

        nursery, loop = self._nursery, self._loop
        if nursery is None:
            raise RuntimeError("content checks run only inside Checks.open()")
        done = trio.Event()
        answer: list[object] = []
        failure: list[BaseException] = []

        async def call(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            try:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    try:
                        answer.append(await trio_asyncio.aio_as_trio(check.call, loop=loop)(
                            envelope, message))
                    except (Exception, asyncio.CancelledError) as exc:
                        failure.append(exc)
            finally:
                done.set()

        # The call runs in a task of the job's nursery, not this one, so the deadline
        # holds even against a check that swallows its cancellation: the session moves on
        # at once, and only the job's end waits for such a check to finish.
        scope = await nursery.start(call)
        try:
            with trio.move_on_after(check.timeout):
                await done.wait()
        finally:
            scope.cancel()
        if not done.is_set():
            problem = f"timed out after {check.timeout:g}s"
        elif failure:
            problem = f"failed: {failure[0]!r}"
        elif not isinstance(answer[0], Accept | Reject | Quarantine):
            problem = f"answered {answer[0]!r}, not a verdict"
        else:
            verdict = answer[0]
            return verdict if isinstance(verdict, Accept) else _signed(verdict, check.name)
        verdict = (Accept() if check.on_error == "accept"
                   else _signed(TEMPFAIL, check.name))
        log.warning("content check %s %s (client %s): %s", check.name, problem,
                    envelope.peer_ip,
                    "accepted" if isinstance(verdict, Accept) else "answered 451 4.3.0")
        return verdict


def _signed(verdict: Reject | Quarantine, name: str) -> Reject | Quarantine:
    """The verdict, naming the check that gave it."""
    return replace(verdict, check=name)
