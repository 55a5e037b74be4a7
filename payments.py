"""The book of payments this instance accepted: idempotency, the queue, dead letters.

A payment is accepted once per correlationId and then moves
PENDING -> PAID (recorded in the store) or PENDING -> DEAD (dead-lettered,
kept and visible). The queue holds PENDING payments ready to be attempted;
payments waiting out a retry backoff sit in a timer heap until due.
"""
import heapq
import itertools
from collections import deque

from audit import OFF
from store import PROCESSOR_NAMES, cents_text
from timestamps import format_ms

PENDING, PAID, DEAD, HANDED_OVER, WITHDRAWN = "pending", "paid", "dead_letter", "handed_over", "withdrawn"

ACCEPTED, ALREADY_ACCEPTED, CONFLICT, QUEUE_FULL = range(4)


class Payment:
    __slots__ = ("correlation_id", "cents", "state", "attempts", "last_error",
                 "requested_at", "ambiguous", "unverified", "pinned", "paid_by", "accepted_at", "in_flight_to",
                 "other_cents")

    def __init__(self, correlation_id, cents, accepted_at):
        self.correlation_id = correlation_id
        self.cents = cents
        self.state = PENDING
        self.attempts = 0
        self.last_error = None
        # requestedAt (ms) per processor, fixed at the first attempt to it and
        # reused on every retry there, so the processor's books and ours agree.
        self.requested_at = [None, None]
        # True once an attempt to that processor ended without a definite answer:
        # the processor may have stored it, so only it may settle the payment.
        self.ambiguous = [False, False]
        # True once that processor answered 5xx: by the rules nothing was stored, but a processor
        # can commit and then fail its answer, so it is asked (GET /payments/{id}) before the
        # payment goes to the other one. None until then (one list less per payment).
        self.unverified = None
        self.pinned = None       # processor index the payment must stay on, or None
        self.paid_by = None
        self.accepted_at = accepted_at
        # Processor index while an attempt is under way there, or claimed for it at acceptance
        # (Dispatcher.claim): what the peer's replica is told the payment may have reached.
        self.in_flight_to = None
        # The amount of another copy of this payment, accepted by the peer, that this one took over
        # (PaymentBook._merge): a processor holding it with that amount holds this payment.
        self.other_cents = None

    def is_unverified(self, processor):
        return self.unverified is not None and self.unverified[processor]

    def set_unverified(self, processor, value):
        if self.unverified is None:
            self.unverified = [False, False]
        self.unverified[processor] = value

    @property
    def amount_text(self):
        return cents_text(self.cents)

    def to_wire(self):
        """Everything the peer needs to carry on with this payment under the same rules.

        accepted_at travels as it is: time.monotonic() is the kernel's CLOCK_MONOTONIC, one
        clock for every process on the host, and the peer is on the same host (the link is a
        Unix socket). So a payment the peer takes over keeps the time it has already waited.
        """
        return [self.correlation_id, self.cents, self.requested_at, self.ambiguous, self.pinned,
                self.attempts, self.last_error, self.accepted_at, self.unverified or [False, False],
                self.other_cents]

    @classmethod
    def from_wire(cls, wire, now):
        """The payment to_wire() describes; its wait so far counts, but never ends in the future."""
        (correlation_id, cents, requested_at, ambiguous, pinned, attempts, last_error, accepted_at, unverified,
         other_cents) = wire
        payment = cls(correlation_id, cents, min(accepted_at, now))
        payment.other_cents = other_cents
        payment.requested_at = list(requested_at)
        payment.ambiguous = list(ambiguous)
        payment.unverified = list(unverified) if any(unverified) else None
        payment.pinned = pinned
        payment.attempts = attempts
        payment.last_error = last_error
        return payment

    def describe(self):
        info = {
            "correlationId": self.correlation_id,
            "amount": self.cents / 100,
            "status": self.state,
            "attempts": self.attempts,
            "lastError": self.last_error,
        }
        if self.paid_by is not None:
            info["processor"] = PROCESSOR_NAMES[self.paid_by]
            info["requestedAt"] = format_ms(self.requested_at[self.paid_by])
        return info


