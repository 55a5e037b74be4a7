"""The API: which request does what, and every answer it can give.

A handler returns (status, header_lines, body). Fixed answers are built once
at import; the server turns them into bytes (and caches those too).
Handlers are synchronous, except a payment lookup that has to ask the peer,
which returns a coroutine the server awaits in order.
"""
import asyncio
import hmac
import re
from functools import partial
from time import monotonic
from urllib.parse import parse_qsl

import orjson

import payment_request
import payments
from peer import STALLED
from store import FALLBACK, DEFAULT, cents_text, describe_record
from timestamps import parse_lower_bound_ms, parse_upper_bound_ms

JSON = b"content-type: application/json\r\nx-content-type-options: nosniff\r\ncache-control: no-store\r\n"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")


def json_error(status, message, extra_headers=b""):
    return status, JSON + extra_headers, orjson.dumps({"error": message})


ACCEPTED = (202, b"", b"")
NOT_FOUND = json_error(404, "not found")
BAD_JSON = json_error(400, "body must be a JSON object")
NO_ID = json_error(400, "correlationId is required")
BAD_ID = json_error(400, "correlationId must be a UUID string")
NO_AMOUNT = json_error(400, "amount is required")
BAD_AMOUNT = json_error(400, "amount must be a number")
NOT_POSITIVE = json_error(400, "amount must be at least 0.01")
NAMED_TWICE = json_error(400, "correlationId or amount named more than once")
NOT_ROUTABLE = json_error(400, "correlationId must be a plain top-level key: the load balancer routes by it")
CONFLICT = json_error(409, "correlationId already accepted with a different amount")
QUEUE_FULL = json_error(503, "too many pending payments, retry later", b"retry-after: 1\r\n")
STOPPING = json_error(503, "instance shutting down, retry", b"retry-after: 1\r\n")
STARTING = json_error(503, "instance starting: the peer's records are not in yet, retry", b"retry-after: 1\r\n")
PEER_BEHIND = json_error(503, "the peer instance is not keeping up, retry", b"retry-after: 1\r\n")
PURGE_OFF = json_error(403, "purge is disabled on this deployment")
ADMIN_OFF = json_error(403, "administrative operations are disabled (no ADMIN_TOKEN configured)")
BAD_TOKEN = json_error(401, "missing or wrong X-Admin-Token")
PURGED = (200, JSON, b'{"message":"payments purged"}')


def method_not_allowed(allow):
    return json_error(405, "method not allowed", b"allow: %s\r\n" % allow.encode())


POST_ONLY = method_not_allowed("POST")
GET_ONLY = method_not_allowed("GET")


def window_texts(query):
    """?from=&to= -> {"from": text or None, "to": ...}, read as the processors read a query: the
    first value of each, '+' as a space, surrounding blanks ignored, blank meaning none."""
    texts = {"from": None, "to": None}
    for name, value in parse_qsl(query, keep_blank_values=True) if query else ():
        if name in texts and texts[name] is None:
            texts[name] = value.strip() or None
    return texts


def parse_window(query):
    """?from=&to= -> [from_ms, to_ms] (None where missing or blank), or a 400 answer.

    A missing bound leaves that side open (the processors' admin summary instead counts
    everything when either bound is missing; /report's audit sends both, see observe.py)."""
    texts = window_texts(query)
    bounds = []
    for name, parse in (("from", parse_lower_bound_ms), ("to", parse_upper_bound_ms)):
        text = texts[name]
        if text is None:
            bounds.append(None)
            continue
        try:
            bounds.append(parse(text))
        except (ValueError, OverflowError):
            return json_error(400, "%s must be an ISO-8601 timestamp" % name)
    return bounds


