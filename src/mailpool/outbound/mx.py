"""Which hosts to try for a domain, from its MX records (RFC 5321 5.1, RFC 7505 null MX).

Pure rules: no DNS, no I/O. The resolver feeds the MX answer in (None when the domain has
no MX records at all) and gets back the host names to look up, in the order to try them,
or a RouteFailure that ends the attempt without any address lookup.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_HOSTS",
    "MxHostName",
    "MxRecord",
    "RouteFailure",
    "is_null_mx",
    "normalize_name",
    "order_mx",
    "select_hosts",
]

# Postfix tries at most 5 MX hosts per delivery (smtp_mx_address_limit is similar).
MAX_HOSTS = 5


@dataclass(frozen=True)
class MxRecord:
    preference: int
    host: str  # lower case, no trailing dot; "" for the root (null MX target ".")


@dataclass(frozen=True)
class MxHostName:
    name: str
    preference: int
    implicit: bool  # no MX records: the domain itself stands in as its own MX (RFC 5321 5.1)


@dataclass(frozen=True)
class RouteFailure:
    """Delivery to this domain cannot proceed; `code`/`status` are the SMTP reply to report."""

    permanent: bool
    code: int
    status: str
    reason: str


def normalize_name(name: str) -> str:
    """DNS names compare case-insensitively and with or without the root's trailing dot."""
    return name.rstrip(".").lower()


def is_null_mx(records: Sequence[MxRecord]) -> bool:
    """RFC 7505: the domain publishes exactly one MX record and its target is the root."""
    return len(records) == 1 and records[0].host == ""


def order_mx(records: Iterable[MxRecord], rng: random.Random) -> list[MxRecord]:
    """Lowest preference first; hosts of equal preference in random order (RFC 5321 5.1)."""
    ordered: list[MxRecord] = []
    by_pref = sorted(records, key=lambda r: r.preference)
    for _, group in itertools.groupby(by_pref, key=lambda r: r.preference):
        same = list(group)
        rng.shuffle(same)
        ordered.extend(same)
    return ordered


def _null_mx_failure(domain: str) -> RouteFailure:
    return RouteFailure(
        permanent=True,
        code=556,
        status="5.1.10",
        reason=f"Recipient address rejected: Domain {domain} does not accept mail (nullMX)",
    )


def select_hosts(
    domain: str,
    records: Sequence[MxRecord] | None,
    *,
    my_names: Collection[str],
    rng: random.Random,
    max_hosts: int = MAX_HOSTS,
) -> list[MxHostName] | RouteFailure:
    """The hosts to look up for `domain`, in the order to try them, at most `max_hosts`.

    `records` is None when the domain has no MX records (NODATA): the domain itself is the
    implicit MX. An MX host that is one of `my_names` means we are an MX for the domain:
    only strictly better MX hosts may be used, or the mail would loop back to us.
    """
    domain = normalize_name(domain)
    implicit = records is None
    if records is None:
        records = [MxRecord(0, domain)]
    elif is_null_mx(records):
        return _null_mx_failure(domain)

    # A "." among real MX records is not a null MX (RFC 7505 3): just skip it. If only
    # "." targets remain the domain still says it takes no mail.
    real = [r for r in records if r.host != ""]
    if not real:
        return _null_mx_failure(domain)

    ordered = order_mx(real, rng)
    mine = {normalize_name(n) for n in my_names}
    own_prefs = [r.preference for r in ordered if normalize_name(r.host) in mine]
    if own_prefs:
        best_own = min(own_prefs)
        ordered = [r for r in ordered if r.preference < best_own]
        if not ordered:
            return RouteFailure(
                permanent=True,
                code=554,
                status="5.4.6",
                reason=f"mail for {domain} loops back to myself",
            )

    # The same host listed twice (at two preferences) is tried once, at its best one.
    hosts: list[MxHostName] = []
    seen: set[str] = set()
    for r in ordered:
        name = normalize_name(r.host)
        if name in seen:
            continue
        seen.add(name)
        hosts.append(MxHostName(name, r.preference, implicit))
    return hosts[:max_hosts]
