"""Admin console / JSON API / metrics, through hypercorn on real sockets, and the console of
a real `mailpool serve` host (its token taken from the configuration)."""

from __future__ import annotations

import functools
import http.client
import json
import logging
import re
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hosthelp import Host

from mailpool.admin.app import MAX_BODY, bearer_credentials, change_refusal, render_metrics
from mailpool.admin.server import serve_admin

TOKEN = "7f3a-console-token-c0ffee"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _stats(jobs: int, in_use: int, accepted: int) -> dict[str, Any]:
    return {
        "parameters": {"start_jobs": True, "initial_jobs": 4, "threshold": 2,
                       "additional_jobs": 2, "maximum_jobs": 20, "max_use": 200,
                       "wait": True, "sessions_per_job": 1, "wait_timeout": 30.0,
                       "idle_timeout": 300.0},
        "jobs": {"current": jobs, "average": jobs - 0.5, "peak": jobs + 2},
        "in_use": {"current": in_use, "average": 0.25, "peak": in_use + 1},
        "waiting": {"current": 0, "average": 0.0, "peak": 3, "average_wait_s": 0.0125},
        "accepted": accepted,
        "rejected": 1,
    }


class FakeSource:
    """Shaped like the supervisor's AdminSource; pool changes follow its rules."""

    def __init__(self) -> None:
        self.pools = {"smtp-server": _stats(4, 1, 120), "framework": _stats(2, 0, 7)}
        self.queues = {"incoming": 0, "outbound": 3, "hold": 2}
        self.changes: list[tuple[str, dict]] = []
        self.fail = False

    def pool_stats(self) -> dict[str, dict]:
        if self.fail:
            raise RuntimeError("supervisor state broken")
        return json.loads(json.dumps(self.pools))

    def queue_counts(self) -> dict[str, int]:
        return dict(self.queues)

    def status(self) -> dict:
        return {"pid": 4242, "started": time.time() - 60,
                "listen": {"smtp": "127.0.0.1:2525", "pop3": "127.0.0.1:1110"}}

    async def change_pool(self, entry: str, changes: dict) -> dict:
        await trio.sleep(0)
        self.changes.append((entry, changes))
        params = self.pools[entry]["parameters"]
        unknown = set(changes) - set(params)
        if unknown:
            return {"error": f"unknown key(s) {', '.join(sorted(unknown))}"}
        if changes.get("maximum_jobs", 1) < 1:
            return {"error": f"{entry}: maximum_jobs: {changes['maximum_jobs']}: must be >= 1"}
        params.update(changes)
        return {"entry": entry, "stats": self.pools[entry]}


