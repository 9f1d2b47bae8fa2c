"""The five relay modes against the classic relay tricks: the full matrix, byte for byte."""

from __future__ import annotations

import ipaddress
import random
import re

import pytest

from mailpool.protocol.smtp_syntax import parse_path
from mailpool.relay import RELAY_MODES, RelayRules, Verdict

LISTED = "10.1.2.3"
UNLISTED = "192.0.2.7"


def rules(mode: str, *, hack: bool = False) -> RelayRules:
    return RelayRules.build(mode=mode, local_domains=["local.example", "Other.Local."],
                            near_domains=["near.example"],
                            networks=["10.0.0.0/8", "2001:db8::/32"], percent_hack=hack)


# (address as the SMTP core hands it over, percent hack: None = either setting,
#  what it is: "local" / "near" (remote, a near domain) / "far" (remote, not near),
#  the address to use from now on)
CASES: list[tuple[str, bool | None, str, str]] = [
    ("user@local.example", None, "local", "user@local.example"),
    ("user@other.local", None, "local", "user@other.local"),
    ("user@near.example", None, "near", "user@near.example"),
    ("user@mx.near.example", None, "near", "user@mx.near.example"),
    ("user@far.example", None, "far", "user@far.example"),
    ("user@evilnear.example", None, "far", "user@evilnear.example"),
    ("user@near.example.far.example", None, "far", "user@near.example.far.example"),
    # <@a.example,@b.example:u@far.example> after the core dropped the source route
    ("u@far.example", None, "far", "u@far.example"),
    # the percent hack
    ("u%far.example@local.example", False, "local", "u%far.example@local.example"),
    ("u%far.example@local.example", True, "far", "u@far.example"),
    ("u%near.example@local.example", False, "local", "u%near.example@local.example"),
    ("u%mx.near.example@local.example", True, "near", "u@mx.near.example"),
    ("u%other.local@local.example", True, "local", "u@other.local"),
    ("a%b%far.example@local.example", True, "far", "a%b@far.example"),  # the last % only
    ("u%far.example%local.example@local.example", True, "far", "u@far.example"),  # twice
    ("u%not_a_domain@local.example", True, "local", "u%not_a_domain@local.example"),
    ("u%@local.example", True, "local", "u%@local.example"),
    ("%far.example@local.example", True, "local", "%far.example@local.example"),
    ("u%FAR.Example@LOCAL.EXAMPLE.", True, "far", "u@far.example"),
    ("u%far.example@far.example", True, "far", "u%far.example@far.example"),
    # UUCP bang paths and quoted local parts: odd local addresses, never rewritten
    ("far.example!u@local.example", None, "local", "far.example!u@local.example"),
    ("far.example!u%far.example@local.example", True, "local",
     "far.example!u%far.example@local.example"),
    ('"u@far.example"@local.example', None, "local", '"u@far.example"@local.example'),
    ('"u%far.example"@local.example', True, "local", '"u%far.example"@local.example'),
    ('"u@far.example"@far.example', None, "far", '"u@far.example"@far.example'),
    # domain literals are remote, even our own address
    ("u@[127.0.0.1]", None, "far", "u@[127.0.0.1]"),
    ("u@[10.1.2.3]", None, "far", "u@[10.1.2.3]"),
    ("u@[IPv6:::1]", None, "far", "u@[ipv6:::1]"),
    ("postmaster@[127.0.0.1]", None, "far", "postmaster@[127.0.0.1]"),
    # postmaster
    ("Postmaster", None, "local", "Postmaster"),
    ("POSTMASTER", None, "local", "POSTMASTER"),
    ("postmaster@local.example", None, "local", "postmaster@local.example"),
    ("PostMaster@LOCAL.EXAMPLE.", None, "local", "PostMaster@local.example"),
    ("postmaster@far.example", None, "far", "postmaster@far.example"),
    # case and one trailing dot do not matter; the local part keeps its case
    ("User@LOCAL.Example", None, "local", "User@local.example"),
    ("user@FAR.EXAMPLE", None, "far", "user@far.example"),
    ("user@MX.Near.Example", None, "near", "user@mx.near.example"),
    ("user@local.example.", None, "local", "user@local.example"),
    ("user@far.example.", None, "far", "user@far.example"),
    ("user@near.example.", None, "near", "user@near.example"),
    ("user@local.example..", None, "far", "user@local.example."),  # only one dot
]


