"""Connection restrictions: the CIDR deny list, and DNS blocklists against the suite's DNS
server (tests/dnsserver.py)."""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterator

import pytest
from dnsserver import DnsServer  # tests/ is on sys.path

from mailpool.restrictions import ConnectionRules, Refusal, client_address, query_name

TIMEOUT = 0.5
CLIENT = "192.0.2.7"
NAME = "7.2.0.192.bl.test"  # CLIENT in the zone bl.test


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as srv:
        yield srv
        assert srv.errors == []


def make_rules(
    port: int, *, deny: tuple[str, ...] = (), dnsbl: tuple[str, ...] = ("bl.test",),
    timeout: float = TIMEOUT,
) -> ConnectionRules:
    return ConnectionRules(
        deny=deny, dnsbl=dnsbl, timeout=timeout, nameservers=("127.0.0.1",), port=port
    )


# -- query names (pure) -------------------------------------------------------------------


def test_query_names_rfc5782() -> None:
    assert query_name(ipaddress.IPv4Address("192.0.2.99"), "bad.example") == (
        "99.2.0.192.bad.example"
    )
    # RFC 5782 2.4's own example.
    assert query_name(ipaddress.IPv6Address("2001:db8:1:2:3:4:567:89ab"), "ugly.example") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example"
    )


def test_client_address() -> None:
    assert client_address("::ffff:192.0.2.7") == ipaddress.IPv4Address(CLIENT)
    assert client_address("2001:DB8::1") == ipaddress.IPv6Address("2001:db8::1")
    assert client_address("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")
    assert client_address("/run/mailpool/smtp.sock") is None
    assert client_address("") is None


# -- the deny list ------------------------------------------------------------------------


async def test_deny_ipv4(server: DnsServer) -> None:
    rules = make_rules(server.port, deny=("198.51.100.0/24", "192.0.2.0/25"))
    refusal = Refusal("Client host [192.0.2.7] rejected: access denied", "deny", "192.0.2.0/25")
    assert rules.denied(CLIENT) == refusal
    assert rules.denied("192.0.2.128") is None
    assert rules.denied("2001:db8::1") is None
    assert await rules.check(CLIENT) == (refusal, [])
    assert server.queries == []  # the deny list needs no DNS


async def test_deny_ipv6_and_mapped_ipv4(server: DnsServer) -> None:
    rules = make_rules(server.port, deny=("2001:db8:5::/48", "192.0.2.7"))
    assert rules.denied("2001:DB8:5::1") == Refusal(
        "Client host [2001:db8:5::1] rejected: access denied", "deny", "2001:db8:5::/48"
    )
    assert rules.denied("2001:db8:6::1") is None
    assert rules.denied("::ffff:192.0.2.7") == Refusal(
        "Client host [192.0.2.7] rejected: access denied", "deny", "192.0.2.7/32"
    )
    assert await rules.check("2001:db8:5::1") == (rules.denied("2001:db8:5::1"), [])
    assert server.queries == []


def test_bad_configuration_is_refused() -> None:
    def rules(**kw: object) -> ConnectionRules:
        args: dict[str, object] = dict(
            deny=(), dnsbl=("bl.test",), timeout=1.0, nameservers=("127.0.0.1",), port=53
        )
        args.update(kw)
        return ConnectionRules(**args)  # type: ignore[arg-type]

    zones = tuple(f"bl{i}.test" for i in range(11))
    with pytest.raises(ValueError, match="dnsbl has 11 zones, at most 10"):
        rules(dnsbl=zones)
    assert rules(dnsbl=zones[:10]).zones == zones[:10]
    with pytest.raises(ValueError, match=re.escape("'192.0.2.7/24'")):
        rules(deny=("192.0.2.7/24",))  # host bits set: a typo more likely than intended
    with pytest.raises(ValueError, match=r"'bl test'"):
        rules(dnsbl=("bl test",))
    with pytest.raises(ValueError, match=re.escape("'bl.test' is given twice")):
        rules(dnsbl=("bl.test", "BL.Test."))
    with pytest.raises(ValueError, match="nameservers"):
        rules(nameservers=())
    with pytest.raises(ValueError, match="dnsbl_timeout 0"):
        rules(timeout=0)
    # No blocklist: no name server needed.
    assert rules(dnsbl=(), nameservers=()).zones == ()


