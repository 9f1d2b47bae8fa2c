"""Relay restrictions (the source's five modes) and the classic tricks to get around them.

Pure logic: classify() says whether a recipient is local, may be relayed, or is
refused, for a given client address. The address comes from the SMTP core
already syntax-checked, with any source route dropped (RFC 5321 4.1.1.3).

Modes, for a recipient in no local domain:
  all   relay for anyone
  none  relay for no one
  near  relay to a near domain (or a subdomain of one), for anyone
  list  relay for clients in the listed networks, to anywhere
  both  near OR list

Tricks that never relay by themselves:
- `user%host@local` (the percent hack) is rewritten to `user@host` and classified
  again only when percent_hack is on; off, it is a local address the directory
  does not know.
- `host!user@local` (UUCP) and `"user@host"@local` (quoted) are local addresses
  with an odd local part, never rewritten.
- Domain literals (`[1.2.3.4]`, `[IPv6:...]`) are never local, not even our own
  address: they go by the mode like any remote domain.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

RELAY_MODES = ("all", "none", "near", "list", "both")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING_RE = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")


def normalize_domain(domain: str) -> str:
    """Lower case, one trailing dot dropped: the form every comparison uses."""
    domain = domain.lower()
    return domain[:-1] if domain.endswith(".") else domain


@dataclass(frozen=True)
class Verdict:
    kind: str  # "local", "relay" (allowed to go out) or "refused"
    address: str  # the address to use from now on (domain normalised, percent hack applied)
    reason: str  # for the journal, and the reply when refused


@dataclass(frozen=True)
class RelayRules:
    mode: str
    local_domains: frozenset[str]  # lower case
    near_domains: frozenset[str]  # lower case; a near domain also covers its subdomains
    networks: tuple[IPNetwork, ...]
    percent_hack: bool = False

    @classmethod
    def build(cls, *, mode: str, local_domains: Iterable[str], near_domains: Iterable[str],
              networks: list[str], percent_hack: bool) -> RelayRules:
        """Rules from configuration values; ValueError naming the first bad value."""
        if mode not in RELAY_MODES:
            raise ValueError(f"relay mode {mode!r}: must be one of {', '.join(RELAY_MODES)}")
        nets: list[IPNetwork] = []
        for text in networks:
            try:
                # strict: "10.1.2.3/8" is more likely a typo than a wish for 10.0.0.0/8.
                nets.append(ipaddress.ip_network(text.strip(), strict=True))
            except ValueError as exc:
                raise ValueError(f"relay network {text!r}: {exc}") from None
        return cls(mode=mode, local_domains=_domains("local domain", local_domains),
                   near_domains=_domains("near domain", near_domains),
                   networks=tuple(nets), percent_hack=percent_hack)

    def client_listed(self, peer_ip: str) -> bool:
        """Is the client in one of the networks? IPv4-mapped IPv6 peers match IPv4 networks;
        anything that is not an IP address (no peer, a Unix socket) is not listed."""
        try:
            addr = ipaddress.ip_address(peer_ip)
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [addr]
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            candidates.append(addr.ipv4_mapped)
        return any(a.version == net.version and a in net
                   for a in candidates for net in self.networks)

    def is_local(self, address: str) -> bool:
        """Is the address for this host (a local domain, or bare Postmaster)?"""
        if "@" not in address:
            return True
        return normalize_domain(address.rpartition("@")[2]) in self.local_domains

    def is_near(self, domain: str) -> bool:
        """Is the (normalised) domain a near domain or a subdomain of one?"""
        if domain.startswith("["):
            return False
        return any(domain == near or domain.endswith("." + near) for near in self.near_domains)

    def classify(self, address: str, peer_ip: str) -> Verdict:
        """Local, relayed or refused: `address` as given by the SMTP core for RCPT TO."""
        if "@" not in address:
            # The core lets only `Postmaster` through without a domain (RFC 5321 4.1.1.3);
            # anything else unqualified is for here too, never for elsewhere.
            return Verdict("local", address, "no domain")
        # rpartition: a quoted local part may itself hold "@".
        local, _, raw_domain = address.rpartition("@")
        domain = normalize_domain(raw_domain)
        address = f"{local}@{domain}"
        if domain in self.local_domains:
            return self._local(local, domain, address, peer_ip)
        return self._remote(domain, address, peer_ip)

    def _local(self, local: str, domain: str, address: str, peer_ip: str) -> Verdict:
        # Quoted and UUCP local parts name no host we would honour: plain local addresses.
        if local.startswith('"') or "!" in local:
            return Verdict("local", address, "local domain (odd local part, not rewritten)")
        if self.percent_hack and "%" in local:
            user, _, host = local.rpartition("%")  # the last "%", as sendmail does
            host = normalize_domain(host)
            if _DOT_STRING_RE.fullmatch(user) and _DOMAIN_RE.fullmatch(host):
                verdict = self.classify(f"{user}@{host}", peer_ip)
                why = f"percent hack: {address} -> {verdict.address}; {verdict.reason}"
                return Verdict(verdict.kind, verdict.address, why)
        return Verdict("local", address, "local domain")

    def _remote(self, domain: str, address: str, peer_ip: str) -> Verdict:
        mode = self.mode
        if mode == "all":
            return Verdict("relay", address, "relay mode all")
        if mode == "none":
            return Verdict("refused", address, "relay mode none: no relaying")
        near = mode in ("near", "both") and self.is_near(domain)
        if near:
            return Verdict("relay", address, f"relay mode {mode}: {domain} is a near domain")
        if mode in ("list", "both") and self.client_listed(peer_ip):
            return Verdict("relay", address, f"relay mode {mode}: client {peer_ip} is listed")
        if mode == "near":
            why = f"{domain} is not a near domain"
        elif mode == "list":
            why = f"client {peer_ip} is not in the listed networks"
        else:
            why = f"{domain} is not a near domain and client {peer_ip} is not listed"
        return Verdict("refused", address, f"relay mode {mode}: {why}")


def _domains(what: str, domains: Iterable[str]) -> frozenset[str]:
    if isinstance(domains, str):  # one name where a list belongs: not its characters
        raise ValueError(f"{what}s {domains!r}: must be a list of domain names")
    out: set[str] = set()
    for name in domains:
        if isinstance(name, str):
            norm = normalize_domain(name.strip())
            if _DOMAIN_RE.fullmatch(norm):
                out.add(norm)
                continue
        raise ValueError(f"{what} {name!r}: is not a valid domain name")
    return frozenset(out)
