"""TLS end to end: STARTTLS and implicit TLS on SMTP, STLS and POP3S, authenticated submission,
with the suite's own CA (trustme) and the standard library's clients."""

from __future__ import annotations

import poplib
import smtplib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from hosthelp import Host, wait_for
from outhelp import free_port
from tlshelp import Certs, make_certs

PASSWORD = "correct horse"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def tls_host(host: Any, certs: Certs, extra: str = "") -> Host:
    ports = {name: free_port() for name in ("submission", "smtps", "pop3s")}
    h = host(certs.config() + "[listen]\n" + "".join(
        f'{name} = "127.0.0.1:{port}"\n' for name, port in ports.items()) + extra)
    h.add_user("bob", "bob@example.test", password=PASSWORD)
    h.add_user("alice", "alice@example.test", "al@other.test", password=PASSWORD)
    return h


# --- POP3 ----------------------------------------------------------------------------------


def deliver_one(h: Host, to: str = "bob@example.test") -> None:
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.sendmail("a@remote.test", [to], b"Subject: for pop\r\n\r\nhello\r\n")


def test_pop3_stls_and_pop3s(host: Any, certs: Certs) -> None:
    h = tls_host(host, certs)
    deliver_one(h)
    h.wait_delivered("bob", 1)
    # Before TLS, logins are refused (TLS is configured: cleartext off by default).
    plain = poplib.POP3(*h.pop3, timeout=10)
    assert "STLS" in plain.capa()
    with pytest.raises(poplib.error_proto):
        plain.user("bob")
    plain.stls(certs.client_context())
    plain.user("bob")
    plain.pass_(PASSWORD)
    assert plain.stat()[0] == 1
    plain.quit()
    secure = poplib.POP3_SSL(*h.addr("pop3s"), context=certs.client_context(), timeout=10)
    secure.user("bob")
    secure.pass_(PASSWORD)
    assert b"hello" in b"\n".join(secure.retr(1)[1])
    secure.quit()


def test_pop3_input_pipelined_after_stls_is_never_answered(host: Any, certs: Certs) -> None:
    h = tls_host(host, certs)
    raw = socket.create_connection(h.pop3, timeout=10)
    assert raw.recv(200).startswith(b"+OK")
    raw.sendall(b"STLS\r\nUSER bob\r\n")  # the USER rides in the same packet, in clear
    assert raw.recv(200).startswith(b"+OK")
    tls = certs.client_context().wrap_socket(raw, server_hostname="mail.example.test")
    tls.sendall(b"CAPA\r\n")
    assert tls.recv(200).startswith(b"+OK")  # CAPA's answer: the injected USER got none
    tls.sendall(b"PASS " + PASSWORD.encode() + b"\r\n")
    assert tls.recv(200).startswith(b"-ERR")  # no USER was ever taken
    tls.close()
