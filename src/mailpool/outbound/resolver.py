"""The outbound DNS resolver: MX and address lookups with dnspython on Trio.

The resolver never reads /etc/resolv.conf: the nameservers, port and timeouts come from
configuration (DnsSettings). Every query names the Trio backend explicitly, because
dnspython detects its default backend once per process. With `settings.cache` answers are
kept for their TTL and negative answers for the zone's negative TTL (our own small cache:
dnspython's would still raise and build its exceptions on every hit); without it each
delivery asks afresh.

Every DNS failure a lookup meets comes back as a DnsProblem (for the caller's journal),
whether or not it ended the route.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import trio

from mailpool.outbound.mx import (
    MAX_HOSTS,
    MxHostName,
    MxRecord,
    RouteFailure,
    normalize_name,
    select_hosts,
)

__all__ = [
    "DnsProblem",
    "DnsSettings",
    "MailResolver",
    "MxHost",
    "Route",
    "RouteFailure",
]

log = logging.getLogger("mailpool.dns")

# EDNS(0) buffer size of the DNS flag day 2020: big enough for most MX sets, small enough
# not to fragment. Bigger answers come truncated and dnspython retries them over TCP.
EDNS_PAYLOAD = 1232
# Grace past the lifetime before our own deadline cuts a query that dnspython did not end.
DEADLINE_GRACE = 1.0
# The answer cache (settings.cache): at most this many entries, each at most this long.
CACHE_ENTRIES = 4096
CACHE_MAX_TTL = 3600.0


@dataclass(frozen=True)
class DnsSettings:
    nameservers: tuple[str, ...]
    port: int = 53
    timeout: float = 5.0  # one query to one server
    lifetime: float = 10.0  # one lookup, all retries and servers included
    cache: bool = False

    def __post_init__(self) -> None:
        if not self.nameservers:
            raise ValueError("DnsSettings: at least one nameserver is needed")
        for server in self.nameservers:
            ipaddress.ip_address(server)  # ValueError names the bad one
        if not 0 < self.port < 65536:
            raise ValueError(f"DnsSettings: port {self.port} out of range")
        if self.timeout <= 0 or self.lifetime <= 0:
            raise ValueError("DnsSettings: timeout and lifetime must be positive")


@dataclass(frozen=True)
class DnsProblem:
    query: str  # "example.test MX", "mx1.example.test AAAA"
    reason: str  # "NXDOMAIN", "SERVFAIL", "timeout", "no answer (NODATA)", ...
    permanent: bool


@dataclass(frozen=True)
class MxHost:
    name: str
    preference: int
    implicit: bool
    addresses: tuple[str, ...]  # IPv6 first, then IPv4, each in answer order


@dataclass(frozen=True)
class Route:
    domain: str
    hosts: tuple[MxHost, ...]  # only hosts with an address, in MX order, at most MAX_HOSTS


NODATA = "no answer (NODATA)"


@dataclass
class _Outcome:
    """One query's result: its records, or why there are none."""

    rdatas: list[Any] = field(default_factory=list)  # dns.rdata.Rdata of the asked type
    problem: DnsProblem | None = None

    @property
    def nodata(self) -> bool:
        return self.problem is not None and self.problem.reason == NODATA


@dataclass
class _HostLookup:
    addresses: tuple[str, ...]
    problems: list[DnsProblem]


def _not_found(name: str, rtype: str, *, temporary: bool) -> str:
    # Postfix's wording, which mail administrators recognise.
    text = f"Host or domain name not found. Name service error for name={name} type={rtype}"
    return text + (": Host not found, try again" if temporary else ": Host not found")


def _temporary_failure(query: str) -> RouteFailure:
    name, _, rtype = query.rpartition(" ")
    return RouteFailure(False, 451, "4.4.3", _not_found(name, rtype, temporary=True))


def _literal_address(text: str) -> str | None:
    """The address of an RFC 5321 domain literal "[1.2.3.4]" / "[IPv6:...]", else None.

    Raises ValueError for a bracketed text that is no valid address literal.
    """
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if inner[:5].lower() == "ipv6:":
        return str(ipaddress.IPv6Address(inner[5:]))
    return str(ipaddress.IPv4Address(inner))


def _nameserver_errors(exc: dns.resolver.NoNameservers) -> str:
    """What every nameserver said, e.g. "SERVFAIL" or "REFUSED, timeout"."""
    reasons: list[str] = []
    for error in exc.kwargs.get("errors") or []:
        cause = error[3]
        if isinstance(cause, str):
            text = cause  # an rcode the server answered
        elif isinstance(cause, dns.exception.Timeout):
            text = "timeout"
        else:
            text = f"{type(cause).__name__}: {cause}"
        if text not in reasons:
            reasons.append(text)
    return ", ".join(reasons) or "no nameserver answering"


