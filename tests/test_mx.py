"""MX ordering and host selection (RFC 5321 5.1, RFC 7505), as pure rules."""

from __future__ import annotations

import itertools
import random

import pytest

from mailpool.outbound.mx import (
    MxHostName,
    MxRecord,
    RouteFailure,
    is_null_mx,
    order_mx,
    select_hosts,
)

NULL_MX_FAILURE = RouteFailure(
    permanent=True,
    code=556,
    status="5.1.10",
    reason="Recipient address rejected: Domain example.test does not accept mail (nullMX)",
)
LOOP_FAILURE = RouteFailure(
    permanent=True, code=554, status="5.4.6", reason="mail for example.test loops back to myself"
)


def mx(*pairs: tuple[int, str]) -> list[MxRecord]:
    return [MxRecord(pref, host) for pref, host in pairs]


def select(records: list[MxRecord] | None, *, my_names: tuple[str, ...] = ("me.test",),
           seed: int = 0, **kw: int) -> list[MxHostName] | RouteFailure:
    return select_hosts("example.test", records, my_names=my_names, rng=random.Random(seed), **kw)


def names(selected: list[MxHostName] | RouteFailure) -> list[str]:
    assert isinstance(selected, list), selected
    return [h.name for h in selected]


# -- ordering -----------------------------------------------------------------------------


def test_order_by_preference_whatever_the_input_order() -> None:
    records = mx((30, "c"), (10, "a"), (20, "b"))
    assert order_mx(records, random.Random(1)) == mx((10, "a"), (20, "b"), (30, "c"))


def test_equal_preferences_are_shuffled_and_every_order_appears() -> None:
    records = mx((20, "z"), (10, "a"), (10, "b"), (10, "c"), (5, "first"))
    seen: set[tuple[str, ...]] = set()
    for seed in range(300):
        ordered = order_mx(records, random.Random(seed))
        prefs = [r.preference for r in ordered]
        assert prefs == sorted(prefs)
        assert sorted(ordered, key=lambda r: r.host) == sorted(records, key=lambda r: r.host)
        assert ordered[0].host == "first" and ordered[-1].host == "z"
        seen.add(tuple(r.host for r in ordered[1:4]))
    assert seen == set(itertools.permutations(("a", "b", "c")))


def test_order_is_reproducible_from_the_rng() -> None:
    records = mx(*((10, f"h{i}") for i in range(8)))
    assert order_mx(records, random.Random(42)) == order_mx(records, random.Random(42))
    assert order_mx(records, random.Random(42)) != order_mx(records, random.Random(43))


def test_select_hosts_keeps_the_order_and_preferences() -> None:
    got = select(mx((20, "mx2.example.test"), (10, "mx1.example.test")))
    assert got == [
        MxHostName("mx1.example.test", 10, False),
        MxHostName("mx2.example.test", 20, False),
    ]


def test_select_hosts_ties_follow_the_rng() -> None:
    records = mx((10, "a.test"), (10, "b.test"))
    firsts = {names(select(records, seed=seed))[0] for seed in range(50)}
    assert firsts == {"a.test", "b.test"}


# -- implicit and null MX -----------------------------------------------------------------


def test_no_mx_records_means_the_domain_itself_implicitly() -> None:
    assert select(None) == [MxHostName("example.test", 0, True)]


def test_domain_name_is_normalised() -> None:
    got = select_hosts("Example.TEST.", None, my_names=(), rng=random.Random(0))
    assert got == [MxHostName("example.test", 0, True)]


def test_null_mx_is_a_permanent_556() -> None:
    records = mx((0, ""))
    assert is_null_mx(records)
    assert select(records) == NULL_MX_FAILURE


def test_null_mx_with_a_nonzero_preference_is_still_null_mx() -> None:
    assert select(mx((10, ""))) == NULL_MX_FAILURE


def test_is_null_mx_needs_exactly_one_root_record() -> None:
    assert not is_null_mx([])
    assert not is_null_mx(mx((0, "mx.test")))
    assert not is_null_mx(mx((0, ""), (10, "mx.test")))


def test_null_mx_mixed_with_real_records_is_ignored() -> None:
    assert names(select(mx((0, ""), (10, "mx1.test"), (20, "mx2.test")))) == [
        "mx1.test",
        "mx2.test",
    ]


def test_only_root_targets_take_no_mail() -> None:
    assert select(mx((0, ""), (10, ""))) == NULL_MX_FAILURE


# -- ourselves among the MX hosts ---------------------------------------------------------


def test_self_as_best_mx_is_a_loop() -> None:
    assert select(mx((10, "me.test"), (20, "backup.test"))) == LOOP_FAILURE


def test_self_sharing_the_best_preference_is_a_loop() -> None:
    # An equal-preference peer is no better than us: sending there could come straight back.
    assert select(mx((10, "other.test"), (10, "me.test"))) == LOOP_FAILURE


def test_self_as_lower_preference_mx_keeps_only_better_hosts() -> None:
    records = mx((10, "a.test"), (20, "b.test"), (30, "me.test"), (30, "c.test"), (40, "d.test"))
    assert names(select(records)) == ["a.test", "b.test"]


def test_own_names_match_case_insensitively_and_without_trailing_dot() -> None:
    records = mx((10, "a.test"), (20, "mx.me.test"))
    assert names(select(records, my_names=("MX.Me.Test.",))) == ["a.test"]


def test_the_best_of_our_own_names_counts() -> None:
    records = mx((10, "a.test"), (20, "me1.test"), (30, "b.test"), (40, "me2.test"))
    assert names(select(records, my_names=("me1.test", "me2.test"))) == ["a.test"]


def test_implicit_mx_to_ourselves_is_a_loop() -> None:
    assert select(None, my_names=("example.test",)) == LOOP_FAILURE


# -- limits -------------------------------------------------------------------------------


def test_truncated_to_five_hosts_best_first() -> None:
    records = mx(*((pref, f"mx{pref}.test") for pref in range(8, 0, -1)))
    assert names(select(records)) == [f"mx{pref}.test" for pref in range(1, 6)]


@pytest.mark.parametrize("limit", [1, 2])
def test_max_hosts_is_a_parameter(limit: int) -> None:
    records = mx((10, "a.test"), (20, "b.test"), (30, "c.test"))
    assert names(select(records, max_hosts=limit)) == ["a.test", "b.test"][:limit]


def test_a_host_listed_twice_is_tried_once_at_its_best_preference() -> None:
    records = mx((30, "a.test"), (10, "a.test"), (20, "b.test"))
    assert select(records) == [MxHostName("a.test", 10, False), MxHostName("b.test", 20, False)]