def replica_entry(payment):
    """What the peer keeps of one of our pending payments: [wire form, processor an attempt is
    under way at (or claimed for), or None]."""
    return [payment.to_wire(), payment.in_flight_to]


def wire_id(wire):
    return wire[0]


def entry_id(entry):
    return entry[0][0]


def entry_cents(entry):
    return entry[0][1]


def wire_cents(wire):
    return wire[1]


def entry_accepted_at(entry):
    return entry[0][7]


def left_behind(entry, now):
    """A pending payment of a peer that died -> the Payment to adopt.

    An attempt that was under way may have reached the processor: the payment
    stays on that processor with the same requestedAt, as after an ambiguous
    attempt, so a 422 there means "already stored" and is settled once.
    """
    payment = Payment.from_wire(entry[0], now)
    in_flight_to = entry[1]
    if in_flight_to is not None:
        payment.ambiguous[in_flight_to] = True
        payment.pinned = in_flight_to
    return payment


class PaymentBook:
    def __init__(self, queue_capacity, index_capacity, audit=OFF):
        self.queue_capacity = queue_capacity
        self.audit = audit
        self.index_capacity = index_capacity
        self._index = {}              # correlationId -> Payment (insertion ordered)
        self.ready = deque()          # PENDING payments free to go to any processor
        self.pinned = (deque(), deque())  # PENDING payments that must stay on one processor
        self._waiting = []            # heap of (due, n, payment) backing off before a retry
        self._held = set()            # PENDING payments accepted, not to be attempted yet (hold)
        self._arriving = {}           # correlationId -> cents of payments being adopted, not yet in
        self.in_flight = set()        # payments with an attempt under way (the dispatcher keeps it)
        self._tiebreak = itertools.count()
        self.pending = 0              # PENDING payments, wherever they are (queue, heap, in flight)
        self.paid = 0
        self.dead = 0
        self.on_ready = None          # called when work becomes ready (the dispatcher's wake-up)
        # The peer's replica hears of new pending payments: on_accepted before the 202 is written,
        # on_new (adopted or replayed) within the loop step.
        self.on_accepted = None
        self.on_new = None

    # ----- accepting -----------------------------------------------------------------
    def accept(self, correlation_id, cents, now, held=False):
        """A new payment; held: not to be attempted until confirm() or withdraw() (it waits out of
        the queue, so nothing behind it waits, and the dispatcher is not woken for it yet)."""
        known = self._index.get(correlation_id)
        if known is not None:
            return ALREADY_ACCEPTED if known.cents == cents else CONFLICT
        if self.pending >= self.queue_capacity:
            return QUEUE_FULL
        payment = Payment(correlation_id, cents, now)
        self._index[correlation_id] = payment
        if len(self._index) > self.index_capacity:
            self._forget_oldest_finished()
        self.pending += 1
        if held:
            self._held.add(payment)
        else:
            self.ready.append(payment)
        if self.audit.enabled:
            self.audit.record("accepted", correlation_id, amount=payment.amount_text)
        if self.on_accepted is not None:
            self.on_accepted(payment)
        if not held and self.on_ready is not None:
            self.on_ready()
        return ACCEPTED

    def _forget_oldest_finished(self):
        # Oldest first; a still-pending payment is never forgotten: it moves to the young end
        # (the queue's capacity being far below the index's, the loop ends).
        while len(self._index) > self.index_capacity:
            oldest_id = next(iter(self._index))
            oldest = self._index.pop(oldest_id)
            if oldest.state == PENDING:
                self._index[oldest_id] = oldest

    def get(self, correlation_id):
        return self._index.get(correlation_id)

    def expect(self, cents_by_id):
        """Payments the peer left or handed over, adopted a chunk per loop step: until each is in,
        a repeat of it is answered from here (arriving_cents), never accepted as a new copy."""
        self._arriving.update(cents_by_id)

    def arriving_cents(self, correlation_id):
        return self._arriving.get(correlation_id)

    def not_arriving(self, correlation_id):
        """An expected payment that will not be adopted after all (already paid)."""
        self._arriving.pop(correlation_id, None)

    # ----- queue ---------------------------------------------------------------------
    def retry_later(self, payment, due):
        heapq.heappush(self._waiting, (due, next(self._tiebreak), payment))

    def release_due(self, now):
        """Move payments whose backoff has ended back to their queues; next due time or None."""
        waiting = self._waiting
        released = False
        while waiting and waiting[0][0] <= now:
            payment = heapq.heappop(waiting)[2]
            if payment.state != PENDING:
                continue
            queue = self.ready if payment.pinned is None else self.pinned[payment.pinned]
            queue.append(payment)
            released = True
        if released and self.on_ready is not None:
            self.on_ready()
        return waiting[0][0] if waiting else None

    def is_held(self, payment):
        return payment in self._held

    def queued(self):
        return len(self.ready) + len(self.pinned[0]) + len(self.pinned[1])

    def confirm(self, payment):
        """Its acceptance reached the peer, and the peer's word on it is in (or there is no peer
        any more): it may be paid now. Also for a held payment settled meanwhile (it is let go)."""
        if payment not in self._held:
            return
        self._held.discard(payment)
        if payment.state == PENDING:
            (self.ready if payment.pinned is None else self.pinned[payment.pinned]).append(payment)
            if self.on_ready is not None:
                self.on_ready()

    def withdraw(self, payment):
        """Undo the acceptance of a payment never attempted (its 202 could not be kept: the
        instance answers 503 instead); False if it can no longer be undone (attempted, or merged
        with the peer's copy, whose 202 was given)."""
        if payment.state != PENDING or payment in self.in_flight or payment.attempts \
                or payment.other_cents is not None:
            return False
        payment.state = WITHDRAWN
        if self._index.get(payment.correlation_id) is payment:
            del self._index[payment.correlation_id]
        if payment in self._held:
            self._held.discard(payment)
        else:
            queue = self.ready if payment.pinned is None else self.pinned[payment.pinned]
            if queue and queue[-1] is payment:   # withdrawn newest first: usually the tail
                queue.pop()
            elif self.on_ready is not None:
                self.on_ready()                  # it stays queued as WITHDRAWN: the dispatcher skips it
        self.pending -= 1
        return True

    # ----- outcomes ------------------------------------------------------------------
    def mark_paid(self, payment, processor, requested_at_ms):
        """The processor holds the payment, with this requestedAt."""
        payment.state = PAID
        payment.paid_by = processor
        payment.requested_at[processor] = requested_at_ms
        payment.pinned = None
        self.pending -= 1
        self.paid += 1

    def settle_by_record(self, payment, processor, requested_at_ms, cents):
        """A record of this payment arrived from the peer: a pending copy here that is not being
        attempted is paid (by the processor the record names, with the record's amount: another
        copy's, see _merge); True if it was settled so."""
        if payment.state != PENDING or payment in self.in_flight:
            return False
        payment.cents = cents
        self.mark_paid(payment, processor, requested_at_ms)
        if self.audit.enabled:
            self.audit.record("paid", payment.correlation_id, outcome="recorded by the peer")
        return True

    def mark_dead(self, payment, reason):
        payment.state = DEAD
        payment.last_error = reason
        payment.pinned = None
        self.pending -= 1
        self.dead += 1

    def replay_dead(self):
        """Dead letters become pending again (same requestedAt and ambiguity state)."""
        replayed = 0
        for payment in self._index.values():
            if payment.state == DEAD:
                payment.state = PENDING
                self.dead -= 1
                self.pending += 1
                (self.ready if payment.pinned is None else self.pinned[payment.pinned]).append(payment)
                if self.audit.enabled:
                    self.audit.record("replayed", payment.correlation_id)
                if self.on_new is not None:
                    self.on_new(payment)
                replayed += 1
        if replayed and self.on_ready is not None:
            self.on_ready()
        return replayed

    def _not_in_flight(self):
        """PENDING payments in the queues, held, and in the backoff heap."""
        found = [p for queue in (self.ready, self.pinned[0], self.pinned[1]) for p in queue if p.state == PENDING]
        found += [p for p in self._held if p.state == PENDING]
        found += [entry[2] for entry in self._waiting if entry[2].state == PENDING]
        return found

    def take_all_pending(self):
        """Remove every pending payment that is not in flight (for a hand-over at shutdown)."""
        taken = self._not_in_flight()
        self.ready.clear()
        self.pinned[0].clear()
        self.pinned[1].clear()
        self._held.clear()
        self._waiting.clear()
        for payment in taken:
            payment.state = HANDED_OVER
            self.pending -= 1
        return taken

    def adopt(self, payment):
        """Take over a payment the peer handed over (or left behind when it died); False if this
        book already holds it (a copy accepted here meanwhile takes the peer's exactly-once state,
        see _merge)."""
        correlation_id = payment.correlation_id
        self._arriving.pop(correlation_id, None)
        known = self._index.get(correlation_id)
        if known is not None and known.state != HANDED_OVER:
            if known.state == PENDING:
                self._merge(known, payment)
                if self.on_new is not None:
                    self.on_new(known)               # the peer's replica hears what it took on
                return False
            if not (known.state == DEAD and known.cents != payment.cents and payment.requested_at != [None, None]):
                return False
            # A copy here with another amount was refused as "stored with another amount": the
            # peer's copy, which may be the one stored, is settled on its own.
            self.dead -= 1
        self._index[correlation_id] = payment
        self.pending += 1
        (self.ready if payment.pinned is None else self.pinned[payment.pinned]).append(payment)
        if self.audit.enabled:
            self.audit.record("adopted", correlation_id, attempts=payment.attempts)
        if self.on_new is not None:
            self.on_new(payment)
        if self.on_ready is not None:
            self.on_ready()
        return True

    def _merge(self, mine, theirs):
        """A copy of one payment was accepted here while the peer held another (the link was down):
        what the peer's copy may have reached binds this one too. requestedAt per processor is
        taken where this copy has none; ambiguity and doubt add up; the peer's pin is kept unless
        this copy is already pinned (then both may hold it, and the processors' 422 settle it).
        Copies with two amounts (a repeat that came before the dead peer's last lines were read):
        a processor holding either is this payment (other_cents, read by the Dispatcher)."""
        mine.other_cents = theirs.cents            # (also when equal: it marks the copy as merged)
        for processor in (0, 1):
            if mine.requested_at[processor] is None:
                mine.requested_at[processor] = theirs.requested_at[processor]
            mine.ambiguous[processor] = mine.ambiguous[processor] or theirs.ambiguous[processor]
            if theirs.unverified is not None and theirs.unverified[processor]:
                mine.set_unverified(processor, True)
        if mine.pinned is None and theirs.pinned is not None:
            mine.pinned = theirs.pinned
            if mine in self.ready:               # rare (a link cut, then a death): move it to its pin
                self.ready.remove(mine)
                self.pinned[mine.pinned].append(mine)

    def pending_payments(self):
        """Every PENDING payment, wherever it is (queues, backoff heap, in flight)."""
        return self._not_in_flight() + list(self.in_flight)

    def forget_finished(self):
        """After a purge: forget paid and dead payments, keep everything still pending."""
        self._index = {cid: p for cid, p in self._index.items() if p.state == PENDING}  # handed over: gone too
        self.paid = 0
        self.dead = 0
