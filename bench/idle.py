"""Idle capacity: how many concurrent idle SMTP sessions a server holds, and their memory.

Opens up to `bound` connections (a bounded number connecting at once), counts
those that get a 220 greeting within `window` seconds, holds them all open and
silent, reads the server's memory (VmRSS summed over its process tree) before
and after, then closes them. Sessions a server queues without greeting them
(a full pool waiting for a job, a backlog beyond the process limit) are not held.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

CONNECTING_AT_ONCE = 64
SETTLE = 1.0  # seconds for the server's memory to reflect the sessions it holds


async def idle_capacity(host: str, port: int, bound: int, window: float,
                        memory: Callable[[], dict[str, int]]) -> dict[str, Any]:
    before = memory()
    held = 0
    settled = 0
    errors: Counter[str] = Counter()
    all_settled = trio.Event()
    release = trio.Event()
    limiter = trio.CapacityLimiter(CONNECTING_AT_ONCE)
    deadline = trio.current_time() + window

    def done() -> None:
        nonlocal settled
        settled += 1
        if settled == bound:
            all_settled.set()

    async def one() -> None:
        nonlocal held
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            greeted = False
            with trio.move_on_at(deadline):
                try:
                    async with limiter:
                        await sock.connect((host, port))
                    data = b""
                    while b"\n" not in data:
                        chunk = await sock.recv(4096)
                        if not chunk:
                            errors["closed"] += 1
                            break
                        data += chunk
                    else:
                        if data.startswith(b"220"):
                            greeted = True
                        else:
                            errors[data[:3].decode(errors="replace") or "empty"] += 1
                except OSError as exc:
                    errors[type(exc).__name__] += 1
            if greeted:
                held += 1
            done()
            if greeted:
                await release.wait()
        finally:
            sock.close()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(bound):
            nursery.start_soon(one)
        with trio.move_on_at(deadline + 1):
            await all_settled.wait()
        ramp = trio.current_time() - start
        await trio.sleep(SETTLE)
        after = memory()
        release.set()
    grown = after["rss_kb"] - before["rss_kb"]
    grown_pss = after["pss_kb"] - before["pss_kb"]
    return {
        "bound": bound, "window": window, "held": held, "ramp_seconds": ramp,
        "not_greeted": bound - held, "errors": dict(errors),
        "before": before, "after": after,
        "rss_kb_per_session": grown / held if held else None,
        "pss_kb_per_session": grown_pss / held if held else None,
    }