class Router:
    def __init__(self, instance):
        self.instance = instance
        self.max_cents = int(instance.settings.max_amount * 100)
        self._confirming = {}            # correlationId -> future answer, while its 202 waits (_confirm)
        self.refusals = {
            payment_request.BAD_JSON: BAD_JSON, payment_request.NO_ID: NO_ID, payment_request.BAD_ID: BAD_ID,
            payment_request.NO_AMOUNT: NO_AMOUNT, payment_request.BAD_AMOUNT: BAD_AMOUNT,
            payment_request.NOT_POSITIVE: NOT_POSITIVE, payment_request.NAMED_TWICE: NAMED_TWICE,
            payment_request.TOO_LARGE: json_error(400, "amount must be at most %.2f" % instance.settings.max_amount),
        }

    def handle(self, method, path, query, body, admin_token=None, routing_key=None):
        if path == "/payments":
            return self.post_payment(body, routing_key) if method == b"POST" else POST_ONLY
        if path == "/payments-summary":
            return self.summary(query) if method == b"GET" else GET_ONLY
        if path == "/purge-payments":
            return self.purge(admin_token) if method == b"POST" else POST_ONLY
        if path == "/admin/dead-letters/replay":
            return self.replay_dead_letters(admin_token) if method == b"POST" else POST_ONLY
        if path == "/admin/records":
            return self.records(query, admin_token) if method == b"GET" else GET_ONLY
        if path == "/health":
            return self.health() if method == b"GET" else GET_ONLY
        if path.startswith("/payments/") and len(path) > 10:
            return self.lookup(path[10:]) if method == b"GET" else GET_ONLY
        # /metrics, /metrics.json, /stats, /processors, /report, /dashboard (observe.py)
        observed = self.instance.observer.route(method, path, query)
        return NOT_FOUND if observed is None else observed

    # ----- POST /payments: the hot path ----------------------------------------------
    def post_payment(self, body, routing_key=None):
        """routing_key: the correlationId HAProxy hashed (header x-routing-key), when it came
        through HAProxy: this instance accepts only what HAProxy routes here by the same id."""
        read = payment_request.read(body, self.max_cents)
        if type(read) is not tuple:
            return self.refusals[read]
        correlation_id, cents = read
        if routing_key is not None and routing_key != correlation_id:
            return NOT_ROUTABLE
        return self._accept(correlation_id, cents)

    def _accept(self, correlation_id, cents):
        """Known anywhere (here, paid at either instance, pending at the peer) -> 202 or 409 at
        once, even while stopping or starting; otherwise accept it here if this instance can."""
        instance = self.instance
        book = instance.book
        known = book.get(correlation_id)
        if known is not None and known.state != payments.HANDED_OVER:
            if known.cents != cents:
                return CONFLICT
            confirming = self._confirming.get(correlation_id)
            return ACCEPTED if confirming is None else self._same_answer(confirming)
        held = instance.store.held(correlation_id)
        if held is not None:
            held_cents = held[1]
        else:
            held_cents = instance.peer.pending_cents(correlation_id)
            if held_cents is None:
                held_cents = book.arriving_cents(correlation_id)
        if held_cents is not None:
            return ACCEPTED if held_cents == cents else CONFLICT
        if instance.stopping:
            return STOPPING
        if not instance.peer.ready:
            return STARTING
        if book.accept(correlation_id, cents, monotonic(), held=True) is not payments.ACCEPTED:
            return QUEUE_FULL
        peer = instance.peer
        payment = book.get(correlation_id)
        if not peer.backlogged():
            self._hold_for_the_peer(payment)
            return ACCEPTED
        # Its acceptance is not all in the kernel yet: the payment is held (not attempted) and
        # its answer decided when those bytes have left, or the link has gone. The decision does
        # not depend on this request: a client that leaves, or a repeat, changes nothing.
        answer = asyncio.get_running_loop().create_future()
        self._confirming[correlation_id] = answer
        mark = peer.mark()
        peer.replication(mark).add_done_callback(partial(self._decide, payment, answer, mark))
        return self._same_answer(answer)

    def _decide(self, payment, answer, mark, replication):
        """A 202 once the payment's acceptance has left this process; if the peer stopped reading
        first (the link is dropped with those bytes), the acceptance is undone: 503."""
        del self._confirming[payment.correlation_id]
        book = self.instance.book
        if replication.result() == STALLED and book.withdraw(payment):
            answer.set_result(PEER_BEHIND)
        else:
            answer.set_result(ACCEPTED)
            self._hold_for_the_peer(payment, mark)

    def _hold_for_the_peer(self, payment, mark=None):
        """A new payment (held) is attempted only once the peer's word on it is in (PeerLink.when_heard):
        a repeat that reached us before we had read what the peer wrote of that payment must not
        be paid a second time at another processor."""
        if not self.instance.peer.when_heard(partial(self._heard_from_peer, payment), mark):
            self._heard_from_peer(payment)

    def _heard_from_peer(self, payment):
        """The peer has said all it had to say of this payment. If it paid it, or holds a copy
        accepted before this one, this copy is withdrawn (as if the repeat had been answered from
        the replica: the peer's copy is the payment); else it may be paid now. Two copies accepted
        at once, each before its instance read the other's, each see the other here: the first
        accepted is kept on both sides (CLOCK_MONOTONIC is one clock for the host; instance 1 on
        a tie), so exactly one goes on."""
        instance = self.instance
        if not instance.book.is_held(payment):
            return                           # withdrawn meanwhile, or handed over
        if payment.state != payments.PENDING:
            instance.book.confirm(payment)   # settled by the peer's record meanwhile: only unparked
            return
        correlation_id = payment.correlation_id
        theirs = instance.peer.pending_entry(correlation_id)
        theirs_first = theirs is not None and (
            payments.entry_accepted_at(theirs) < payment.accepted_at
            or (payments.entry_accepted_at(theirs) == payment.accepted_at and instance.settings.instance_id != 1))
        if (theirs_first or instance.store.held(correlation_id) is not None) and instance.book.withdraw(payment):
            instance.peer.forget(payment)
            instance.audit.record("withdrawn", correlation_id, reason="the peer holds it")
        else:
            instance.book.confirm(payment)

    async def decide_waiting(self, timeout):
        """Wait (at most `timeout` s) until every 202 still waiting is decided (the stall limit
        decides each within PEER_STALL_S): an instance that stops hands over only payments whose
        answer is settled, never one whose 202 would follow its hand-over."""
        if self._confirming:
            await asyncio.wait(list(self._confirming.values()), timeout=timeout)

    @staticmethod
    async def _same_answer(answer):
        return await asyncio.shield(answer)

    # ----- GET /payments-summary -----------------------------------------------------
    def summary(self, query):
        if not self.instance.peer.ready:
            return STARTING                  # HAProxy retries it at the other instance
        bounds = parse_window(query)
        if type(bounds) is not list:
            return bounds                    # the 400 answer
        totals = self.instance.store.summary(*bounds)
        body = ('{"default":{"totalRequests":%d,"totalAmount":%s},"fallback":{"totalRequests":%d,"totalAmount":%s}}' % (
            totals.count[DEFAULT], cents_text(totals.cents[DEFAULT]),
            totals.count[FALLBACK], cents_text(totals.cents[FALLBACK]))).encode()
        return 200, JSON, body

    # ----- POST /purge-payments ------------------------------------------------------
    def _token_refused(self, given):
        """None when the admin token matches (or none is configured), else the answer."""
        expected = self.instance.settings.admin_token
        if expected and not (given and hmac.compare_digest(given.encode(), expected.encode())):
            return BAD_TOKEN
        return None

    def purge(self, admin_token):
        # Off unless PURGE_ENABLED; with ADMIN_TOKEN set it also needs the token.
        # The official test calls it without credentials at setup, so the Rinha
        # deployment enables it explicitly and sets no token.
        if not self.instance.settings.purge_enabled:
            return PURGE_OFF
        refused = self._token_refused(admin_token)
        if refused:
            return refused
        self.instance.peer.purge()
        return PURGED

    # ----- POST /admin/dead-letters/replay -------------------------------------------
    def replay_dead_letters(self, admin_token):
        """Queue this instance's dead letters again (after an operator fixed the cause)."""
        if not self.instance.settings.admin_token:
            return ADMIN_OFF
        refused = self._token_refused(admin_token)
        if refused:
            return refused
        if self.instance.stopping:
            return STOPPING                  # nothing would pay them, nor hand them over
        replayed = self.instance.book.replay_dead()
        return 200, JSON, orjson.dumps({"replayed": replayed})

    # ----- GET /admin/records ---------------------------------------------------------
    def records(self, query, admin_token):
        """The paid records this instance holds, a page at a time (?offset=&limit=, at most
        10,000): what its summaries add up, for an audit record by record."""
        if not self.instance.settings.admin_token:
            return ADMIN_OFF
        refused = self._token_refused(admin_token)
        if refused:
            return refused
        params = dict(parse_qsl(query)) if query else {}
        try:
            offset = max(0, int(params.get("offset", 0)))
            limit = min(10_000, max(1, int(params.get("limit", 10_000))))
        except ValueError:
            return json_error(400, "offset and limit must be integers")
        page, next_offset = self.instance.store.records_page(offset, limit)
        return 200, JSON, orjson.dumps({
            "records": [describe_record(record) for record in page], "next": next_offset})

    # ----- GET /payments/{correlationId} ---------------------------------------------
    def lookup(self, correlation_id):
        correlation_id = correlation_id.lower()
        info = describe_local(self.instance, correlation_id)
        if info is not None:
            return 200, JSON, orjson.dumps(info)
        if not _UUID.match(correlation_id) or not self.instance.peer.link_up:
            return NOT_FOUND
        return self._lookup_at_peer(correlation_id)

    async def _lookup_at_peer(self, correlation_id):
        info = await self.instance.peer.lookup(correlation_id)
        return NOT_FOUND if info is None else (200, JSON, orjson.dumps(info))

    # ----- GET /health ---------------------------------------------------------------
    def health(self):
        instance = self.instance
        status = "stopping" if instance.stopping else "ok" if instance.peer.ready else "starting"
        body = orjson.dumps({"status": status,
                             "instance": instance.settings.instance_id,
                             "peer": "up" if instance.peer.link_up else "down",
                             "pending": instance.book.pending})
        # 503 while stopping or starting keeps the instance out of HAProxy's rotation.
        return (200 if status == "ok" else 503), JSON, body


def describe_local(instance, correlation_id):
    """What this instance's book says of a payment (also what the peer is asked in a lookup)."""
    payment = instance.book.get(correlation_id)
    if payment is None or payment.state == payments.HANDED_OVER:
        return None
    info = payment.describe()
    info["instance"] = instance.settings.instance_id
    return info
