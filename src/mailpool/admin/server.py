"""Serve the admin app with hypercorn on the supervisor's own Trio loop."""

from __future__ import annotations

import errno
import ipaddress
import socket

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from mailpool.admin.app import AdminSource, create_app


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(address: str) -> bool:
    """Whether a bound address (always numeric) is reachable only from this machine."""
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:
        return False


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
        raise OSError(exc.errno, f"admin console cannot listen on {_where(host, port)}: "
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


async def serve_admin(source: AdminSource, host: str, port: int, *, token: str = "",
                      task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                      ) -> None:
    """Serve until cancelled. `token` is [admin] token ("" = no changes through the console).
    Reports (host, port) actually bound (port 0 picks one) once listening; a bind failure,
    or an address beyond loopback with no token, raises OSError from nursery.start().
    Cancellation closes the listener and every open connection at once (no graceful drain:
    nothing here is worth holding a supervisor shutdown for)."""
    sock = bind_socket(host, port)
    bound: tuple[str, int] = sock.getsockname()[:2]
    # The configuration refuses this already; checked again on the address really bound
    # (a name, "", 0.0.0.0) so no caller can open the console to the network by mistake.
    if not token and not is_loopback(bound[0]):
        sock.close()
        raise OSError(errno.EACCES, f"admin console will not listen on {_where(host, port)}: "
                                    "beyond loopback it needs [admin] token")
    config = hypercorn_config(sock)

    # hypercorn reports its binds as URLs once listening; report our (host, port) instead.
    class _Started:
        def started(self, binds: object = None) -> None:
            task_status.started(bound)

    await serve(create_app(source, token=token), config, task_status=_Started())  # type: ignore[arg-type]
