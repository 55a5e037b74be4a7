"""Paying through the two processors.

- ProcessorClient: one long-lived aiohttp session; every answer is classified
  as paid, duplicate, definite failure (5xx told apart), ambiguous or
  rejected; and GET /payments/{id} tells what a processor holds.
- Breaker: per processor; opens after consecutive failures, lets one probe
  through at growing intervals, closes on success or a healthy health report.
- HealthMonitor: reads /payments/service-health without ever exceeding the
  processors' one call per 5 s, counting both instances together.
- Dispatcher: drains the book's queue at a bounded rate and concurrency and
  applies the exactly-once rules (see Dispatcher._settle).
"""
import asyncio
import json
import logging
import random
from decimal import Decimal, InvalidOperation

import aiohttp
import orjson

from audit import OFF
from payments import PENDING
from store import DEFAULT, FALLBACK, PROCESSOR_NAMES, cents_text
from timestamps import format_ms, now_ms, parse_us

log = logging.getLogger("processors")

# How a POST /payments ended. SERVER_ERROR is a FAILED (5xx) after which the processor is asked
# before the payment moves on; STORED and NOT_STORED are what GET /payments/{id} then said;
# UNKNOWN: that question got no answer.
PAID_OK, DUPLICATE, FAILED, SERVER_ERROR, AMBIGUOUS, REJECTED = (
    "paid", "duplicate", "failed", "server_error", "ambiguous", "rejected")
STORED, NOT_STORED, UNKNOWN = "stored", "not_stored", "unknown"
_JSON_HEADERS = {"Content-Type": "application/json"}
MIN_PAUSE_S = 0.001


class ProcessorClient:
    def __init__(self, settings):
        self._settings = settings
        bases = (settings.processor_default_url.rstrip("/"), settings.processor_fallback_url.rstrip("/"))
        self.payments_urls = tuple(base + "/payments" for base in bases)
        self.health_urls = tuple(base + "/payments/service-health" for base in bases)
        self._session = None

    async def start(self):
        s = self._settings
        connector = aiohttp.TCPConnector(
            limit=0,
            limit_per_host=max(s.max_in_flight_default, s.max_in_flight_fallback) + 2,
            keepalive_timeout=60,
            ttl_dns_cache=300,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=s.request_timeout_processor_s, connect=s.connect_timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )

    async def close(self):
        if self._session is not None:
            await self._session.close()

    async def pay(self, processor, body):
        """POST one payment; returns (outcome, detail)."""
        try:
            async with self._session.post(self.payments_urls[processor], data=body,
                                          headers=_JSON_HEADERS) as response:
                status = response.status
                try:
                    await response.read()   # keeps the connection reusable; the body says nothing we need
                except Exception:
                    pass                    # the status line already settled the outcome
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # No connection was made, so nothing was sent: a definite failure.
            return FAILED, "connect failed: %s" % type(exc).__name__
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Timeout, reset or garbage after the request left: it may have been stored.
            return AMBIGUOUS, "no definite answer: %s" % type(exc).__name__
        if status == 200:
            return PAID_OK, None
        if status == 422:
            return DUPLICATE, "HTTP 422"
        if status == 429:
            return FAILED, "HTTP 429"           # refused before any work: nothing stored
        if status >= 500:
            return SERVER_ERROR, "HTTP %d" % status
        return REJECTED, "HTTP %d" % status

    async def stored(self, processor, correlation_id):
        """What the processor holds under this id: (STORED, cents, requestedAt ms), (NOT_STORED,)
        or (UNKNOWN, why). GET /payments/{id} is part of the processors' public API (no token,
        no delay, no failure mode), answered from their database."""
        url = self.payments_urls[processor] + "/" + correlation_id
        try:
            async with self._session.get(url) as response:
                status = response.status
                data = await response.read()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return UNKNOWN, "lookup failed: %s" % type(exc).__name__
        if status == 404:
            return (NOT_STORED,)
        if status != 200:
            return UNKNOWN, "lookup answered HTTP %d" % status
        try:
            found = json.loads(data, parse_float=Decimal)
            cents = int(Decimal(found["amount"]) * 100)
            requested_at_ms = parse_us(found["requestedAt"]) // 1000
        except (ValueError, KeyError, TypeError, InvalidOperation):
            return UNKNOWN, "lookup answer unreadable"
        return STORED, cents, requested_at_ms

    async def health(self, processor):
        """The processor's health report as a dict, or None when it could not be read."""
        try:
            async with self._session.get(self.health_urls[processor]) as response:
                if response.status not in (200, 503):   # a failing processor answers 503 with the report
                    return None
                data = orjson.loads(await response.read())
            return {"failing": bool(data["failing"]), "minResponseTime": int(data["minResponseTime"])}
        except asyncio.CancelledError:
            raise
        except Exception:
            return None


