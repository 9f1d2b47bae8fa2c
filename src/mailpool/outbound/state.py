"""The delivery state of one message on the outbound side, kept beside its queue file.

`spool/state/<queue id>` holds the attempts made, the next attempt time and each recipient's
outcome. A new state is appended before an attempt (the time the message is due again if
this attempt fails, so a crash neither resets the schedule nor retries at once) and after it
(what each recipient got). A recipient once delivered or failed is never tried again. The
queue file itself never changes after it is written.
"""

from __future__ import annotations

import os
import struct
import zlib

import msgspec

from mailpool.framework.spool import Envelope, Spool, SpoolError
from mailpool.fsutil import write_all

# The queues a message waits in for delivery to another host (first try, then the retries).
OUTBOUND_QUEUES = ("outbound", "retry1", "retry2")

PENDING = "pending"
DELIVERED = "delivered"  # accepted by the next hop
FAILED = "failed"        # permanently (a notice went to the originator)


class RecipientState(msgspec.Struct, omit_defaults=True):
    status: str = PENDING
    # The last answer or failure for this recipient: enhanced status and text (for notices,
    # `queue list` and the journal), and the host that gave it.
    code: str = ""
    reason: str = ""
    remote_mta: str = ""
    last_attempt: float = 0.0


class OutboundState(msgspec.Struct, omit_defaults=True):
    recipients: list[RecipientState]
    attempts: int = 0
    next_attempt: float = 0.0   # Unix seconds; 0 = due now
    delay_notified: bool = False

    def pending(self) -> list[int]:
        return [i for i, r in enumerate(self.recipients) if r.status == PENDING]


_decoder = msgspec.msgpack.Decoder(OutboundState)
_encoder = msgspec.msgpack.Encoder()
# A record: payload length, CRC-32 of the payload, msgpack payload. The file is a log of
# them: an update appends one (no new directory entry, unlike write-and-rename), the last
# whole record is the state, and a record torn by a crash is ignored (the one before holds).
_RECORD = struct.Struct(">II")


def load_state(spool: Spool, queue_id: str, recipients: int) -> OutboundState:
    """The stored state, or a fresh one (nothing tried yet) when there is none."""
    path = spool.state / queue_id
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    last = None
    pos = 0
    while pos + _RECORD.size <= len(data):
        length, crc = _RECORD.unpack_from(data, pos)
        body = data[pos + _RECORD.size: pos + _RECORD.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break  # a torn tail: the state is the record before it
        last = body
        pos += _RECORD.size + length
    if pos < len(data):
        # Cut the torn tail, or the next record appended after it would never be read.
        os.truncate(path, pos)
    if last is None:
        # Nothing, or only a first record torn by a crash before its group commit (so
        # before the first attempt): nothing was tried yet.
        return OutboundState(recipients=[RecipientState() for _ in range(recipients)])
    try:
        state = _decoder.decode(last)
    except msgspec.DecodeError as exc:
        raise SpoolError(f"{path}: bad outbound state: {exc}") from None
    if len(state.recipients) != recipients:
        raise SpoolError(f"{path}: {len(state.recipients)} recipients, message has {recipients}")
    return state


def save_state(spool: Spool, queue_id: str, state: OutboundState, *, sync: bool = False) -> None:
    """Append the new state; durable at the next group commit unless `sync`."""
    body = _encoder.encode(state)
    path = spool.state / queue_id
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        write_all(fd, _RECORD.pack(len(body), zlib.crc32(body)) + body)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def pending_envelope(envelope: Envelope, state: OutboundState) -> Envelope:
    """The envelope for the recipients still pending: what goes through the framework again
    (`queue requeue`), so no recipient already delivered or failed gets the message twice."""
    keep = state.pending()
    return msgspec.structs.replace(
        envelope, recipients=[envelope.recipients[i] for i in keep],
        notify=[envelope.rcpt_notify(i) for i in keep] if envelope.notify else [],
        orcpt=[envelope.rcpt_orcpt(i) for i in keep] if envelope.orcpt else [])


def destination_of(address: str, router: str) -> str:
    """The next hop a recipient's mail goes to: the router when one is set, else its domain."""
    if router:
        return router
    return address.rpartition("@")[2].lower().rstrip(".")


def destinations(envelope: Envelope, state: OutboundState, router: str) -> list[str]:
    """The next hops of the recipients still pending, sorted."""
    return sorted({destination_of(envelope.recipients[i], router) for i in state.pending()})
