"""Password checks, one way for POP3 logins and SMTP AUTH.

A recently verified password comes from the login cache; anything else pays the memory-hard
hash in a worker thread. A failure waits the base delay (unknown user and bad password alike)
and, repeated from one client address, longer, doubling up to the cap: the supervisor counts
failures per address across every job, so parallel guessing is slowed too.
"""

from __future__ import annotations

import trio

from mailpool.auth_cache import AuthCache
from mailpool.directory.cached import JobDirectory
from mailpool.jobs.runtime import JobContext


class Logins:
    def __init__(self, ctx: JobContext, directory: JobDirectory) -> None:
        cfg = ctx.config.pop3
        self.ctx = ctx
        self.directory = directory
        self.cache = AuthCache(cfg.auth_cache_ttl)
        self.base_delay = cfg.auth_fail_delay
        self.max_delay = cfg.auth_fail_delay_max

    async def user_name(self, login: str) -> str | None:
        """The directory user a login names: a user name, or one of a user's addresses."""
        if "@" in login:
            entry = await self.directory.lookup(login)
            return entry.name if entry is not None else None
        return login

    async def check(self, login: str, password: str) -> str | None:
        """The user when the password is right, else None. DirectoryError or OSError when the
        directory cannot be read (the caller answers a temporary failure)."""
        user = await self.user_name(login)
        if user is None:
            # The same memory-hard work as a wrong password: no hint that the name is unknown.
            await self.directory.check_password(None, password)
            return None
        entry = await self.directory.get(user)
        stored = entry.password_hash if entry is not None else ""
        if stored and self.cache.check(user, password, stored):
            return user
        ok = await self.directory.check_password(entry, password)
        if ok:
            self.cache.remember(user, password, stored)
        return user if ok else None

    async def failed(self, ip: str, failures: int) -> int:
        """A failed login from `ip`: counted across jobs, then the delay; the new count."""
        failures = max(failures + 1, await self.ctx.auth_failed(ip))
        await trio.sleep(min(self.base_delay * 2 ** max(0, failures - 1), self.max_delay))
        return failures
