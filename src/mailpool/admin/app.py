"""Admin console, JSON API and Prometheus /metrics (a Starlette app; served by server.py).

The app holds no state of its own: every request asks the supervisor through AdminSource,
so what it shows is what `mailpool pool show` would print at that moment.

Reading is open (the console binds to loopback unless [admin] token is set). Every changing
request needs `Authorization: Bearer <[admin] token>`; with no token configured there are no
changes here at all, only through the control socket (`mailpool pool change`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time
from collections.abc import Iterable
from typing import Any, Protocol

import anyio.to_thread
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger("mailpool.admin")

# A pool change is a handful of keys; anything bigger is a mistake or an attack.
MAX_BODY = 64 * 1024
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class AdminSource(Protocol):
    """What the supervisor exposes to the admin app.

    pool_stats, status and change_pool run on the supervisor's event loop. queue_counts runs
    in a worker thread (it may list spool directories, which blocks), so it must not touch
    Trio objects.
    """

    def pool_stats(self) -> dict[str, dict[str, Any]]:
        """{entry: PoolRules.stats()}: the `pool show --json` entries."""
        ...

    def queue_counts(self) -> dict[str, int]:
        """{queue name: messages in it}."""
        ...

    def status(self) -> dict[str, Any]:
        """{"pid": int, "started": unix time, "listen": {name: "host:port"}}."""
        ...

    async def change_pool(self, entry: str, changes: dict[str, Any]) -> dict[str, Any]:
        """The CLI's `pool change`: {"entry", "stats"} or {"error": why}."""
        ...


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def _error(status: int, message: str) -> JSON:
    return JSON({"error": message}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    # Unknown paths and wrong methods answer JSON too, so API clients parse one shape.
    assert isinstance(exc, HTTPException)
    return JSON({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _read_body(request: Request) -> bytes | None:
    """The request body, or None once it passes MAX_BODY (without reading the rest)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# --- who may change things ---------------------------------------------------------------

# Methods that only read. Every other method, known or not, on any path, counts as a change:
# an allow-list, so a method added to a route later is guarded without anyone remembering to.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="mailpool"'}
CHANGES_DISABLED = ("changes are only possible through the control socket "
                    "(`mailpool pool change`) or with [admin] token in the configuration")


def bearer_credentials(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The token of the first `Authorization: Bearer <token>` header (the scheme is
    case-insensitive, RFC 9110 11.1), or None when the request carries no bearer token."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.strip().partition(b" ")
            credentials = credentials.strip(b" \t")
            if scheme.lower() != b"bearer" or not credentials:
                return None
            return credentials
    return None


def token_matches(presented: bytes, token: bytes) -> bool:
    # Digests first: equal lengths, so the comparison time gives away not even the length.
    return hmac.compare_digest(hashlib.sha256(presented).digest(),
                               hashlib.sha256(token).digest())


def change_refusal(headers: Iterable[tuple[bytes, bytes]],
                   token: bytes) -> tuple[int, str, str] | None:
    """None when a changing request may go on, else (status, error for the client, reason
    for the log). Neither text holds the configured token or the one presented."""
    if not token:
        return 403, CHANGES_DISABLED, "changes are disabled (no [admin] token)"
    presented = bearer_credentials(headers)
    if presented is None:
        return 401, "this change needs Authorization: Bearer <[admin] token>", "no bearer token"
    if not token_matches(presented, token):
        return 403, "the bearer token is not [admin] token", "wrong bearer token"
    return None


class ChangeGuard:
    """ASGI middleware in front of the router: a changing request without the token is
    answered here, before routing, content-type checks or reading the body, so it gets the
    same answer whatever its path, method or body, and no handler ever sees it."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in READ_METHODS:
            refusal = change_refusal(scope["headers"], self.token)
            if refusal is not None:
                status, message, reason = refusal
                client = scope.get("client")
                # %r: the path is client-chosen and already percent-decoded (could hold CR/LF).
                log.warning("admin console: refused %s %r from %s: %s", scope["method"],
                            scope["path"], client[0] if client else "?", reason)
                reply = JSON({"error": message}, status_code=status,
                             headers=CHALLENGE if status == 401 else None)
                await reply(scope, receive, send)
                return
        await self.app(scope, receive, send)


# --- Prometheus text exposition format 0.0.4 ---------------------------------------------


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float | int | bool) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Metrics:
    """Collects samples by metric so each metric's lines come out as one group."""

    def __init__(self) -> None:
        self._meta: dict[str, tuple[str, str]] = {}
        self._samples: dict[str, list[str]] = {}

    def add(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict, Any]]):
        self._meta[name] = (kind, help_text)
        lines = self._samples.setdefault(name, [])
        for labels, value in samples:
            pairs = ",".join(f'{k}="{_label_value(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{pairs}}} {_number(value)}" if pairs
                         else f"{name} {_number(value)}")

    def render(self) -> str:
        out: list[str] = []
        for name, (kind, help_text) in self._meta.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(self._samples[name])
        return "\n".join(out) + "\n"


