"""Per-client connection limits (anvil) with a hand-driven clock."""

from __future__ import annotations

from mailpool.supervisor.anvil import ClientLimits


def limits(now: list[float], **kw: int) -> ClientLimits:
    return ClientLimits(max_connections=kw.get("conns", 2), max_rate=kw.get("rate", 5),
                        exceptions=["127.0.0.0/8"], clock=lambda: now[0])


def test_concurrent_connections_per_address() -> None:
    now = [0.0]
    lim = limits(now)
    assert lim.admit("192.0.2.1") is None
    assert lim.admit("192.0.2.1") is None
    refused = lim.admit("192.0.2.1")
    assert refused is not None and "2 open" in refused
    assert lim.admit("192.0.2.2") is None  # another address is never affected
    lim.closed("192.0.2.1")
    assert lim.admit("192.0.2.1") is None
    assert lim.open_connections("192.0.2.1") == 2


def test_rate_per_minute_and_forgetting() -> None:
    now = [0.0]
    lim = limits(now, conns=100, rate=3)
    for _ in range(3):
        assert lim.admit("2001:db8::1") is None
        lim.closed("2001:db8::1")
    refused = lim.admit("2001:db8::1")
    assert refused is not None and "3 in a minute" in refused
    now[0] = 60.0
    assert lim.admit("2001:db8::1") is None  # the window moved on
    lim.closed("2001:db8::1")
    now[0] = 200.0
    lim.expire()
    assert lim._recent == {} and lim._open == {}  # bounded memory


def test_exceptions_and_mapped_addresses() -> None:
    now = [0.0]
    lim = limits(now, conns=1)
    for _ in range(10):
        assert lim.admit("127.0.0.1") is None
        assert lim.admit("::ffff:127.0.0.9") is None
    assert lim.admit("::ffff:192.0.2.5") is None
    assert lim.admit("192.0.2.5") is not None  # the same client in its IPv4 form
