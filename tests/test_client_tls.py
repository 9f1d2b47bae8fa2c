"""STARTTLS in the client driver (jobs/client_session.py) against a real TLS server.

The server here is a few lines of SMTP spoken by hand on 127.0.0.1, so each test controls
what happens around STARTTLS (offered or not, refused, closed before the handshake, bytes
injected after the 220). Certificates come from a trustme CA made per test module.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

from mailpool.config import OutboundConfig, OutboundTlsConfig
from mailpool.jobs.client_session import (
    ConnectionCache,
    SessionError,
    TlsContexts,
    open_connection,
    tls_policy_for,
)
from mailpool.protocol import smtp_client as core

MX = "mx.tls.test"
MESSAGE = b"Subject: tls\r\n\r\nover TLS\r\n"


@dataclass
class Session:
    """What the server saw on one connection."""

    commands: list[bytes] = field(default_factory=list)
    tls_version: str | None = None  # set once the server's handshake succeeded
    messages: list[bytes] = field(default_factory=list)


@dataclass
class FakeMx:
    """One SMTP server, any number of connections. `offer`: STARTTLS in the EHLO reply (never
    over TLS); `starttls`: what STARTTLS gets ("accept"; "close" right after the 220; "garbage":
    SMTP text in answer to the ClientHello; "stall": no answer at all; "refuse" with 454);
    `after_220`: octets sent behind the 220 in the same write."""

    server_context: ssl.SSLContext
    offer: bool = True
    starttls: str = "accept"
    after_220: bytes = b""
    sessions: list[Session] = field(default_factory=list)

    async def handle(self, stream: trio.abc.Stream) -> None:
        session = Session()
        self.sessions.append(session)
        buf = bytearray()

        async def line() -> bytes | None:
            while b"\n" not in buf:
                try:
                    data = await stream.receive_some(4096)
                except trio.BrokenResourceError:
                    return None
                if not data:
                    return None
                buf.extend(data)
            end = buf.index(b"\n") + 1
            out = bytes(buf[:end])
            del buf[:end]
            return out

        try:
            await stream.send_all(b"220 " + MX.encode() + b" ESMTP\r\n")
            while (command := await line()) is not None:
                session.commands.append(command.rstrip(b"\r\n"))
                verb = command[:4].upper()
                if verb == b"EHLO":
                    offer = self.offer and session.tls_version is None
                    await stream.send_all(b"250-" + MX.encode() + b"\r\n"
                                          + (b"250-STARTTLS\r\n" if offer else b"")
                                          + b"250 8BITMIME\r\n")
                elif command.upper().startswith(b"STARTTLS"):
                    if self.starttls == "refuse":
                        await stream.send_all(b"454 4.7.0 TLS not available\r\n")
                        continue
                    await stream.send_all(b"220 2.0.0 Ready to start TLS\r\n" + self.after_220)
                    if self.starttls == "close":
                        return
                    if self.starttls == "stall":
                        await trio.sleep_forever()
                    if self.starttls == "garbage":
                        await stream.receive_some(4096)  # the ClientHello
                        await stream.send_all(b"500 5.5.1 unrecognized command\r\n")
                        return
                    assert not buf  # the client said nothing before its handshake
                    tls = trio.SSLStream(stream, self.server_context, server_side=True,
                                         https_compatible=True)
                    try:
                        await tls.do_handshake()
                    except trio.BrokenResourceError:
                        return  # the client refused the certificate
                    stream = tls
                    session.tls_version = tls.version()
                elif verb in (b"MAIL", b"RCPT"):
                    await stream.send_all(b"250 2.1.0 Ok\r\n")
                elif verb == b"DATA":
                    await stream.send_all(b"354 go ahead\r\n")
                    body = b""
                    while (text := await line()) not in (b".\r\n", None):
                        body += text
                    session.messages.append(body)
                    await stream.send_all(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    await stream.send_all(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    await stream.send_all(b"502 5.5.1 what\r\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(MX).configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@asynccontextmanager
async def serving(mx: FakeMx) -> AsyncIterator[int]:
    """Run the server; yield its port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"), mx.handle, 0)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def config(port: int, ca_file: str = "", helo_timeout: float = 5) -> OutboundConfig:
    return OutboundConfig(port=port, connect_timeout=5, greeting_timeout=5,
                          helo_timeout=helo_timeout,
                          mail_timeout=5, rcpt_timeout=5, data_timeout=5, data_done_timeout=5,
                          quit_timeout=5, data_block_timeout=5,
                          tls=OutboundTlsConfig(ca_file=ca_file))