def render_metrics(pools: dict[str, dict[str, Any]], queues: dict[str, int],
                   status: dict[str, Any]) -> str:
    m = _Metrics()
    m.add("mailpool_start_time_seconds", "gauge",
          "Start time of the supervisor since the Unix epoch in seconds.",
          [({}, float(status["started"]))])

    def per_pool(name: str, kind: str, help_text: str, pick) -> None:
        m.add(name, kind, help_text, [({"entry": e}, pick(st)) for e, st in pools.items()])

    per_pool("mailpool_pool_jobs", "gauge", "Prestart jobs running now.",
             lambda st: st["jobs"]["current"])
    per_pool("mailpool_pool_jobs_average", "gauge", "Time-weighted average of running jobs.",
             lambda st: st["jobs"]["average"])
    per_pool("mailpool_pool_jobs_peak", "gauge", "Peak number of running jobs.",
             lambda st: st["jobs"]["peak"])
    per_pool("mailpool_pool_in_use", "gauge", "Prestart jobs serving a request now.",
             lambda st: st["in_use"]["current"])
    per_pool("mailpool_pool_in_use_peak", "gauge", "Peak number of jobs in use.",
             lambda st: st["in_use"]["peak"])
    per_pool("mailpool_pool_waiting", "gauge", "Requests waiting for a job now.",
             lambda st: st["waiting"]["current"])
    per_pool("mailpool_pool_waiting_peak", "gauge", "Peak number of waiting requests.",
             lambda st: st["waiting"]["peak"])
    per_pool("mailpool_pool_average_wait_seconds", "gauge",
             "Average time an accepted request waited for a job.",
             lambda st: st["waiting"]["average_wait_s"])
    per_pool("mailpool_pool_accepted_total", "counter", "Requests handed to a job.",
             lambda st: st["accepted"])
    per_pool("mailpool_pool_rejected_total", "counter", "Requests refused (no job available).",
             lambda st: st["rejected"])
    per_pool("mailpool_pool_maximum_jobs", "gauge", "Configured maximum_jobs of the entry.",
             lambda st: st["parameters"]["maximum_jobs"])
    m.add("mailpool_queue_messages", "gauge", "Messages in each spool queue.",
          [({"queue": q}, n) for q, n in queues.items()])
    return m.render()


# --- the app -----------------------------------------------------------------------------


