"""The dispatcher in one process, with the real book, store and HTTP client.

Stopping is where a payment can fall between two owners: an attempt whose task
was created but had not run yet when shutdown cancelled it.
"""
import asyncio
import socket
import uuid

import orjson
import uvloop

from config import Settings
from payments import ACCEPTED, Payment, PaymentBook, left_behind, replica_entry
from processors import DUPLICATE, SERVER_ERROR, STORED, Breaker, Dispatcher, ProcessorClient
from store import PaymentStore


def refused_url():
    """A loopback port nothing listens on: attempts there fail at once, definitely."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "http://127.0.0.1:%d" % s.getsockname()[1]


def breakers_for(settings):
    return tuple(Breaker(settings.breaker_failures, settings.breaker_probe_s, settings.breaker_probe_max_s)
                 for _ in range(2))


async def stop_while_attempts_are_being_started(count):
    url = refused_url()
    settings = Settings(processor_default_url=url, processor_fallback_url=url, dispatch_delay_s=0.0,
                        dispatch_burst=count, health_enabled=False)
    book = PaymentBook(settings.queue_capacity, settings.index_capacity)
    client = ProcessorClient(settings)
    await client.start()
    breakers = breakers_for(settings)
    dispatcher = Dispatcher(settings, book, PaymentStore(1000, "e"), client, breakers)
    runner = asyncio.get_running_loop().create_task(dispatcher.run())
    await asyncio.sleep(0)                          # the dispatcher is waiting for work
    ids = [str(uuid.uuid4()) for _ in range(count)]
    for cid in ids:
        assert book.accept(cid, 100, 0.0) == ACCEPTED
    while not book.in_flight:                       # the pass that starts the attempts has run...
        await asyncio.sleep(0)
    started = len(book.in_flight)
    runner.cancel()                                 # ...and shutdown comes before their tasks' first step
    await dispatcher.stop()
    await client.close()
    return started, ids, book, dispatcher


def test_attempts_cancelled_before_they_ran_are_handed_over_not_lost():
    started, ids, book, dispatcher = uvloop.run(stop_while_attempts_are_being_started(20))
    assert started == 20
    assert not book.in_flight and dispatcher.in_flight == [0, 0] and dispatcher.attempts == [0, 0]
    assert book.pending == 20
    taken = book.take_all_pending()
    assert sorted(p.correlation_id for p in taken) == sorted(ids)
    assert book.pending == 0
    # Nothing was sent, so nothing is ambiguous: the peer may send them anywhere.
    assert not any(any(p.ambiguous) for p in taken)


# ----- taking over a payment from the peer (its wire form) ------------------------------

def test_an_adopted_payment_keeps_its_acceptance_time_never_one_in_the_future():
    origin = PaymentBook(100, 100)
    for cid, accepted_at in (("a" * 36, 10.0), ("b" * 36, 30.0)):
        assert origin.accept(cid, 100, accepted_at) == ACCEPTED
    heir = PaymentBook(100, 100)
    for payment in origin.take_all_pending():
        assert heir.adopt(Payment.from_wire(payment.to_wire(), 20.0))
    assert heir.get("a" * 36).accepted_at == 10.0      # the wait at the origin counts
    assert heir.get("b" * 36).accepted_at == 20.0      # a clock ahead of ours: now, not later


def test_the_wire_form_carries_every_exactly_once_field():
    payment = Payment("c" * 36, 250, 3.0)
    payment.requested_at = [1752150896789, None]
    payment.ambiguous = [True, False]
    payment.unverified = [False, True]
    payment.pinned, payment.attempts, payment.last_error = 0, 3, "default: HTTP 500"
    payment.other_cents = 199                       # a copy with another amount it took over (_merge)
    back = Payment.from_wire(orjson.loads(orjson.dumps(payment.to_wire())), 5.0)
    assert {name: getattr(back, name) for name in Payment.__slots__} == \
        {name: getattr(payment, name) for name in Payment.__slots__}


def test_an_inherited_payment_in_flight_is_pinned_where_it_may_be():
    payment = Payment("d" * 36, 100, 1.0)
    payment.requested_at = [1752150896789, None]
    heir = left_behind(replica_entry_of(payment, in_flight_to=0), 2.0)
    assert heir.pinned == 0 and heir.ambiguous == [True, False] and heir.requested_at == payment.requested_at


def test_a_copy_accepted_here_takes_the_pin_of_the_peers_copy():
    book = PaymentBook(100, 100)
    assert book.accept("e" * 36, 100, 1.0) == ACCEPTED
    theirs = Payment("e" * 36, 100, 0.5)
    theirs.requested_at, theirs.ambiguous, theirs.pinned = [1752150896789, None], [True, False], 0
    assert not book.adopt(theirs)
    mine = book.get("e" * 36)
    assert (mine.pinned, mine.ambiguous, mine.requested_at) == (0, [True, False], [1752150896789, None])
    assert not book.ready and list(book.pinned[0]) == [mine] and book.pending == 1


def test_a_copy_with_another_amount_settles_against_either_amount():
    """A repeat with another amount reached this instance before it read the dead peer's last
    lines (its acceptance, its attempt at the fallback): both were answered 202. The processor
    may hold either copy's amount: this copy, which took the peer's over, settles against both."""
    book = PaymentBook(100, 100)
    assert book.accept("f" * 36, 861, 1.0) == ACCEPTED
    theirs = Payment("f" * 36, 750, 0.5)
    theirs.requested_at, theirs.ambiguous, theirs.pinned = [None, 1752150896789], [False, True], 1
    assert not book.adopt(theirs)
    mine = book.get("f" * 36)
    assert (mine.cents, mine.other_cents, mine.pinned, mine.requested_at) == (861, 750, 1, [None, 1752150896789])


def test_a_dead_letter_with_another_amount_does_not_hide_the_peers_copy():
    """As above, but this copy was attempted first and refused ("already stored with another
    amount"): the dead peer's copy, which the processor may hold, is adopted and settled."""
    book = PaymentBook(100, 100)
    assert book.accept("a" * 36, 2101, 1.0) == ACCEPTED
    book.mark_dead(book.get("a" * 36), "default refused it: already stored with another amount (19.90)")
    theirs = Payment("a" * 36, 1990, 0.5)
    theirs.requested_at, theirs.ambiguous, theirs.pinned = [1752150896789, None], [True, False], 0
    assert book.adopt(theirs)
    assert book.get("a" * 36) is theirs and (book.pending, book.dead) == (1, 0)
    assert list(book.pinned[0]) == [theirs]


def test_a_held_copy_that_took_over_the_peers_cannot_be_withdrawn():
    """A copy here, its 202 still waiting, takes over the dead peer's copy (answered 202 long ago):
    if the link then stalls, this copy's answer is not undone, since it is also the peer's."""
    book = PaymentBook(100, 100)
    assert book.accept("b" * 36, 100, 1.0, held=True) == ACCEPTED
    mine = book.get("b" * 36)
    theirs = Payment("b" * 36, 100, 0.5)
    theirs.requested_at, theirs.ambiguous, theirs.pinned = [1752150896789, None], [True, False], 0
    assert not book.adopt(theirs)
    assert not book.withdraw(mine)
    assert book.get("b" * 36) is mine and book.pending == 1


def test_a_withdrawn_acceptance_is_forgotten():
    book = PaymentBook(100, 100)
    assert book.accept("f" * 36, 100, 1.0) == ACCEPTED
    assert book.withdraw(book.get("f" * 36))
    assert book.get("f" * 36) is None and not book.ready and book.pending == 0
    assert book.accept("f" * 36, 200, 2.0) == ACCEPTED      # never accepted: free to be accepted anew


def replica_entry_of(payment, in_flight_to):
    payment.in_flight_to = in_flight_to
    return replica_entry(payment)


# ----- the breaker: every probe ends ------------------------------------------------------

def test_a_probe_that_never_reached_its_processor_leaves_the_breaker_open_not_half_open():
    """A payment routed to the default as its breaker's probe is settled at the fallback (which
    held it after a 500) before anything is sent: the probe is not spent (found by review)."""
    breaker = Breaker(1, 0.5, 2.0)
    breaker.on_failure(0.0)
    assert breaker.state == Breaker.OPEN and breaker.allows(10.0)
    breaker.on_send()
    assert breaker.state == Breaker.PROBING and not breaker.allows(10.0)
    breaker.on_not_sent(10.0)
    assert breaker.state == Breaker.OPEN and breaker.allows(10.0)


# ----- a payment whose 202 waits for the peer is not attempted ----------------------------

async def hold_then_confirm():
    url = refused_url()
    settings = Settings(processor_default_url=url, processor_fallback_url=url, dispatch_delay_s=0.0,
                        health_enabled=False)
    book = PaymentBook(settings.queue_capacity, settings.index_capacity)
    client = ProcessorClient(settings)
    await client.start()
    breakers = breakers_for(settings)
    dispatcher = Dispatcher(settings, book, PaymentStore(1000, "e"), client, breakers)
    runner = asyncio.get_running_loop().create_task(dispatcher.run())
    await asyncio.sleep(0)
    held, free = str(uuid.uuid4()), str(uuid.uuid4())
    assert book.accept(held, 100, 0.0, held=True) == ACCEPTED
    await asyncio.sleep(0.05)
    attempted_while_held = book.get(held).attempts
    assert book.accept(free, 100, 0.0) == ACCEPTED      # behind it in the queue: goes on
    await asyncio.sleep(0.05)
    behind_while_held = book.get(free).attempts
    book.confirm(book.get(held))
    await asyncio.sleep(0.05)
    runner.cancel()
    await dispatcher.stop()
    await client.close()
    return attempted_while_held, behind_while_held, book.get(held).attempts, book.get(free).attempts


def test_a_held_payment_is_not_attempted_until_it_is_confirmed():
    """Found by review: after the link to the peer stalled, the dispatcher could start payments
    whose 202 was still waiting, which could then no longer be undone (503). A held payment is
    out of the queue meanwhile: one accepted after it is not kept waiting behind it."""
    held_before, behind_before, held_after, behind_after = uvloop.run(hold_then_confirm())
    assert held_before == 0 and behind_before >= 1
    assert held_after >= 1                             # (a refused connection: retried with backoff)


class ScriptedProcessors:
    """The processors' answers, scripted: the first attempt a 5xx, every later one a 422, and the
    lookup after it says the processor holds the payment with `held_cents`."""

    def __init__(self, held_cents, requested_at):
        self.held_cents, self.requested_at, self.calls = held_cents, requested_at, 0

    async def pay(self, processor, body):
        self.calls += 1
        await asyncio.sleep(0)
        return (SERVER_ERROR, "HTTP 500") if self.calls == 1 else (DUPLICATE, "HTTP 422")

    async def stored(self, processor, correlation_id):
        return STORED, self.held_cents, self.requested_at


def test_a_copy_that_took_over_the_peers_is_counted_with_the_amount_the_processor_holds():
    """This copy (20.00) was attempted once (5xx) when the dead peer's copy (10.00, in flight at the
    default) was taken over; its retry gets 422 and the processor holds 10.00: that is this
    payment, recorded once with 10.00, not a dead letter that leaves the stored one uncounted."""
    cid, requested_at = "d" * 36, 1752150896789

    async def main():
        settings = Settings(dispatch_delay_s=0.0, health_enabled=False, retry_base_s=0.05, retry_max_s=0.05)
        book = PaymentBook(settings.queue_capacity, settings.index_capacity)
        store = PaymentStore(1000, "2-1")
        breakers = breakers_for(settings)
        dispatcher = Dispatcher(settings, book, store, ScriptedProcessors(1000, requested_at), breakers)
        runner = asyncio.get_running_loop().create_task(dispatcher.run())
        await asyncio.sleep(0)
        assert book.accept(cid, 2000, 1.0) == ACCEPTED
        mine = book.get(cid)
        while mine.attempts == 0 or mine in book.in_flight:
            await asyncio.sleep(0.001)
        theirs = Payment(cid, 1000, 0.5)
        theirs.requested_at = [requested_at, None]
        entry = replica_entry(theirs)
        entry[1] = 0
        assert not book.adopt(left_behind(entry, 2.0))
        for _ in range(200):
            if store.held(cid) is not None or book.dead:
                break
            await asyncio.sleep(0.005)
        runner.cancel()
        return store.held(cid), book.dead

    held, dead = uvloop.run(main())
    assert held == (requested_at, 1000, 0) and dead == 0