async def deliver(port: int, policy: str, *, host: str = MX, ca_file: str = "",
                  helo_timeout: float = 5) -> tuple[str, core.Ready]:
    """One session and one transaction; the connection's TLS outcome and its Ready."""
    cfg = config(port, ca_file, helo_timeout)
    conn, ready = await open_connection(cfg, "client.test", host, "127.0.0.1", port,
                                        tls_policy=policy, tls_contexts=TlsContexts(ca_file))
    try:
        assert isinstance(ready, core.Ready)
        conn.core.send_transaction(core.Transaction("a@client.test", ("b@tls.test",), MESSAGE))
        done = await conn.next_event()
        assert isinstance(done, core.TransactionDone)
        assert done.data is not None and done.data.code == 250
    finally:
        await conn.close()
    return conn.tls, ready


# -- may ---------------------------------------------------------------------------------------


async def test_may_uses_tls_when_offered(server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context)
    async with serving(mx) as port:
        tls, ready = await deliver(port, "may")
    [session] = mx.sessions
    assert session.tls_version in ("TLSv1.2", "TLSv1.3")
    assert tls.startswith(session.tls_version + " ")  # "TLSv1.3 TLS_AES_256_GCM_SHA384"
    assert len(tls.split()) == 2
    assert ready.tls and ready.esmtp
    assert session.commands == [b"EHLO client.test", b"STARTTLS", b"EHLO client.test",
                                b"MAIL FROM:<a@client.test>", b"RCPT TO:<b@tls.test>",
                                b"DATA", b"QUIT"]
    assert session.messages == [MESSAGE]


async def test_may_does_not_check_the_certificate(ca_file: str) -> None:
    # A certificate from a CA nobody trusts, for another name: still TLS under may.
    stranger = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("elsewhere.test").configure_cert(stranger)
    mx = FakeMx(stranger)
    async with serving(mx) as port:
        tls, ready = await deliver(port, "may", ca_file=ca_file)
    assert ready.tls and tls.startswith("TLSv1.")
    assert [s.messages for s in mx.sessions] == [[MESSAGE]]


async def test_may_when_not_offered_is_plaintext(server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context, offer=False)
    async with serving(mx) as port:
        tls, ready = await deliver(port, "may")
    assert tls == "none" and not ready.tls
    [session] = mx.sessions
    assert b"STARTTLS" not in session.commands and session.messages == [MESSAGE]


async def test_may_when_refused_is_plaintext(server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context, starttls="refuse")
    async with serving(mx) as port:
        tls, ready = await deliver(port, "may")
    assert tls == "none" and not ready.tls
    [session] = mx.sessions
    assert session.commands == [b"EHLO client.test", b"STARTTLS", b"MAIL FROM:<a@client.test>",
                                b"RCPT TO:<b@tls.test>", b"DATA", b"QUIT"]
    assert session.messages == [MESSAGE]


async def test_policy_none_never_says_starttls(server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context)
    async with serving(mx) as port:
        tls, ready = await deliver(port, "none")
    assert tls == "none" and not ready.tls
    assert b"STARTTLS" not in mx.sessions[0].commands


