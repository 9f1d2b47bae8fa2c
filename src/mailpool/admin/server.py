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
    # The supervisor cancels us on shutdown; don't hold a drain for slow browsers.
    config.graceful_timeout = 1.0
    return config


def _split_bind(bind: str) -> tuple[str, int]:
    """'http://127.0.0.1:8025' or 'http://[::1]:8025' -> (host, port)."""
    hostport = bind.partition("://")[2]
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


async def serve_admin(source: AdminSource, host: str, port: int, *,
                      task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                      ) -> None:
    """Serve until cancelled. Reports (host, port) actually bound (port 0 picks one) once
    listening; a bind failure raises OSError from nursery.start()."""

    # hypercorn reports its binds as URLs; translate them into our (host, port) once.
    class _Started:
        def started(self, binds: list[str]) -> None:
            task_status.started(_split_bind(binds[0]))

    config = hypercorn_config(bind_socket(host, port))
    await serve(create_app(source), config,
                task_status=_Started())  # type: ignore[arg-type]
