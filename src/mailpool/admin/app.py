"""Admin console, JSON API and Prometheus /metrics (a Starlette app; served by server.py).

The app holds no state of its own: every request asks the supervisor through AdminSource,
so what it shows is what `mailpool pool show` would print at that moment. The console page
(console.html) polls the JSON endpoints every two seconds.

Reading is open (the console binds to loopback unless [admin] token is set). Every changing
request needs `Authorization: Bearer <[admin] token>`; with no token configured there are no
changes here at all, only through the control socket (`mailpool pool change`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
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

from mailpool.admin.console import console_page
from mailpool.admin.history import MINUTE
from mailpool.admin.metrics import exposition, metrics_registry

log = logging.getLogger("mailpool.admin")

# A pool change is a handful of keys; anything bigger is a mistake or an attack.
MAX_BODY = 64 * 1024


class AdminSource(Protocol):
    """What the supervisor exposes to the admin app.

    Methods marked "loop" run on the supervisor's event loop and must not block; those
    marked "thread" run in a worker thread (they list spool directories or read the
    journal) and must not touch Trio objects. Counters are numbers since the supervisor
    started and never go down.
    """

    def pool_stats(self) -> dict[str, dict[str, Any]]:
        """loop. {entry: PoolRules.stats()}: the `pool show --json` entries."""
        ...

    def queue_counts(self) -> dict[str, int]:
        """thread. {queue name: messages in it}, every queue of the spool."""
        ...

    def status(self) -> dict[str, Any]:
        """loop. {"pid": int, "started": unix time, "listen": {name: "host:port"}}."""
        ...

    async def change_pool(self, entry: str, changes: dict[str, Any]) -> dict[str, Any]:
        """loop. The CLI's `pool change`: {"entry", "stats"} or {"error": why}."""
        ...

    async def control(self, request: dict[str, Any]) -> dict[str, Any]:
        """loop. What the control socket answers `request` ({"op": "queue-release",
        "queue_id": ...}): the CLI's queue operations, run by the same code."""
        ...

    def counters(self) -> dict[str, Any]:
        """loop. Mail flow since start, for /metrics:
        {"smtpd_connections": {listener: n}, "pop3d_connections": {listener: n},
         "received": n, "delivered": {"local": n, "remote": n}, "deferred": n,
         "bounced": n, "rejects": {"550": n, ...},
         "delivery_delay": metrics.DelayHistogram.snapshot()}.
        A key left out counts as zero."""
        ...

    def history(self) -> list[dict[str, int]]:
        """loop. history.MinuteHistory.samples(): the chart's last hour, oldest first."""
        ...

    def events(self) -> list[dict[str, Any]]:
        """loop. history.RecentEvents.recent(): recent rejections and errors, newest first."""
        ...

    def queue_messages(self, queue: str, limit: int) -> list[dict[str, Any]]:
        """thread. The first `limit` messages of `queue`, oldest first, each with
        `queue list --json`'s fields (queue_view.queued)."""
        ...

    def queue_oldest(self) -> dict[str, float]:
        """thread. {queue: arrival time (Unix seconds) of its oldest message}; empty queues
        left out."""
        ...

    def journal_bytes(self) -> int:
        """thread. Bytes in the journal's receiver files (0 with journaling off)."""
        ...

    def trace(self, message_id: str, limit: int) -> list[dict[str, Any]]:
        """thread. The first `limit` records of `journal dump --message-id ID --format
        json` (journal.dump.record_dict each), oldest first; `message_id` with or without
        angle brackets."""
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


# --- queue operations, traces ------------------------------------------------------------

# The console's names for the CLI's queue operations (`mailpool queue ACTION ID`).
QUEUE_ACTIONS = {"hold": "queue-hold", "release": "queue-release", "delete": "queue-delete",
                 "requeue": "queue-requeue", "flush": "queue-flush"}
# The spool's queue ids (framework.spool). "ALL" fits the pattern but stays with the CLI:
# the console changes one message at a time.
_QUEUE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
# A queue of 100 000 messages must not become one 30 MB answer every two seconds.
QUEUE_LIST_LIMIT = 500
TRACE_LIMIT = 2000
MAX_MESSAGE_ID = 998  # RFC 5322's line length: no real Message-ID is longer
_BAD_IN_MESSAGE_ID = re.compile(r"[\x00-\x20\x7f]")