def allowed(mode: str, what: str, listed: bool) -> bool:
    near = what == "near"
    return {"all": True, "none": False, "near": near, "list": listed,
            "both": near or listed}[mode]


@pytest.mark.parametrize("hack", [False, True], ids=["hack-off", "hack-on"])
@pytest.mark.parametrize("peer", [LISTED, UNLISTED], ids=["listed", "unlisted"])
@pytest.mark.parametrize("mode", RELAY_MODES)
def test_relay_matrix(mode: str, peer: str, hack: bool) -> None:
    r = rules(mode, hack=hack)
    got, want = [], []
    for address, case_hack, what, final in CASES:
        if case_hack is not None and case_hack != hack:
            continue
        if what == "local":
            kind = "local"
        else:
            kind = "relay" if allowed(mode, what, peer == LISTED) else "refused"
        verdict = r.classify(address, peer)
        got.append((address, verdict.kind, verdict.address))
        want.append((address, kind, final))
    assert got == want
    assert len(got) >= 25  # the filter above kept the cases


def test_relay_only_where_the_mode_allows_it() -> None:
    # The same cases, seen from the other side: a count of relays per mode and client.
    counts = {}
    for mode in RELAY_MODES:
        for peer in (LISTED, UNLISTED):
            for hack in (False, True):
                r = rules(mode, hack=hack)
                counts[mode, peer, hack] = sum(
                    r.classify(a, peer).kind == "relay" for a, h, _, _ in CASES
                    if h is None or h == hack)
    for hack in (False, True):
        assert counts["none", LISTED, hack] == counts["none", UNLISTED, hack] == 0
        assert counts["list", UNLISTED, hack] == 0
        assert counts["near", LISTED, hack] == counts["near", UNLISTED, hack] > 0
        assert counts["both", UNLISTED, hack] == counts["near", UNLISTED, hack]
        assert counts["both", LISTED, hack] == counts["all", UNLISTED, hack] \
            == counts["list", LISTED, hack]


def test_reasons_name_the_mode() -> None:
    far = "user@far.example"
    assert rules("all").classify(far, UNLISTED) == Verdict(
        "relay", far, "relay mode all")
    assert rules("none").classify(far, LISTED) == Verdict(
        "refused", far, "relay mode none: no relaying")
    assert rules("near").classify(far, LISTED) == Verdict(
        "refused", far, "relay mode near: far.example is not a near domain")
    assert rules("list").classify(far, UNLISTED) == Verdict(
        "refused", far, "relay mode list: client 192.0.2.7 is not in the listed networks")
    assert rules("both").classify(far, UNLISTED) == Verdict(
        "refused", far,
        "relay mode both: far.example is not a near domain and client 192.0.2.7 is not listed")
    assert rules("both").classify(far, LISTED) == Verdict(
        "relay", far, "relay mode both: client 10.1.2.3 is listed")
    assert rules("near").classify("u@mx.near.example", UNLISTED) == Verdict(
        "relay", "u@mx.near.example", "relay mode near: mx.near.example is a near domain")
    assert rules("none", hack=True).classify("u%far.example@local.example", LISTED) == Verdict(
        "refused", "u@far.example",
        "percent hack: u%far.example@local.example -> u@far.example; "
        "relay mode none: no relaying")
    assert rules("none").classify("u@local.example", UNLISTED) == Verdict(
        "local", "u@local.example", "local domain")


def test_client_listed() -> None:
    r = rules("list")
    assert r.client_listed("10.1.2.3")
    assert r.client_listed("10.255.255.255")
    assert r.client_listed("::ffff:10.1.2.3")  # IPv4-mapped: an IPv4 client on a v6 socket
    assert r.client_listed("2001:db8::25")
    assert not r.client_listed("11.0.0.1")
    assert not r.client_listed("::ffff:192.0.2.7")
    assert not r.client_listed("2001:db9::1")
    assert not r.client_listed("::1")
    assert not r.client_listed("fe80::1%eth0")
    for junk in ("", "unix", "10.1.2", "10.1.2.3:25"):
        assert not r.client_listed(junk)
    # A listed IPv4-mapped IPv6 network still matches that form.
    mapped = RelayRules.build(mode="list", local_domains=[], near_domains=[],
                              networks=["::ffff:10.0.0.0/104"], percent_hack=False)
    assert mapped.client_listed("::ffff:10.9.9.9")
    assert not mapped.client_listed("::ffff:11.9.9.9")
    nobody = RelayRules.build(mode="list", local_domains=[], near_domains=[], networks=[],
                              percent_hack=False)
    assert not nobody.client_listed("10.1.2.3")
    assert nobody.classify("u@far.example", "10.1.2.3").kind == "refused"


