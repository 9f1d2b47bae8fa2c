"""The source's connection restrictions: a CIDR deny list and DNS blocklists (RFC 5782).

ConnectionRules.denied() is the deny list alone (pure, no I/O). check() adds the DNSBL
zones, asked all at once under one deadline. A blocklist can only refuse a client by a
positive answer: silence, SERVFAIL, error codes and nonsense answers never reject, they
become notes for the journal and the log.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import trio

from mailpool.outbound.resolver import EDNS_PAYLOAD, _nameserver_errors

__all__ = ["MAX_ZONES", "ConnectionRules", "Refusal", "client_address", "query_name"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Every zone is asked on every connection: a bound on the work one client can cause.
MAX_ZONES = 10
# RFC 5782 2.1: an A record in 127.0.0.0/8 lists the client...
LISTING_NET = ipaddress.IPv4Network("127.0.0.0/8")
# ...except 127.255.255.0/24, where lists put the codes of their own errors.
ERROR_NET = ipaddress.IPv4Network("127.255.255.0/24")
KNOWN_ERRORS = {
    "127.255.255.252": "typing error in the list's name",
    "127.255.255.254": "query via public resolver",
    "127.255.255.255": "too many queries",
}
# TXT text is the list's to choose: kept printable and short before it reaches a log.
TXT_LIMIT = 200
# A zone is plain LDH labels (underscores allowed), so it can go into a reply as it is.
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
# The longest query name (IPv6, 32 nibbles) must still fit with the zone (RFC 1035 2.3.4).
_LONGEST_PREFIX = ".".join("f" * 32)


@dataclass(frozen=True)
class Refusal:
    reason: str  # for the 554 reply and the journal
    listed_by: str  # "deny" (the CIDR list) or the DNSBL zone
    detail: str  # the network that matched, or the A answers and the TXT text if any


@dataclass
class _ZoneResult:
    """What one zone said so far."""

    answered: bool = False  # the A query is over (whatever its outcome)
    finished: bool = False  # and the TXT query too, when there was one
    codes: list[str] = field(default_factory=list)  # listing answers, in answer order
    text: str = ""
    notes: list[str] = field(default_factory=list)


def client_address(peer: str) -> IPAddress | None:
    """The address a peer is known by, IPv4-mapped IPv6 as IPv4; None when it is no IP
    address at all (a Unix socket path, say)."""
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:  # "fe80::1%eth0": the zone index is local only
            return ipaddress.IPv6Address(addr.packed)
    return addr


def query_name(addr: IPAddress, zone: str) -> str:
    """RFC 5782 2.1 and 2.4: the octets (IPv4) or the 32 nibbles (IPv6) reversed, then the
    zone, e.g. "7.2.0.192.bl.test"."""
    if isinstance(addr, ipaddress.IPv4Address):
        parts = reversed(str(addr).split("."))
    else:
        parts = reversed(addr.packed.hex())
    return ".".join(parts) + "." + zone


def _zone(text: str) -> str:
    zone = text.strip().lower().rstrip(".")
    labels = zone.split(".")
    if not zone or not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"restrictions: dnsbl zone {text!r} is not a domain name")
    try:
        dns.name.from_text(f"{_LONGEST_PREFIX}.{zone}")
    except dns.exception.DNSException:
        raise ValueError(f"restrictions: dnsbl zone {text!r} is too long") from None
    return zone


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip())
    except ValueError as exc:
        raise ValueError(f"restrictions: deny entry {text!r} is not a CIDR network: {exc}") \
            from None


def _txt(rdatas: Sequence[Any]) -> str:
    """The TXT records as one printable line: a record's strings joined, records by " "."""
    records = [b"".join(rd.strings) for rd in rdatas]
    text = " ".join(r.decode("ascii", "replace") for r in records)
    text = _UNPRINTABLE.sub("?", text)
    return text if len(text) <= TXT_LIMIT else text[: TXT_LIMIT - 3] + "..."


