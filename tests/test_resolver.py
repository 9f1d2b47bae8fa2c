"""The outbound resolver against the suite's own DNS server (tests/dnsserver.py)."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
import trio
from dnsserver import DnsServer  # tests/ is on sys.path

from mailpool.outbound.mx import RouteFailure
from mailpool.outbound.resolver import DnsProblem, DnsSettings, MailResolver, MxHost, Route

D = "example.test"
TIMEOUT, LIFETIME = 0.3, 0.6


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer() as srv:
        yield srv
        assert srv.errors == []


def make_resolver(port: int, **kw: float) -> MailResolver:
    settings = DnsSettings(("127.0.0.1",), port=port, timeout=kw.get("timeout", TIMEOUT),
                           lifetime=kw.get("lifetime", LIFETIME))
    return MailResolver(settings, my_names=("me.test",), rng=random.Random(7))


@pytest.fixture
def resolver(server: DnsServer) -> MailResolver:
    return make_resolver(server.port)


def temp_failure(name: str, rtype: str) -> RouteFailure:
    return RouteFailure(
        False, 451, "4.4.3",
        f"Host or domain name not found. Name service error for name={name} type={rtype}: "
        "Host not found, try again",
    )


def address_queries(server: DnsServer) -> list[tuple[str, str]]:
    return [q for q in server.queries if q[1] in ("A", "AAAA")]


# -- routes -------------------------------------------------------------------------------


async def test_mx_hosts_by_preference_with_ipv6_first(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "20 mx2.example.test.", "10 MX1.Example.Test.")
    server.add("mx1.example.test", "A", "127.0.0.1", "127.0.0.2")
    server.add("mx1.example.test", "AAAA", "::1", "2001:db8::7")
    server.add("mx2.example.test", "A", "127.0.0.3")  # no AAAA: NODATA, which is no problem
    route, problems = await resolver.route("Example.Test.")
    assert route == Route(D, (
        MxHost("mx1.example.test", 10, False, ("::1", "2001:db8::7", "127.0.0.1", "127.0.0.2")),
        MxHost("mx2.example.test", 20, False, ("127.0.0.3",)),
    ))
    assert problems == []
    assert server.queries[0] == (D, "MX")
    assert sorted(server.queries[1:]) == [
        ("mx1.example.test", "A"), ("mx1.example.test", "AAAA"),
        ("mx2.example.test", "A"), ("mx2.example.test", "AAAA"),
    ]


async def test_no_mx_records_means_implicit_mx(server: DnsServer, resolver: MailResolver) -> None:
    server.add(D, "A", "127.0.0.5")
    route, problems = await resolver.route(D)
    assert route == Route(D, (MxHost(D, 0, True, ("127.0.0.5",)),))
    assert problems == []


async def test_implicit_mx_without_address_is_permanent(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "TXT", '"no mail here"')
    route, problems = await resolver.route(D)
    assert route == RouteFailure(
        True, 550, "5.4.4",
        "Host or domain name not found. Name service error for name=example.test type=A: "
        "Host not found",
    )
    assert problems == [
        DnsProblem(f"{D} AAAA", "no answer (NODATA)", True),
        DnsProblem(f"{D} A", "no answer (NODATA)", True),
    ]


async def test_null_mx_fails_without_address_lookups(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "0 .")
    server.add(D, "A", "127.0.0.1")  # would be the implicit MX's address: must not be asked
    route, problems = await resolver.route(D)
    assert route == RouteFailure(
        True, 556, "5.1.10",
        "Recipient address rejected: Domain example.test does not accept mail (nullMX)",
    )
    assert problems == []
    assert server.queries == [(D, "MX")]


async def test_null_mx_mixed_with_real_mx_is_ignored(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "0 .", "10 mx1.example.test.")
    server.add("mx1.example.test", "A", "127.0.0.1")
    route, _ = await resolver.route(D)
    assert route == Route(D, (MxHost("mx1.example.test", 10, False, ("127.0.0.1",)),))


@pytest.mark.parametrize("explicit", [False, True])
async def test_nxdomain_is_permanent(
    server: DnsServer, resolver: MailResolver, explicit: bool
) -> None:
    if explicit:
        server.add(D, "A", "127.0.0.1")
        server.nxdomain(D)
    route, problems = await resolver.route(D)
    assert route == RouteFailure(
        True, 550, "5.1.2",
        "Host or domain name not found. Name service error for name=example.test type=MX: "
        "Host not found",
    )
    assert problems == [DnsProblem(f"{D} MX", "NXDOMAIN", True)]
    assert server.queries == [(D, "MX")]


async def test_servfail_is_temporary_and_not_retried(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "10 mx1.example.test.")
    server.servfail(D)
    route, problems = await resolver.route(D)
    assert route == temp_failure(D, "MX")
    assert problems == [DnsProblem(f"{D} MX", "SERVFAIL", False)]
    assert server.queries == [(D, "MX")]


async def test_silent_server_is_temporary_within_the_lifetime(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.silence(D)
    start = trio.current_time()
    route, problems = await resolver.route(D)
    elapsed = trio.current_time() - start
    assert route == temp_failure(D, "MX")
    assert problems == [DnsProblem(f"{D} MX", "timeout", False)]
    # dnspython gives up at the lifetime (after at most one more back-off step of 0.2 s),
    # well before our own guard deadline (lifetime + 1 s) would.
    assert LIFETIME <= elapsed < LIFETIME + 0.9
    assert len(server.queries) >= 2  # it retried within the lifetime


async def test_no_nameserver_listening_is_temporary() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    route, problems = await make_resolver(port).route(D)
    assert route == temp_failure(D, "MX")
    assert len(problems) == 1
    assert problems[0].query == f"{D} MX" and not problems[0].permanent


async def test_host_without_addresses_is_skipped(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "10 mx1.example.test.", "20 mx2.example.test.", "30 mx3.example.test.")
    server.add("mx2.example.test", "TXT", '"no address"')  # mx1 does not exist at all
    server.add("mx3.example.test", "AAAA", "::1")
    route, problems = await resolver.route(D)
    assert route == Route(D, (MxHost("mx3.example.test", 30, False, ("::1",)),))
    assert problems == [
        DnsProblem("mx1.example.test AAAA", "NXDOMAIN", True),
        DnsProblem("mx1.example.test A", "NXDOMAIN", True),
        DnsProblem("mx2.example.test AAAA", "no answer (NODATA)", True),
        DnsProblem("mx2.example.test A", "no answer (NODATA)", True),
    ]


async def test_no_host_with_an_address_is_permanent(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "10 mx1.example.test.", "20 mx2.example.test.")
    server.add("mx2.example.test", "TXT", '"no address"')
    route, problems = await resolver.route(D)
    assert route == RouteFailure(
        True, 550, "5.4.4", "No MX host for example.test has a valid address record"
    )
    assert [p.query for p in problems] == [
        "mx1.example.test AAAA", "mx1.example.test A",
        "mx2.example.test AAAA", "mx2.example.test A",
    ]
    assert all(p.permanent for p in problems)


async def test_one_host_servfail_and_no_other_address_is_temporary(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "10 mx1.example.test.", "20 mx2.example.test.")
    server.servfail("mx1.example.test")
    route, problems = await resolver.route(D)
    assert route == temp_failure("mx1.example.test", "AAAA")
    assert problems == [
        DnsProblem("mx1.example.test AAAA", "SERVFAIL", False),
        DnsProblem("mx1.example.test A", "SERVFAIL", False),
        DnsProblem("mx2.example.test AAAA", "NXDOMAIN", True),
        DnsProblem("mx2.example.test A", "NXDOMAIN", True),
    ]


async def test_servfailing_host_is_skipped_when_another_has_addresses(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "10 mx1.example.test.", "20 mx2.example.test.")
    server.servfail("mx1.example.test")
    server.add("mx2.example.test", "A", "127.0.0.2")
    route, problems = await resolver.route(D)
    assert route == Route(D, (MxHost("mx2.example.test", 20, False, ("127.0.0.2",)),))
    assert [(p.query, p.permanent) for p in problems] == [
        ("mx1.example.test AAAA", False), ("mx1.example.test A", False),
    ]


async def test_one_family_timing_out_still_uses_the_other(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "10 mx1.example.test.")
    server.add("mx1.example.test", "A", "127.0.0.1")
    server.silence("mx1.example.test", "AAAA")
    route, problems = await resolver.route(D)
    assert route == Route(D, (MxHost("mx1.example.test", 10, False, ("127.0.0.1",)),))
    assert problems == [DnsProblem("mx1.example.test AAAA", "timeout", False)]


async def test_self_as_best_mx_loops_without_address_lookups(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "10 me.test.", "20 mx2.example.test.")
    route, problems = await resolver.route(D)
    assert route == RouteFailure(True, 554, "5.4.6", "mail for example.test loops back to myself")
    assert problems == []
    assert address_queries(server) == []


async def test_more_than_five_mx_hosts_only_five_looked_up(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", *(f"{n}0 mx{n}.example.test." for n in range(7, 0, -1)))
    for n in range(1, 8):
        server.add(f"mx{n}.example.test", "A", f"127.0.0.{n}")
    route, problems = await resolver.route(D)
    assert isinstance(route, Route)
    assert [(h.name, h.addresses) for h in route.hosts] == [
        (f"mx{n}.example.test", (f"127.0.0.{n}",)) for n in range(1, 6)
    ]
    assert problems == []
    assert {name for name, _ in address_queries(server)} == {
        f"mx{n}.example.test" for n in range(1, 6)
    }


async def test_big_answer_falls_back_to_tcp(server: DnsServer, resolver: MailResolver) -> None:
    many = [f"2001:db8::{n:x}" for n in range(1, 101)]  # 100 AAAA: ~2.8 kB, over EDNS 1232
    server.add(D, "MX", "10 mx1.example.test.")
    server.add("mx1.example.test", "AAAA", *many)
    server.add("mx1.example.test", "A", "127.0.0.1")
    route, problems = await resolver.route(D)
    assert route == Route(D, (MxHost("mx1.example.test", 10, False, (*many, "127.0.0.1")),))
    assert problems == []
    assert server.tcp_queries == [("mx1.example.test", "AAAA")]
    assert server.queries.count(("mx1.example.test", "AAAA")) == 2  # UDP (TC), then TCP


async def test_cname_to_the_mx_host_is_followed(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add(D, "MX", "10 mail.example.test.")
    server.add("mail.example.test", "CNAME", "real.example.test.")
    server.add("real.example.test", "A", "127.0.0.9")
    route, _ = await resolver.route(D)
    assert route == Route(D, (MxHost("mail.example.test", 10, False, ("127.0.0.9",)),))


@pytest.mark.parametrize(
    ("literal", "address"),
    [("[192.0.2.1]", "192.0.2.1"), ("[IPv6:2001:DB8:0::1]", "2001:db8::1"),
     ("[ipv6:::1]", "::1")],
)
async def test_domain_literal_needs_no_dns(
    server: DnsServer, resolver: MailResolver, literal: str, address: str
) -> None:
    route, problems = await resolver.route(literal)
    assert route == Route(literal, (MxHost(literal, 0, True, (address,)),))
    assert problems == []
    assert server.queries == []


@pytest.mark.parametrize("literal", ["[300.1.1.1]", "[IPv6:1.2.3.4]", "[tag:x]", "[]"])
async def test_bad_domain_literal_is_permanent(
    server: DnsServer, resolver: MailResolver, literal: str
) -> None:
    route, problems = await resolver.route(literal)
    assert route == RouteFailure(True, 550, "5.1.2", f"bad domain literal {literal}")
    assert problems == []
    assert server.queries == []


@pytest.mark.parametrize("name", ["", "a..test", "x" * 64 + ".test"])
async def test_bad_domain_name_is_permanent_without_a_query(
    server: DnsServer, resolver: MailResolver, name: str
) -> None:
    route, _ = await resolver.route(name)
    assert isinstance(route, RouteFailure) and route.permanent and route.status == "5.1.2"
    assert server.queries == []


async def test_answers_change_between_calls(server: DnsServer, resolver: MailResolver) -> None:
    server.add(D, "A", "127.0.0.1")
    assert (await resolver.route(D))[0] == Route(D, (MxHost(D, 0, True, ("127.0.0.1",)),))
    server.clear()
    server.add(D, "A", "127.0.0.2")
    assert (await resolver.route(D))[0] == Route(D, (MxHost(D, 0, True, ("127.0.0.2",)),))


# -- host_addresses -----------------------------------------------------------------------


async def test_host_addresses_ipv6_first(server: DnsServer, resolver: MailResolver) -> None:
    server.add("relay.test", "A", "127.0.0.1")
    server.add("relay.test", "AAAA", "::1")
    assert await resolver.host_addresses("Relay.Test.") == (("::1", "127.0.0.1"), [])


async def test_host_addresses_with_one_family_failing(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add("relay.test", "A", "127.0.0.1")
    server.add("relay.test", "AAAA", "::1")
    server.servfail("relay.test", "AAAA")
    assert await resolver.host_addresses("relay.test") == (
        ("127.0.0.1",), [DnsProblem("relay.test AAAA", "SERVFAIL", False)]
    )


@pytest.mark.parametrize(("name", "address"), [
    ("[192.0.2.1]", "192.0.2.1"), ("192.0.2.1", "192.0.2.1"), ("[IPv6:::1]", "::1"),
    ("::1", "::1"),
])
async def test_host_addresses_of_a_literal(
    server: DnsServer, resolver: MailResolver, name: str, address: str
) -> None:
    assert await resolver.host_addresses(name) == ((address,), [])
    assert server.queries == []


async def test_host_addresses_nxdomain_is_permanent(
    server: DnsServer, resolver: MailResolver
) -> None:
    failure, problems = await resolver.host_addresses("relay.test")
    assert failure == RouteFailure(
        True, 550, "5.4.4",
        "Host or domain name not found. Name service error for name=relay.test type=A: "
        "Host not found",
    )
    assert problems == [
        DnsProblem("relay.test AAAA", "NXDOMAIN", True),
        DnsProblem("relay.test A", "NXDOMAIN", True),
    ]


async def test_host_addresses_servfail_is_temporary(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.servfail("relay.test")
    failure, problems = await resolver.host_addresses("relay.test")
    assert failure == temp_failure("relay.test", "AAAA")
    assert [p.reason for p in problems] == ["SERVFAIL", "SERVFAIL"]


async def test_host_addresses_both_nodata_is_permanent(
    server: DnsServer, resolver: MailResolver
) -> None:
    server.add("relay.test", "MX", "10 other.test.")
    failure, problems = await resolver.host_addresses("relay.test")
    assert isinstance(failure, RouteFailure) and failure.permanent and failure.code == 550
    assert problems == [
        DnsProblem("relay.test AAAA", "no answer (NODATA)", True),
        DnsProblem("relay.test A", "no answer (NODATA)", True),
    ]


# -- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {"nameservers": ()}, {"nameservers": ("dns.test",)}, {"nameservers": ("127.0.0.1",), "port": 0},
    {"nameservers": ("127.0.0.1",), "timeout": 0},
])
def test_bad_settings_are_refused(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DnsSettings(**kw)  # type: ignore[arg-type]


# -- the test server itself ---------------------------------------------------------------


def test_server_nodata_and_nxdomain_carry_an_soa(server: DnsServer) -> None:
    server.add("a.example.test", "A", "127.0.0.1")
    nodata = dns.query.udp(dns.message.make_query("a.example.test", "MX"), "127.0.0.1",
                           timeout=5, port=server.port)
    assert nodata.rcode() == dns.rcode.NOERROR and nodata.answer == []
    assert nodata.flags & dns.flags.AA
    assert [rr.rdtype for rr in nodata.authority] == [dns.rdatatype.SOA]
    assert nodata.authority[0].name.to_text() == "test."
    nx = dns.query.tcp(dns.message.make_query("b.example.test", "A"), "127.0.0.1",
                       timeout=5, port=server.port)
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert [rr.rdtype for rr in nx.authority] == [dns.rdatatype.SOA]


def test_server_ignores_garbage_and_keeps_answering(server: DnsServer) -> None:
    server.add("a.test", "A", "127.0.0.1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x00garbage", ("127.0.0.1", server.port))
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"\xff\xff" + b"x" * 100)  # longer than any query: dropped
        assert sock.recv(10) == b""
    answer = dns.query.udp(dns.message.make_query("a.test", "A"), "127.0.0.1",
                           timeout=5, port=server.port)
    assert [rd.address for rd in answer.answer[0]] == ["127.0.0.1"]
    assert server.queries == [("a.test", "A")]


def test_server_truncates_big_udp_answers(server: DnsServer) -> None:
    server.add("big.test", "TXT", *(f'"{n:03d} {"x" * 40}"' for n in range(20)))
    query = dns.message.make_query("big.test", "TXT")
    udp = dns.query.udp(query, "127.0.0.1", timeout=5, port=server.port,
                        raise_on_truncation=False)
    assert udp.flags & dns.flags.TC and udp.answer == []
    tcp = dns.query.tcp(query, "127.0.0.1", timeout=5, port=server.port)
    assert not tcp.flags & dns.flags.TC
    assert len(tcp.answer[0]) == 20
    assert server.tcp_queries == [("big.test", "TXT")]


# -- the answer cache -----------------------------------------------------------------------


async def test_cache_keeps_answers_and_negative_answers_but_not_failures(
    server: DnsServer
) -> None:
    settings = DnsSettings(("127.0.0.1",), port=server.port, timeout=TIMEOUT,
                           lifetime=LIFETIME, cache=True)
    resolver = MailResolver(settings, my_names=("me.test",), rng=random.Random(7))
    server.add(D, "MX", f"10 mx1.{D}.")
    server.add(f"mx1.{D}", "A", "192.0.2.1")  # no AAAA: a NODATA answer
    server.add("broken.test", "MX", "10 mx.broken.test.")
    server.servfail("broken.test")
    first, _ = await resolver.route(D)
    asked = len(server.queries)
    again, _ = await resolver.route(D)
    assert again == first and len(server.queries) == asked  # MX, A and NODATA AAAA kept
    assert (await resolver.route("gone.test"))[0] == (await resolver.route("gone.test"))[0]
    assert server.queries.count(("gone.test", "MX")) == 1  # NXDOMAIN kept (RFC 2308)
    await resolver.route("broken.test")
    await resolver.route("broken.test")
    assert server.queries.count(("broken.test", "MX")) == 2  # SERVFAIL never kept
