"""Admin console / JSON API / metrics, through hypercorn on real sockets."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from typing import Any

import pytest
import trio

from mailpool.admin.app import MAX_BODY, render_metrics
from mailpool.admin.server import serve_admin


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


async def request(addr: tuple[str, int], method: str, path: str, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    def run() -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(addr[0], addr[1], timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    return await trio.to_thread.run_sync(run)


async def get_json(addr: tuple[str, int], path: str, expect: int = 200) -> Any:
    status, headers, body = await request(addr, "GET", path)
    assert status == expect, body
    assert headers["content-type"].startswith("application/json")
    return json.loads(body)


async def post_json(addr: tuple[str, int], path: str, payload: Any) -> tuple[int, Any]:
    status, _, body = await request(addr, "POST", path, json.dumps(payload).encode(),
                                    {"Content-Type": "application/json"})
    return status, json.loads(body)


@pytest.fixture
def source() -> FakeSource:
    return FakeSource()


@pytest.fixture
async def addr(nursery: trio.Nursery, source: FakeSource) -> tuple[str, int]:
    return await nursery.start(serve_admin, source, "127.0.0.1", 0)


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
                                    {"Content-Type": "application/json"})
    assert status == 400 and "not JSON" in json.loads(body)["error"]
    assert len(source.changes) == 2


async def test_change_pool_needs_json_content_type(addr, source) -> None:
    # A cross-site page can POST text/plain without a preflight; that must not change pools.
    status, _, body = await request(addr, "POST", "/api/pools/smtp-server",
                                    b'{"maximum_jobs": 1}', {"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(body)["error"]
    assert source.changes == []


async def test_change_pool_body_limit(addr, source) -> None:
    big = json.dumps({"maximum_jobs": 5, "pad": "x" * MAX_BODY}).encode()
    status, _, body = await request(addr, "POST", "/api/pools/smtp-server", big,
                                    {"Content-Type": "application/json"})
    assert status == 413 and "error" in json.loads(body)
    assert source.changes == []


async def test_queues(addr, source) -> None:
    assert await get_json(addr, "/api/queues") == {"queues": source.queues}


async def test_unknown_path_and_method(addr) -> None:
    assert "error" in await get_json(addr, "/api/nothing", expect=404)
    status, headers, body = await request(addr, "DELETE", "/api/pools")
    assert status == 405 and "GET" in headers["allow"] and "error" in json.loads(body)


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