def queue_id_problem(queue_id: str) -> str | None:
    """Why `queue_id` is not one message's queue id, or None."""
    if queue_id.upper() == "ALL":
        return "the console changes one message at a time: use `mailpool queue` for ALL"
    if not _QUEUE_ID.fullmatch(queue_id):
        return f"bad queue id {queue_id!r}"
    return None


def action_outcome(queue_id: str, reply: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for a control op's reply. The ops answer {"error"}, or
    {"done", "busy", "errors"} lists (hold, delete, requeue), or their own key
    ({"released"}, {"flushed"})."""
    if "error" in reply:
        return 400, {"error": str(reply["error"])}
    errors = reply.get("errors") or []
    if errors:
        return 400, {**reply, "error": "; ".join(str(e) for e in errors)}
    if reply.get("busy"):
        return 409, {**reply, "error": f"{queue_id} is being delivered right now: "
                                       "try again in a moment"}
    return 200, reply


# --- the app -----------------------------------------------------------------------------


def create_app(source: AdminSource, *, token: str = "") -> Starlette:
    """The console over `source`. `token` is [admin] token: "" refuses every change."""
    registry = metrics_registry(source)

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

    async def api_queue(request: Request) -> Response:
        queue = request.path_params["queue"]
        counts = await anyio.to_thread.run_sync(source.queue_counts)
        if queue not in counts:
            return _error(404, f"unknown queue {queue!r} (known: {', '.join(counts)})")
        rows = await anyio.to_thread.run_sync(source.queue_messages, queue,
                                              QUEUE_LIST_LIMIT + 1)
        return JSON({"queue": queue, "total": counts[queue],
                     "messages": rows[:QUEUE_LIST_LIMIT], "more": len(rows) > QUEUE_LIST_LIMIT})

    async def api_queue_action(request: Request) -> Response:
        queue_id, action = request.path_params["queue_id"], request.path_params["action"]
        op = QUEUE_ACTIONS.get(action)
        if op is None:
            return _error(404, f"unknown action {action!r} (known: {', '.join(QUEUE_ACTIONS)})")
        problem = queue_id_problem(queue_id)
        if problem is not None:
            return _error(400, problem)
        reply = await source.control({"op": op, "queue_id": queue_id})
        status, body = action_outcome(queue_id, reply)
        log.info("admin console: %s %s from %s: %s", action, queue_id,
                 request.client.host if request.client else "?",
                 "done" if status == 200 else body["error"])
        return JSON(body, status_code=status)

    async def api_trace(request: Request) -> Response:
        message_id = request.path_params["message_id"]
        if not message_id or len(message_id) > MAX_MESSAGE_ID \
                or _BAD_IN_MESSAGE_ID.search(message_id):
            return _error(400, f"bad Message-ID {message_id[:100]!r}")
        records = await anyio.to_thread.run_sync(source.trace, message_id, TRACE_LIMIT + 1)
        return JSON({"message_id": message_id, "records": records[:TRACE_LIMIT],
                     "more": len(records) > TRACE_LIMIT})

    async def api_history(request: Request) -> Response:
        return JSON({"minute_s": MINUTE, "samples": source.history()})

    async def api_events(request: Request) -> Response:
        return JSON({"events": source.events()})

    async def metrics(request: Request) -> Response:
        body, content_type = await anyio.to_thread.run_sync(
            exposition, registry, request.headers.get("accept", ""))
        return Response(body, headers={"Content-Type": content_type})

    async def index(request: Request) -> Response:
        page, headers = console_page()
        return HTMLResponse(page, headers=headers)

    return Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/api/status", api_status, methods=["GET"]),
            Route("/api/pools", api_pools, methods=["GET"]),
            Route("/api/pools/{entry}", api_pool, methods=["GET", "POST"]),
            Route("/api/queues", api_queues, methods=["GET"]),
            Route("/api/queue/{queue}", api_queue, methods=["GET"]),
            Route("/api/queue/{queue_id}/{action}", api_queue_action, methods=["POST"]),
            Route("/api/trace/{message_id:path}", api_trace, methods=["GET"]),
            Route("/api/history", api_history, methods=["GET"]),
            Route("/api/events", api_events, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        middleware=[Middleware(ChangeGuard, token=token)],
        exception_handlers={HTTPException: _http_error},
    )