def test_build_normalises_and_refuses_bad_values() -> None:
    r = rules("both")
    assert r.local_domains == frozenset({"local.example", "other.local"})
    assert r.near_domains == frozenset({"near.example"})
    assert r.networks == (ipaddress.ip_network("10.0.0.0/8"),
                          ipaddress.ip_network("2001:db8::/32"))
    single = RelayRules.build(mode="list", local_domains=[], near_domains=[],
                              networks=["192.0.2.7", "::1"], percent_hack=False)
    assert single.client_listed("192.0.2.7") and single.client_listed("::1")
    assert not single.client_listed("192.0.2.8")

    def build(**kw: object) -> RelayRules:
        args: dict[str, object] = {"mode": "near", "local_domains": ["local.example"],
                                   "near_domains": [], "networks": [], "percent_hack": False}
        args.update(kw)
        return RelayRules.build(**args)  # type: ignore[arg-type]

    with pytest.raises(ValueError, match="relay mode 'bogus'"):
        build(mode="bogus")
    with pytest.raises(ValueError, match="relay mode 'NEAR'"):
        build(mode="NEAR")
    for cidr in ("10.0.0.0/33", "10.1.2.3/8", "nonsense", "2001:db8::/129"):
        with pytest.raises(ValueError, match=re.escape(f"relay network '{cidr}'")):
            build(networks=["10.0.0.0/8", cidr])
    with pytest.raises(ValueError, match="near domain 'bad domain'"):
        build(near_domains=["bad domain"])
    with pytest.raises(ValueError, match="local domain ''"):
        build(local_domains=[""])
    with pytest.raises(ValueError, match=r"local domains 'local\.example'"):
        build(local_domains="local.example")


_DOMAINS = ["far.example", "near.example", "a.near.example", "local.example", "Other.Local",
            "x_y"]
_PIECES = ["u", "user", "%", "%", "!", ".", "far.example", "near.example", "local.example",
           "other.local", "LOCAL.EXAMPLE", "[127.0.0.1]", "postmaster", '"', "@", "x_y"]


def _random_addresses(n: int) -> list[str]:
    """Strings the SMTP core accepts as a RCPT TO mailbox, built from relay-trick pieces."""
    rng = random.Random(5)
    out: list[str] = []
    while len(out) < n:
        if rng.random() < 0.5:
            local = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 6)))
        else:  # user, then hops such as %far.example or !near.example
            local = rng.choice(["u", "postmaster", "a.b"]) + "".join(
                rng.choice("%%!") + rng.choice(_DOMAINS) for _ in range(rng.randint(1, 3)))
            if rng.random() < 0.1:
                local = f'"{local}"'
        domain = rng.choice(["local.example", "Local.Example.", "other.local", "far.example",
                             "near.example", "a.near.example", "[127.0.0.1]"])
        address = f"{local}@{domain}"
        if parse_path(address, null_ok=False, postmaster_ok=True) == address:
            out.append(address)
    return out


def test_no_trick_relays_where_the_mode_forbids() -> None:
    addresses = _random_addresses(3000)
    assert sum("%" in a for a in addresses) > 500 and sum(a.startswith('"') for a in addresses)
    for hack in (False, True):
        for mode in RELAY_MODES:
            r = rules(mode, hack=hack)
            for address in addresses:
                v = r.classify(address, UNLISTED)
                domain = v.address.rpartition("@")[2]
                # Whatever comes out is still a mailbox the core would have accepted.
                assert parse_path(v.address, null_ok=False, postmaster_ok=True) == v.address
                if v.kind == "local":
                    assert domain in r.local_domains
                else:
                    assert domain not in r.local_domains
                if v.kind == "relay":
                    assert mode in ("all", "near", "both"), (mode, address, v)
                    if mode != "all":
                        assert domain == "near.example" or domain.endswith(".near.example")
                if not hack:  # nothing rewrites a local part but the percent hack
                    assert v.address.rpartition("@")[0] == address.rpartition("@")[0]
