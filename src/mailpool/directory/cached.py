"""The directory as a job sees it: asynchronous, cached per job, and reported when down.

The file backend is read in place (one stat per call notices any change at once), so it is
called directly, as before: no thread, no cache. A remote backend (PostgreSQL) costs a round
trip per call, so a job keeps what it found for `ttl` seconds (`[directory] cache_ttl`): a
user removed on any host stops receiving mail, and logging in, on every host within that
time. Misses are not kept, so a user added on one host receives mail through every host at
once. Remote calls run in Trio worker threads under a hard deadline: a database that hangs
costs a session a temporary failure, never the job's event loop.

A directory that cannot be read raises DirectoryError (DirectoryUnavailable for the
database) to the caller, which answers a temporary failure; the first such failure, then at
most one per REPORT_INTERVAL, is logged and journaled (PU) by the job.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from mailpool.directory.backend import UserDirectory
from mailpool.directory.model import DirectoryError, DirectoryUnavailable, User, lookup_key
from mailpool.directory.passwords import check_login

log = logging.getLogger("mailpool.directory")
T = TypeVar("T")

REPORT_INTERVAL = 60.0  # seconds between two PU entries of one job in an outage
MAX_ENTRIES = 10_000    # per map: a flood of distinct addresses cannot grow a job unbounded

Report = Callable[[str], Awaitable[None]]


class _TtlMap:
    def __init__(self, ttl: float, clock: Callable[[], float]) -> None:
        self.ttl = ttl
        self.clock = clock
        self.entries: dict[str, tuple[float, User]] = {}

    def get(self, key: str) -> User | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        if hit[0] <= self.clock():
            del self.entries[key]
            return None
        return hit[1]

    def put(self, key: str, user: User) -> None:
        if self.ttl <= 0:
            return
        now = self.clock()
        if len(self.entries) >= MAX_ENTRIES:
            self.entries = {k: v for k, v in self.entries.items() if v[0] > now}
            if len(self.entries) >= MAX_ENTRIES:
                self.entries.clear()
        self.entries[key] = (now + self.ttl, user)


class JobDirectory:
    def __init__(self, backend: UserDirectory, ttl: float, *, deadline: float = 30.0,
                 report: Report | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.backend = backend
        self.remote = backend.remote
        self.deadline = deadline
        self._report = report
        self._clock = clock
        self._by_address = _TtlMap(ttl, clock)
        self._by_name = _TtlMap(ttl, clock)
        self._last_report: float | None = None
        self._batch: dict[str, User | None] = {}  # the last prefetch, misses included

    # -- calling the backend -------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: object) -> T:
        try:
            if not self.remote:
                return fn(*args)
            with trio.fail_after(self.deadline):
                # abandon_on_cancel: a thread stuck in libpq is left to its own timeouts;
                # the session answers now.
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        except trio.TooSlowError:
            exc: Exception = DirectoryUnavailable(
                f"{self.backend.describe()}: no answer within {self.deadline:g} s")
            await self.report(exc)
            raise exc from None
        except (DirectoryError, OSError) as exc:
            await self.report(exc)
            raise

    async def report(self, exc: BaseException) -> None:
        """Log and journal (PU) that the directory cannot be read: the first time, then at
        most once per REPORT_INTERVAL, so an outage does not flood the journal."""
        now = self._clock()
        if self._last_report is not None and now - self._last_report < REPORT_INTERVAL:
            return
        self._last_report = now
        reason = str(exc) or type(exc).__name__
        log.warning("directory unavailable (temporary failures until it is back): %s", reason)
        if self._report is not None:
            await self._report(reason)

    # -- lookups -------------------------------------------------------------------------

    async def lookup(self, address: str) -> User | None:
        """The owner of `address`, or None (RCPT, AUTH by address, sender checks)."""
        if not self.remote:
            return await self._call(self.backend.lookup, address)
        key = lookup_key(address)
        if key is None:
            return None
        user = self._by_address.get(key)
        if user is None:
            user = await self._call(self.backend.lookup, key)
            if user is not None:
                self._remember(user)
        return user

    async def get(self, name: str) -> User | None:
        if not self.remote:
            return await self._call(self.backend.get, name)
        user = self._by_name.get(name)
        if user is None:
            user = await self._call(self.backend.get, name)
            if user is not None:
                self._remember(user)
        return user

    async def check_password(self, user: User | None, password: str) -> bool:
        """The memory-hard check, in a worker thread (None: an unknown user, same cost)."""
        return await trio.to_thread.run_sync(check_login, user, password)

    def _remember(self, user: User) -> None:
        self._by_name.put(user.name, user)
        for a in user.addresses:
            self._by_address.put(a, user)

    # -- the framework pass: one query per batch, then synchronous answers ---------------

    async def prefetch(self, addresses: list[str]) -> None:
        """Look up every address a batch will resolve, in one round trip (remote only):
        lookup_now then answers each from what was found, misses included."""
        self._batch = {}
        if not self.remote:
            return
        keys = {k for a in addresses if (k := lookup_key(a)) is not None}
        wanted = sorted(k for k in keys if self._by_address.get(k) is None)
        if wanted:
            found = await self._call(self.backend.lookup_many, wanted)
            for key, user in found.items():
                self._batch[key] = user
                if user is not None:
                    self._remember(user)

    def lookup_now(self, address: str) -> User | None:
        """Synchronous lookup for the framework pass: from the cache or the last prefetch,
        else (rare: a TTL that ran out since) a blocking call."""
        if not self.remote:
            return self.backend.lookup(address)
        key = lookup_key(address)
        if key is None:
            return None
        user = self._by_address.get(key)
        if user is not None:
            return user
        if key in self._batch:
            return self._batch[key]
        return self.backend.lookup(key)

    @property
    def resolver(self) -> _Resolver:
        """An object with a synchronous lookup(address), as the framework pass wants."""
        return _Resolver(self)


class _Resolver:
    def __init__(self, directory: JobDirectory) -> None:
        self.lookup = directory.lookup_now
