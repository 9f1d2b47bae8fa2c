"""TLS for the session drivers, once for every protocol: the server context and the handshake.

The protocol cores only announce "start TLS now" (STARTTLS, STLS) or a listener starts with it
(465, 995); the driver then wraps its stream in `trio.SSLStream` here, under the handshake
timeout. A job loads the certificate when it starts, so after SIGHUP the new jobs serve the new
certificate while the old ones finish their sessions with theirs.
"""

from __future__ import annotations

import ssl

import trio

from mailpool.config import TlsConfig


def server_context(cfg: TlsConfig) -> ssl.SSLContext | None:
    """The server side context (TLS 1.2 at least), or None when TLS is not configured."""
    if not cfg.enabled:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cfg.certificate, cfg.key)
    return context


async def handshake(stream: trio.abc.Stream, context: ssl.SSLContext,
                    timeout: float) -> trio.SSLStream[trio.abc.Stream] | None:
    """The stream, now encrypted; None when the handshake failed or took too long."""
    tls = trio.SSLStream(stream, context, server_side=True)
    with trio.move_on_after(timeout):
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        return tls
    return None


def describe(tls: trio.SSLStream[trio.abc.Stream]) -> str:
    """Postfix's words for the Received header: "TLSv1.3 with cipher X (256/256 bits)"."""
    cipher = tls.cipher()
    if cipher is None:
        return str(tls.version())
    name, _, bits = cipher
    return f"{tls.version()} with cipher {name} ({bits}/{bits} bits)"
