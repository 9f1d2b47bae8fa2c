"""Journal entry codes (the SubType/code of the source's LG entries).

The first character is the function identifier, the second the action. The
source's codes come from /work/shared/journal-codes.md; `J` (prestart job
pool) and `Q` (queue operator) are the project's own, `D` is the POP3 server. Reserved
codes and identifiers have no counterpart here: the dump names them, the
writer refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class FunctionInfo:
    ident: str
    name: str
    reserved: bool = False


@dataclass(frozen=True, slots=True)
class CodeInfo:
    code: str
    function: str  # name of the function identifier (code[0])
    action: str  # the source's action column (or the project's)
    explanation: str  # one line, shown by the dump
    reserved: bool = False


FUNCTIONS: Final[dict[str, FunctionInfo]] = {
    f.ident: f
    for f in (
        FunctionInfo("7", "Bridge server"),
        FunctionInfo("8", "SMTP client"),
        FunctionInfo("9", "SMTP server"),
        FunctionInfo("A", "Framework non-delivery"),
        FunctionInfo("B", "Framework local delivery"),
        FunctionInfo("C", "Framework message forwarding"),
        FunctionInfo("D", "POP server"),
        FunctionInfo("E", "Send mail API"),
        FunctionInfo("F", "Domino MTA", reserved=True),
        FunctionInfo("G", "Tunneling snap-in"),
        FunctionInfo("H", "SNADS switcher", reserved=True),
        FunctionInfo("I", "MIME parser"),
        FunctionInfo("J", "Prestart job pool"),
        FunctionInfo("L", "FAX local delivery", reserved=True),
        FunctionInfo("M", "SNADS", reserved=True),
        FunctionInfo("O", "Filtering"),
        FunctionInfo("P", "Framework address resolution"),
        FunctionInfo("Q", "Queue operator"),
    )
}

# (code, action, explanation[, reserved])
_TABLE: Final[tuple[tuple[str, str, str] | tuple[str, str, str, bool], ...]] = (
    # SMTP client
    ("8B", "dequeue for processing", "Message taken off the outbound queue for delivery"),
    ("88", "successful delivery", "Message delivered to the remote server"),
    ("82", "successful delivery", "Recipient accepted by the remote server"),
    ("83", "undeliverable", "Message undeliverable (permanent failure)"),
    ("8C", "1st level timeout", "Message added to the 1st level retry queue"),
    ("8D", "2nd level timeout", "Message added to the 2nd level retry queue"),
    ("8E", "ready to be retried", "Message back on the outbound queue from the 1st level retry"),
    ("8F", "ready to be retried", "Message back on the outbound queue from the 2nd level retry"),
    (
        "87",
        "COD / undeliverable notice",
        "Delivery notice (COD or non-delivery) passed to the incoming queue",
    ),
    (
        "86",
        "resource busy",
        "Message put back on the outbound queue (connections full or recipient changed)",
    ),
    ("8K", "MX query failure", "DNS query failed (reason and query)"),
    # SMTP server
    ("94", "receiving mail (local)", "Mail received (local)"),
    ("95", "receiving relayed mail", "Mail received for relay"),
    ("91", "receiving mail", "Originator of received mail"),
    ("92", "receiving mail", "Recipient of received mail"),
    ("9T", "receiving mail", "Size of received mail in bytes"),
    ("99", "receiving mail", "Message-ID of received mail"),
    ("97", "passing mail to bridge server", "Message entered the incoming queue"),
    ("96", "passing mail to client", "Message entered the outbound queue (relayed)"),
    ("9S", "connection refused", "Connection refused by connection restrictions"),
    ("9V", "relay refused", "Relay refused by relay restrictions"),
    ("9R", "mail refused", "MAIL, RCPT or end of DATA refused with 4xx/5xx: the command, "
     "reply and reason, originator, recipient and IP (project)"),
    ("9A", "SMTP AUTH succeeded", "Client authenticated (AUTH): user and IP (project)"),
    ("9F", "SMTP AUTH failed", "Client authentication failed (AUTH): user tried and IP (project)"),
    # Bridge server
    ("7A", "getting mail off the incoming queue", "Message taken off the incoming queue"),
    ("7O", "passing mail to SNADS", "Message passed to SNADS (reserved: no SNADS here)", True),
    ("7L", "put on the busy queue", "Message put on the busy queue (storage threshold exceeded)"),
    ("7M", "getting mail off the busy queue", "Message taken off the busy queue (space reclaimed)"),
    ("7H", "pass message to framework", "Message inserted into the framework"),
    ("71", "pass message to framework", "Originator of message inserted into the framework"),
    ("72", "pass message to framework", "Recipient of message inserted into the framework"),
    ("7R", "creation of COD message", "COD (delivery confirmation) message created"),
    ("7G", "generated message", "Message id of the newly generated message (COD or notice)"),
    ("7P", "cannot deliver to a recipient", "Recipient undeliverable: creating a notice"),
    # Framework exits and creates
    ("AP", "creation of non-delivery message", "Non-delivery notice inserted"),
    ("A1", "creation of non-delivery message", "Originator of the non-delivery notice"),
    ("A2", "creation of non-delivery message", "Recipient of the non-delivery notice"),
    ("B8", "delivered into a POP mailbox", "Message delivered into a POP mailbox"),
    ("B2", "local delivery", "Recipient of local delivery"),
    ("BR", "COD into the framework", "COD message inserted into the framework"),
    ("B1", "COD into the framework", "Originator of the COD message"),
    ("CN", "checking availability", "Message put back on the framework queue: client not started"),
    ("C6", "enqueuing the mail", "Message put on the outbound queue"),
    ("C1", "enqueuing the mail", "Originator of message put on the outbound queue"),
    ("C2", "enqueuing the mail", "Recipient of message put on the outbound queue"),
    ("EH", "use of the send mail API", "Message created by the send mail API"),
    ("E1", "use of the send mail API", "Originator of message created by the send mail API"),
    ("E2", "use of the send mail API", "Recipient of message created by the send mail API"),
    ("ET", "use of the send mail API", "Total size in bytes of the send mail API message"),
    ("G8", "targeted to a bridged remote system", "Message tunneled to a bridged remote system"),
    ("G2", "tunneling", "Recipient of tunneled message"),
    ("GQ", "tunneled mail received", "Tunneled message received for local delivery"),
    ("H1", "SNADS switch", "SNADS switched a message into the framework (reserved)", True),
    ("IH", "re-insertion of parsed MIME note", "Parsed MIME note re-inserted into the framework"),
    ("I1", "re-insertion of parsed MIME note", "Originator of the re-inserted MIME note"),
    ("I2", "re-insertion of parsed MIME note", "Recipient of the re-inserted MIME note"),
    ("IG", "re-insertion of parsed MIME note", "Message id of the re-inserted MIME note"),
    ("OW", "rejected by filtering", "Message rejected by filtering (discarded, kept or rewritten)"),
    ("P2", "typed by address resolution", "Message tagged by address resolution"),
    (
        "PU",
        "directory unavailable",
        "The directory could not be read: temporary failures, mail kept queued (reason)",
    ),
    # Prestart job pool (project)
    ("JS", "job started", "Prestart job started"),
    ("JE", "job ended", "Prestart job ended (max_use, idle, crash, drain, heartbeat, reload)"),
    ("JH", "connection handed to a job", "Connection handed to a prestart job"),
    ("JW", "request waiting", "Request waiting: no prestart job available"),
    ("JR", "request rejected", "Request rejected at the maximum number of jobs (421 sent)"),
    ("JC", "pool entry changed", "Prestart job entry changed (CHGPJE)"),
    ("JT", "job restart throttled", "Prestart job restart throttled (back-off)"),
    # Queue operator (project)
    ("QR", "message released", "Message released from quarantine or hold by the operator"),
    ("QD", "message deleted", "Message deleted from its queue by the operator"),
    ("QH", "message held", "Message put on hold by the operator"),
    ("QQ", "message requeued", "Message put back on the incoming queue by the operator"),
    # POP3 server (project)
    ("DL", "POP login", "POP login succeeded"),
    ("DF", "POP login failed", "POP login failed"),
    ("DR", "message retrieved", "POP message retrieved"),
    ("DD", "message deleted", "POP message deleted at QUIT"),
)


def _build() -> dict[str, CodeInfo]:
    table: dict[str, CodeInfo] = {}
    for row in _TABLE:
        code, action, explanation = row[0], row[1], row[2]
        reserved = bool(row[3]) if len(row) > 3 else False
        func = FUNCTIONS[code[0]]
        table[code] = CodeInfo(code, func.name, action, explanation, reserved or func.reserved)
    return table


CODES: Final[dict[str, CodeInfo]] = _build()


def explain(code: str) -> str:
    """One-line explanation; never raises (a journal may hold codes from elsewhere)."""
    info = CODES.get(code)
    if info is not None:
        return info.explanation
    func = FUNCTIONS.get(code[:1])
    if func is not None:
        return f"Unknown {func.name} code {code}"
    return f"Unknown code {code!r}"


def check_writable(code: str) -> None:
    """Raise ValueError unless `code` is documented and not reserved."""
    info = CODES.get(code)
    if info is None:
        raise ValueError(f"unknown journal code {code!r}")
    if info.reserved:
        raise ValueError(f"journal code {code!r} is reserved ({info.function}): nothing writes it")
