"""Admin console / JSON API / metrics, through hypercorn on real sockets, and the console of
a real `mailpool serve` host (its token taken from the configuration)."""

from __future__ import annotations

import functools
import http.client
import json
import logging
import re
import signal
import smtplib
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from hosthelp import Host, wait_for
from prometheus_client import CollectorRegistry, generate_latest

from mailpool.admin.app import (
    MAX_BODY,
    QUEUE_LIST_LIMIT,
    TRACE_LIMIT,
    action_outcome,
    bearer_credentials,
    change_refusal,
)
from mailpool.admin.console import console_page, security_headers
from mailpool.admin.history import MinuteHistory, RecentEvents
from mailpool.admin.metrics import DELAY_BUCKETS, DelayHistogram, Reading, families
from mailpool.admin.server import serve_admin

TOKEN = "7f3a-console-token-c0ffee"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUEUES = ("incoming", "outbound", "retry1", "retry2", "busy", "hold", "quarantine")
NOW = 1_700_000_000.0


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
        "sessions": {"in_use": in_use, "capacity": jobs - in_use},
    }


def message(queue: str, queue_id: str, *recipients: str, message_id: str = "",
            arrival: float = NOW - 600) -> dict[str, Any]:
    """A row as queue_view.queued gives it (`queue list --json`)."""
    return {"queue_name": queue, "queue_id": queue_id, "arrival_time": int(arrival),
            "message_size": 1234, "sender": "alice@example.test",
            "recipients": [{"address": r} for r in recipients], "next_attempt": None,
            "attempts": 0, "message_id": message_id or f"{queue_id}@example.test"}


class FakeSource:
    """Shaped like the supervisor's AdminSource: pool changes and queue operations follow
    its rules, and each method checks it runs where the protocol says (loop or thread)."""

    def __init__(self) -> None:
        self.loop_thread = threading.get_ident()
        self.pools = {"smtp-server": _stats(4, 1, 120), "framework": _stats(2, 0, 7)}
        self.messages: dict[str, list[dict[str, Any]]] = {q: [] for q in QUEUES}
        self.messages["outbound"] = [message("outbound", f"0OUT{i}", "x@remote.test")
                                     for i in range(3)]
        self.messages["hold"] = [message("hold", "0HOLD1", "bob@example.test"),
                                 message("hold", "0HOLD2", "carol@example.test")]
        self.changes: list[tuple[str, dict]] = []
        self.controls: list[dict[str, Any]] = []
        self.busy: set[str] = set()
        self.counter_values: dict[str, Any] = {"received": 5}
        self.samples: list[dict[str, int]] = []
        self.recent: list[dict[str, Any]] = []
        self.traces: dict[str, list[dict[str, Any]]] = {}
        self.trace_calls: list[tuple[str, int]] = []
        self.journal_size = 8192
        self.fail = False

    # Where each method may run: the supervisor's state only on its loop, and blocking
    # reads (spool, journal) only off it.
    def _loop(self) -> None:
        assert threading.get_ident() == self.loop_thread, "called off the event loop"

    def _thread(self) -> None:
        assert threading.get_ident() != self.loop_thread, "blocking call on the event loop"

    def pool_stats(self) -> dict[str, dict]:
        self._loop()
        if self.fail:
            raise RuntimeError("supervisor state broken")
        return json.loads(json.dumps(self.pools))

    def queue_counts(self) -> dict[str, int]:
        self._thread()
        return {q: len(rows) for q, rows in self.messages.items()}

    def status(self) -> dict:
        self._loop()
        return {"pid": 4242, "started": time.time() - 60,
                "listen": {"smtp": "127.0.0.1:2525", "pop3": "127.0.0.1:1110"}}

    async def change_pool(self, entry: str, changes: dict) -> dict:
        self._loop()
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

    def _find(self, queue_id: str) -> tuple[str, dict[str, Any]] | None:
        for queue, rows in self.messages.items():
            for row in rows:
                if row["queue_id"] == queue_id:
                    return queue, row
        return None

    def _move(self, row: dict[str, Any], src: str, dst: str) -> None:
        self.messages[src].remove(row)
        self.messages[dst].append({**row, "queue_name": dst})

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        self._loop()
        await trio.sleep(0)
        self.controls.append(request)
        op, qid = request["op"], request["queue_id"]
        if op not in ("queue-release", "queue-delete", "queue-hold", "queue-requeue",
                      "queue-flush"):
            return {"error": f"unknown op {op!r}"}
        found = self._find(qid)
        if found is None:
            return {"error": f"{qid}: no such message in any queue"}
        queue, row = found
        if op == "queue-release":
            if queue not in ("hold", "quarantine"):
                return {"error": f"{qid} is in {queue}: only held mail is released"}
            self.messages[queue].remove(row)  # delivered at once
            self.counter_values["delivered"] = {"local": len(row["recipients"])}
            return {"released": qid}
        if op == "queue-flush":
            return {"flushed": int(queue in ("outbound", "retry1", "retry2"))}
        if qid in self.busy:
            return {"done": [], "busy": [qid], "errors": []}
        if op == "queue-delete":
            self.messages[queue].remove(row)
        else:
            self._move(row, queue, "hold" if op == "queue-hold" else "incoming")
        return {"done": [qid], "busy": [], "errors": []}

    def counters(self) -> dict[str, Any]:
        self._loop()
        return json.loads(json.dumps(self.counter_values))

    def history(self) -> list[dict[str, int]]:
        self._loop()
        return [dict(s) for s in self.samples]

    def events(self) -> list[dict[str, Any]]:
        self._loop()
        return [dict(e) for e in self.recent]

    def queue_messages(self, queue: str, limit: int) -> list[dict[str, Any]]:
        self._thread()
        return [dict(r) for r in self.messages[queue][:limit]]

    def queue_oldest(self) -> dict[str, float]:
        self._thread()
        return {q: float(min(r["arrival_time"] for r in rows))
                for q, rows in self.messages.items() if rows}

    def journal_bytes(self) -> int:
        self._thread()
        return self.journal_size

    def trace(self, message_id: str, limit: int) -> list[dict[str, Any]]:
        self._thread()
        self.trace_calls.append((message_id, limit))
        return self.traces.get(message_id.strip("<>"), [])[:limit]


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
    assert await get_json(addr, "/api/queues") == {"queues": {
        "incoming": 0, "outbound": 3, "retry1": 0, "retry2": 0, "busy": 0, "hold": 2,
        "quarantine": 0}}


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
                 "/api/queue/hold", "/api/trace/x@y", "/api/history", "/api/events",
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


