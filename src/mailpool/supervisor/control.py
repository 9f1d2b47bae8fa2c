"""The supervisor's local control endpoint: a Unix stream socket, one JSON request per line.

The CLI (`pool show`, `pool change`, `journal rotate`) talks to a running supervisor here.
File permissions on the socket (0600, owner only) are the access control.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlUnavailable(Exception):
    """No supervisor answers on the control socket."""


class ControlError(Exception):
    """The supervisor refused the request; the message says why."""


def request(path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request and return the reply; ControlError when it carries an error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ControlUnavailable(exc.strerror or str(exc)) from None
        sock.sendall(json.dumps(payload).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise ControlUnavailable(f"no answer within {timeout} s") from None
    finally:
        sock.close()
    reply = json.loads(b"".join(chunks) or b"{}")
    if "error" in reply:
        raise ControlError(reply["error"])
    return reply


async def serve_control(path: Path, handler: Handler, *,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    task_status.started()

    async def one(conn: trio.socket.SocketType) -> None:
        async with trio.SocketStream(conn) as stream:
            buf = b""
            with trio.move_on_after(10):
                while b"\n" not in buf and len(buf) < MAX_REQUEST:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        break
                    buf += chunk
            try:
                reply = await handler(json.loads(buf.split(b"\n", 1)[0]))
            except (ValueError, KeyError, TypeError) as exc:
                reply = {"error": f"bad request: {exc}"}
            with trio.move_on_after(10):
                try:
                    await stream.send_all(json.dumps(reply).encode() + b"\n")
                except trio.BrokenResourceError:
                    pass

    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(one, conn)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
