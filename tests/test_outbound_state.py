"""The outbound delivery state: a log of records, the last whole one counts."""

from __future__ import annotations

from pathlib import Path

from mailpool.framework.spool import Spool
from mailpool.outbound.state import (
    DELIVERED,
    OutboundState,
    RecipientState,
    load_state,
    save_state,
)


def test_the_last_whole_record_counts_and_a_torn_tail_is_cut(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    assert load_state(spool, "q1", 2).attempts == 0  # nothing stored: nothing tried
    save_state(spool, "q1", OutboundState(recipients=[RecipientState()] * 2, attempts=1,
                                          next_attempt=10.0))
    done = OutboundState(recipients=[RecipientState(status=DELIVERED), RecipientState()],
                         attempts=2, next_attempt=20.0)
    save_state(spool, "q1", done)
    assert load_state(spool, "q1", 2) == done
    path = spool.state / "q1"
    whole = path.read_bytes()
    path.write_bytes(whole + b"\x00\x00\x00\x40\x12\x34")  # a record cut by a crash
    assert load_state(spool, "q1", 2) == done
    assert path.read_bytes() == whole  # cut, so the next record is read after it
    third = OutboundState(recipients=[RecipientState(status=DELIVERED)] * 2, attempts=3)
    save_state(spool, "q1", third)
    assert load_state(spool, "q1", 2) == third


def test_a_first_record_torn_means_nothing_was_tried(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (spool.state / "q2").write_bytes(b"\x00\x00")
    state = load_state(spool, "q2", 1)
    assert state.attempts == 0 and state.pending() == [0]
