"""TLS end to end: STARTTLS and implicit TLS on SMTP, STLS and POP3S, authenticated submission,
with the suite's own CA (trustme) and the standard library's clients."""

from __future__ import annotations

import base64
import poplib
import shutil
import smtplib
import socket
import ssl
import subprocess
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


# --- SMTP: STARTTLS, implicit TLS, authenticated submission ---------------------------------


def received_header(h: Host, user: str) -> bytes:
    (path, *_) = h.wait_delivered(user, 1)
    return path.read_bytes().split(b"\r\n\r\n")[0]


def test_starttls_on_port_25_and_the_received_header(host: Any, certs: Certs) -> None:
    h = tls_host(host, certs)
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.ehlo("client.example.test")
        assert s.has_extn("starttls") and not s.has_extn("auth")  # AUTH off on port 25
        s.starttls(context=certs.client_context())
        s.ehlo("client.example.test")
        assert not s.has_extn("starttls")  # once is enough
        assert s.docmd("STARTTLS")[0] == 503
        # TLS alone is no licence to relay: without AUTH the relay rules still refuse.
        assert s.docmd("MAIL", "FROM:<a@remote.test>")[0] == 250
        assert s.docmd("RCPT", "TO:<someone@far.test>")[0] == 550
        s.docmd("RSET")
        s.sendmail("a@remote.test", ["bob@example.test"], b"Subject: tls\r\n\r\nsecret\r\n")
    header = received_header(h, "bob")
    assert b"with ESMTPS id" in header and b"(using TLSv1." in header and b"cipher" in header


def test_commands_pipelined_behind_starttls_are_never_answered(host: Any,
                                                                certs: Certs) -> None:
    h = tls_host(host, certs)
    raw = socket.create_connection(h.smtp, timeout=10)
    raw.recv(200)
    raw.sendall(b"EHLO client.example.test\r\n")
    while b"250 " not in raw.recv(4096):
        pass
    raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\n")
    assert raw.recv(200).startswith(b"220 2.0.0")
    tls = certs.client_context().wrap_socket(raw, server_hostname="mail.example.test")
    tls.sendall(b"NOOP\r\n")
    assert tls.recv(200) == b"250 2.0.0 Ok\r\n"  # NOOP's answer: the MAIL got none
    tls.sendall(b"MAIL FROM:<a@remote.test>\r\n")
    assert tls.recv(200).startswith(b"503")  # the session started over: EHLO first
    tls.close()


def login_plain(s: smtplib.SMTP, user: str, password: str) -> tuple[int, bytes]:
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return s.docmd("AUTH", f"PLAIN {token}")


def test_submission_requires_tls_then_auth(host: Any, certs: Certs) -> None:
    h = tls_host(host, certs)
    with smtplib.SMTP(*h.addr("submission"), timeout=10) as s:
        s.ehlo("client.example.test")
        assert not s.has_extn("auth")  # not before TLS
        assert s.docmd("AUTH", "PLAIN")[0] == 538
        assert s.docmd("MAIL", "FROM:<alice@example.test>")[0] == 530
        s.starttls(context=certs.client_context())
        s.ehlo("client.example.test")
        assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
        s.login("alice", PASSWORD)  # smtplib picks PLAIN or LOGIN
        # Authenticated: relaying is allowed (the default relay rules would refuse it from
        # here), and the sender must be alice's own address.
        assert s.docmd("MAIL", "FROM:<bob@example.test>")[0] == 553
        assert s.docmd("MAIL", "FROM:<al@other.test>")[0] == 250
        assert s.docmd("RCPT", "TO:<someone@far.test>")[0] == 250
        assert s.docmd("RCPT", "TO:<bob@example.test>")[0] == 250
        s.docmd("RSET")
        s.sendmail("alice@example.test", ["bob@example.test"], b"Subject: sub\r\n\r\nx\r\n")
    assert b"with ESMTPSA id" in received_header(h, "bob")
    records = h.journal("--code", "9A")
    assert records and records[-1]["user"] == "alice" and records[-1]["ip"] == "127.0.0.1"


def test_smtps_with_login(host: Any, certs: Certs) -> None:
    h = tls_host(host, certs)
    with smtplib.SMTP_SSL(*h.addr("smtps"), context=certs.client_context(), timeout=10) as s:
        s.ehlo("client.example.test")
        assert not s.has_extn("starttls")
        s.login("bob@example.test", PASSWORD)  # a user's address works as the login too
        s.sendmail("bob@example.test", ["alice@example.test"], b"Subject: 465\r\n\r\nx\r\n")
    h.wait_delivered("alice", 1)


