"""Recently verified logins, so a mail client polling every minute does not pay a
memory-hard password hash each time (Dovecot's auth_cache does the same).

Only a keyed digest of the password is kept (the key is random per process, never stored),
each entry lasts `ttl` seconds and only while the user's stored hash is unchanged. A wrong
password never matches, so it still costs the full hash.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable

MAX_ENTRIES = 10_000


class AuthCache:
    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._entries: dict[str, tuple[bytes, str, float]] = {}

    def _digest(self, user: str, password: str) -> bytes:
        data = user.encode("utf-8", "surrogateescape") + b"\0" + password.encode(
            "utf-8", "surrogateescape")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def check(self, user: str, password: str, stored_hash: str) -> bool:
        """True only for the password last verified for `user`, within ttl, hash unchanged."""
        entry = self._entries.get(user)
        if entry is None:
            return False
        digest, stored, expires = entry
        if stored != stored_hash or self._clock() > expires:
            del self._entries[user]
            return False
        return hmac.compare_digest(digest, self._digest(user, password))

    def remember(self, user: str, password: str, stored_hash: str) -> None:
        if self.ttl <= 0:
            return
        if len(self._entries) >= MAX_ENTRIES:
            now = self._clock()
            for name in [n for n, (_, _, exp) in self._entries.items() if exp < now]:
                del self._entries[name]
            if len(self._entries) >= MAX_ENTRIES:
                self._entries.pop(next(iter(self._entries)))
        self._entries[user] = (self._digest(user, password), stored_hash,
                               self._clock() + self.ttl)
