"""Tests of the sans-IO SASL server mechanisms (mailpool.protocol.sasl)."""

from __future__ import annotations

import base64

import pytest

from mailpool.protocol.sasl import (
    MAX_RESPONSE_LINE,
    MECHANISMS,
    Challenge,
    Credentials,
    SaslError,
    SaslServer,
)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def started(mechanism: str = "PLAIN") -> SaslServer:
    sasl = SaslServer()
    assert sasl.start(mechanism, None) == Challenge(b"" if mechanism == "PLAIN" else
                                                     b"Username:")
    assert sasl.active and sasl.mechanism == mechanism
    return sasl


# ---------------------------------------------------------------- PLAIN (RFC 4616)


def test_plain_initial_response() -> None:
    sasl = SaslServer()
    result = sasl.start("PLAIN", b"AGFsaWNlAHNlY3JldA==")  # "\0alice\0secret"
    assert result == Credentials("", "alice", "secret")
    assert not sasl.active and sasl.mechanism is None


def test_plain_after_empty_challenge() -> None:
    sasl = started("PLAIN")
    assert Challenge(b"").encoded() == b""
    assert sasl.step(b64(b"alice\0alice\0pw")) == Credentials("alice", "alice", "pw")
    assert not sasl.active


def test_mechanism_name_is_case_insensitive() -> None:
    assert SaslServer().start("plain", b64(b"\0a\0b")) == Credentials("", "a", "b")


def test_plain_authzid_naming_someone_else() -> None:
    sasl = SaslServer()
    assert sasl.start("PLAIN", b64(b"root\0alice\0secret")) is SaslError.AUTHZID
    assert not sasl.active


@pytest.mark.parametrize(
    "message",
    [
        b"",  # "=" as initial response
        b"alice\0secret",  # one NUL
        b"\0alice\0secret\0",  # three NULs
        b"\0\0secret",  # empty authcid
        b"\0alice\0",  # empty password
        b"\0al\xffice\0secret",  # authcid not UTF-8
        b"\xff\0alice\0secret",  # authzid not UTF-8
        b"\0ali\tce\0secret",  # control character in the user name
        b"\0alice\x7f\0secret",
        b"x\x01\0alice\0secret",  # control character in the authzid
    ],
)
def test_plain_malformed(message: bytes) -> None:
    sasl = started("PLAIN")
    assert sasl.step(b64(message)) is SaslError.MALFORMED
    assert not sasl.active


def test_plain_password_keeps_its_octets() -> None:
    result = SaslServer().start("PLAIN", b64(b"\0b\xc3\xa9a\0p\xff\xfe\xc3\xa9 \t"))
    assert isinstance(result, Credentials)
    assert result.username == "b\u00e9a"
    assert result.password.encode("utf-8", "surrogateescape") == b"p\xff\xfe\xc3\xa9 \t"
    assert "p\udcff" not in repr(result) and "password" not in repr(result)


def test_equals_sign_is_an_empty_initial_response() -> None:
    # RFC 4954 4: "=" is an empty response; for PLAIN that is malformed, not a challenge.
    assert SaslServer().start("PLAIN", b"=") is SaslError.MALFORMED
    sasl = started("PLAIN")
    assert sasl.step(b"=") is SaslError.BAD_BASE64  # only the initial response has "="


# ---------------------------------------------------------------- LOGIN


def test_login_two_steps() -> None:
    sasl = started("LOGIN")
    assert Challenge(b"Username:").encoded() == b"VXNlcm5hbWU6"
    result = sasl.step(b"YWxpY2U=")
    assert result == Challenge(b"Password:")
    assert result.encoded() == b"UGFzc3dvcmQ6"
    assert sasl.active
    assert sasl.step(b"c2VjcmV0") == Credentials("", "alice", "secret")
    assert not sasl.active


def test_login_with_initial_user_name() -> None:
    sasl = SaslServer()
    assert sasl.start("LOGIN", b64(b"alice")) == Challenge(b"Password:")
    assert sasl.step(b64(b"p w")) == Credentials("", "alice", "p w")


@pytest.mark.parametrize(
    ("user", "password"),
    [(b"", None), (b"a\0b", None), (b"\xff", None), (b"a\nb", None),
     (b"alice", b""), (b"alice", b"p\0w")],
)
def test_login_malformed(user: bytes, password: bytes | None) -> None:
    sasl = started("LOGIN")
    result = sasl.step(b64(user))
    if password is None:
        assert result is SaslError.MALFORMED
    else:
        assert result == Challenge(b"Password:")
        assert sasl.step(b64(password)) is SaslError.MALFORMED
    assert not sasl.active


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_cancel(mechanism: str) -> None:
    sasl = started(mechanism)
    assert sasl.step(b"*") is SaslError.CANCELLED
    assert not sasl.active


@pytest.mark.parametrize(
    "line", [b"AGFsaWNlAHNlY3JldA", b"AGFsaWNl AHNlY3JldA==", b"!!!!", b"YQ==YQ==", b"*x",
             b"AGFsaWNlAHNlY3JldA==\r", b"\xff", b"AGFsaWNlAHNlY3JldA==AA==",
             b"AGFsaWNlAHNlY3JldB==", b"AGFsaWNlAHNlY3Jl=="])
def test_bad_base64(line: bytes) -> None:
    sasl = started("PLAIN")
    assert sasl.step(line) is SaslError.BAD_BASE64
    assert not sasl.active


def test_bad_base64_initial_response() -> None:
    assert SaslServer().start("PLAIN", b"*") is SaslError.BAD_BASE64
    assert SaslServer().start("LOGIN", b"abc") is SaslError.BAD_BASE64


def test_line_length_limit() -> None:
    # 12288 octets with the CRLF: a line of 12286 octets is read, 12287 is too long.
    longest = b64(b"\0alice\0" + b"p" * 9206)  # base64 comes in fours: 12284 octets
    assert len(longest) == MAX_RESPONSE_LINE - 4
    result = started("PLAIN").step(longest)
    assert isinstance(result, Credentials) and len(result.password) == 9206
    assert started("PLAIN").step(longest + b"==") is SaslError.BAD_BASE64  # 12286: read
    sasl = started("PLAIN")
    assert sasl.step(longest + b"===") is SaslError.TOO_LONG  # 12287
    assert not sasl.active


def test_too_long_from_the_core() -> None:
    sasl = started("LOGIN")
    assert sasl.too_long() is SaslError.TOO_LONG
    assert not sasl.active


def test_unsupported_mechanism() -> None:
    sasl = SaslServer(("PLAIN",))
    assert sasl.start("LOGIN", None) is SaslError.UNSUPPORTED
    assert sasl.start("CRAM-MD5", None) is SaslError.UNSUPPORTED
    assert not sasl.active
    assert sasl.start("PLAIN", None) == Challenge(b"")


def test_usage_errors() -> None:
    assert MECHANISMS == ("PLAIN", "LOGIN")
    with pytest.raises(ValueError):
        SaslServer(("PLAIN", "GSSAPI"))
    sasl = SaslServer()
    with pytest.raises(RuntimeError):
        sasl.step(b"x")
    sasl.start("PLAIN", None)
    with pytest.raises(RuntimeError):
        sasl.start("PLAIN", None)


def test_exchanges_follow_one_another() -> None:
    sasl = SaslServer()
    assert sasl.start("LOGIN", None) == Challenge(b"Username:")
    assert sasl.step(b"*") is SaslError.CANCELLED
    assert sasl.start("LOGIN", b64(b"bob")) == Challenge(b"Password:")  # no user kept
    assert sasl.step(b64(b"pw")) == Credentials("", "bob", "pw")
