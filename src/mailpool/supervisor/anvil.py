"""Per-client connection limits (Postfix's anvil), as pure logic with an injected clock.

Counts, per client address, the connections open now and those opened in the last minute.
A client over either limit is refused (the caller answers 421 4.7.0 and journals 9S); other
addresses are never affected. Addresses in the exceptions (by default loopback, as Postfix
exempts $mynetworks) are not counted. Memory is bounded: an address with nothing open and
no connection in the last minute is forgotten.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable, Sequence

WINDOW = 60.0
KEY_CACHE = 4096

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientLimits:
    def __init__(self, *, max_connections: int, max_rate: int, exceptions: Sequence[str],
                 clock: Callable[[], float]) -> None:
        self.max_connections = max_connections
        self.max_rate = max_rate
        self.exceptions: tuple[Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in exceptions)
        self._clock = clock
        self._open: dict[str, int] = {}
        self._recent: dict[str, deque[float]] = {}
        self._keys: dict[str, str | None] = {}  # parsed addresses (bounded): per connection

    def _key(self, ip: str) -> str | None:
        """The client's address as counted (IPv4-mapped IPv6 as IPv4), or None: exempt."""
        try:
            return self._keys[ip]
        except KeyError:
            pass
        if len(self._keys) >= KEY_CACHE:
            self._keys.clear()
        key = self._keys[ip] = self._parse(ip)
        return key

    def _parse(self, ip: str) -> str | None:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None  # not an IP client (a Unix socket): nothing to count
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        if any(addr.version == n.version and addr in n for n in self.exceptions):
            return None
        return str(addr)

    def admit(self, ip: str) -> str | None:
        """Count a new connection from `ip`; None when admitted (call closed() when it ends),
        else why it is refused (not counted)."""
        key = self._key(ip)
        if key is None:
            return None
        ip = key
        now = self._clock()
        recent = self._recent.setdefault(ip, deque())
        while recent and now - recent[0] >= WINDOW:
            recent.popleft()
        if self._open.get(ip, 0) >= self.max_connections:
            return f"too many connections from {ip} ({self.max_connections} open)"
        if len(recent) >= self.max_rate:
            return f"too many connections from {ip} ({self.max_rate} in a minute)"
        recent.append(now)
        self._open[ip] = self._open.get(ip, 0) + 1
        return None

    def closed(self, ip: str) -> None:
        key = self._key(ip)
        if key is None:
            return
        ip = key
        count = self._open.get(ip, 0) - 1
        if count > 0:
            self._open[ip] = count
        else:
            self._open.pop(ip, None)
            self._forget(ip)

    def _forget(self, ip: str) -> None:
        recent = self._recent.get(ip)
        now = self._clock()
        if recent is not None and (not recent or now - recent[-1] >= WINDOW):
            del self._recent[ip]

    def expire(self) -> None:
        """Forget addresses idle for a whole window (call now and then)."""
        now = self._clock()
        for ip in [ip for ip, r in self._recent.items()
                   if ip not in self._open and (not r or now - r[-1] >= WINDOW)]:
            del self._recent[ip]

    def open_connections(self, ip: str) -> int:
        return self._open.get(ip, 0)