# --- queues, traces, history, events --------------------------------------------------------


async def test_queue_messages(addr, source) -> None:
    got = await get_json(addr, "/api/queue/hold")
    assert got == {"queue": "hold", "total": 2, "messages": source.messages["hold"],
                   "more": False}
    assert (await get_json(addr, "/api/queue/quarantine"))["messages"] == []
    missing = await get_json(addr, "/api/queue/nope", expect=404)
    assert missing["error"] == ("unknown queue 'nope' (known: incoming, outbound, retry1, "
                                "retry2, busy, hold, quarantine)")


async def test_queue_messages_are_bounded(addr, source) -> None:
    source.messages["retry1"] = [message("retry1", f"0R{i:05d}", "x@remote.test")
                                 for i in range(QUEUE_LIST_LIMIT + 5)]
    got = await get_json(addr, "/api/queue/retry1")
    assert got["total"] == QUEUE_LIST_LIMIT + 5 and got["more"] is True
    assert got["messages"] == source.messages["retry1"][:QUEUE_LIST_LIMIT]


async def test_trace(addr, source) -> None:
    records = [{"seq": 7, "time": "2024-01-01T00:00:00.000000Z", "type": "LG", "code": "94",
                "job": "smtp-server-1", "queue_id": "0HOLD1", "message_id": "a/b@x.test",
                "explanation": "SMTP server: message received"}]
    source.traces["a/b@x.test"] = records
    # A Message-ID may hold '/': percent-encoded by the page, one path parameter here.
    path = "/api/trace/" + urllib.parse.quote("<a/b@x.test>", safe="")
    assert await get_json(addr, path) == {"message_id": "<a/b@x.test>", "records": records,
                                          "more": False}
    assert source.trace_calls == [("<a/b@x.test>", TRACE_LIMIT + 1)]
    assert (await get_json(addr, "/api/trace/unknown@x.test"))["records"] == []
    for bad in ("a%20b@x", "a%00b@x", "a%09b@x", "x" * 999):
        error = (await get_json(addr, "/api/trace/" + bad, expect=400))["error"]
        assert error.startswith("bad Message-ID"), bad
    # A line break never even matches the route.
    await get_json(addr, "/api/trace/a%0d%0ab@x", expect=404)
    assert len(source.trace_calls) == 2


async def test_trace_is_bounded(addr, source) -> None:
    source.traces["big@x"] = [{"seq": n} for n in range(TRACE_LIMIT + 3)]
    got = await get_json(addr, "/api/trace/big@x")
    assert len(got["records"]) == TRACE_LIMIT and got["more"] is True


