"""Idle sessions: how many a server holds and what they cost, and whether they slow new clients.

- idle_capacity: opens up to `bound` connections (`at_once` of them connecting or waiting
  for their greeting at any moment), counts those greeted with a 220 within `window`
  seconds, holds them all open and silent, reads the server's memory (summed over its
  process tree, and per process kind) before and after, then closes them. A session the
  server queues without greeting it (a pool waiting for a job, a backlog beyond a process
  limit) is not held.
- greeting_delay: new clients' connect-to-greeting, one at a time, first with nothing else
  open, then again while `idle` silent sessions are held open.

Connect-to-greeting is timed as bench.smtp_load times it: TCP connect started -> the whole
220 line read.
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.smtp_load import percentiles

CONNECTING_AT_ONCE = 64
SETTLE = 1.0  # seconds for the server's memory to reflect the sessions it holds
PROBE_TIMEOUT = 5.0  # a probe that waits longer for its greeting counts as "timeout"

Memory = Callable[[], dict[str, Any]]


@dataclass
class Held:
    """Sessions opened by hold_idle: open until release is set."""

    bound: int
    held: int = 0
    settled: int = 0
    ramp_seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    release: trio.Event = field(default_factory=trio.Event)


async def _greeting(sock: trio.socket.SocketType) -> str | None:
    """None once a whole 220 line is read, else what went wrong (an error's name)."""
    data = b""
    while b"\n" not in data:
        chunk = await sock.recv(4096)
        if not chunk:
            return "closed"
        data += chunk
    return None if data.startswith(b"220") else (data[:3].decode(errors="replace") or "empty")


async def hold_idle(nursery: trio.Nursery, host: str, port: int, bound: int, window: float,
                    at_once: int = CONNECTING_AT_ONCE) -> Held:
    """Open up to bound sessions in nursery and return once each is greeted, failed, or the
    window is over; the greeted ones stay open and silent until .release is set."""
    state = Held(bound)
    all_settled = trio.Event()
    limiter = trio.CapacityLimiter(at_once)
    deadline = trio.current_time() + window

    def settled() -> None:
        state.settled += 1
        if state.settled == bound:
            all_settled.set()

    async def one() -> None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            greeted = False
            with trio.move_on_at(deadline) as scope:
                # Connect and greeting under one slot: at most at_once sessions wait in the
                # server (a supervisor refuses beyond its max_waiting).
                async with limiter:
                    try:
                        await sock.connect((host, port))
                        error = await _greeting(sock)
                    except OSError as exc:
                        error = type(exc).__name__
                if error is None:
                    greeted = True
                else:
                    state.errors[error] += 1
            if scope.cancelled_caught:
                state.errors["no greeting in window"] += 1
            if greeted:
                state.held += 1
            settled()
            if greeted:
                await state.release.wait()
        finally:
            sock.close()

    start = trio.current_time()
    for _ in range(bound):
        nursery.start_soon(one)
    with trio.move_on_at(deadline + 1):
        await all_settled.wait()
    state.ramp_seconds = trio.current_time() - start
    return state


async def idle_capacity(host: str, port: int, bound: int, window: float, memory: Memory,
                        ) -> dict[str, Any]:
    """Hold up to bound idle sessions; their count and the server's memory before and after."""
    before = memory()
    async with trio.open_nursery() as nursery:
        held = await hold_idle(nursery, host, port, bound, window)
        await trio.sleep(SETTLE)
        after = memory()
        held.release.set()
    return {"bound": bound, "window": window, "held": held.held,
            "ramp_seconds": held.ramp_seconds, "not_greeted": bound - held.held,
            "errors": dict(held.errors), "before": before, "after": after,
            **per_session(before, after, held.held)}


def per_session(before: dict[str, Any], after: dict[str, Any], held: int) -> dict[str, Any]:
    """KiB per held session: RSS and PSS grown over the whole tree, and PSS without the
    processes started meanwhile (the rest of the growth: the sessions themselves). A
    process started is counted at the mean PSS of that kind's processes before."""
    if not held:
        return {"rss_kb_per_session": None, "pss_kb_per_session": None,
                "pss_kb_per_session_sessions_only": None, "new_processes": {}}
    b_kinds: dict[str, dict[str, int]] = before.get("by_kind", {})
    new: dict[str, int] = {}
    start_up = 0.0
    for kind, a in after.get("by_kind", {}).items():
        b = b_kinds.get(kind)
        grown = a["processes"] - (b["processes"] if b else 0)
        if grown > 0:
            new[kind] = grown
            if b and b["processes"]:
                start_up += grown * b["pss_kb"] / b["processes"]
    pss = after["pss_kb"] - before["pss_kb"]
    return {"rss_kb_per_session": (after["rss_kb"] - before["rss_kb"]) / held,
            "pss_kb_per_session": pss / held,
            "pss_kb_per_session_sessions_only": (pss - start_up) / held,
            "new_processes": new}


async def probe(host: str, port: int, count: int, gap: float = 0.002,
                ) -> tuple[list[float], Counter[str]]:
    """count new clients one after another: connect-to-greeting in seconds, then QUIT."""
    samples: list[float] = []
    errors: Counter[str] = Counter()
    for _ in range(count):
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        with sock:
            t0 = time.perf_counter()
            error: str | None = "timeout"
            with trio.move_on_after(PROBE_TIMEOUT):
                try:
                    await sock.connect((host, port))
                    error = await _greeting(sock)
                except OSError as exc:
                    error = type(exc).__name__
                if error is None:
                    samples.append(time.perf_counter() - t0)
                    with contextlib.suppress(OSError):
                        await sock.send(b"QUIT\r\n")
                        await sock.recv(4096)
            if error is not None:
                errors[error] += 1
        await trio.sleep(gap)  # the previous session's end is not on the next sample
    return samples, errors


async def greeting_delay(host: str, port: int, idle: int, probes: int, window: float,
                         ) -> dict[str, Any]:
    """New clients' connect-to-greeting (ms percentiles) alone, then with idle sessions open."""
    alone, alone_errors = await probe(host, port, probes)
    async with trio.open_nursery() as nursery:
        held = await hold_idle(nursery, host, port, idle, window)
        await trio.sleep(SETTLE)
        loaded, loaded_errors = await probe(host, port, probes)
        held.release.set()
    return {"idle": idle, "held": held.held, "idle_errors": dict(held.errors),
            "probes": probes, "alone_ms": percentiles(alone),
            "alone_errors": dict(alone_errors), "with_idle_ms": percentiles(loaded),
            "with_idle_errors": dict(loaded_errors)}
