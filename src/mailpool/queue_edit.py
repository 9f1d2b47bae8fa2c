"""Operator changes to queued mail (`queue release/hold/requeue/delete`, postsuper's
work): files only, run in a worker thread by the supervisor's control ops, which first make
sure no job is working on the message. Each returns the queue the message was in (or, for
release, went to) and its envelope; ValueError says why a change cannot be made."""

from __future__ import annotations

import msgspec

from mailpool.framework.spool import Envelope, Spool
from mailpool.fsutil import syncfs
from mailpool.outbound.state import load_state, pending_envelope, save_state


def release(spool: Spool, queue_id: str) -> tuple[str, Envelope]:
    """quarantine/hold -> incoming, marked so the filters let it through; a message held
    on its way out (it has a delivery state) -> outbound, due now, its state kept (as
    postsuper -H puts it back in the deferred queue). Returns the queue it went to."""
    queue = spool.find(queue_id)
    if queue not in ("quarantine", "hold"):
        raise ValueError(f"{queue_id}: not in quarantine or on hold"
                         + (f" (it is in {queue})" if queue else " (no such message)"))
    if queue == "hold" and (spool.state / queue_id).exists():
        envelope = spool.load_envelope(queue, queue_id)
        state = load_state(spool, queue_id, len(envelope.recipients))
        state.next_attempt = 0.0
        save_state(spool, queue_id, state, sync=True)
        spool.move(queue_id, "hold", "outbound")
        return "outbound", envelope
    envelope, content = spool.load(queue, queue_id)
    released = msgspec.structs.replace(envelope, filter_exempt=True)
    spool.store("incoming", released, content, sync=False)
    spool.remove(queue, queue_id, sync=False)
    syncfs(spool.root)
    return "incoming", released

def hold(spool: Spool, queue_id: str) -> tuple[str, Envelope]:
    """Any queue but hold and quarantine -> hold: kept, not delivered, until released."""
    queue = spool.find(queue_id)
    if queue in (None, "hold", "quarantine"):
        raise ValueError(f"{queue_id}: " + (f"already in {queue}" if queue
                                            else "no such message in any queue"))
    envelope = spool.load_envelope(queue, queue_id)
    spool.move(queue_id, queue, "hold")
    return queue, envelope

def requeue(spool: Spool, queue_id: str) -> tuple[str, Envelope]:
    """Back to the incoming queue, to be taken through the framework afresh (Postfix's
    postsuper -r); an outbound message's delivery state starts over."""
    queue = spool.find(queue_id)
    if queue is None or queue == "incoming":
        raise ValueError(f"{queue_id}: " + ("already on the incoming queue" if queue
                                            else "no such message in any queue"))
    envelope, content = spool.load(queue, queue_id)
    if (spool.state / queue_id).exists():
        # On its way out: only the recipients not yet delivered or failed go again.
        state = load_state(spool, queue_id, len(envelope.recipients))
        envelope = pending_envelope(envelope, state)
        if not envelope.recipients:
            raise ValueError(f"{queue_id}: every recipient was delivered or failed")
    spool.store("incoming", envelope, content, sync=False)
    spool.remove(queue, queue_id, sync=False)
    syncfs(spool.root)
    return queue, envelope

def delete(spool: Spool, queue_id: str) -> tuple[str, Envelope]:
    queue = spool.find(queue_id)
    if queue is None:
        raise ValueError(f"{queue_id}: no such message in any queue")
    envelope = spool.load_envelope(queue, queue_id)
    spool.remove(queue, queue_id)
    return queue, envelope

def all_queued(spool: Spool) -> list[str]:
    """Every queued message's id (for the operator's ALL)."""
    return [qid for queue in Spool.QUEUES for qid in spool.list(queue)]