async def test_peer_that_is_no_ip_address(server: DnsServer) -> None:
    rules = make_rules(server.port, deny=("0.0.0.0/0", "::/0"))
    assert rules.denied("/run/mailpool/smtp.sock") is None
    assert await rules.check("/run/mailpool/smtp.sock") == (None, [])
    assert server.queries == []


# -- blocklists ---------------------------------------------------------------------------


async def test_listed_with_txt(server: DnsServer) -> None:
    server.add(NAME, "A", "127.0.0.2")
    server.add(NAME, "TXT", '"Listed, see https://bl.test/q?192.0.2.7"')
    refusal, notes = await make_rules(server.port).check(CLIENT)
    assert refusal == Refusal(
        "Client host [192.0.2.7] blocked using bl.test",
        "bl.test",
        "A 127.0.0.2; TXT Listed, see https://bl.test/q?192.0.2.7",
    )
    assert notes == []
    assert server.queries == [(NAME, "A"), (NAME, "TXT")]


async def test_listed_without_txt(server: DnsServer) -> None:
    server.add(NAME, "A", "127.0.0.4", "127.0.0.2")  # NODATA for TXT
    refusal, notes = await make_rules(server.port).check(CLIENT)
    assert refusal == Refusal(
        "Client host [192.0.2.7] blocked using bl.test", "bl.test", "A 127.0.0.4, 127.0.0.2"
    )
    assert notes == []


async def test_txt_text_is_made_printable(server: DnsServer) -> None:
    server.add(NAME, "A", "127.0.0.2")
    server.add(NAME, "TXT", '"bad\\013\\010line" "\\255end"')
    refusal, _ = await make_rules(server.port).check(CLIENT)
    assert refusal is not None
    assert refusal.detail == "A 127.0.0.2; TXT bad??line?end"


async def test_listing_stands_when_txt_is_silent(server: DnsServer) -> None:
    server.add(NAME, "A", "127.0.0.2")
    server.silence(NAME, "TXT")
    start = time.monotonic()
    refusal, notes = await make_rules(server.port).check(CLIENT)
    assert time.monotonic() - start < TIMEOUT + 0.4
    assert refusal == Refusal(
        "Client host [192.0.2.7] blocked using bl.test", "bl.test", "A 127.0.0.2"
    )
    assert notes == []


async def test_error_code_is_a_note_not_a_listing(server: DnsServer) -> None:
    server.add(NAME, "A", "127.255.255.254")
    assert await make_rules(server.port).check(CLIENT) == (
        None, ["bl.test: error code 127.255.255.254 (query via public resolver)"]
    )
    assert server.queries == [(NAME, "A")]  # no TXT for what is no listing


async def test_error_code_beside_a_listing(server: DnsServer) -> None:
    server.add(NAME, "A", "127.255.255.255", "127.0.0.3")
    refusal, notes = await make_rules(server.port).check(CLIENT)
    assert refusal == Refusal(
        "Client host [192.0.2.7] blocked using bl.test", "bl.test", "A 127.0.0.3"
    )
    assert notes == ["bl.test: error code 127.255.255.255 (too many queries)"]


async def test_answer_outside_loopback_is_no_listing(server: DnsServer) -> None:
    server.add(NAME, "A", "192.0.2.1")  # a wildcarded or hijacked zone
    assert await make_rules(server.port).check(CLIENT) == (
        None, ["bl.test: answer 192.0.2.1 outside 127.0.0.0/8 ignored"]
    )


async def test_nxdomain_and_nodata_are_not_listed(server: DnsServer) -> None:
    rules = make_rules(server.port)
    assert await rules.check(CLIENT) == (None, [])  # never added: NXDOMAIN
    server.add(NAME, "TXT", '"only text"')
    assert await rules.check(CLIENT) == (None, [])  # NODATA
    assert server.queries == [(NAME, "A"), (NAME, "A")]


async def test_servfail_is_a_note(server: DnsServer) -> None:
    server.servfail(NAME)
    assert await make_rules(server.port).check(CLIENT) == (None, ["bl.test: SERVFAIL"])