def http_request(addr: tuple[str, int], method: str, path: str, body: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(addr[0], addr[1], timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


async def request(addr: tuple[str, int], method: str, path: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    return await trio.to_thread.run_sync(http_request, addr, method, path, body, headers)


async def get_json(addr: tuple[str, int], path: str, expect: int = 200) -> Any:
    status, headers, body = await request(addr, "GET", path)
    assert status == expect, body
    assert headers["content-type"].startswith("application/json")
    return json.loads(body)


async def post_json(addr: tuple[str, int], path: str, payload: Any,
                    auth: dict[str, str] = AUTH) -> tuple[int, Any]:
    status, _, body = await request(addr, "POST", path, json.dumps(payload).encode(),
                                    {"Content-Type": "application/json", **auth})
    return status, json.loads(body)


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
async def addr(nursery: trio.Nursery, source: FakeSource) -> tuple[str, int]:
    """A console configured with TOKEN."""
    return await nursery.start(functools.partial(serve_admin, token=TOKEN),
                               source, "127.0.0.1", 0)


@pytest.fixture
async def tokenless_addr(nursery: trio.Nursery, source: FakeSource) -> tuple[str, int]:
    """A console with no [admin] token: read-only."""
    return await nursery.start(serve_admin, source, "127.0.0.1", 0)


@pytest.fixture
def admin_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """What mailpool.admin logs, once each, even if something in this process already
    detached the mailpool loggers from the root (mailpool.logs.setup)."""
    logger = logging.getLogger("mailpool.admin")
    propagate = logger.propagate
    logger.addHandler(caplog.handler)
    logger.propagate = False
    caplog.set_level(logging.INFO, logger="mailpool.admin")
    try:
        yield caplog
    finally:
        logger.removeHandler(caplog.handler)
        logger.propagate = propagate


# --- JSON API ------------------------------------------------------------------------------


async def test_status(addr, source, capfd) -> None:
    st = await get_json(addr, "/api/status")
    assert capfd.readouterr() == ("", ""), "request logged"
    assert st["pid"] == 4242
    assert st["listen"] == {"smtp": "127.0.0.1:2525", "pop3": "127.0.0.1:1110"}
    assert isinstance(st["started"], float)
    assert 0 <= st["uptime_s"]


async def test_pools_is_pool_show_json_shape(addr, source) -> None:
    assert await get_json(addr, "/api/pools") == {"entries": source.pools}


async def test_one_pool_and_unknown_pool(addr, source) -> None:
    one = await get_json(addr, "/api/pools/smtp-server")
    assert one == {"entry": "smtp-server", "stats": source.pools["smtp-server"]}
    missing = await get_json(addr, "/api/pools/nope", expect=404)
    assert "nope" in missing["error"] and "smtp-server" in missing["error"]


async def test_change_pool(addr, source) -> None:
    status, reply = await post_json(addr, "/api/pools/smtp-server", {"maximum_jobs": 40})
    assert status == 200
    assert reply["entry"] == "smtp-server"
    assert reply["stats"]["parameters"]["maximum_jobs"] == 40
    assert source.changes == [("smtp-server", {"maximum_jobs": 40})]
    shown = await get_json(addr, "/api/pools/smtp-server")
    assert shown["stats"]["parameters"]["maximum_jobs"] == 40


async def test_change_pool_errors(addr, source) -> None:
    status, reply = await post_json(addr, "/api/pools/smtp-server", {"maximum_jobs": 0})
    assert status == 400 and "maximum_jobs" in reply["error"]
    status, reply = await post_json(addr, "/api/pools/smtp-server", {"colour": "red"})
    assert status == 400 and "colour" in reply["error"]
    # Unknown entries stop before the supervisor is asked.
    status, reply = await post_json(addr, "/api/pools/nope", {"maximum_jobs": 5})
    assert status == 404 and "nope" in reply["error"]
    assert [c[0] for c in source.changes] == ["smtp-server", "smtp-server"]
    for payload in ({}, [1, 2], "maximum_jobs", None):
        status, reply = await post_json(addr, "/api/pools/smtp-server", payload)
        assert status == 400 and "JSON object" in reply["error"], payload
    status, _, body = await request(addr, "POST", "/api/pools/smtp-server", b"{not json",
                                    {"Content-Type": "application/json", **AUTH})
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    assert len(source.changes) == 2


async def test_change_pool_needs_json_content_type(addr, source) -> None:
    # A cross-site page can POST text/plain without a preflight; that must not change pools,
    # even with the right token.
    status, _, body = await request(addr, "POST", "/api/pools/smtp-server",
                                    b'{"maximum_jobs": 1}', {"Content-Type": "text/plain", **AUTH})
    assert status == 415 and "application/json" in json.loads(body)["error"]
    assert source.changes == []


async def test_change_pool_body_limit(addr, source) -> None:
    big = json.dumps({"maximum_jobs": 5, "pad": "x" * MAX_BODY}).encode()
    status, _, body = await request(addr, "POST", "/api/pools/smtp-server", big,
                                    {"Content-Type": "application/json", **AUTH})
    assert status == 413 and "error" in json.loads(body)
    assert source.changes == []


async def test_queues(addr, source) -> None:
    assert await get_json(addr, "/api/queues") == {"queues": source.queues}


async def test_unknown_path_and_method(addr) -> None:
    assert "error" in await get_json(addr, "/api/nothing", expect=404)
    status, headers, body = await request(addr, "DELETE", "/api/pools", headers=AUTH)
    assert status == 405 and "GET" in headers["allow"] and "error" in json.loads(body)
    status, headers, body = await request(addr, "POST", "/api/nothing", b"{}",
                                          {"Content-Type": "application/json", **AUTH})
    assert status == 404 and "error" in json.loads(body)


async def test_source_failure_is_500_and_server_lives(addr, source, capfd) -> None:
    source.fail = True
    status, _, _ = await request(addr, "GET", "/api/pools")
    assert status == 500
    # The traceback may be logged just after the response goes out: wait for it (bounded).
    out = err = ""
    with trio.move_on_after(10):
        while "supervisor state broken" not in err:
            o, e = capfd.readouterr()
            out, err = out + o, err + e
            await trio.sleep(0.02)
    assert out == "" and "supervisor state broken" in err
    source.fail = False
    assert await get_json(addr, "/api/pools") == {"entries": source.pools}


# --- changes need the token ----------------------------------------------------------------

WRONG_TOKENS = [TOKEN[:-1], TOKEN + "0", TOKEN.upper(), "x", f"{TOKEN} {TOKEN}",
                "\u00e9" * len(TOKEN)]


def _raw_auth(value: str) -> dict[str, str]:
    # http.client sends str header values as latin-1: non-ASCII tokens go out as raw bytes.
    return {"Authorization": value}


async def test_no_token_configured_refuses_every_change(tokenless_addr, source,
                                                        admin_log) -> None:
    addr = tokenless_addr
    json_ct = {"Content-Type": "application/json"}
    attempts = [("POST", "/api/pools/smtp-server", {}), ("POST", "/api/pools/smtp-server", AUTH),
                ("PUT", "/api/pools/smtp-server", AUTH), ("PATCH", "/api/pools/smtp-server", {}),
                ("DELETE", "/api/pools/smtp-server", {}), ("POST", "/api/pools/nope", {}),
                ("POST", "/api/nothing", {}), ("PROPFIND", "/", {})]
    for method, path, auth in attempts:
        status, headers, body = await request(addr, method, path, b'{"maximum_jobs": 40}',
                                              {**json_ct, **auth})
        assert (status, headers["content-type"]) == (403, "application/json"), (method, path)
        error = json.loads(body)["error"]
        assert "control socket" in error and "`mailpool pool change`" in error
        assert "[admin] token" in error
        assert "www-authenticate" not in headers
        assert TOKEN not in body.decode()
    assert source.changes == []
    # Reading stays open.
    one = await get_json(addr, "/api/pools/smtp-server")
    assert one["stats"]["parameters"]["maximum_jobs"] == 20
    refusals = [r.getMessage() for r in admin_log.records if r.name == "mailpool.admin"]
    assert len(refusals) == len(attempts)
    assert refusals[0] == ("admin console: refused POST '/api/pools/smtp-server' from "
                           "127.0.0.1: changes are disabled (no [admin] token)")
    assert not any(TOKEN in line for line in refusals)


async def test_token_missing_is_401_with_challenge(addr, source) -> None:
    for auth in ({}, _raw_auth("Basic dXNlcjpwYXNz"), _raw_auth("Bearer"),
                 _raw_auth("Bearer   "), _raw_auth(TOKEN)):
        status, headers, body = await request(
            addr, "POST", "/api/pools/smtp-server", b'{"maximum_jobs": 40}',
            {"Content-Type": "application/json", **auth})
        assert status == 401, auth
        assert headers["www-authenticate"] == 'Bearer realm="mailpool"'
        assert "Authorization: Bearer" in json.loads(body)["error"]
        assert TOKEN not in body.decode()
    assert source.changes == []


async def test_token_checked_before_anything_else(addr, source) -> None:
    # Without the token, the path, the method and the body make no difference to the answer.
    for method, path, ctype in [("POST", "/api/pools/nope", "application/json"),
                                ("POST", "/api/pools/smtp-server", "text/plain"),
                                ("DELETE", "/api/pools", "application/json"),
                                ("PUT", "/api/nothing", "application/json")]:
        status, headers, _ = await request(addr, method, path, b"{not json",
                                           {"Content-Type": ctype})
        assert status == 401 and "www-authenticate" in headers, (method, path)
        status, headers, _ = await request(addr, method, path, b"{not json",
                                           {"Content-Type": ctype,
                                            **_raw_auth("Bearer " + WRONG_TOKENS[0])})
        assert status == 403 and "www-authenticate" not in headers, (method, path)
    assert source.changes == []


async def test_wrong_token_is_403_and_never_echoed(addr, source, admin_log) -> None:
    for wrong in WRONG_TOKENS:
        status, reply = await post_json(addr, "/api/pools/smtp-server", {"maximum_jobs": 40},
                                        auth=_raw_auth(f"Bearer {wrong}"))
        assert status == 403, wrong
        assert reply == {"error": "the bearer token is not [admin] token"}
    assert source.changes == []
    assert (await get_json(addr, "/api/pools/smtp-server"))["stats"]["parameters"][
        "maximum_jobs"] == 20
    refusals = [r.getMessage() for r in admin_log.records if r.name == "mailpool.admin"]
    assert refusals == ["admin console: refused POST '/api/pools/smtp-server' from "
                        "127.0.0.1: wrong bearer token"] * len(WRONG_TOKENS)


async def test_right_token_changes_the_pool(addr, source, admin_log) -> None:
    status, reply = await post_json(addr, "/api/pools/framework", {"max_use": 50})
    assert status == 200 and reply["stats"]["parameters"]["max_use"] == 50
    # The scheme is case-insensitive (RFC 9110 11.1); the token is not.
    status, reply = await post_json(addr, "/api/pools/framework", {"max_use": 60},
                                    auth=_raw_auth(f"bEARER  {TOKEN} "))
    assert status == 200 and reply["stats"]["parameters"]["max_use"] == 60
    assert source.changes == [("framework", {"max_use": 50}), ("framework", {"max_use": 60})]
    assert (await get_json(addr, "/api/pools/framework"))["stats"]["parameters"][
        "max_use"] == 60
    assert [r for r in admin_log.records if r.name == "mailpool.admin"] == []


async def test_reading_needs_no_token(addr, tokenless_addr, source) -> None:
    for path in ("/", "/api/status", "/api/pools", "/api/pools/smtp-server", "/api/queues",
                 "/metrics"):
        for method in ("GET", "HEAD"):
            status, _, _ = await request(addr, method, path)
            assert status == 200, (method, path)
    # HEAD passes the token check as a read: with a JSON body it must still change nothing.
    for console in (addr, tokenless_addr):
        status, _, body = await request(console, "HEAD", "/api/pools/smtp-server",
                                        b'{"maximum_jobs": 40}',
                                        {"Content-Type": "application/json"})
        assert (status, body) == (200, b"")
    assert source.changes == []
    # A bad Authorization header on a read is not checked at all.
    status, _, _ = await request(addr, "GET", "/api/pools", headers=_raw_auth("Bearer nope"))
    assert status == 200
    # OPTIONS is a read too: the router answers it (no route allows it).
    status, headers, _ = await request(addr, "OPTIONS", "/api/pools/smtp-server")
    assert status == 405 and "POST" in headers["allow"]


@pytest.mark.parametrize(("header", "token"), [
    (b"Bearer abc", b"abc"),
    (b"bearer abc", b"abc"),
    (b"BEARER \t abc \t", b"abc"),
    (b"Bearer a b", b"a b"),
    (b"Bearer \xc3\xa9t\xc3\xa9", "\u00e9t\u00e9".encode()),
    (b"Bearer", None),
    (b"Bearer   ", None),
    (b"Basic abc", None),
    (b"Bearerabc", None),
    (b"abc", None),
])
def test_bearer_credentials(header: bytes, token: bytes | None) -> None:
    assert bearer_credentials([(b"host", b"x"), (b"authorization", header)]) == token


def test_bearer_credentials_first_header_only() -> None:
    assert bearer_credentials([]) is None
    assert bearer_credentials([(b"authorization", b"Basic x"),
                               (b"authorization", b"Bearer abc")]) is None
    assert bearer_credentials([(b"Authorization", b"Bearer abc"),
                               (b"authorization", b"Bearer def")]) == b"abc"


def test_change_refusal_decisions() -> None:
    right = [(b"authorization", b"Bearer " + TOKEN.encode())]
    assert change_refusal(right, TOKEN.encode()) is None
    assert change_refusal(right, b"")[:1] == (403,)
    assert change_refusal([], TOKEN.encode())[:1] == (401,)
    wrong = [(b"authorization", b"Bearer " + TOKEN.encode()[:-1])]
    assert change_refusal(wrong, TOKEN.encode())[:1] == (403,)
    # A non-UTF-8 token in the header is just wrong, not an error.
    assert change_refusal([(b"authorization", b"Bearer \xff\xfe")], TOKEN.encode())[:1] == (403,)
    for refusal in (change_refusal(right, b""), change_refusal([], TOKEN.encode()),
                    change_refusal(wrong, TOKEN.encode())):
        assert refusal is not None and not any(TOKEN[:8] in text for text in refusal[1:])


async def test_no_token_beyond_loopback_is_refused(source) -> None:
    async with trio.open_nursery() as nursery:
        for host in ("0.0.0.0", ""):
            with pytest.raises(OSError, match="beyond loopback it needs \\[admin\\] token"):
                await nursery.start(serve_admin, source, host, 0)


# --- /metrics ------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf'^({_NAME})(?:\{{(.*)\}})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_metrics(text: str) -> dict[str, dict[str, Any]]:
    """Strict reader of text format 0.0.4: HELP/TYPE first, each metric one group."""
    assert text.endswith("\n")
    metrics: dict[str, dict[str, Any]] = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in metrics, f"{name} declared twice"
            assert help_text
            metrics[name] = {"help": help_text, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and kind in ("counter", "gauge"), line
            metrics[name]["type"] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name, labels_text, value = m.groups()
            assert name == current, f"{name} outside its group"
            labels: dict[str, str] = {}
            rest = labels_text or ""
            while rest:
                lm = _LABEL.match(rest)
                assert lm, f"bad labels in {line!r}"
                labels[lm[1]] = lm[2]
                rest = rest[lm.end():]
            metrics[name]["samples"].append((labels, float(value)))
    for name, metric in metrics.items():
        assert "type" in metric, name
        if metric["type"] == "counter":
            assert name.endswith("_total")
    return metrics


def sample(metrics: dict, name: str, **labels: str) -> float:
    values = [v for lab, v in metrics[name]["samples"] if lab == labels]
    assert len(values) == 1, (name, labels, metrics[name]["samples"])
    return values[0]


async def test_metrics(addr, source) -> None:
    status, headers, body = await request(addr, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    m = parse_metrics(body.decode())
    assert sample(m, "mailpool_pool_jobs", entry="smtp-server") == 4
    assert sample(m, "mailpool_pool_jobs", entry="framework") == 2
    assert sample(m, "mailpool_pool_jobs_peak", entry="smtp-server") == 6
    assert sample(m, "mailpool_pool_in_use", entry="smtp-server") == 1
    assert sample(m, "mailpool_pool_waiting", entry="smtp-server") == 0
    assert sample(m, "mailpool_pool_waiting_peak", entry="smtp-server") == 3
    assert sample(m, "mailpool_pool_average_wait_seconds", entry="smtp-server") == 0.0125
    assert sample(m, "mailpool_pool_accepted_total", entry="smtp-server") == 120
    assert sample(m, "mailpool_pool_rejected_total", entry="framework") == 1
    assert sample(m, "mailpool_pool_maximum_jobs", entry="framework") == 20
    assert m["mailpool_pool_accepted_total"]["type"] == "counter"
    assert m["mailpool_pool_jobs"]["type"] == "gauge"
    for queue, n in source.queues.items():
        assert sample(m, "mailpool_queue_messages", queue=queue) == n
    assert sample(m, "mailpool_start_time_seconds") <= time.time()


def test_metrics_escaping_and_special_values() -> None:
    pools = {'we"ird\\name\n': _stats(1, 0, 0)}
    pools['we"ird\\name\n']["waiting"]["average_wait_s"] = float("nan")
    text = render_metrics(pools, {}, {"started": 1.5})
    m = parse_metrics(text)
    assert m["mailpool_pool_jobs"]["samples"] == [({"entry": 'we\\"ird\\\\name\\n'}, 1.0)]
    assert 'mailpool_pool_average_wait_seconds{entry="we\\"ird\\\\name\\n"} NaN' in text
    assert m["mailpool_queue_messages"]["samples"] == []


# --- console page --------------------------------------------------------------------------


async def test_index_page_is_self_contained(addr) -> None:
    status, headers, body = await request(addr, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "fetch(" in page and "/api/pools" in page and "/api/queues" in page
    assert "setInterval(refresh" in page
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page), "external asset"
    assert "innerHTML" not in page
    # Read-only: the page never holds the token. A change form added here must take the
    # token from a field the operator types into, and this test must then check that.
    assert TOKEN not in page
    assert "<form" not in page and "method:" not in page and "POST" not in page


# --- serving: bind, shutdown ---------------------------------------------------------------


def _refused(addr: tuple[str, int]) -> bool:
    try:
        socket.create_connection(addr, timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_clean_shutdown_on_cancel(source) -> None:
    async with trio.open_nursery() as nursery:
        addr = await nursery.start(serve_admin, source, "127.0.0.1", 0)
        assert addr[0] == "127.0.0.1" and addr[1] > 0
        # A keep-alive connection left open must not hold the shutdown up.
        idle = await trio.open_tcp_stream(*addr)
        await idle.send_all(b"GET /api/queues HTTP/1.1\r\nHost: x\r\n\r\n")
        got = b""
        while b"\r\n\r\n" not in got:
            got += await idle.receive_some(4096)
        assert got.startswith(b"HTTP/1.1 200")
        nursery.cancel_scope.cancel()
    # The nursery exited without error and the port is closed.
    assert await trio.to_thread.run_sync(_refused, addr)
    await idle.aclose()


async def test_bind_failure_raises_from_start(source) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError, match=f"admin console cannot listen on 127.0.0.1:{port}"):
                await nursery.start(serve_admin, source, "127.0.0.1", port)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_bind(nursery, source) -> None:
    addr = await nursery.start(serve_admin, source, "::1", 0)
    assert addr[0] == "::1"
    assert (await get_json(addr, "/api/queues"))["queues"] == source.queues


# --- the console of a real host ------------------------------------------------------------


def _console(h: Host) -> tuple[str, int]:
    # Host.start may read listen.json before the console is bound; by the time the jobs are
    # up the supervisor has rewritten it with the console's address.
    listen = json.loads((h.data / "run" / "listen.json").read_text())
    host, _, port = listen["admin"].rpartition(":")
    return host, int(port)


def _post(addr: tuple[str, int], payload: dict[str, Any],
          auth: dict[str, str]) -> tuple[int, dict[str, str], Any]:
    status, headers, body = http_request(addr, "POST", "/api/pools/smtp-server",
                                         json.dumps(payload).encode(),
                                         {"Content-Type": "application/json", **auth})
    return status, headers, json.loads(body)


def test_host_console_without_token_is_read_only(host) -> None:
    h = host()
    addr = _console(h)
    assert addr[0] == "127.0.0.1"
    max_use = h.pool_stats()["smtp-server"]["parameters"]["max_use"]
    status, _, reply = _post(addr, {"max_use": max_use + 7}, AUTH)
    assert status == 403 and "`mailpool pool change`" in reply["error"]
    assert h.pool_stats()["smtp-server"]["parameters"]["max_use"] == max_use
    status, _, body = http_request(addr, "GET", "/api/pools/smtp-server")
    assert status == 200 and json.loads(body)["stats"]["parameters"]["max_use"] == max_use
    assert ("mailpool: admin console: refused POST '/api/pools/smtp-server' from 127.0.0.1: "
            "changes are disabled (no [admin] token)\n") in h.log_path.read_text()
    # The way changes do go: the control socket, for its owner only.
    assert (h.data / "run" / "control.sock").stat().st_mode & 0o777 == 0o600


def test_host_console_with_token(host) -> None:
    # Needs the supervisor to pass [admin] token to serve_admin.
    h = host(f'[admin]\ntoken = "{TOKEN}"\n')
    addr = _console(h)
    max_use = h.pool_stats()["smtp-server"]["parameters"]["max_use"]
    status, headers, _ = _post(addr, {"max_use": max_use + 7}, {})
    assert status == 401 and headers["www-authenticate"] == 'Bearer realm="mailpool"'
    wrong = "not-the-console-token-5150"
    status, _, _ = _post(addr, {"max_use": max_use + 7}, {"Authorization": f"Bearer {wrong}"})
    assert status == 403
    assert h.pool_stats()["smtp-server"]["parameters"]["max_use"] == max_use
    status, _, reply = _post(addr, {"max_use": max_use + 7}, AUTH)
    assert status == 200 and reply["stats"]["parameters"]["max_use"] == max_use + 7
    # The supervisor itself changed: what the control socket reports.
    assert h.pool_stats()["smtp-server"]["parameters"]["max_use"] == max_use + 7
    status, _, body = http_request(addr, "GET", "/api/pools/smtp-server")
    assert status == 200 and json.loads(body)["stats"]["parameters"]["max_use"] == max_use + 7
    log = h.log_path.read_text()
    assert "from 127.0.0.1: no bearer token\n" in log
    assert "from 127.0.0.1: wrong bearer token\n" in log
    assert TOKEN not in log and wrong not in log