async def test_history_and_events(addr, source) -> None:
    assert await get_json(addr, "/api/history") == {"minute_s": 60, "samples": []}
    source.samples = [{"t": 1_699_999_980, "received": 3, "delivered": 2, "in_use": 1,
                       "waiting": 0}]
    assert await get_json(addr, "/api/history") == {"minute_s": 60, "samples": source.samples}
    source.recent = [{"time": NOW, "kind": "reject", "code": "550",
                      "detail": "5.1.1 <nobody@example.test>: user unknown",
                      "listener": "smtp", "ip": "192.0.2.7"}]
    assert await get_json(addr, "/api/events") == {"events": source.recent}


# --- queue operations ------------------------------------------------------------------------


async def act(addr: tuple[str, int], queue_id: str, action: str,
              auth: dict[str, str] = AUTH) -> tuple[int, Any]:
    status, _, body = await request(addr, "POST", f"/api/queue/{queue_id}/{action}",
                                    headers=auth)
    return status, json.loads(body)


async def test_queue_actions_run_the_cli_ops(addr, source, admin_log) -> None:
    assert await act(addr, "0HOLD1", "release") == (200, {"released": "0HOLD1"})
    assert await act(addr, "0OUT0", "hold") == (200, {"done": ["0OUT0"], "busy": [],
                                                       "errors": []})
    assert await act(addr, "0OUT1", "flush") == (200, {"flushed": 1})
    assert await act(addr, "0OUT0", "requeue") == (200, {"done": ["0OUT0"], "busy": [],
                                                          "errors": []})
    assert await act(addr, "0HOLD2", "delete") == (200, {"done": ["0HOLD2"], "busy": [],
                                                          "errors": []})
    assert source.controls == [{"op": "queue-release", "queue_id": "0HOLD1"},
                               {"op": "queue-hold", "queue_id": "0OUT0"},
                               {"op": "queue-flush", "queue_id": "0OUT1"},
                               {"op": "queue-requeue", "queue_id": "0OUT0"},
                               {"op": "queue-delete", "queue_id": "0HOLD2"}]
    assert [r["queue_id"] for r in source.messages["incoming"]] == ["0OUT0"]
    assert source.messages["hold"] == []
    logged = [r.getMessage() for r in admin_log.records if r.name == "mailpool.admin"]
    assert logged[0] == "admin console: release 0HOLD1 from 127.0.0.1: done"
    assert len(logged) == 5


async def test_queue_action_refusals(addr, source) -> None:
    source.busy.add("0OUT2")
    status, reply = await act(addr, "0OUT2", "delete")
    assert status == 409
    assert reply == {"done": [], "busy": ["0OUT2"], "errors": [],
                     "error": "0OUT2 is being delivered right now: try again in a moment"}
    assert await act(addr, "0GONE", "release") == (
        400, {"error": "0GONE: no such message in any queue"})
    assert await act(addr, "0OUT1", "release") == (
        400, {"error": "0OUT1 is in outbound: only held mail is released"})
    calls = len(source.controls)
    # Refused before the supervisor is asked.
    status, reply = await act(addr, "0OUT1", "shred")
    assert status == 404
    assert reply["error"] == ("unknown action 'shred' (known: hold, release, delete, "
                              "requeue, flush)")
    for qid in ("ALL", "all"):
        status, reply = await act(addr, qid, "delete")
        assert status == 400 and "one message at a time" in reply["error"]
    for qid in ("a.b", "-x", "x" * 65, "%C3%A9"):
        status, reply = await act(addr, qid, "delete")
        assert status == 400 and reply["error"].startswith("bad queue id"), qid
    assert len(source.controls) == calls
    assert len(source.messages["outbound"]) == 3


async def test_queue_actions_need_the_token(addr, tokenless_addr, source) -> None:
    status, reply = await act(addr, "0HOLD1", "release", auth={})
    assert status == 401 and "Authorization: Bearer" in reply["error"]
    status, reply = await act(addr, "0HOLD1", "release",
                              auth=_raw_auth("Bearer " + WRONG_TOKENS[0]))
    assert status == 403
    status, reply = await act(tokenless_addr, "0HOLD1", "release")
    assert status == 403 and "control socket" in reply["error"]
    # GET on an action is not an action.
    status, _, _ = await request(addr, "GET", "/api/queue/0HOLD1/release", headers=AUTH)
    assert status == 405
    assert source.controls == [] and len(source.messages["hold"]) == 2


