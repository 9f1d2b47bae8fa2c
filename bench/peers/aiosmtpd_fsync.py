"""The Python peer: aiosmtpd answering 250 only once each message is durable.

    python -m bench.peers.aiosmtpd_fsync --port 2526 --maildir DIR

Each message is written the Maildir way: a unique file in DIR/tmp, fsync, rename
into DIR/new, fsync of DIR/new, and only then the 250. The disk work runs in
asyncio's default thread pool, as a user of aiosmtpd would write it, so that
concurrent sessions overlap their fsyncs instead of queueing on the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

_counter = itertools.count()


def deliver(maildir: Path, data: bytes) -> None:
    """Write one message durably into maildir/new (Maildir protocol)."""
    name = f"{os.getpid()}.{next(_counter)}.bench"
    tmp = maildir / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, maildir / "new" / name)
    dfd = os.open(maildir / "new", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class FsyncHandler:
    def __init__(self, maildir: Path) -> None:
        self.maildir = maildir
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        head = f"Return-Path: <{envelope.mail_from}>\r\n".encode()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, deliver, self.maildir, head + content)
        return "250 2.0.0 Ok: queued"


async def serve(host: str, port: int, maildir: Path) -> None:
    handler = FsyncHandler(maildir)
    loop = asyncio.get_running_loop()
    # Let asyncio make the socket: it sets TCP_NODELAY only on sockets whose proto is
    # IPPROTO_TCP, and without it aiosmtpd's line-by-line EHLO reply meets the client's
    # delayed ACK (40 ms per connection).
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="aiosmtpd.bench.test"), host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--maildir", type=Path, required=True)
    a = p.parse_args()
    asyncio.run(serve(a.host, a.port, a.maildir))


if __name__ == "__main__":
    main()
