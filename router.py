"""The API: which request does what, and every answer it can give.

A handler returns (status, header_lines, body). Fixed answers are built once
at import; the server turns them into bytes (and caches those too).
Handlers are synchronous, except a payment lookup that has to ask the peer,
which returns a coroutine the server awaits in order.
"""
import hmac
import math
import re
from decimal import ROUND_HALF_EVEN, Decimal
from time import monotonic
from urllib.parse import parse_qs

import orjson

import payments
from store import FALLBACK, DEFAULT
from timestamps import parse_lower_bound_ms, parse_upper_bound_ms

JSON = b"content-type: application/json\r\nx-content-type-options: nosniff\r\ncache-control: no-store\r\n"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z")
_CENT = Decimal("0.01")


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
CONFLICT = json_error(409, "correlationId already accepted with a different amount")
QUEUE_FULL = json_error(503, "too many pending payments, retry later", b"retry-after: 1\r\n")
STOPPING = json_error(503, "instance shutting down, retry", b"retry-after: 1\r\n")
PURGE_OFF = json_error(403, "purge is disabled on this deployment")
ADMIN_OFF = json_error(403, "administrative operations are disabled (no ADMIN_TOKEN configured)")
BAD_TOKEN = json_error(401, "missing or wrong X-Admin-Token")
PURGED = (200, JSON, b'{"message":"payments purged"}')


def method_not_allowed(allow):
    return json_error(405, "method not allowed", b"allow: %s\r\n" % allow.encode())


POST_ONLY = method_not_allowed("POST")
GET_ONLY = method_not_allowed("GET")


def to_cents(amount):
    """A JSON number -> integer cents, rounded half-even on its decimal text (as the processors do)."""
    scaled = amount * 100
    whole = round(scaled)
    if abs(scaled - whole) < 1e-6 and abs(amount) < 1e13:
        return int(whole)    # already two decimals: the common case, no Decimal needed
    return int(Decimal(repr(amount)).quantize(_CENT, rounding=ROUND_HALF_EVEN) * 100)


def parse_window(query):
    """?from=&to= -> [from_ms, to_ms] (None where missing or empty), or a 400 answer."""
    params = parse_qs(query, keep_blank_values=True) if query else {}
    bounds = []
    for name, parse in (("from", parse_lower_bound_ms), ("to", parse_upper_bound_ms)):
        text = params.get(name, [""])[-1]
        if not text:
            bounds.append(None)
            continue
        try:
            bounds.append(parse(text))
        except (ValueError, OverflowError):
            return json_error(400, "%s must be an ISO-8601 timestamp" % name)
    return bounds


def format_cents(cents):
    return b"%d.%02d" % divmod(cents, 100)


class Router:
    def __init__(self, instance):
        self.instance = instance
        self.max_cents = int(instance.settings.max_amount * 100)
        self.too_large = json_error(400, "amount must be at most %.2f" % instance.settings.max_amount)

    def handle(self, method, path, query, body, admin_token=None):
        if path == "/payments":
            return self.post_payment(body) if method == b"POST" else POST_ONLY
        if path == "/payments-summary":
            return self.summary(query) if method == b"GET" else GET_ONLY
        if path == "/purge-payments":
            return self.purge(admin_token) if method == b"POST" else POST_ONLY
        if path == "/admin/dead-letters/replay":
            return self.replay_dead_letters(admin_token) if method == b"POST" else POST_ONLY
        if path == "/health":
            return self.health() if method == b"GET" else GET_ONLY
        if path.startswith("/payments/") and len(path) > 10:
            return self.lookup(path[10:]) if method == b"GET" else GET_ONLY
        # /metrics, /metrics.json, /stats, /processors, /report, /dashboard (observe.py)
        observed = self.instance.observer.route(method, path, query)
        return NOT_FOUND if observed is None else observed

    # ----- POST /payments: the hot path ----------------------------------------------
    def post_payment(self, body):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return BAD_JSON
        if type(data) is not dict:
            return BAD_JSON
        correlation_id = data.get("correlationId")
        amount = data.get("amount")
        if correlation_id is None:
            return NO_ID
        if type(correlation_id) is not str or len(correlation_id) != 36 or not _UUID.match(correlation_id):
            return BAD_ID
        if amount is None:
            return NO_AMOUNT
        if type(amount) is not float and type(amount) is not int:   # bool is not a number here
            return BAD_AMOUNT
        if not math.isfinite(amount) or amount > self.instance.settings.max_amount:
            return self.too_large if amount > 0 else NOT_POSITIVE
        cents = to_cents(amount) if amount > 0 else 0
        if cents <= 0:
            return NOT_POSITIVE
        if cents > self.max_cents:
            return self.too_large
        if self.instance.stopping:
            return STOPPING
        result = self.instance.book.accept(correlation_id.lower(), cents, monotonic())
        if result is payments.ACCEPTED or result is payments.ALREADY_ACCEPTED:
            return ACCEPTED
        return CONFLICT if result is payments.CONFLICT else QUEUE_FULL

    # ----- GET /payments-summary -----------------------------------------------------
    def summary(self, query):
        bounds = parse_window(query)
        if type(bounds) is not list:
            return bounds                    # the 400 answer
        totals = self.instance.store.summary(*bounds)
        body = b'{"default":{"totalRequests":%d,"totalAmount":%s},"fallback":{"totalRequests":%d,"totalAmount":%s}}' % (
            totals.count[DEFAULT], format_cents(totals.cents[DEFAULT]),
            totals.count[FALLBACK], format_cents(totals.cents[FALLBACK]))
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
        replayed = self.instance.book.replay_dead()
        return 200, JSON, orjson.dumps({"replayed": replayed})

    # ----- GET /payments/{correlationId} ---------------------------------------------
    def lookup(self, correlation_id):
        correlation_id = correlation_id.lower()
        payment = self.instance.book.get(correlation_id)
        if payment is not None:
            return 200, JSON, orjson.dumps(payment.describe())
        if not _UUID.match(correlation_id) or not self.instance.peer.link_up:
            return NOT_FOUND
        return self._lookup_at_peer(correlation_id)

    async def _lookup_at_peer(self, correlation_id):
        info = await self.instance.peer.lookup(correlation_id)
        return NOT_FOUND if info is None else (200, JSON, orjson.dumps(info))

    # ----- GET /health ---------------------------------------------------------------
    def health(self):
        instance = self.instance
        body = orjson.dumps({"status": "stopping" if instance.stopping else "ok",
                             "instance": instance.settings.instance_id,
                             "peer": "up" if instance.peer.link_up else "down",
                             "pending": instance.book.pending})
        # 503 while stopping takes the instance out of HAProxy's rotation.
        return (503 if instance.stopping else 200), JSON, body


def describe_local(book, correlation_id):
    """What the peer is asked for in a lookup."""
    payment = book.get(correlation_id)
    return None if payment is None else payment.describe()
