"""The SMTP server core's fixed replies (Postfix's texts where it has one) and the
replies built from a command's argument."""

from __future__ import annotations

from mailpool.protocol.sasl import SaslError
from mailpool.protocol.smtp_syntax import Reply


def make_reply(code: int, enhanced: str, text: str) -> Reply:
    return Reply(code, enhanced, (text,))


NOT_IMPLEMENTED = make_reply(502, "5.5.1", "Error: command not implemented")
NOT_RECOGNIZED = make_reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = make_reply(500, "5.5.2", "Error: line too long")
NEED_HELO = make_reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = make_reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = make_reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = make_reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RCPT = make_reply(554, "5.5.1", "Error: no valid recipients")
MAIL_SYNTAX = make_reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = make_reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
DATA_SYNTAX = make_reply(501, "5.5.4", "Syntax: DATA")
RSET_SYNTAX = make_reply(501, "5.5.4", "Syntax: RSET")
VRFY_SYNTAX = make_reply(501, "5.5.4", "Syntax: VRFY address")
BAD_SENDER = make_reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = make_reply(501, "5.1.3", "Bad recipient address syntax")
BAD_SIZE = make_reply(501, "5.5.4", "Bad message size syntax")
SIZE_EXCEEDED = make_reply(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_RCPTS = make_reply(452, "4.5.3", "Error: too many recipients")
MESSAGE_TOO_LARGE = make_reply(552, "5.3.4", "Error: message too large")
ETRN_SYNTAX = make_reply(501, "5.5.4", "Syntax: ETRN [@]domain | #queue")
IN_TRANSACTION = make_reply(503, "5.5.1", "Error: MAIL transaction in progress")
OK = make_reply(250, "2.0.0", "Ok")
HELLO_SYNTAX = {v: make_reply(501, "5.5.4", f"Syntax: {v} hostname") for v in ("HELO", "EHLO")}
FORBIDDEN = make_reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.")
IMPROPER_PIPELINING = make_reply(554, "5.5.0", "Error: improper command pipelining after DATA")
EARLY_TALKER = make_reply(554, "5.7.1", "Error: client talked before the greeting")
NO_SERVICE = make_reply(503, "5.7.0", "Error: no SMTP service here")
NEED_EHLO = make_reply(503, "5.5.1", "Error: send EHLO first")
STARTTLS_SYNTAX = make_reply(501, "5.5.4", "Syntax: STARTTLS")
TLS_ACTIVE = make_reply(503, "5.5.1", "Error: TLS already active")
AUTH_SYNTAX = make_reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
ENCRYPTION_REQUIRED = make_reply(538, "5.7.11",
                              "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = make_reply(503, "5.5.1", "Error: already authenticated")
UNKNOWN_MECHANISM = make_reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_FAILED = make_reply(535, "5.7.8", "Error: authentication failed")
AUTH_REQUIRED = make_reply(530, "5.7.0", "Authentication required")
# RFC 4954 4 and 6 give the codes; the texts are Postfix's where it has one.
SASL_ERRORS = {
    SaslError.BAD_BASE64: make_reply(501, "5.5.2", "Error: invalid base64"),
    SaslError.CANCELLED: make_reply(501, "5.7.0", "Authentication aborted"),
    SaslError.TOO_LONG: make_reply(500, "5.5.6", "Authentication Exchange line is too long"),
    SaslError.MALFORMED: make_reply(501, "5.5.2", "Error: malformed authentication response"),
    SaslError.AUTHZID: AUTH_FAILED,  # acting as another user is never allowed here
}


def bad_param(name: str) -> Reply:
    return make_reply(501, "5.5.4", f"Bad {name} parameter syntax")


def unsupported(token: str) -> Reply:
    return make_reply(555, "5.5.4", f"Unsupported option: {token}")


def help_lines(etrn: bool, starttls: bool, auth: bool) -> tuple[str, ...]:
    extensions = ("STARTTLS " if starttls else "") + ("AUTH " if auth else "")
    return (
        "Commands supported:",
        f"HELO EHLO {extensions}MAIL RCPT DATA",
        "RSET VRFY ETRN NOOP QUIT HELP" if etrn else "RSET VRFY NOOP QUIT HELP",
        "End of HELP info",
    )