def system_nameservers() -> tuple[str, ...]:
    """The nameservers of /etc/resolv.conf, for [dns] nameservers left empty (read once,
    when a job starts; never for the search list or options)."""
    try:
        found = tuple(dns.resolver.Resolver(configure=True).nameservers)
    except dns.exception.DNSException as exc:
        found = ()
        log.error("no usable /etc/resolv.conf (%s): set [dns] nameservers", exc)
    return found or ("127.0.0.1",)


def _negative_ttl(responses: Iterable[Any]) -> float:
    """RFC 2308: a negative answer is kept for the smaller of the SOA's TTL and its minimum;
    without an SOA in the authority section it is not kept."""
    for response in responses:
        for rrset in getattr(response, "authority", ()):
            if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
                return float(min(rrset.ttl, rrset[0].minimum))
    return 0.0


class MailResolver:
    def __init__(
        self,
        settings: DnsSettings,
        *,
        my_names: Collection[str],
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.my_names = frozenset(normalize_name(n) for n in my_names)
        self.rng = rng if rng is not None else random.Random()
        self._backend = dns.asyncbackend.get_backend("trio")
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = list(settings.nameservers)
        resolver.port = settings.port
        resolver.timeout = settings.timeout
        resolver.lifetime = settings.lifetime
        # A SERVFAIL is an answer: asking the same servers again only burns the lifetime.
        resolver.retry_servfail = False
        resolver.use_edns(0, 0, EDNS_PAYLOAD)
        self._resolver = resolver
        # (name, type) -> (monotonic expiry, outcome): answers for their TTL, "no such name"
        # and "no such record" for the zone's negative TTL (RFC 2308); failures never.
        self._cache: dict[tuple[str, str], tuple[float, _Outcome]] = {}
        self._clock = time.monotonic

    # -- public ---------------------------------------------------------------------------

    async def route(self, domain: str) -> tuple[Route | RouteFailure, list[DnsProblem]]:
        """The hosts to deliver mail for `domain` to, with their addresses."""
        try:
            literal = _literal_address(domain)
        except ValueError:
            return RouteFailure(True, 550, "5.1.2", f"bad domain literal {domain}"), []
        if literal is not None:
            return Route(domain, (MxHost(domain, 0, True, (literal,)),)), []

        domain = normalize_name(domain)
        if self._bad_name(domain):
            return RouteFailure(True, 550, "5.1.2", f"bad domain name {domain!r}"), []

        records, problems = await self.mx_of(domain)
        if isinstance(records, RouteFailure):
            return records, problems
        selected = select_hosts(domain, records, my_names=self.my_names, rng=self.rng)
        if isinstance(selected, RouteFailure):
            return selected, problems

        lookups = await self._lookup_hosts([h.name for h in selected])
        hosts: list[MxHost] = []
        for host, found in zip(selected, lookups, strict=True):
            problems.extend(found.problems)
            if found.addresses:
                hosts.append(MxHost(host.name, host.preference, host.implicit, found.addresses))
        if hosts:
            return Route(domain, tuple(hosts[:MAX_HOSTS])), problems
        return self._no_address_failure(domain, selected, problems), problems

    async def host_addresses(
        self, name: str
    ) -> tuple[tuple[str, ...] | RouteFailure, list[DnsProblem]]:
        """AAAA then A addresses of one host name (or the address of a literal)."""
        try:
            literal = _literal_address(name)
            if literal is None:
                literal = str(ipaddress.ip_address(name))
        except ValueError:
            literal = None
        if literal is not None:
            return (literal,), []
        name = normalize_name(name)
        if self._bad_name(name):
            return RouteFailure(True, 550, "5.1.2", f"bad host name {name!r}"), []
        (found,) = await self._lookup_hosts([name])
        if found.addresses:
            return found.addresses, found.problems
        temporary = [p for p in found.problems if not p.permanent]
        if temporary:
            return _temporary_failure(temporary[0].query), found.problems
        failure = RouteFailure(True, 550, "5.4.4", _not_found(name, "A", temporary=False))
        return failure, found.problems

    async def mx_of(
        self, domain: str
    ) -> tuple[list[MxRecord] | RouteFailure | None, list[DnsProblem]]:
        """The MX records of `domain`; None when it has none (NODATA), or the failure."""
        outcome = await self._query(domain, "MX")
        if outcome.problem is None:
            records = [
                MxRecord(rd.preference, normalize_name(rd.exchange.to_text()))
                for rd in outcome.rdatas
            ]
            return records, []
        if outcome.nodata:
            return None, []  # no MX records is no problem: the domain is its own MX
        problem = outcome.problem
        if problem.permanent:
            failure = RouteFailure(True, 550, "5.1.2", _not_found(domain, "MX", temporary=False))
        else:
            failure = _temporary_failure(problem.query)
        return failure, [problem]

    # -- internals ------------------------------------------------------------------------

    @staticmethod
    def _bad_name(name: str) -> bool:
        if not name:
            return True
        try:
            dns.name.from_text(name)
        except dns.exception.DNSException:
            return True
        return False

    def _no_address_failure(
        self, domain: str, selected: Sequence[MxHostName], problems: Sequence[DnsProblem]
    ) -> RouteFailure:
        temporary = [p for p in problems if not p.permanent]
        if temporary:
            return _temporary_failure(temporary[0].query)
        if selected and selected[0].implicit:
            return RouteFailure(True, 550, "5.4.4", _not_found(domain, "A", temporary=False))
        return RouteFailure(
            True, 550, "5.4.4", f"No MX host for {domain} has a valid address record"
        )

    async def _lookup_hosts(self, names: Sequence[str]) -> list[_HostLookup]:
        """AAAA and A of every name, all at once; results in the order of `names`."""
        outcomes: dict[tuple[str, str], _Outcome] = {}

        async def one(name: str, rtype: str) -> None:
            outcomes[name, rtype] = await self._query(name, rtype)

        async with trio.open_nursery() as nursery:
            for name in names:
                for rtype in ("AAAA", "A"):
                    nursery.start_soon(one, name, rtype)

        lookups = []
        for name in names:
            v6, v4 = outcomes[name, "AAAA"], outcomes[name, "A"]
            addresses = tuple(rd.address for rd in v6.rdatas + v4.rdatas)
            problems = [
                o.problem
                for o in (v6, v4)
                # One family without records is normal when the other has some.
                if o.problem is not None and not (o.nodata and addresses)
            ]
            lookups.append(_HostLookup(addresses, problems))
        return lookups

    async def _query(self, name: str, rtype: str) -> _Outcome:
        if not self.settings.cache:
            return (await self._ask(name, rtype))[0]
        key = (name, rtype)
        hit = self._cache.get(key)
        now = self._clock()
        if hit is not None and hit[0] > now:
            return hit[1]
        outcome, ttl = await self._ask(name, rtype)
        if ttl > 0:
            if len(self._cache) >= CACHE_ENTRIES:
                # Bounded: drop what has expired, or else the oldest half.
                live = {k: v for k, v in self._cache.items() if v[0] > now}
                if len(live) >= CACHE_ENTRIES:
                    live = dict(sorted(live.items(), key=lambda kv: kv[1][0])
                                [CACHE_ENTRIES // 2:])
                self._cache = live
            self._cache[key] = (now + min(ttl, CACHE_MAX_TTL), outcome)
        return outcome

    async def _ask(self, name: str, rtype: str) -> tuple[_Outcome, float]:
        """One lookup: its outcome and how long it may be kept (0: not at all)."""
        query = f"{name} {rtype}"

        def failed(reason: str, permanent: bool, ttl: float = 0.0) -> tuple[_Outcome, float]:
            return _Outcome(problem=DnsProblem(query, reason, permanent)), ttl

        qname = dns.name.from_text(name)  # absolute: no search list, no local domain
        answer = None
        # dnspython ends a lookup at its lifetime; this deadline only guards against a
        # backend that does not.
        with trio.move_on_after(self.settings.lifetime + DEADLINE_GRACE):
            try:
                answer = await self._resolver.resolve(
                    qname, rtype, search=False, backend=self._backend
                )
            except dns.resolver.NXDOMAIN as exc:
                return failed("NXDOMAIN", True, _negative_ttl(exc.responses().values()))
            except dns.resolver.NoAnswer as exc:
                return failed(NODATA, True, _negative_ttl([exc.kwargs.get("response")]))
            except dns.resolver.NoNameservers as exc:
                return failed(_nameserver_errors(exc), False)
            except dns.exception.Timeout:  # LifetimeTimeout included
                return failed("timeout", False)
            except dns.exception.DNSException as exc:
                return failed(f"{type(exc).__name__}: {exc}", False)
        if answer is None:
            return failed("timeout", False)
        ttl = answer.rrset.ttl if answer.rrset is not None else 0
        return _Outcome(rdatas=list(answer)), float(ttl)
