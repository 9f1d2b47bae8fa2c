"""The delivery state of one message on the outbound side, kept beside its queue file.

`spool/state/<queue id>` holds the attempts made, the next attempt time and each recipient's
outcome. It is rewritten atomically before an attempt (the time the message is due again if
this attempt fails, so a crash neither resets the schedule nor retries at once) and after it
(what each recipient got). A recipient once delivered or failed is never tried again. The
queue file itself never changes after it is written.
"""

from __future__ import annotations

import msgspec

from mailpool.framework.spool import Envelope, Spool, SpoolError
from mailpool.fsutil import write_file_durably

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


def load_state(spool: Spool, queue_id: str, recipients: int) -> OutboundState:
    """The stored state, or a fresh one (nothing tried yet) when there is none."""
    path = spool.state / queue_id
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return OutboundState(recipients=[RecipientState() for _ in range(recipients)])
    try:
        state = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise SpoolError(f"{path}: bad outbound state: {exc}") from None
    if len(state.recipients) != recipients:
        raise SpoolError(f"{path}: {len(state.recipients)} recipients, message has {recipients}")
    return state


def save_state(spool: Spool, queue_id: str, state: OutboundState, *, sync: bool = False) -> None:
    """Replace the state atomically; durable at the next group commit unless `sync`."""
    write_file_durably(spool.state, queue_id, _encoder.encode(state), sync=sync,
                       tmp_dir=spool.tmp)


def destination_of(address: str, router: str) -> str:
    """The next hop a recipient's mail goes to: the router when one is set, else its domain."""
    if router:
        return router
    return address.rpartition("@")[2].lower().rstrip(".")


def destinations(envelope: Envelope, state: OutboundState, router: str) -> list[str]:
    """The next hops of the recipients still pending, sorted."""
    return sorted({destination_of(envelope.recipients[i], router) for i in state.pending()})
