import itertools
import random
import time

import pytest
from hypothesis import given, settings, strategies as st

from store import DEFAULT, FALLBACK, PaymentStore
from timestamps import now_ms

T0 = 1752150896000
_ids = itertools.count()


def new_id():
    return "id-%d" % next(_ids)


def brute_force(records, lo, hi):
    count, cents = [0, 0], [0, 0]
    for ts, c, p in records:
        if (lo is None or ts >= lo) and (hi is None or ts <= hi):
            count[p] += 1
            cents[p] += c
    return count, cents


records_strategy = st.lists(st.tuples(st.integers(T0 - 50_000, T0 + 50_000), st.integers(1, 10_000),
                                      st.sampled_from([DEFAULT, FALLBACK])), max_size=300)
bound = st.one_of(st.none(), st.integers(T0 - 60_000, T0 + 60_000))


@settings(max_examples=300, deadline=None)
@given(records_strategy, bound, bound)
def test_summary_equals_brute_force(records, lo, hi):
    store = PaymentStore(1000, "e")
    for ts, c, p in records:
        store.record_local(new_id(), ts, c, p)
    totals = store.summary(lo, hi)
    assert (totals.count, totals.cents) == brute_force(records, lo, hi)


@settings(max_examples=100, deadline=None)
@given(records_strategy, bound, bound, st.integers(1, 50))
def test_wraparound_keeps_only_the_newest(records, lo, hi, capacity):
    store = PaymentStore(capacity, "e")
    for ts, c, p in records:
        store.record_local(new_id(), ts, c, p)
    kept = records[-capacity:] if records else []
    totals = store.summary(lo, hi)
    assert (totals.count, totals.cents) == brute_force(kept, lo, hi)
    assert len(store) == len(kept)
    assert store.overwritten == len(records) - len(kept)


def test_inclusive_bounds_at_the_millisecond():
    store = PaymentStore(10, "e")
    store.record_local(new_id(), T0, 1990, DEFAULT)
    assert store.summary(T0, T0).count == [1, 0]
    assert store.summary(T0 + 1, None).count == [0, 0]
    assert store.summary(None, T0 - 1).count == [0, 0]
    assert store.summary(T0 + 5, T0).count == [0, 0]


def test_purge_forgets_records_but_not_what_was_seen():
    store = PaymentStore(10, "local")
    store.record_local(new_id(), T0, 100, DEFAULT)
    assert store.ingest("peer", 1, T0, 200, FALLBACK, "x", now_ms())
    purge_at = now_ms() + 1
    store.purge(purge_at)
    assert len(store) == 0 and store.summary().count == [0, 0]
    assert not store.ingest("peer", 1, T0, 200, FALLBACK, "x", now_ms()), "a purged record must not come back"
    assert store.ingest("peer", 2, T0, 300, FALLBACK, "y", purge_at), "paid after the purge: kept"
    assert store.summary().cents == [0, 300]


def test_a_purge_is_a_point_in_time_whichever_arrives_first():
    """Records paid before the purge go, also those that arrive after it; those paid after it
    stay, whatever their requestedAt (a payment accepted before the purge and paid after it).
    Two stores that see the same records and purge in any order hold the same."""
    purge_at = now_ms() + 60_000
    records = [("peer", seq, T0 + (59 - seq) * 40, 100 * seq, seq % 2, "id%d" % seq, purge_at - 30 + seq)
               for seq in range(1, 60)]
    early, late = PaymentStore(100, "a"), PaymentStore(100, "b")
    early.purge(purge_at)
    for record in records:
        early.ingest(*record)
        late.ingest(*record)
    late.purge(purge_at)
    kept = [r for r in records if r[6] >= purge_at]
    assert 0 < len(kept) < len(records)
    for store in (early, late):
        assert store.summary().count == [sum(1 for r in kept if r[4] == p) for p in (0, 1)]
        assert sorted(r[1] for r in store.records_above({})) == [r[1] for r in kept]
        assert store.held("id1") is None and store.held("id59") is not None
        assert store.record_local("new", T0, 1, DEFAULT) is None      # paid now, before the purge: purged too
    late.purge(purge_at - 1000)                 # an older purge arriving late changes nothing
    assert len(late) == len(kept)