def create_app(source: AdminSource, *, token: str = "") -> Starlette:
    """The console over `source`. `token` is [admin] token: "" refuses every change."""

    async def api_status(request: Request) -> Response:
        st = source.status()
        return JSON({**st, "uptime_s": max(0.0, time.time() - st["started"])})

    async def api_pools(request: Request) -> Response:
        return JSON({"entries": source.pool_stats()})

    async def api_pool(request: Request) -> Response:
        name = request.path_params["entry"]
        pools = source.pool_stats()
        if name not in pools:
            return _error(404, f"unknown pool entry {name!r} (known: {', '.join(pools)})")
        # Only POST changes: HEAD (a read, so never stopped by ChangeGuard) shows, like GET.
        if request.method != "POST":
            return JSON({"entry": name, "stats": pools[name]})
        # ChangeGuard has checked the token already; this stays as a second wall. Demanding
        # application/json makes a cross-site form or no-cors fetch need a CORS preflight,
        # which this app never grants: a web page cannot change pools.
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return _error(415, "send the changes as Content-Type: application/json")
        body = await _read_body(request)
        if body is None:
            return _error(413, f"request body over {MAX_BODY} bytes")
        try:
            changes = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            return _error(400, f"body is not JSON: {exc}")
        if not isinstance(changes, dict) or not changes:
            return _error(400, 'body must be a JSON object naming at least one value, '
                               'e.g. {"maximum_jobs": 40}')
        reply = await source.change_pool(name, changes)
        if "error" in reply:
            return _error(400, str(reply["error"]))
        return JSON(reply)

    async def api_queues(request: Request) -> Response:
        counts = await anyio.to_thread.run_sync(source.queue_counts)
        return JSON({"queues": counts})

    async def metrics(request: Request) -> Response:
        pools = source.pool_stats()
        status = source.status()
        queues = await anyio.to_thread.run_sync(source.queue_counts)
        return Response(render_metrics(pools, queues, status), media_type=METRICS_TYPE)

    async def index(request: Request) -> Response:
        return HTMLResponse(INDEX_HTML)

    return Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/api/status", api_status, methods=["GET"]),
            Route("/api/pools", api_pools, methods=["GET"]),
            Route("/api/pools/{entry}", api_pool, methods=["GET", "POST"]),
            Route("/api/queues", api_queues, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=[Middleware(ChangeGuard, token=token)],
        exception_handlers={HTTPException: _http_error},
    )


# Self-contained (no external assets): the console must work on a host with no internet.
# Entry names and values go in through textContent, never innerHTML. Read-only on purpose:
# no form, so the page never handles the token (changes: `mailpool pool change` or the API).
INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>mailpool</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; margin: 0 0 .2em; } h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
#state { color: #666; } #state.bad { color: #b00; font-weight: bold; }
</style></head>
<body>
<h1>mailpool</h1>
<div id="status"></div>
<div id="state">loading...</div>
<h2>Active prestart jobs</h2>
<table><thead>
<tr><th rowspan="2">Entry</th><th colspan="3">Prestart jobs</th><th colspan="3">In use</th>
<th colspan="3">Requests waiting</th><th rowspan="2">Avg wait s</th>
<th rowspan="2">Accepted</th><th rowspan="2">Rejected</th>
<th rowspan="2">Initial / threshold / additional / maximum</th><th rowspan="2">Max use</th>
<th rowspan="2">Wait</th></tr>
<tr><th>current</th><th>average</th><th>peak</th><th>current</th><th>average</th>
<th>peak</th><th>current</th><th>average</th><th>peak</th></tr>
</thead><tbody id="pools"></tbody></table>
<h2>Queues</h2>
<table><thead><tr><th>Queue</th><th>Messages</th></tr></thead>
<tbody id="queues"></tbody></table>
<script>
"use strict";
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    td.textContent = c;
    tr.appendChild(td);
  }
  return tr;
}
function fill(id, rows) {
  const body = document.getElementById(id);
  body.replaceChildren(...rows.map(row));
}
const avg = (x) => Number(x).toFixed(2);
function gauge(g) { return [g.current, avg(g.average), g.peak]; }
async function getJSON(path) {
  const r = await fetch(path, {cache: "no-store"});
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}
async function refresh() {
  const state = document.getElementById("state");
  try {
    const [status, pools, queues] = await Promise.all(
      [getJSON("/api/status"), getJSON("/api/pools"), getJSON("/api/queues")]);
    const listen = Object.entries(status.listen).map(([k, v]) => k + " " + v).join(", ");
    document.getElementById("status").textContent =
      "pid " + status.pid + ", up " + Math.floor(status.uptime_s) + " s, listening on " + listen;
    fill("pools", Object.entries(pools.entries).map(([name, st]) => {
      const p = st.parameters;
      return [name, ...gauge(st.jobs), ...gauge(st.in_use), ...gauge(st.waiting),
              Number(st.waiting.average_wait_s).toFixed(3), st.accepted, st.rejected,
              [p.initial_jobs, p.threshold, p.additional_jobs, p.maximum_jobs].join(" / "),
              p.max_use, p.wait ? "yes" : "no"];
    }));
    fill("queues", Object.entries(queues.queues).map(([q, n]) => [q, n]));
    state.className = "";
    state.textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    state.className = "bad";
    state.textContent = "cannot reach mailpool: " + e.message;
  }
}
refresh();
setInterval(refresh, 3000);
</script>
</body></html>
"""