class Breaker:
    CLOSED, OPEN, PROBING = "closed", "open", "half_open"

    def __init__(self, failures_to_open, probe_s, probe_max_s):
        self.failures_to_open = failures_to_open
        self.probe_s = probe_s
        self.probe_max_s = probe_max_s
        self.state = self.CLOSED
        self.failures = 0            # consecutive
        self.retry_at = 0.0          # loop time when an OPEN breaker lets a probe through
        self.opened_at = None        # loop time it last went from closed to open
        self._probe_delay = probe_s

    def allows(self, now):
        if self.state == self.CLOSED:
            return True
        return self.state == self.OPEN and now >= self.retry_at

    def on_send(self):
        if self.state == self.OPEN:
            self.state = self.PROBING

    def on_not_sent(self, now):
        """The attempt that took the probe never reached the processor (it was settled elsewhere,
        or a lookup failed first): the probe is not spent, another may go at once."""
        if self.state == self.PROBING:
            self.state = self.OPEN
            self.retry_at = now

    def on_success(self):
        self.state = self.CLOSED
        self.failures = 0
        self.opened_at = None
        self._probe_delay = self.probe_s

    def on_failure(self, now):
        self.failures += 1
        if self.state == self.PROBING or (self.state == self.CLOSED and self.failures >= self.failures_to_open):
            self._open(now)

    def on_health(self, failing, now):
        if failing and self.state == self.CLOSED:
            self._open(now)
        elif not failing and self.state == self.OPEN:
            self.retry_at = now      # probe at once instead of waiting out the delay

    def _open(self, now):
        if self.opened_at is None:
            self.opened_at = now
        self.state = self.OPEN
        self.retry_at = now + self._probe_delay * random.uniform(0.8, 1.2)
        self._probe_delay = min(self._probe_delay * 2, self.probe_max_s)


class HealthMonitor:
    """Keeps the last health report per processor.

    The processors allow one health call per 5 s, shared by every caller. While
    the peer link is up only instance 1 polls (every health_interval_s) and
    shares what it reads; while it is down each instance polls at twice that
    interval. Each poller waits for its call before the next, so at most two
    calls are ever outstanding: the processor holds the second, never a 429.
    """

    def __init__(self, settings, client, breakers, peer=None):
        self._settings = settings
        self._client = client
        self._breakers = breakers
        self.peer = peer
        self.reports = [None, None]   # {"failing", "minResponseTime", "checkedAt"}

    def apply(self, processor, report, share=True):
        loop_now = asyncio.get_running_loop().time()
        self.reports[processor] = report
        self._breakers[processor].on_health(report["failing"], loop_now)
        if share and self.peer is not None:
            self.peer.send_health(processor, report)

    async def run(self):
        await asyncio.gather(self._poll(DEFAULT), self._poll(FALLBACK))

    async def _poll(self, processor):
        loop = asyncio.get_running_loop()
        interval = self._settings.health_interval_s
        last_call = -1e9
        while True:
            link_up = self.peer is not None and self.peer.link_up
            if link_up and self._settings.instance_id != 1:
                await asyncio.sleep(1.0)          # instance 1 polls and shares
                continue
            wait = last_call + (interval if link_up else 2 * interval) - loop.time()
            if wait > 0:
                await asyncio.sleep(min(wait, 1.0))  # re-check the link at least every second
                continue
            last_call = loop.time()
            report = await self._client.health(processor)
            if report is not None:
                report["checkedAt"] = format_ms(now_ms())
                self.apply(processor, report)