async def test_may_after_a_failed_handshake_retries_in_plaintext(
        server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context, starttls="close")
    async with serving(mx) as port:
        tls, ready = await deliver(port, "may")
    assert tls == ("plaintext after failed handshake "
                   "(the server closed the connection during the handshake)")
    assert not ready.tls
    first, second = mx.sessions
    assert first.commands == [b"EHLO client.test", b"STARTTLS"] and first.messages == []
    assert second.commands[0] == b"EHLO client.test"
    assert b"STARTTLS" not in second.commands  # offered again, not taken again
    assert second.messages == [MESSAGE]


async def test_may_after_a_tls_protocol_error_retries_in_plaintext(
        server_context: ssl.SSLContext) -> None:
    # The server answers the ClientHello with SMTP text instead of TLS.
    mx = FakeMx(server_context, starttls="garbage")
    async with serving(mx) as port:
        tls, ready = await deliver(port, "may")
    assert not ready.tls
    assert tls.startswith("plaintext after failed handshake (TLS error: ")  # OpenSSL's name
    assert [s.messages for s in mx.sessions] == [[], [MESSAGE]]


async def test_may_after_a_stalled_handshake_retries_in_plaintext(
        server_context: ssl.SSLContext) -> None:
    # The handshake has the EHLO deadline.
    mx = FakeMx(server_context, starttls="stall")
    async with serving(mx) as port:
        with trio.fail_after(5):
            tls, ready = await deliver(port, "may", helo_timeout=0.3)
    assert tls == "plaintext after failed handshake (the handshake timed out)"
    assert not ready.tls
    assert [s.messages for s in mx.sessions] == [[], [MESSAGE]]


# -- encrypt -----------------------------------------------------------------------------------


async def test_encrypt_uses_tls(server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context)
    async with serving(mx) as port:
        tls, ready = await deliver(port, "encrypt")
    assert ready.tls and tls.startswith(f"{mx.sessions[0].tls_version} ")


async def test_encrypt_not_offered_fails(server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context, offer=False)
    async with serving(mx) as port:
        with pytest.raises(SessionError) as caught:
            await deliver(port, "encrypt")
    assert caught.value.stage == "starttls"
    assert caught.value.reason == (f"TLS is required but was not offered by host "
                                   f"{MX}[127.0.0.1]:{port}")
    [session] = mx.sessions
    assert session.commands == [b"EHLO client.test", b"QUIT"]


async def test_encrypt_refused_fails(server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context, starttls="refuse")
    async with serving(mx) as port:
        with pytest.raises(SessionError) as caught:
            await deliver(port, "encrypt")
    assert caught.value.stage == "starttls"
    assert caught.value.reason == (f"TLS is required but {MX}[127.0.0.1]:{port} refused "
                                   "STARTTLS: 454 4.7.0 TLS not available")
    assert mx.sessions[0].commands == [b"EHLO client.test", b"STARTTLS", b"QUIT"]


async def test_encrypt_failed_handshake_has_no_plaintext_retry(
        server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context, starttls="close")
    async with serving(mx) as port:
        with pytest.raises(SessionError) as caught:
            await deliver(port, "encrypt")
    assert caught.value.stage == "starttls"
    assert caught.value.reason == (f"TLS handshake with {MX}[127.0.0.1]:{port} failed: the "
                                   "server closed the connection during the handshake")
    assert len(mx.sessions) == 1


# -- verify ------------------------------------------------------------------------------------


async def test_verify_with_the_right_ca_and_name(server_context: ssl.SSLContext,
                                                 ca_file: str) -> None:
    mx = FakeMx(server_context)
    async with serving(mx) as port:
        tls, ready = await deliver(port, "verify", ca_file=ca_file)
    assert ready.tls and tls.startswith(f"{mx.sessions[0].tls_version} ")
    assert mx.sessions[0].messages == [MESSAGE]


async def test_verify_with_a_wrong_name(server_context: ssl.SSLContext, ca_file: str) -> None:
    mx = FakeMx(server_context)
    async with serving(mx) as port:
        with pytest.raises(SessionError) as caught:
            await deliver(port, "verify", host="other.tls.test", ca_file=ca_file)
    assert caught.value.stage == "starttls"
    assert caught.value.reason == (
        f"TLS handshake with other.tls.test[127.0.0.1]:{port} failed: certificate "
        "verification failed: Hostname mismatch, certificate is not valid for "
        "'other.tls.test'.")
    assert len(mx.sessions) == 1 and mx.sessions[0].messages == []