def test_a_purge_looks_only_at_what_was_appended_since_it():
    store = PaymentStore(10_000, "e")
    for _ in range(5000):
        store.record_local(new_id(), T0, 1, DEFAULT)
    purge_at = now_ms() + 1000
    store.purge(purge_at)
    assert len(store) == 0
    assert store.record_local(new_id(), T0, 1, DEFAULT) is None     # paid (now) before the purge's instant
    assert store.ingest("peer", 1, T0, 5, FALLBACK, "late", purge_at + 5)
    store.purge(purge_at + 2)
    assert store.held("late") == (T0, 5, FALLBACK)


def test_resync_sends_exactly_what_the_peer_lacks():
    a, b = PaymentStore(100, "a"), PaymentStore(100, "b")
    for i in range(10):
        a.record_local(new_id(), T0 + i, 100 + i, i % 2)
    # b got the first four over the link, then the link dropped
    for record in list(a.records_above({}))[:4]:
        assert b.ingest(*record)
    missing = list(a.records_above(b.high_water()))
    assert [r[1] for r in missing] == list(range(5, 11))
    for record in missing + missing:            # delivering twice counts once
        b.ingest(*record)
    assert (b.summary().count, b.summary().cents) == (a.summary().count, a.summary().cents)


def test_restarted_peer_gets_its_old_records_back():
    a, b1 = PaymentStore(100, "a"), PaymentStore(100, "b1")
    for i in range(5):
        a.ingest(*b1.record_local(new_id(), T0 + i, 100, DEFAULT))
        b1.ingest(*a.record_local(new_id(), T0 + i, 200, FALLBACK))
    b2 = PaymentStore(100, "b2")                 # b restarted with nothing
    for record in a.records_above(b2.high_water()):
        b2.ingest(*record)
    assert b2.summary().count == [5, 5] and b2.summary().cents == [500, 1000]
    assert list(b2.records_above(a.high_water())) == []


def test_records_above_skips_what_is_overwritten_meanwhile():
    store = PaymentStore(5, "e")
    for i in range(5):
        store.record_local(new_id(), T0 + i, 1, DEFAULT)
    pending = store.records_above({})
    first = next(pending)
    for i in range(3):                          # overwrites seq 1..3 while iterating
        store.record_local(new_id(), T0 + 10 + i, 1, DEFAULT)
    assert [first[1]] + [r[1] for r in pending] == [1, 4, 5]


def test_large_store_matches_brute_force_on_windows():
    rng = random.Random(7)
    store = PaymentStore(200_000, "e")
    records = []
    for i in range(100_000):
        ts = T0 + i * 3 + rng.randint(-2000, 2000)   # mostly increasing, some out of order
        rec = (ts, rng.randint(1, 5000), rng.randint(0, 1))
        records.append(rec)
        store.record_local(new_id(), *rec)
    for _ in range(20):
        lo = T0 + rng.randint(-5000, 300_000)
        hi = lo + rng.randint(0, 100_000)
        totals = store.summary(lo, hi)
        assert (totals.count, totals.cents) == brute_force(records, lo, hi)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError):
        PaymentStore(0, "e")


def test_one_record_per_correlation_id_whatever_path_it_comes_by():
    a, b = PaymentStore(100, "a"), PaymentStore(100, "b")
    first = a.record_local("x", T0, 1990, DEFAULT)
    assert a.record_local("x", T0 + 5, 1990, DEFAULT) is None        # settled again here
    theirs = b.record_local("x", T0, 1990, DEFAULT)                  # settled at the peer too
    assert not a.ingest(*theirs) and not b.ingest(*first)
    assert a.summary().count == b.summary().count == [1, 0]
    assert a.held("x") == b.held("x") == (T0, 1990, DEFAULT)
    # a refused record still counts as seen: a resync does not send it again
    assert list(b.records_above(a.high_water())) == []
    assert a.held("y") is None


def test_an_overwritten_or_purged_record_frees_its_correlation_id():
    store = PaymentStore(2, "e")
    for cid in ("x", "y", "z"):
        store.record_local(cid, T0, 1, DEFAULT)
    assert store.held("x") is None and store.held("z") is not None
    assert store.record_local("x", T0, 1, DEFAULT) is not None
    time.sleep(0.002)
    store.purge(now_ms())
    assert store.held("x") is None and store.record_local("x", T0 + 1, 1, DEFAULT) is not None


def test_records_above_in_steps_finds_what_records_above_finds():
    store = PaymentStore(100, "a")
    for i in range(57):
        store.record_local(new_id(), T0 + i, 1, DEFAULT)
    steps = list(store.records_above_in_steps({"a": 20}, step=10))
    assert len(steps) == 6 and [r for step in steps for r in step] == list(store.records_above({"a": 20}))