@pytest.mark.parametrize(("reply", "outcome"), [
    ({"released": "Q1"}, (200, {"released": "Q1"})),
    ({"flushed": 0}, (200, {"flushed": 0})),
    ({"done": ["Q1"], "busy": [], "errors": []}, (200, {"done": ["Q1"], "busy": [],
                                                        "errors": []})),
    ({"error": "Q1: no such message"}, (400, {"error": "Q1: no such message"})),
    ({"done": [], "busy": [], "errors": ["Q1: gone", "Q1: still gone"]},
     (400, {"done": [], "busy": [], "errors": ["Q1: gone", "Q1: still gone"],
            "error": "Q1: gone; Q1: still gone"})),
    ({"done": [], "busy": ["Q1"], "errors": []},
     (409, {"done": [], "busy": ["Q1"], "errors": [],
            "error": "Q1 is being delivered right now: try again in a moment"})),
])
def test_action_outcome(reply: dict[str, Any], outcome: tuple[int, dict[str, Any]]) -> None:
    assert action_outcome("Q1", reply) == outcome


# --- /metrics ------------------------------------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf'^({_NAME})(?:\{{(.*)\}})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')
_SUFFIXES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def parse_metrics(text: str) -> dict[str, dict[str, Any]]:
    """Strict reader of text format 0.0.4: HELP/TYPE first, each metric one group, a
    histogram's _bucket/_count/_sum inside its group, counters named *_total."""
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
            assert name == current and kind in _SUFFIXES, line
            metrics[name]["type"] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"bad sample line {line!r}"
            name, labels_text, value = m.groups()
            assert current is not None
            kind = metrics[current]["type"]
            assert name in {current + s for s in _SUFFIXES[kind]}, f"{name} outside its group"
            labels: dict[str, str] = {}
            rest = labels_text or ""
            while rest:
                lm = _LABEL.match(rest)
                assert lm, f"bad labels in {line!r}"
                labels[lm[1]] = lm[2]
                rest = rest[lm.end():]
            key = name if kind == "histogram" else current
            metrics[current]["samples"].append((key, labels, float(value)))
    for name, metric in metrics.items():
        assert "type" in metric, name
        if metric["type"] == "counter":
            assert name.endswith("_total")
    return metrics


def sample(metrics: dict, name: str, sample_name: str | None = None, **labels: str) -> float:
    values = [v for n, lab, v in metrics[name]["samples"]
              if lab == labels and n == (sample_name or name)]
    assert len(values) == 1, (name, labels, metrics[name]["samples"])
    return values[0]