async def test_verify_with_an_unknown_ca(server_context: ssl.SSLContext,
                                         tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    mx = FakeMx(server_context)
    async with serving(mx) as port:
        with pytest.raises(SessionError) as caught:
            await deliver(port, "verify", ca_file=str(other))
    assert caught.value.stage == "starttls"
    assert caught.value.reason == (
        f"TLS handshake with {MX}[127.0.0.1]:{port} failed: certificate verification "
        "failed: unable to get local issuer certificate")
    assert len(mx.sessions) == 1


async def test_verify_with_an_unreadable_ca_file(tmp_path: Path) -> None:
    bad = tmp_path / "not-pem.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(SessionError) as caught:
        await open_connection(config(1), "client.test", MX, "127.0.0.1", 1,
                              tls_policy="verify", tls_contexts=TlsContexts(str(bad)))
    assert caught.value.stage == "starttls"
    assert caught.value.reason.startswith(f"TLS is required for {MX}, but the client TLS "
                                          f"setup failed: CA file '{bad}': ")


# -- plaintext injected before the handshake ------------------------------------------------------


async def test_bytes_after_the_220_are_not_replies(server_context: ssl.SSLContext) -> None:
    # In the same write as the 220: a whole fake EHLO reply. Read as replies, it would answer
    # the EHLO said over TLS (no 8BITMIME) and make the real reply an unexpected one.
    mx = FakeMx(server_context, after_220=b"250-evil.test\r\n250 SIZE 10\r\n")
    async with serving(mx) as port:
        _, ready = await deliver(port, "encrypt")
    assert ready.tls
    assert ready.hello.lines == (MX, "8BITMIME")
    assert mx.sessions[0].messages == [MESSAGE]


# -- the cache and the parts -------------------------------------------------------------------


async def test_the_cache_keeps_tls_policies_apart(server_context: ssl.SSLContext) -> None:
    mx = FakeMx(server_context, offer=False)
    async with serving(mx) as port:
        cfg = config(port)
        cache = ConnectionCache(cfg)
        conn, ready = await open_connection(cfg, "client.test", MX, "127.0.0.1", port,
                                            tls_policy="may")
        assert isinstance(ready, core.Ready) and conn.tls == "none"
        await cache.give_back("tls.test", "127.0.0.1", conn)
        assert await cache.take("tls.test", "127.0.0.1", tls_policy="verify") is None
        assert await cache.take("tls.test", "127.0.0.1") is None  # "none"
        assert await cache.take("tls.test", "127.0.0.1", tls_policy="may") is conn
        await cache.close_all()
        await conn.close()


def test_contexts_per_policy(ca_file: str) -> None:
    contexts = TlsContexts(ca_file)
    loose = contexts.get("may")
    assert contexts.get("encrypt") is loose  # built once
    assert loose.verify_mode == ssl.CERT_NONE and not loose.check_hostname
    strict = contexts.get("verify")
    assert contexts.get("verify") is strict
    assert strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    assert len(strict.get_ca_certs()) == 1  # the file's CA, not the system's
    for context in (loose, strict):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(ValueError):
        contexts.get("none")


def test_policy_per_destination() -> None:
    cfg = OutboundTlsConfig(policy="may", destinations={"Bank.Test": "verify",
                                                        "old.test": "none"})
    assert tls_policy_for(cfg, "bank.test") == "verify"
    assert tls_policy_for(cfg, "BANK.TEST.") == "verify"
    assert tls_policy_for(cfg, "old.test") == "none"
    assert tls_policy_for(cfg, "sub.bank.test") == "may"  # exact domains only
    assert tls_policy_for(OutboundTlsConfig(policy="encrypt"), "x.test") == "encrypt"