class Dispatcher:
    """Takes payments from the book and pays them, at a bounded rate.

    Rate: a token bucket (dispatch_rate per second, dispatch_burst at once),
    so a backlog drains as an even stream rather than a burst that would hold
    the event loop (and the CPU quota) while payment requests wait.
    """

    def __init__(self, settings, book, store, client, breakers, on_paid=None, audit=OFF, replica=None):
        self._settings = settings
        self._audit = audit
        self._book = book
        self._store = store
        self._client = client
        self.breakers = breakers
        self.on_paid = on_paid        # (record, payment) once a payment is recorded
        # The peer's copy of our pending payments (peer.PeerLink, or None): it must hear of
        # an attempt before the request leaves, so it can settle it if we die meanwhile.
        self._replica = replica
        self.in_flight = [0, 0]
        self._max_in_flight = (settings.max_in_flight_default, settings.max_in_flight_fallback)
        self._tokens = float(settings.dispatch_burst)
        self._tokens_at = 0.0
        self._waiter = None
        self._tasks = set()
        self.attempts = [0, 0]
        self.retries = [0, 0]
        self.dead = [0, 0]           # payments dead-lettered after this processor's answer (observe.py)
        self._loop = None
        self._delayed_wake = None
        book.on_ready = self.wake_soon

    def wake_soon(self):
        """Work became ready (a payment accepted, say): look after dispatch_delay_s.

        The answer that accepted it is written by then, and the instance sleeps, so
        HAProxy can forward it at once instead of waiting for this CPU to finish paying;
        the payments accepted within the delay share one dispatch pass.
        """
        if self._delayed_wake is not None:
            return
        delay = self._settings.dispatch_delay_s
        if delay <= 0 or self._loop is None:
            self.wake()
        else:
            self._delayed_wake = self._loop.call_later(delay, self._wake_after_delay)

    def _wake_after_delay(self):
        self._delayed_wake = None
        self.wake()

    def wake(self):
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def run(self):
        self._loop = loop = asyncio.get_running_loop()
        self._tokens_at = loop.time()
        while True:
            if self._replica is not None and self._replica.backlogged():
                # The peer is not reading: an attempt announced now would not reach it before
                # its request leaves. Start none until what is written has left this process.
                await self._replica.replicated()
                continue
            now = loop.time()
            next_due = self._book.release_due(now)
            self._refill(now)
            self._dispatch(now)
            wake_at = self._next_wake(now, next_due)
            self._waiter = loop.create_future()
            timer = loop.call_at(wake_at, self.wake) if wake_at is not None else None
            try:
                await self._waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()

    def _refill(self, now):
        rate, burst = self._settings.dispatch_rate, self._settings.dispatch_burst
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now

    def _can_send(self, processor, now):
        return self.in_flight[processor] < self._max_in_flight[processor] and self.breakers[processor].allows(now)

    def _route(self, now):
        """Where an unpinned payment goes now, or None to keep it waiting."""
        if self._can_send(DEFAULT, now):
            return DEFAULT
        if self._fallback_permitted(now) and self._can_send(FALLBACK, now):
            return FALLBACK
        return None

    def _fallback_permitted(self, now):
        policy = self._settings.fallback_policy
        if policy == "never":
            return False
        default = self.breakers[DEFAULT]
        if policy == "eager":
            return default.state != Breaker.CLOSED
        # patient: a fallback payment costs 10 points of fee; waiting costs nothing as long
        # as the queue drains, so pay it only when the default has failed for fallback_after_s,
        # when it is up but every slot is taken and the payment at the head of the queue has
        # waited fallback_wait_s (the queue is not draining fast enough: what is still queued
        # when the test ends is not paid at all), or when the queue is nearly full.
        settings = self._settings
        if default.state != Breaker.CLOSED and default.opened_at is not None \
                and now - default.opened_at >= settings.fallback_after_s:
            return True
        if self._default_full() and now - self._book.ready[0].accepted_at >= settings.fallback_wait_s:
            return True
        return self._book.pending >= settings.fallback_queue_ratio * self._book.queue_capacity

    def _default_full(self):
        return self.in_flight[DEFAULT] >= self._max_in_flight[DEFAULT]

    def claim(self, payment):
        """A payment just accepted, before the peer's replica hears of it: if the next pass will
        send it to the default processor, fix its requestedAt there now and mark the attempt as
        under way, so the replica message written with the acceptance announces the attempt too
        and the pass writes none (the peer is woken once per payment less). If the pass sends it
        elsewhere after all, it announces that attempt as usual; until then a peer that inherits
        it pins it to the default with that requestedAt, which is safe whether it was sent or not.
        """
        if self._loop is None:
            return
        book = self._book
        ahead = len(book.ready) + len(book.pinned[DEFAULT]) + book.is_held(payment)   # this payment included
        free = self._max_in_flight[DEFAULT] - self.in_flight[DEFAULT]
        if ahead <= free and ahead <= self._tokens and self.breakers[DEFAULT].allows(self._loop.time()):
            payment.requested_at[DEFAULT] = now_ms()
            payment.in_flight_to = DEFAULT

    def _dispatch(self, now):
        book = self._book
        started = []
        for processor in (DEFAULT, FALLBACK):
            queue = book.pinned[processor]
            while queue and self._tokens >= 1 and self._can_send(processor, now):
                payment = queue.popleft()
                if payment.state == PENDING:         # else withdrawn while queued
                    started.append(self._start(payment, processor))
        while book.ready and self._tokens >= 1:
            if book.ready[0].state != PENDING:
                book.ready.popleft()
                continue
            processor = self._route(now)
            if processor is None:
                break
            started.append(self._start(book.ready.popleft(), processor))
        announced_at = None
        if self._replica is not None:
            # Written now, before the attempts' tasks first run and send their requests;
            # those claimed at acceptance for this processor were announced with it.
            announce = [payment for payment, _, announced in started if not announced]
            if announce:
                self._replica.watch_now(*announce)
                if self._replica.backlogged():
                    # Not all in the kernel: each request waits until the announcement has left.
                    announced_at = self._replica.mark()
        for payment, processor, _ in started:
            task = self._loop.create_task(self._attempt(payment, processor, announced_at))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _next_wake(self, now, next_due):
        """When the loop must look again without being woken (None: only when woken).

        Only future events count: anything already due that did not lead to a
        send is blocked by something that wakes the loop itself (a completion).
        Never sooner than MIN_PAUSE_S: uvloop's timers have 1 ms resolution.
        """
        candidates = [] if next_due is None else [next_due]
        if self._book.queued():
            if self._tokens < 1:
                candidates.append(now + (1 - self._tokens) / self._settings.dispatch_rate)
            for breaker in self.breakers:
                if breaker.state == Breaker.OPEN and breaker.retry_at > now:
                    candidates.append(breaker.retry_at)
            opened_at = self.breakers[DEFAULT].opened_at
            if self._settings.fallback_policy == "patient":
                if opened_at is not None and opened_at + self._settings.fallback_after_s > now:
                    candidates.append(opened_at + self._settings.fallback_after_s)
                if self._book.ready and self._default_full():
                    waited_enough = self._book.ready[0].accepted_at + self._settings.fallback_wait_s
                    if waited_enough > now:
                        candidates.append(waited_enough)
        return max(min(candidates), now + MIN_PAUSE_S) if candidates else None

    def _start(self, payment, processor):
        """Book an attempt (its task is created by _dispatch once it is announced);
        (payment, processor, whether the peer already knows of it)."""
        announced = payment.in_flight_to == processor     # claimed at acceptance
        self._tokens -= 1
        self.breakers[processor].on_send()
        self.in_flight[processor] += 1
        self.attempts[processor] += 1
        if payment.attempts:
            self.retries[processor] += 1
        payment.attempts += 1
        if payment.requested_at[processor] is None:
            payment.requested_at[processor] = now_ms()
        payment.in_flight_to = processor
        self._book.in_flight.add(payment)
        if self._audit.enabled:
            self._audit.record("attempt", payment.correlation_id, processor=PROCESSOR_NAMES[processor],
                               requestedAt=format_ms(payment.requested_at[processor]), attempt=payment.attempts)
        return payment, processor, announced

    async def _attempt(self, payment, processor, announced_at):
        sent = False
        try:
            if announced_at is not None:
                await self._replica.replicated(announced_at)     # its announcement first leaves
            other = FALLBACK if processor == DEFAULT else DEFAULT
            if payment.ambiguous[other] or payment.is_unverified(other):
                outcome, detail = await self._verify_elsewhere(payment, other)
            else:
                outcome = None
            if outcome is None:
                sent = True
                outcome, detail = await self._client.pay(processor, self._body(payment, processor))
                if outcome == DUPLICATE:
                    outcome, detail = await self._settle_duplicate(payment, processor)
        except asyncio.CancelledError:
            outcome, detail = (AMBIGUOUS, "cancelled at shutdown") if sent else (UNKNOWN, "not sent: shutting down")
            raise
        except Exception as exc:        # a bug of ours: keep the payment, say so once
            log.exception("payment attempt failed unexpectedly")
            outcome, detail = AMBIGUOUS, "internal error: %s" % type(exc).__name__
        finally:
            self.in_flight[processor] -= 1
            payment.in_flight_to = None
            self._book.in_flight.discard(payment)
            self._settle(payment, processor, outcome, detail)
            self.wake()

    async def _verify_elsewhere(self, payment, other):
        """Before a payment goes to the processor that is not `other`: `other` answered it 5xx,
        so ask whether it holds it after all: (STORED, (other, cents, requestedAt)), (UNKNOWN,
        why), or (None, None) to go ahead. One where an attempt was ambiguous is asked too (two
        copies of a payment merged after a failure can be pinned to one and in doubt at the
        other): holding it settles it; not holding it yet proves nothing there."""
        found = await self._client.stored(other, payment.correlation_id)
        if found[0] == STORED:
            return STORED, (other,) + found[1:]
        if found[0] == UNKNOWN:
            return UNKNOWN, found[1]
        payment.set_unverified(other, False)
        return None, None

    @staticmethod
    def _body(payment, processor):
        return b'{"correlationId":"%s","amount":%s,"requestedAt":"%s"}' % (
            payment.correlation_id.encode(), payment.amount_text.encode(),
            format_ms(payment.requested_at[processor]).encode())

    async def _settle_duplicate(self, payment, processor):
        """A 422 ("already stored") is settled by what the processor holds."""
        found = await self._client.stored(processor, payment.correlation_id)
        if found[0] == STORED:
            return STORED, (processor,) + found[1:]
        if found[0] == NOT_STORED:              # purged in between: nothing there now
            return FAILED, "HTTP 422, then not found"
        return AMBIGUOUS, "HTTP 422, then %s" % found[1]     # it holds it: stay there, ask again

    def _settle(self, payment, processor, outcome, detail):
        """The exactly-once rules (the attempt went to `processor`).

        - 200: the processor holds it with the requestedAt we sent: record it.
        - 422: the processor holds this correlationId; GET /payments/{id} says
          with which amount and requestedAt. The same amount: record exactly
          that (whichever attempt, ours or a copy's, stored it). Another amount:
          dead letter (it is not this payment).
        - another 4xx: dead letter.
        - 5xx: retry later, free to move, but the processor is asked whether it
          stored it before the payment goes elsewhere (a 5xx after a commit).
        - 429, no connection: retry later, free to move.
        - ambiguous (timeout, reset after sending): retry on this processor only.
        The store keeps one record per correlationId: a payment settled twice
        (two copies, a resync) is counted once.
        """
        if payment.state != PENDING:
            return
        breaker = self.breakers[processor]
        now = self._loop.time()
        if outcome == PAID_OK:
            breaker.on_success()
            self._record(payment, processor, payment.requested_at[processor], outcome)
            return
        if outcome == STORED:
            where, cents, requested_at = detail
            if where == processor:
                breaker.on_success()
            else:
                breaker.on_not_sent(now)          # settled by the other one: this one was never asked
            if cents == payment.cents or cents == payment.other_cents:
                payment.cents = cents             # the copy the processor holds is the one counted
                self._record(payment, where, requested_at, outcome)
                return
            outcome, detail = REJECTED, "already stored with another amount (%s)" % cents_text(cents)
            processor, breaker = where, None
        if outcome == REJECTED:
            if breaker is not None:
                breaker.on_success()    # the processor answered; the payment is what it refused
            self._book.mark_dead(payment, "%s refused it: %s" % (PROCESSOR_NAMES[processor], detail))
            self.dead[processor] += 1
            if self._replica is not None:
                self._replica.forget(payment)
            log.warning("dead-lettered %s: %s", payment.correlation_id, payment.last_error)
            if self._audit.enabled:
                self._audit.record("dead_lettered", payment.correlation_id, processor=PROCESSOR_NAMES[processor],
                                   reason=payment.last_error)
            return
        if outcome == UNKNOWN:                   # a lookup failed, or shutdown came: nothing was sent
            breaker.on_not_sent(now)
        else:
            breaker.on_failure(now)
        payment.last_error = "%s: %s" % (PROCESSOR_NAMES[processor], detail)
        if outcome == AMBIGUOUS:
            payment.ambiguous[processor] = True
            payment.pinned = processor
        elif outcome == SERVER_ERROR:
            payment.set_unverified(processor, True)
        s = self._settings
        backoff = min(s.retry_max_s, s.retry_base_s * 2 ** min(max(payment.attempts - 1, 0), 16))
        self._book.retry_later(payment, now + backoff * random.uniform(0.5, 1.5))
        if self._replica is not None:
            self._replica.watch(payment)    # no longer in flight; maybe now pinned
        if self._audit.enabled:
            self._audit.record("retry", payment.correlation_id, processor=PROCESSOR_NAMES[processor],
                               outcome=outcome, reason=detail, pinned=payment.pinned is not None)

    def _record(self, payment, processor, requested_at, outcome):
        """The processor holds the payment with this requestedAt: count it, once."""
        record = self._store.record_local(payment.correlation_id, requested_at, payment.cents, processor)
        self._book.mark_paid(payment, processor, requested_at)
        if record is not None:
            if self.on_paid is not None:
                self.on_paid(record, payment)
        else:
            # Already recorded (another copy of it was settled, here or at the peer): once is all.
            held = self._store.held(payment.correlation_id)
            if held is not None and held[2] != processor:
                log.error("%s is stored by both processors", payment.correlation_id)
            if self._replica is not None:
                self._replica.forget(payment)
        if self._audit.enabled:
            self._audit.record("paid", payment.correlation_id, processor=PROCESSOR_NAMES[processor],
                               requestedAt=format_ms(requested_at), outcome=outcome, counted=record is not None)

    async def stop(self):
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # A task cancelled before its first step never ran _attempt, nor its finally: that
        # request was never sent. Undo the attempt and queue the payment again, unchanged and
        # not ambiguous, so the hand-over (or the abandoned list) includes it.
        for payment in list(self._book.in_flight):    # only _start fills it, so the loop is set
            self._unstart(payment)
            self._book.retry_later(payment, self._loop.time())

    def _unstart(self, payment):
        """Undo _start's bookkeeping for an attempt whose request never left."""
        processor = payment.in_flight_to
        self.in_flight[processor] -= 1
        self.attempts[processor] -= 1
        payment.attempts -= 1
        if payment.attempts:
            self.retries[processor] -= 1
        payment.in_flight_to = None
        self._book.in_flight.discard(payment)