async def test_metrics(addr, source) -> None:
    delays = DelayHistogram()
    for seconds in (0.5, 2.0, 400.0):
        delays.observe(seconds)
    source.counter_values = {
        "smtpd_connections": {"smtp": 31, "submission": 4}, "pop3d_connections": {"pop3": 9},
        "received": 12, "delivered": {"local": 8, "remote": 3}, "deferred": 2, "bounced": 1,
        "rejects": {"550": 5, "421": 1}, "delivery_delay": delays.snapshot()}
    status, headers, body = await request(addr, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    m = parse_metrics(body.decode())
    # The names of the hand-written exposition, unchanged.
    assert sample(m, "mailpool_pool_jobs", entry="smtp-server") == 4
    assert sample(m, "mailpool_pool_jobs", entry="framework") == 2
    assert sample(m, "mailpool_pool_jobs_average", entry="smtp-server") == 3.5
    assert sample(m, "mailpool_pool_jobs_peak", entry="smtp-server") == 6
    assert sample(m, "mailpool_pool_in_use", entry="smtp-server") == 1
    assert sample(m, "mailpool_pool_in_use_peak", entry="smtp-server") == 2
    assert sample(m, "mailpool_pool_waiting", entry="smtp-server") == 0
    assert sample(m, "mailpool_pool_waiting_peak", entry="smtp-server") == 3
    assert sample(m, "mailpool_pool_average_wait_seconds", entry="smtp-server") == 0.0125
    assert sample(m, "mailpool_pool_accepted_total", entry="smtp-server") == 120
    assert sample(m, "mailpool_pool_rejected_total", entry="framework") == 1
    assert sample(m, "mailpool_pool_maximum_jobs", entry="framework") == 20
    assert m["mailpool_pool_accepted_total"]["type"] == "counter"
    assert m["mailpool_pool_jobs"]["type"] == "gauge"
    for queue, n in {"incoming": 0, "outbound": 3, "hold": 2, "quarantine": 0}.items():
        assert sample(m, "mailpool_queue_messages", queue=queue) == n
    assert sample(m, "mailpool_start_time_seconds") <= time.time()
    # New.
    assert sample(m, "mailpool_pool_sessions_in_use", entry="smtp-server") == 1
    assert sample(m, "mailpool_pool_sessions_capacity", entry="smtp-server") == 3
    assert sample(m, "mailpool_smtpd_connects_total", listener="submission") == 4
    assert sample(m, "mailpool_pop3d_connects_total", listener="pop3") == 9
    assert sample(m, "mailpool_messages_received_total") == 12
    assert sample(m, "mailpool_messages_delivered_total", kind="remote") == 3
    assert sample(m, "mailpool_messages_deferred_total") == 2
    assert sample(m, "mailpool_messages_bounced_total") == 1
    assert sample(m, "mailpool_smtpd_messages_rejected_total", code="550") == 5
    hist = "mailpool_delivery_delay_seconds"
    assert m[hist]["type"] == "histogram"
    assert sample(m, hist, hist + "_bucket", le="1.0") == 1
    assert sample(m, hist, hist + "_bucket", le="300.0") == 2
    assert sample(m, hist, hist + "_bucket", le="1800.0") == 3
    assert sample(m, hist, hist + "_count") == 3
    assert sample(m, hist, hist + "_sum") == 402.5
    # Arrived 600 s before NOW: far in the past, so the age is large and positive.
    assert sample(m, "mailpool_queue_oldest_seconds", queue="hold") > 600
    assert sample(m, "mailpool_queue_oldest_seconds", queue="incoming") == 0
    assert sample(m, "mailpool_journal_bytes") == 8192
    # The process collectors: this very process.
    assert sample(m, "process_open_fds") > 0
    assert sample(m, "process_resident_memory_bytes") > 0
    assert m["process_cpu_seconds_total"]["type"] == "counter"
    assert next(lab for _, lab, _ in m["python_info"]["samples"])["implementation"] == "CPython"


async def test_metrics_openmetrics_when_asked(addr, source) -> None:
    status, headers, body = await request(
        addr, "GET", "/metrics", headers={"Accept": "application/openmetrics-text; "
                                                    "version=1.0.0; charset=utf-8"})
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n")
    # OpenMetrics names the counter family without _total; its sample keeps it.
    assert "# TYPE mailpool_messages_received counter\n" in text
    assert "\nmailpool_messages_received_total 5.0\n" in text


async def test_metrics_source_failure_is_500(addr, source) -> None:
    source.fail = True
    status, _, _ = await request(addr, "GET", "/metrics")
    assert status == 500
    source.fail = False
    status, _, _ = await request(addr, "GET", "/metrics")
    assert status == 200


def _exposition(reading: Reading, now: float) -> str:
    class Fixed:
        def collect(self):
            return families(reading, now)

    registry = CollectorRegistry()
    registry.register(Fixed())
    return generate_latest(registry).decode()


def _reading(**overrides: Any) -> Reading:
    fields: dict[str, Any] = {"status": {"started": 1.5}, "pools": {}, "counters": {},
                              "queues": {}, "oldest": {}, "journal_bytes": 0}
    return Reading(**{**fields, **overrides})


def test_metrics_exposition_bytes() -> None:
    delays = DelayHistogram()
    for seconds in (0.2, 1.0, 1.5, 45.0, 7200.0, 90000.0):
        delays.observe(seconds)
    reading = _reading(
        counters={"smtpd_connections": {"smtp": 12}, "received": 9,
                  "delivered": {"local": 5}, "rejects": {"550": 2},
                  "delivery_delay": delays.snapshot()},
        queues={"incoming": 0, "hold": 2}, oldest={"hold": NOW - 60}, journal_bytes=4096)
    text = _exposition(reading, NOW)
    start = text.index("# HELP mailpool_smtpd_connects_total")
    assert text[start:] == """\
# HELP mailpool_smtpd_connects_total Connections accepted by each SMTP listener.
# TYPE mailpool_smtpd_connects_total counter
mailpool_smtpd_connects_total{listener="smtp"} 12.0
# HELP mailpool_pop3d_connects_total Connections accepted by each POP3 listener.
# TYPE mailpool_pop3d_connects_total counter
# HELP mailpool_messages_received_total Messages accepted onto the incoming queue.
# TYPE mailpool_messages_received_total counter
mailpool_messages_received_total 9.0
# HELP mailpool_messages_delivered_total Recipients delivered: into a local mailbox or to \
a remote host.
# TYPE mailpool_messages_delivered_total counter
mailpool_messages_delivered_total{kind="local"} 5.0
mailpool_messages_delivered_total{kind="remote"} 0.0
# HELP mailpool_messages_deferred_total Delivery attempts that failed for now (the message \
waits to be retried).
# TYPE mailpool_messages_deferred_total counter
mailpool_messages_deferred_total 0.0
# HELP mailpool_messages_bounced_total Recipients that failed for good (a non-delivery \
notice goes back).
# TYPE mailpool_messages_bounced_total counter
mailpool_messages_bounced_total 0.0
# HELP mailpool_smtpd_messages_rejected_total Refusals the SMTP service sent (connection, sender, \
recipient or message), by reply code.
# TYPE mailpool_smtpd_messages_rejected_total counter
mailpool_smtpd_messages_rejected_total{code="550"} 2.0
# HELP mailpool_delivery_delay_seconds Time from a message's arrival to the delivery of \
each recipient.
# TYPE mailpool_delivery_delay_seconds histogram
mailpool_delivery_delay_seconds_bucket{le="1.0"} 2.0
mailpool_delivery_delay_seconds_bucket{le="5.0"} 3.0
mailpool_delivery_delay_seconds_bucket{le="30.0"} 3.0
mailpool_delivery_delay_seconds_bucket{le="60.0"} 4.0
mailpool_delivery_delay_seconds_bucket{le="300.0"} 4.0
mailpool_delivery_delay_seconds_bucket{le="1800.0"} 4.0
mailpool_delivery_delay_seconds_bucket{le="3600.0"} 4.0
mailpool_delivery_delay_seconds_bucket{le="14400.0"} 5.0
mailpool_delivery_delay_seconds_bucket{le="86400.0"} 5.0
mailpool_delivery_delay_seconds_bucket{le="+Inf"} 6.0
mailpool_delivery_delay_seconds_count 6.0
mailpool_delivery_delay_seconds_sum 97247.7
# HELP mailpool_queue_messages Messages in each spool queue.
# TYPE mailpool_queue_messages gauge
mailpool_queue_messages{queue="incoming"} 0.0
mailpool_queue_messages{queue="hold"} 2.0
# HELP mailpool_queue_oldest_seconds Age of the oldest message in each spool queue (0 when \
empty).
# TYPE mailpool_queue_oldest_seconds gauge
mailpool_queue_oldest_seconds{queue="incoming"} 0.0
mailpool_queue_oldest_seconds{queue="hold"} 60.0
# HELP mailpool_journal_bytes Bytes in the journal's receivers.
# TYPE mailpool_journal_bytes gauge
mailpool_journal_bytes 4096.0
"""
    parse_metrics(text)


def test_metrics_escaping_and_special_values() -> None:
    name = 'we"ird\\name\n'
    pools = {name: _stats(1, 0, 0)}
    pools[name]["waiting"]["average_wait_s"] = float("nan")
    text = _exposition(_reading(pools=pools, oldest={"hold": NOW + 5},
                                queues={"hold": 1}), NOW)
    m = parse_metrics(text)
    assert m["mailpool_pool_jobs"]["samples"] == [
        ("mailpool_pool_jobs", {"entry": 'we\\"ird\\\\name\\n'}, 1.0)]
    assert 'mailpool_pool_average_wait_seconds{entry="we\\"ird\\\\name\\n"} NaN' in text
    # A message stamped in the future (a clock stepped back) is not of negative age.
    assert sample(m, "mailpool_queue_oldest_seconds", queue="hold") == 0
    empty = parse_metrics(_exposition(_reading(), NOW))
    assert empty["mailpool_queue_messages"]["samples"] == []
    assert sample(empty, "mailpool_messages_received_total") == 0
    hist = "mailpool_delivery_delay_seconds"
    assert sample(empty, hist, hist + "_bucket", le="+Inf") == 0


def test_delay_histogram_buckets() -> None:
    h = DelayHistogram()
    assert h.snapshot() == {"counts": [0] * (len(DELAY_BUCKETS) + 1), "sum": 0.0}
    # A delay equal to a bound is in that bound's bucket (Prometheus' "le").
    for seconds in (*DELAY_BUCKETS, 0.0, -3.0, 86400.5):
        h.observe(seconds)
    assert h.snapshot()["counts"] == [3, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert h.snapshot()["sum"] == sum(DELAY_BUCKETS) + 86400.5
    with pytest.raises(ValueError, match="has 3 bucket counts, not 10"):
        families(_reading(counters={"delivery_delay": {"counts": [1, 2, 3], "sum": 1.0}}),
                 NOW)


# --- history and events (kept by the supervisor) ---------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


M = 1_699_999_980  # a minute's start (a multiple of 60)


def _minute(t: int, received: int = 0, delivered: int = 0, in_use: int = 0,
            waiting: int = 0) -> dict[str, int]:
    return {"t": t, "received": received, "delivered": delivered, "in_use": in_use,
            "waiting": waiting}


def test_minute_history_counts_peaks_and_quiet_minutes() -> None:
    clock = Clock(M + 10.5)
    h = MinuteHistory(clock)
    h.count("received")
    h.count("received", 2)
    h.load(in_use=5, waiting=2)
    h.load(in_use=1, waiting=0)  # the minute keeps its peak
    clock.now = M + 59.999
    h.count("delivered")
    clock.now = M + 180  # two quiet minutes: there, counts 0, gauges where they were left
    h.count("delivered", 4)
    assert h.samples() == [_minute(M, 3, 1, 5, 2), _minute(M + 60, in_use=1),
                           _minute(M + 120, in_use=1), _minute(M + 180, delivered=4,
                                                               in_use=1)]
    clock.now = M + 240.0  # samples() alone brings the ring up to the current minute
    assert h.samples()[-1] == _minute(M + 240, in_use=1)


def test_minute_history_is_a_ring_of_an_hour() -> None:
    clock = Clock(M)
    h = MinuteHistory(clock)
    h.load(in_use=3, waiting=0)
    clock.now = M + 10 * 3600  # ten hours of silence cost sixty entries, no more
    samples = h.samples()
    assert len(samples) == 60
    assert samples[0] == _minute(M + 10 * 3600 - 59 * 60, in_use=3)
    assert samples[-1] == _minute(M + 10 * 3600, in_use=3)
    assert [s["t"] for s in samples] == list(range(samples[0]["t"], M + 10 * 3600 + 1, 60))
    small = MinuteHistory(clock, minutes=2)
    for _ in range(5):
        clock.now += 60
        small.count("received")
    assert small.samples() == [_minute(int(clock.now) - 60, 1), _minute(int(clock.now), 1)]


def test_minute_history_clock_stepping_back() -> None:
    clock = Clock(M + 120)
    h = MinuteHistory(clock)
    h.count("received")
    clock.now = M  # wall clock set back two minutes: counted in the newest minute
    h.count("received")
    assert h.samples() == [_minute(M + 120, received=2)]
    with pytest.raises(ValueError, match="unknown count 'bounced'"):
        h.count("bounced")
    with pytest.raises(ValueError):
        MinuteHistory(clock, minutes=0)


def test_recent_events() -> None:
    clock = Clock(NOW)
    events = RecentEvents(clock, size=3)
    events.add("reject", "550", "5.1.1 user unknown", listener="smtp", ip="192.0.2.1",
               queue_id=None)
    clock.now += 1
    events.add("error", "", "journal: disk full", job="supervisor")
    assert events.recent() == [
        {"time": NOW + 1, "kind": "error", "code": "", "detail": "journal: disk full",
         "job": "supervisor"},
        {"time": NOW, "kind": "reject", "code": "550", "detail": "5.1.1 user unknown",
         "listener": "smtp", "ip": "192.0.2.1"}]
    for n in range(4):
        events.add("reject", "421", f"busy {n}")
    assert [e["detail"] for e in events.recent()] == ["busy 3", "busy 2", "busy 1"]
    with pytest.raises(ValueError, match="unknown event kind 'warning'"):
        events.add("warning", "", "x")
    with pytest.raises(ValueError, match="unknown event field"):
        events.add("error", "", "x", colour="red")


# --- console page --------------------------------------------------------------------------


async def test_console_page_is_self_contained(addr) -> None:
    status, headers, body = await request(addr, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page), "external asset"
    assert "<script src" not in page and "<link rel=\"stylesheet\"" not in page
    assert "innerHTML" not in page and "outerHTML" not in page
    assert "insertAdjacentHTML" not in page and "document.write" not in page
    for path in ("/api/status", "/api/pools", "/api/queues", "/api/history", "/api/events",
                 '"/api/queue/"', '"/api/trace/"'):
        assert path in page, path
    # Polled every two seconds, each poll after the last one finished.
    assert "const POLL_MS = 2000;" in page and "setTimeout(poll, POLL_MS)" in page
    assert '<canvas id="chart"' in page
    # The page never holds the token: the operator types it into a password field, and it
    # is kept in this tab's sessionStorage at most.
    assert TOKEN not in page
    assert '<input id="token" type="password"' in page
    assert "sessionStorage.setItem(TOKEN_KEY" in page and "localStorage" not in page
    assert "document.cookie" not in page
    assert '"Authorization": "Bearer " + token' in page


async def test_console_page_headers(addr) -> None:
    status, headers, body = await request(addr, "GET", "/")
    assert status == 200
    expected_page, expected_headers = console_page()
    assert body == expected_page
    for name, value in expected_headers.items():
        assert headers[name.lower()] == value
    csp = headers["content-security-policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "connect-src 'self'" in csp and "'unsafe-inline'" not in csp
    assert headers["x-content-type-options"] == "nosniff"


def test_security_headers_pin_each_inline_block() -> None:
    headers = security_headers(b"<style>b{}</style><p>x</p><script>go()</script>"
                               b"<script>\nmore()\n</script>")
    # sha256 of exactly what is between the tags, base64: as CSP Level 3 hashes them.
    assert headers["Content-Security-Policy"] == (
        "default-src 'none'; "
        "script-src 'sha256-5KYv+PUboo5h+0+YAtGRPbwv5d/QxzHslP4YGnUaxRw=' "
        "'sha256-fFVP1hUtxkeCT074D4DXIa9DBckvKOlfyCCS6y3K4dM='; "
        "style-src 'sha256-7yqHVAesot11p6HczDsgKRipvI5UPgs97z80zNXlans='; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'")


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
    assert (await get_json(addr, "/api/queues"))["queues"]["hold"] == 2


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
    assert ("]: admin console: refused POST '/api/pools/smtp-server' from 127.0.0.1: "
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


def test_host_metrics(host) -> None:
    h = host()
    h.add_user("alice", "alice@example.test")
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        s.mail("carol@example.test")
        code, _ = s.rcpt("nobody@example.test")
        assert code == 550
        s.rcpt("alice@example.test")
        code, _ = s.data(b"Subject: counted\r\n\r\nOne message.\r\n")
        assert code == 250
    h.wait_delivered("alice", 1)
    addr = _console(h)

    def scrape() -> dict[str, dict[str, Any]]:
        status, headers, body = http_request(addr, "GET", "/metrics")
        assert status == 200, body
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        return parse_metrics(body.decode())

    # Jobs report their counts once a second: the figures arrive just after the mail.
    m = wait_for(lambda: (m := scrape()) and sample(
        m, "mailpool_messages_delivered_total", kind="local") == 1 and sample(
        m, "mailpool_messages_received_total") == 1 and sample(
        m, "mailpool_smtpd_messages_rejected_total", code="550") == 1 and m,
        what="the delivery, the message and the rejection counted")
    assert sample(m, "mailpool_messages_delivered_total", kind="remote") == 0
    assert sample(m, "mailpool_smtpd_connects_total", listener="smtp") >= 1
    assert sample(m, "mailpool_smtpd_messages_rejected_total", code="550") == 1
    hist = "mailpool_delivery_delay_seconds"
    assert sample(m, hist, hist + "_count") == 1
    assert sample(m, hist, hist + "_bucket", le="+Inf") == 1
    for queue in QUEUES:
        assert sample(m, "mailpool_queue_messages", queue=queue) == 0
        assert sample(m, "mailpool_queue_oldest_seconds", queue=queue) == 0
    assert sample(m, "mailpool_pool_jobs", entry="smtp-server") >= 1
    assert sample(m, "mailpool_journal_bytes") > 0
    assert sample(m, "process_open_fds") > 0
    assert sample(m, "process_start_time_seconds") <= time.time()


def test_host_events_show_refusals_and_the_supervisors_errors(host: Any) -> None:
    h = host()
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        s.mail("bob@remote.test")
        assert s.rcpt("nobody@example.test")[0] == 550
    # A reload the supervisor refuses is an error it logs: the console shows it too.
    good = h.config_path.read_text()
    h.config_path.write_text(good + "\n[smtp]\nno_such_key = 1\n")
    assert h.proc is not None
    h.proc.send_signal(signal.SIGHUP)
    addr = _console(h)

    def events() -> list[dict[str, Any]]:
        status, _, body = http_request(addr, "GET", "/api/events")
        assert status == 200
        return json.loads(body)["events"]

    found = wait_for(lambda: (e := events()) and any(x["kind"] == "error" for x in e)
                     and any(x["kind"] == "reject" for x in e) and e, 20,
                     what="a refusal and an error in /api/events")
    reject = next(e for e in found if e["kind"] == "reject")
    assert reject["code"] == "550" and reject["ip"] == "127.0.0.1"
    assert "RCPT: 550 5.1.1 <nobody@example.test>" in reject["detail"]
    assert reject["job"].startswith("smtp-server/")
    error = next(e for e in found if e["kind"] == "error")
    assert error["job"] == "supervisor" and "reload refused" in error["detail"]
    h.config_path.write_text(good)