async def test_silent_list_returns_at_the_deadline(server: DnsServer) -> None:
    server.silence(NAME)
    start = time.monotonic()
    result = await make_rules(server.port).check(CLIENT)
    elapsed = time.monotonic() - start
    assert result == (None, ["bl.test: timeout"])
    assert TIMEOUT - 0.05 <= elapsed < TIMEOUT + 0.4


async def test_two_zones_one_listing(server: DnsServer) -> None:
    name_b = "7.2.0.192.b.test"
    server.add(name_b, "A", "127.0.0.2")
    rules = make_rules(server.port, dnsbl=("a.test", "b.test"))
    refusal, notes = await rules.check(CLIENT)
    assert refusal == Refusal("Client host [192.0.2.7] blocked using b.test", "b.test",
                              "A 127.0.0.2")
    assert notes == []
    assert sorted(server.queries) == [("7.2.0.192.a.test", "A"), (name_b, "A"),
                                      (name_b, "TXT")]


async def test_first_zone_in_order_wins(server: DnsServer) -> None:
    for name in ("7.2.0.192.a.test", "7.2.0.192.b.test"):
        server.add(name, "A", "127.0.0.2")
    refusal, _ = await make_rules(server.port, dnsbl=("b.test", "a.test")).check(CLIENT)
    assert refusal is not None and refusal.listed_by == "b.test"
    refusal, _ = await make_rules(server.port, dnsbl=("a.test", "b.test")).check(CLIENT)
    assert refusal is not None and refusal.listed_by == "a.test"


async def test_listing_by_the_first_zone_does_not_wait_for_the_others(
    server: DnsServer,
) -> None:
    server.add("7.2.0.192.a.test", "A", "127.0.0.2")
    server.silence("7.2.0.192.b.test")
    start = time.monotonic()
    refusal, notes = await make_rules(server.port, dnsbl=("a.test", "b.test")).check(CLIENT)
    assert time.monotonic() - start < TIMEOUT / 2
    assert refusal is not None and refusal.listed_by == "a.test"
    assert notes == []  # b.test did not fail, it was not needed


async def test_listing_after_a_silent_zone_waits_for_it_then_counts(
    server: DnsServer,
) -> None:
    server.silence("7.2.0.192.a.test")  # it could still list the client, until the deadline
    server.add("7.2.0.192.b.test", "A", "127.0.0.2")
    start = time.monotonic()
    refusal, notes = await make_rules(server.port, dnsbl=("a.test", "b.test")).check(CLIENT)
    assert TIMEOUT - 0.05 <= time.monotonic() - start < TIMEOUT + 0.4
    assert refusal is not None and refusal.listed_by == "b.test"
    assert notes == ["a.test: timeout"]


async def test_ipv6_query_name(server: DnsServer) -> None:
    name = "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.test"
    server.add(name, "A", "127.0.0.2")
    assert await make_rules(server.port).check("2001:DB8:1:2:3:4:567:89AB") == (Refusal(
        "Client host [2001:db8:1:2:3:4:567:89ab] blocked using bl.test", "bl.test", "A 127.0.0.2"
    ), [])
    assert server.queries == [(name, "A"), (name, "TXT")]


async def test_ipv4_mapped_ipv6_is_looked_up_as_ipv4(server: DnsServer) -> None:
    server.add(NAME, "A", "127.0.0.2")
    refusal, _ = await make_rules(server.port).check("::ffff:192.0.2.7")
    assert refusal == Refusal(
        "Client host [192.0.2.7] blocked using bl.test", "bl.test", "A 127.0.0.2"
    )
    assert server.queries[0] == (NAME, "A")


async def test_no_zones_no_queries(server: DnsServer) -> None:
    assert await make_rules(server.port, dnsbl=()).check(CLIENT) == (None, [])
    assert server.queries == []


async def test_other_zones_answering_do_not_cut_the_txt_query(server: DnsServer) -> None:
    server.add("7.2.0.192.a.test", "A", "127.0.0.2")
    server.add("7.2.0.192.a.test", "TXT", '"see a.test"')
    server.add("7.2.0.192.b.test", "TXT", '"NODATA for A"')
    refusal, notes = await make_rules(server.port, dnsbl=("a.test", "b.test")).check(CLIENT)
    assert refusal == Refusal(
        "Client host [192.0.2.7] blocked using a.test", "a.test", "A 127.0.0.2; TXT see a.test"
    )
    assert notes == []