def test_wrong_passwords_are_delayed_counted_and_end_the_session(host: Any,
                                                                certs: Certs) -> None:
    h = tls_host(host, certs, "[pop3]\nauth_fail_delay = 0.2\n[smtp]\nmax_auth_failures = 2\n")
    s = smtplib.SMTP_SSL(*h.addr("smtps"), context=certs.client_context(), timeout=20)
    s.ehlo("client.example.test")
    assert login_plain(s, "alice", "wrong")[0] == 535
    assert login_plain(s, "alice", "wrong again")[0] == 535
    code, text = s.getreply()  # the 421 that followed the second 535, then the close
    assert code == 421 and text.startswith(b"4.7.0")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()
    failed = h.journal("--code", "9F")
    assert len(failed) == 2 and {r["ip"] for r in failed} == {"127.0.0.1"}
    # The right password still works, later and elsewhere (a delay, not a lock-out).
    with smtplib.SMTP_SSL(*h.addr("smtps"), context=certs.client_context(), timeout=20) as ok:
        ok.ehlo("client.example.test")
        assert login_plain(ok, "alice", PASSWORD)[0] == 235
    # The malformed exchanges get the RFC's codes.
    with smtplib.SMTP_SSL(*h.addr("smtps"), context=certs.client_context(), timeout=20) as m:
        m.ehlo("client.example.test")
        assert m.docmd("AUTH", "PLAIN not-base64!")[0] == 501
        assert m.docmd("AUTH", "PLAIN")[0] == 334
        assert m.docmd("*")[0] == 501  # cancelled
        assert m.docmd("AUTH", "CRAM-MD5")[0] == 504
        assert m.docmd("AUTH", "LOGIN")[0] == 334
        assert m.docmd("A" * 13000)[0] == 500  # over-long response
        assert login_plain(m, "alice", PASSWORD)[0] == 235
        assert m.docmd("AUTH", "PLAIN")[0] == 503  # a second AUTH


def test_a_new_certificate_is_served_after_sighup(host: Any, certs: Certs,
                                                  tmp_path: Path) -> None:
    h = tls_host(host, certs)
    newer = make_certs(tmp_path / "newer")
    with smtplib.SMTP(*h.smtp, timeout=10) as s:
        s.starttls(context=certs.client_context())
    h.config_path.write_text(h.config_path.read_text()
                             .replace(str(certs.cert), str(newer.cert))
                             .replace(str(certs.key), str(newer.key)))
    import os
    import signal

    os.kill(h.proc.pid, signal.SIGHUP)

    def new_cert_served() -> bool:
        s = smtplib.SMTP(*h.smtp, timeout=10)
        try:
            s.starttls(context=newer.client_context())
        except (ssl.SSLError, smtplib.SMTPException, OSError):
            return False  # still the old certificate (a job from before the reload)
        finally:
            s.close()
        return True

    wait_for(new_cert_served, 30, what="the new certificate after SIGHUP")


# --- other clients: swaks, openssl s_client; POP3 AUTH PLAIN -----------------------------------


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_with_tls_and_auth(host: Any, certs: Certs) -> None:
    h = tls_host(host, certs)
    server = "{}:{}".format(*h.addr("submission"))
    res = subprocess.run(
        ["swaks", "--server", server, "--tls", "--tls-verify", "--tls-ca-path",
         str(certs.ca_file), "--tls-sni", "mail.example.test",
         "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", PASSWORD,
         "--from", "alice@example.test", "--to", "bob@example.test",
         "--helo", "client.example.test"],
        capture_output=True, text=True, timeout=60)
    if "requires Net::SSLeay" in res.stderr:
        pytest.skip("swaks has no TLS here (Debian package libnet-ssleay-perl missing)")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "235 2.7.0" in res.stdout
    assert b"with ESMTPSA id" in received_header(h, "bob")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_starttls(host: Any, certs: Certs) -> None:
    h = tls_host(host, certs)
    res = subprocess.run(
        ["openssl", "s_client", "-connect", "{}:{}".format(*h.smtp), "-starttls", "smtp",
         "-CAfile", str(certs.ca_file), "-verify_return_error", "-verify_hostname",
         "mail.example.test", "-quiet"],
        input="EHLO client.example.test\r\nQUIT\r\n", capture_output=True, text=True,
        timeout=60)
    assert "250" in res.stdout and "221" in res.stdout, res.stdout + res.stderr
    assert "STARTTLS" not in res.stdout  # not offered again inside TLS


def test_pop3_auth_plain_under_tls_only(host: Any, certs: Certs) -> None:
    h = tls_host(host, certs)
    deliver_one(h)
    h.wait_delivered("bob", 1)
    token = base64.b64encode(f"\0bob\0{PASSWORD}".encode())
    raw = socket.create_connection(h.pop3, timeout=10)
    raw.recv(200)
    raw.sendall(b"AUTH PLAIN " + token + b"\r\n")
    assert raw.recv(200).startswith(b"-ERR [AUTH]")  # not before TLS
    raw.close()
    pop = poplib.POP3_SSL(*h.addr("pop3s"), context=certs.client_context(), timeout=10)
    assert "SASL" in pop.capa()
    assert pop._shortcmd("AUTH PLAIN " + token.decode()).startswith(b"+OK")
    assert pop.stat()[0] == 1
    pop.quit()
