"""Serve the admin app with hypercorn on the supervisor's own Trio loop."""

from __future__ import annotations

import socket

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from mailpool.admin.app import AdminSource, create_app


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind here rather than in hypercorn: its bind errors arrive wrapped in nested
    exception groups; ours is a plain OSError naming the address."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(exc.errno, f"admin console cannot listen on {where}: "
                                 f"{exc.strerror or exc}") from None
    return sock


def hypercorn_config(sock: socket.socket) -> Config:
    config = Config()
    # hypercorn wraps the descriptor in its own socket object, which owns and closes it.
    config.bind = [f"fd://{sock.detach()}"]
    # No access log; hypercorn's errors (and app tracebacks) go to stderr, its
    # "Running on ..." banner does not: the supervisor logs its own start line.
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    return config


async def serve_admin(source: AdminSource, host: str, port: int, *,
                      task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                      ) -> None:
    """Serve until cancelled. Reports (host, port) actually bound (port 0 picks one) once
    listening; a bind failure raises OSError from nursery.start(). Cancellation closes the
    listener and every open connection at once (no graceful drain: nothing here is worth
    holding a supervisor shutdown for)."""
    sock = bind_socket(host, port)
    bound: tuple[str, int] = sock.getsockname()[:2]
    config = hypercorn_config(sock)

    # hypercorn reports its binds as URLs once listening; report our (host, port) instead.
    class _Started:
        def started(self, binds: object = None) -> None:
            task_status.started(bound)

    await serve(create_app(source), config, task_status=_Started())  # type: ignore[arg-type]