class ConnectionRules:
    def __init__(
        self,
        *,
        deny: Sequence[str],
        dnsbl: Sequence[str],
        timeout: float,
        nameservers: Sequence[str],
        port: int,
    ) -> None:
        self.deny = tuple(_network(text) for text in deny)
        if len(dnsbl) > MAX_ZONES:
            raise ValueError(
                f"restrictions: dnsbl has {len(dnsbl)} zones, at most {MAX_ZONES} are allowed"
            )
        zones = [_zone(text) for text in dnsbl]
        for zone in zones:
            if zones.count(zone) > 1:
                raise ValueError(f"restrictions: dnsbl zone {zone!r} is given twice")
        self.zones = tuple(zones)
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"restrictions: dnsbl_timeout {timeout!r} must be positive")
        self.timeout = timeout
        if self.zones and not nameservers:
            # Never /etc/resolv.conf: the host's DNS settings name the servers to ask.
            raise ValueError("restrictions: dnsbl needs the nameservers of the dns settings")
        for server in nameservers:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ValueError(f"restrictions: nameserver {server!r} is no IP address") \
                    from None
        if not 0 < port < 65536:
            raise ValueError(f"restrictions: DNS port {port} out of range")
        self._backend = dns.asyncbackend.get_backend("trio")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(nameservers)
        resolver.port = port
        # Our own deadline ends the lookups; dnspython's lifetime only keeps it honest.
        resolver.timeout = timeout
        resolver.lifetime = timeout
        resolver.retry_servfail = False  # a SERVFAIL is an answer, and a note
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        self._resolver = resolver

    # -- public ---------------------------------------------------------------------------

    def denied(self, ip: str) -> Refusal | None:
        """The deny list's verdict on a peer address (no I/O)."""
        addr = client_address(ip)
        if addr is None:
            return None
        given = ipaddress.ip_address(ip)
        for network in self.deny:
            # Either form matches: "::ffff:192.0.2.7" is denied by 192.0.2.0/24 and by
            # ::ffff:192.0.2.0/120.
            if addr in network or given in network:
                return Refusal(
                    f"Client host [{addr}] rejected: access denied", "deny", str(network)
                )
        return None

    async def check(self, ip: str) -> tuple[Refusal | None, list[str]]:
        """The deny list, then every DNSBL zone at once, all within `timeout`.

        Returns the refusal of the first zone (in configured order) that lists the client,
        and notes about the lists that failed.
        """
        refusal = self.denied(ip)
        if refusal is not None:
            return refusal, []
        addr = client_address(ip)
        if addr is None or not self.zones:
            return None, []

        names = [query_name(addr, zone) for zone in self.zones]
        results = [_ZoneResult() for _ in self.zones]
        decided = False
        with trio.move_on_after(self.timeout):
            async with trio.open_nursery() as nursery:

                async def ask(index: int) -> None:
                    nonlocal decided
                    await self._ask_zone(names[index], results[index])
                    if _first_listing(results) is not None:
                        decided = True
                        nursery.cancel_scope.cancel()  # later zones cannot change it

                for index in range(len(self.zones)):
                    nursery.start_soon(ask, index)

        notes: list[str] = []
        for zone, result in zip(self.zones, results, strict=True):
            notes.extend(f"{zone}: {note}" for note in result.notes)
            if not result.answered and not decided:
                notes.append(f"{zone}: timeout")
        # A zone that did not answer in time lists nobody; a listing whose TXT query was cut
        # short by the deadline still counts.
        for zone, result in zip(self.zones, results, strict=True):
            if result.codes:
                return self._listed(addr, zone, result), notes
        return None, notes

    # -- internals ------------------------------------------------------------------------

    @staticmethod
    def _listed(addr: IPAddress, zone: str, result: _ZoneResult) -> Refusal:
        detail = "A " + ", ".join(result.codes)
        if result.text:
            detail += "; TXT " + result.text
        return Refusal(f"Client host [{addr}] blocked using {zone}", zone, detail)

    async def _ask_zone(self, name: str, result: _ZoneResult) -> None:
        """Ask one zone about one client; the listing is recorded before the TXT query."""
        rdatas, problem = await self._ask(name, "A")
        if problem:
            result.notes.append(problem)
        for rdata in rdatas:
            answer = ipaddress.IPv4Address(rdata.address)
            if answer in ERROR_NET:
                known = KNOWN_ERRORS.get(str(answer))
                result.notes.append(f"error code {answer}" + (f" ({known})" if known else ""))
            elif answer in LISTING_NET:
                result.codes.append(str(answer))
            else:
                result.notes.append(f"answer {answer} outside {LISTING_NET} ignored")
        result.answered = True
        if result.codes:
            texts, _ = await self._ask(name, "TXT")  # best effort: no text, no note
            result.text = _txt(texts)
        result.finished = True

    async def _ask(self, name: str, rtype: str) -> tuple[list[Any], str]:
        """One query: its records, or none and what went wrong ("" when that is normal)."""
        try:
            answer = await self._resolver.resolve(
                dns.name.from_text(name), rtype, search=False, backend=self._backend
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [], ""  # not listed
        except dns.resolver.NoNameservers as exc:
            return [], _nameserver_errors(exc)
        except dns.exception.Timeout:
            return [], "timeout"
        except dns.exception.DNSException as exc:
            return [], f"{type(exc).__name__}: {exc}"
        return list(answer), ""


def _first_listing(results: Sequence[_ZoneResult]) -> int | None:
    """The zone whose refusal stands whatever the zones still asking say: it lists the
    client, its TXT query is over, and every zone before it answered without a listing."""
    for index, result in enumerate(results):
        if not result.answered:
            return None
        if result.codes:
            return index if result.finished else None
    return None
