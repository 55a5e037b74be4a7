"""Payment processor simulator for the Rinha de Backend 2025 challenge.

A stand-in for the official payment processor service (two of them run in the
official test: "default" with a 5 % fee and "fallback" with 15 %), written to
behave like it where it matters for a backend under test, plus a few extra
knobs under /admin/sim/ for this project's own tests.

    python simulator.py --port 8001 --fee 0.05 [--host 127.0.0.1] [--token 123]
                        [--name default] [--max-active 800] [--max-queued 500]
                        [--health-window 5.0] [--health-queue 2]
                        [--health-failing-status 503]

Official API (same paths, bodies and status codes as the real service):
    POST /payments                       {correlationId, amount, requestedAt}
    GET  /payments/service-health        rate limited, shared by all callers
    GET  /payments/{id}
    GET  /admin/payments-summary?from=&to=          (X-Rinha-Token)
    PUT  /admin/configurations/delay     {"delay": ms}       (X-Rinha-Token)
    PUT  /admin/configurations/failure   {"failure": bool}   (X-Rinha-Token)
    PUT  /admin/configurations/token     {"token": "..."}    (X-Rinha-Token)
    POST /admin/purge-payments                               (X-Rinha-Token)

Simulator-only (X-Rinha-Token as well):
    GET  /admin/sim/stats                counters
    PUT  /admin/sim/fault  {"mode": "none"|"reset"|"reset_before"|"garbage"|"hang"|"fail_after_store"}
    GET  /admin/sim/payments             every stored payment

The simulator runs next to the system being benchmarked and takes CPU from
it, so the command line serves HTTP/1.1 from a plain asyncio.Protocol with
httptools (on uvloop) instead of aiohttp.web: a payment that need not wait is
answered inside the parser callback, with no task and a pre-rendered answer.
(Under aiohttp.web a payment cost ~170 µs of CPU at the benchmark's trickle of
~300/s, mostly framework; now ~60.) The endpoints (class Endpoints) do not
depend on the server; start_server() serves them for embedding (the tests).

Nothing is logged per request.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as _dt
import decimal
import email.message
import email.parser
import email.policy
import email.utils
import functools
import http
import json
import re
import signal
import socket
import struct
import sys
import time
import traceback
import types
import urllib.parse
from decimal import Decimal

import httptools
import orjson

__all__ = [
    "SimState",
    "ConcurrencyLimiter",
    "FixedWindowLimiter",
    "Endpoints",
    "Reply",
    "Request",
    "SimServer",
    "parse_timestamp_us",
    "format_timestamp_us",
    "start_server",
    "main",
]

# reset: store, then RST; reset_before: RST without storing; garbage: store, answer 200 with a
# non-JSON body; hang: store, never answer; fail_after_store: store, then answer 500 (a processor
# that commits and fails its answer, which the official one can do on an unexpected exception).
FAULT_MODES = ("none", "reset", "reset_before", "garbage", "hang", "fail_after_store")

# Largest magnitude a .NET System.Decimal can hold; the real service answers
# 400 for anything it cannot bind to a decimal.
_DOTNET_DECIMAL_MAX = Decimal("79228162514264337593543950335")
_CENT = Decimal("0.01")
_DEC_CTX = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)
# The range check's abs() in the default context (rounded to 28 digits), except
# that an overflow (1e1000000) gives Infinity and so a 400 rather than raising (a 500).
_ABS_CTX = decimal.Context(prec=28, rounding=decimal.ROUND_HALF_EVEN, Emax=999999, Emin=-999999,
                           traps=[decimal.InvalidOperation, decimal.DivisionByZero])

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
)

# ISO-8601 (extended format): a date, optionally a time (hh:mm[:ss[.fraction]]),
# optionally Z or an offset (+hh, +hhmm, +hh:mm). No offset means UTC. ASCII digits only.
_TS_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?\Z",
    re.ASCII,   # .NET's invariant culture reads ASCII digits only
)
_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()
_EPOCH = _dt.datetime(1970, 1, 1)


def parse_timestamp_us(text: str) -> int:
    """Parse an ISO-8601 timestamp into integer microseconds since the Unix epoch (UTC).

    Accepts ``Z``, a numeric offset, or no zone (taken as UTC) and any number of
    fraction digits; digits beyond microseconds are truncated (the real service
    keeps .NET ticks and PostgreSQL stores microseconds). Raises ValueError.
    """
    m = _TS_RE.match(text)
    if m is None:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    y, mo, d, hh, mi, ss, frac, z, sign, oh, om = m.groups()
    # Validates calendar fields (raises ValueError on 2025-02-30, hour 25, ...).
    day = _dt.date(int(y), int(mo), int(d))
    h = int(hh) if hh else 0
    mnt = int(mi) if mi else 0
    s = int(ss) if ss else 0
    if h > 23 or mnt > 59 or s > 59:
        raise ValueError(f"time out of range: {text!r}")
    micro = int(frac[:6].ljust(6, "0")) if frac else 0
    secs = (day.toordinal() - _EPOCH_ORDINAL) * 86400 + h * 3600 + mnt * 60 + s
    if sign:
        off_h = int(oh)
        off_m = int(om) if om else 0
        if off_h > 23 or off_m > 59:
            raise ValueError(f"offset out of range: {text!r}")
        off = off_h * 3600 + off_m * 60
        secs = secs - off if sign == "+" else secs + off
    return secs * 1_000_000 + micro


def format_timestamp_us(us: int, zulu: bool = True) -> str:
    """Format microseconds since epoch as ISO-8601.

    With ``zulu`` the result ends in Z and has 3 fraction digits when the value
    is whole milliseconds (JavaScript ``toISOString()`` style), else 6.
    Without ``zulu`` it mimics how the real service prints a stored timestamp
    (.NET DateTime of unspecified kind: no zone, trailing fraction zeros trimmed).
    """
    t = _EPOCH + _dt.timedelta(microseconds=us)
    base = t.strftime("%Y-%m-%dT%H:%M:%S")
    micro = t.microsecond
    if zulu:
        if micro % 1000 == 0:
            return f"{base}.{micro // 1000:03d}Z"
        return f"{base}.{micro:06d}Z"
    if micro == 0:
        return base
    return f"{base}.{micro:06d}".rstrip("0")


def _dec_text(d: Decimal) -> str:
    """A Decimal as JSON number text (never exponent notation)."""
    return format(d, "f")


class ConcurrencyLimiter:
    """At most ``max_active`` holders; up to ``max_queued`` FIFO waiters; beyond → reject.

    ``max_active <= 0`` means unlimited.
    """

    __slots__ = ("max_active", "max_queued", "active", "waiters", "max_active_seen")

    def __init__(self, max_active: int, max_queued: int) -> None:
        self.max_active = max_active
        self.max_queued = max(0, max_queued)
        self.active = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.max_active_seen = 0

    def try_acquire(self):
        """True: slot taken. False: rejected. A Future: queued, await it (see acquire)."""
        if self.max_active <= 0 or (self.active < self.max_active and not self.waiters):
            self.active += 1
            if self.active > self.max_active_seen:
                self.max_active_seen = self.active
            return True
        if len(self.waiters) < self.max_queued:
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            return fut
        return False

    async def acquire(self) -> bool:
        r = self.try_acquire()
        if r is True or r is False:
            return r
        await self.wait(r)
        return True

    async def wait(self, fut: asyncio.Future) -> None:
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The slot was handed to us just as we were cancelled: pass it on.
                self.release()
            else:
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(True)  # hand our slot over; active is unchanged
                return
        self.active -= 1

    @property
    def queued(self) -> int:
        return len(self.waiters)


class FixedWindowLimiter:
    """Fixed-window rate limiter: ``permits`` per window, ``queue_limit`` FIFO waiters.

    Windows start when the limiter is first used (as the real service's limiter
    is created on first use) and follow each other every ``window`` seconds.
    A permit not used in its window is lost. When a window starts, waiting
    callers are served oldest first; callers beyond the queue are rejected.
    """

    def __init__(self, window: float, permits: int = 1, queue_limit: int = 2) -> None:
        if window <= 0:
            raise ValueError("window must be > 0")
        self.window = float(window)
        self.permits = max(1, int(permits))
        self.queue_limit = max(0, int(queue_limit))
        self._t0: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._window_idx = -1
        self._used = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def _now_idx(self) -> int:
        loop = asyncio.get_running_loop()
        if self._t0 is None or self._loop is not loop:
            self._loop = loop
            self._t0 = loop.time()
            self._window_idx = -1
            self._used = 0
            self.waiters.clear()
            self._timer = None
        # A small epsilon so a timer firing on the boundary counts as the new window.
        return int((loop.time() - self._t0) / self.window + 1e-6)

    def _roll(self, idx: int) -> None:
        if idx != self._window_idx:
            self._window_idx = idx
            self._used = 0

    def try_acquire(self):
        """True: permit granted. False: rejected. A Future: queued, await it."""
        idx = self._now_idx()
        self._roll(idx)
        if self._used < self.permits and not self.waiters:
            self._used += 1
            return True
        if len(self.waiters) < self.queue_limit:
            fut = self._loop.create_future()
            self.waiters.append(fut)
            self._schedule(idx)
            return fut
        return False

    async def acquire(self) -> bool:
        r = self.try_acquire()
        if r is True or r is False:
            return r
        await self.wait(r)
        return True

    async def wait(self, fut: asyncio.Future) -> None:
        """Wait for the permit a queued caller was promised (the Future try_acquire returned)."""
        try:
            await fut
        except asyncio.CancelledError:
            try:
                self.waiters.remove(fut)
            except ValueError:
                pass
            raise

    def _schedule(self, idx: int) -> None:
        if self._timer is None:
            when = self._t0 + (idx + 1) * self.window
            self._timer = self._loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self._timer = None
        idx = self._now_idx()
        self._roll(idx)
        while self.waiters and self._used < self.permits:
            fut = self.waiters.popleft()
            if fut.done():
                continue
            self._used += 1
            fut.set_result(True)
        if self.waiters:
            self._schedule(idx)

    @property
    def queued(self) -> int:
        return len(self.waiters)


class SimState:
    """Everything a simulator instance knows: configuration, payments, limiters, counters."""

    def __init__(
        self,
        fee,
        token: str = "123",
        name: str = "default",
        max_active: int = 800,
        max_queued: int = 500,
        health_window: float = 5.0,
        health_queue: int = 2,
        health_failing_status: int = 503,
    ) -> None:
        self.fee = Decimal(str(fee))
        self.fee_text = _dec_text(self.fee)
        self.token = str(token)
        self.name = name
        self.delay_ms = 0
        self.failure = False
        self.fault = "none"
        self.health_failing_status = int(health_failing_status)
        # correlationId (lower-case canonical) -> (amount Decimal, requestedAt µs since epoch)
        self.payments: dict[str, tuple[Decimal, int]] = {}
        self.limiter = ConcurrencyLimiter(max_active, max_queued)
        self.health_limiter = FixedWindowLimiter(health_window, 1, health_queue)
        self.counters = {
            "payments_ok": 0,
            "payments_500": 0,
            "payments_422": 0,
            "payments_429": 0,
            "payments_400": 0,
            "payments_415": 0,
            "health_ok": 0,
            "health_429": 0,
        }

    # -- store -------------------------------------------------------------
    def store_payment(self, cid: str, amount: Decimal, requested_at_us: int) -> bool:
        """Atomically insert; False when the correlationId is already stored."""
        payments = self.payments
        if cid in payments:
            return False
        payments[cid] = (amount, requested_at_us)
        return True

    def purge(self) -> None:
        self.payments.clear()

    def summary(self, from_us: int | None, to_us: int | None) -> tuple[int, Decimal]:
        """(count, total amount) of payments with from <= requestedAt <= to (all if a bound is None)."""
        total = Decimal(0)
        if from_us is None or to_us is None:
            vals = self.payments.values()
            for amount, _ in vals:
                total += amount
            return len(vals), total
        n = 0
        for amount, ts in self.payments.values():
            if from_us <= ts <= to_us:
                n += 1
                total += amount
        return n, total

    def stats(self) -> dict:
        d = dict(self.counters)
        d["active"] = self.limiter.active
        d["queued"] = self.limiter.queued
        d["max_active_seen"] = self.limiter.max_active_seen
        d["health_queued"] = self.health_limiter.queued
        d["stored"] = len(self.payments)
        d["name"] = self.name
        return d

    def payment_json(self, cid: str, zulu: bool) -> str | None:
        p = self.payments.get(cid)
        if p is None:
            return None
        amount, ts = p
        return (
            '{"correlationId":"%s","amount":%s,"requestedAt":"%s"}'
            % (cid, _dec_text(amount), format_timestamp_us(ts, zulu))
        )


# -- request parsing -----------------------------------------------------------

class _BadRequest(Exception):
    pass


class _TooLarge(Exception):
    """The request body was larger than MAX_BODY_BYTES."""


MAX_BODY_BYTES = 1024**2  # aiohttp's default client_max_size: a larger body gets 413


def _reject_constant(name):
    raise _BadRequest(f"invalid number {name}")


# The body this project's backend sends (compact, these three keys in this
# order, requestedAt as JavaScript's toISOString) is matched by one regex
# instead of json.loads(parse_float=Decimal) + parse_timestamp_us: 1.5 µs
# instead of 5.6. The regex only matches bodies that json.loads decodes to exactly
# these three values (ASCII, no escapes, JSON whitespace only); the digit
# limits keep huge literals on the general path, whose int() refuses more than
# 4300 digits. Anything else takes the general path. test_simulator.py checks
# that both paths agree.
_JSON_WS = rb"[ \t\n\r]*"
_FAST_PAYMENT_RE = re.compile(
    _JSON_WS + rb"\{" + _JSON_WS + rb'"correlationId"' + _JSON_WS + rb":" + _JSON_WS
    + rb'"([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})"'
    + _JSON_WS + rb"," + _JSON_WS + rb'"amount"' + _JSON_WS + rb":" + _JSON_WS
    + rb"(-?(?:0|[1-9][0-9]{0,39})(?:\.[0-9]{1,40})?(?:[eE][-+]?[0-9]{1,6})?)"
    + _JSON_WS + rb"," + _JSON_WS + rb'"requestedAt"' + _JSON_WS + rb":" + _JSON_WS
    # 2025-07-10T12:34:56.789Z in groups, or any other string for parse_timestamp_us
    + rb'"(?:([0-9]{4}-[0-9]{2}-[0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{3})Z'
    + rb'|([ !#-\[\]-~]*))"'
    + _JSON_WS + rb"\}" + _JSON_WS + rb"\Z"
)
_BAD_TIMESTAMP = "requestedAt must be an ISO-8601 timestamp string"
# Amount literal -> rounded Decimal: clients send the same few amounts (k6: 19.90).
_amounts: dict[bytes, Decimal] = {}


def _parse_payment(body: bytes) -> tuple[str, Decimal, int]:
    """(lower-case correlationId, amount rounded to cents, requestedAt µs) or _BadRequest."""
    m = _FAST_PAYMENT_RE.match(body)
    if m is None:
        return _parse_payment_json(body)
    cid, number, day, hh, mi, ss, ms, other_ts = m.groups()
    # requestedAt first, then the amount: the general path's order of complaints
    if day is not None:
        try:
            ts = _day_start_us(day)
        except ValueError:
            raise _BadRequest(_BAD_TIMESTAMP) from None
        h, mnt, s = int(hh), int(mi), int(ss)
        if h > 23 or mnt > 59 or s > 59:
            raise _BadRequest(_BAD_TIMESTAMP)
        ts += ((h * 60 + mnt) * 60 + s) * 1_000_000 + int(ms) * 1000
    else:
        try:
            ts = parse_timestamp_us(other_ts.decode())
        except (ValueError, OverflowError):
            raise _BadRequest(_BAD_TIMESTAMP) from None
    amount = _amounts.get(number)
    if amount is None:
        # json.loads: int() for an integer literal, parse_float=Decimal otherwise
        integer = b"." not in number and b"e" not in number and b"E" not in number
        amount = _round_amount(int(number) if integer else Decimal(number.decode()))
        if len(_amounts) >= 1024:
            _amounts.clear()
        _amounts[number] = amount
    return cid.decode().lower(), amount, ts


@functools.lru_cache(maxsize=64)
def _day_start_us(day: bytes) -> int:
    """µs since the epoch at 00:00 UTC of a YYYY-MM-DD date; ValueError if there is no such day."""
    d = _dt.date(int(day[:4]), int(day[5:7]), int(day[8:10]))
    return (d.toordinal() - _EPOCH_ORDINAL) * 86_400_000_000


def _parse_payment_json(body: bytes) -> tuple[str, Decimal, int]:
    """The general path: any JSON text."""
    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _BadRequest(f"invalid JSON: {e}") from None
    if not isinstance(data, dict):
        raise _BadRequest("body must be a JSON object")
    cid = data.get("correlationId")
    amount = data.get("amount")
    req_at = data.get("requestedAt")
    if not isinstance(cid, str) or _UUID_RE.match(cid) is None:
        raise _BadRequest("correlationId must be a UUID string")
    if isinstance(amount, bool) or not isinstance(amount, (int, Decimal)):
        raise _BadRequest("amount must be a number")
    if not isinstance(req_at, str):
        raise _BadRequest(_BAD_TIMESTAMP)
    try:
        ts = parse_timestamp_us(req_at)
    except (ValueError, OverflowError):
        raise _BadRequest(_BAD_TIMESTAMP) from None
    return cid.lower(), _round_amount(amount), ts


def _round_amount(amount: int | Decimal) -> Decimal:
    amount = Decimal(amount)
    if not amount.is_finite() or _ABS_CTX.abs(amount) > _DOTNET_DECIMAL_MAX:
        raise _BadRequest("amount out of range")
    # decimal.Round(amount, 2) in .NET: banker's rounding on the exact decimal value.
    return amount.quantize(_CENT, rounding=decimal.ROUND_HALF_EVEN, context=_DEC_CTX)


class _OctetStreamDefault(email.message.EmailMessage):
    def __init__(self) -> None:
        super().__init__()
        self.set_default_type("application/octet-stream")


_CONTENT_TYPE_PARSER = email.parser.HeaderParser(_OctetStreamDefault, policy=email.policy.HTTP)


@functools.lru_cache(maxsize=64)
def _media_type(raw: str | None) -> str:
    """The media type of a Content-Type value, worked out as aiohttp.web does."""
    if raw is None:
        return "application/octet-stream"
    value = _CONTENT_TYPE_PARSER.parsestr("Content-Type: " + raw).get("content-type", "")
    ctype = str(value).lower().partition(";")[0].strip()
    return ctype if ctype.count("/") == 1 else "application/octet-stream"


def _is_json_content_type(raw: str | None) -> bool:
    """application/json or application/<anything>+json, like ASP.NET's body binding."""
    if raw == "application/json":  # what every client sends: skip the parse
        return True
    ct = _media_type(raw)
    return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


def _query_first(query: str) -> dict[str, str]:
    """Query parameters, the first value of each ('+' is a space), as aiohttp's request.query.get."""
    out: dict[str, str] = {}
    for k, v in urllib.parse.parse_qsl(query, keep_blank_values=True):
        out.setdefault(k, v)
    return out


# -- answers ---------------------------------------------------------------------

class Reply:
    """An answer: status, body, Content-Type and extra headers.

    Its HTTP head is rendered once per framing (keep-alive, HTTP/1.0, HEAD) and
    kept, so a constant Reply such as the payment's 200 costs one join per request.
    """

    __slots__ = ("status", "body", "content_type", "headers", "_heads")

    def __init__(self, status: int, body: bytes = b"", content_type: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self._heads: dict[int, bytes] = {}


_JSON = "application/json"
_TEXT = "text/plain; charset=utf-8"


def _json_reply(body: str | bytes, status: int = 200) -> Reply:
    return Reply(status, body.encode() if isinstance(body, str) else body, _JSON)


def _message(text: str, status: int = 400) -> Reply:
    return Reply(status, orjson.dumps({"message": text}), _JSON)


_OK = _json_reply(b'{"message":"payment processed successfully"}')
_GARBAGE = _json_reply(b"<<not json>> payment processed\x00{")
_NO_CONTENT = Reply(204)
_UNAUTHORIZED = Reply(401)
_NOT_FOUND_EMPTY = Reply(404)
_UNSUPPORTED = Reply(415)
_FAILED = Reply(500)
_GAVE_UP = Reply(503)
_NOT_A_UUID = Reply(400, b"id must be a UUID", _TEXT)
_PAYMENTS_BUSY = Reply(429, b"Too many requests", _TEXT)
_TOO_LARGE = Reply(413, b"Maximum request body size %d exceeded." % MAX_BODY_BYTES, _TEXT)
_PURGED = _json_reply(b'{"message":"All payments purged."}')
# Routing and server-level answers, with aiohttp.web's wording.
_NOT_FOUND = Reply(404, b"404: Not Found", _TEXT)
_INTERNAL_ERROR = Reply(500, b"500 Internal Server Error\n\nServer got itself in trouble", _TEXT)

_Coroutine = types.CoroutineType


class Request:
    """What an endpoint needs of a request, whichever server carries it.

    ``conn`` is the client connection: ``client_gone()``, ``abort()`` (RST) and
    ``await wait_gone()``. ``body`` is None when it exceeded MAX_BODY_BYTES.
    """

    __slots__ = ("match", "query", "content_type", "token", "body", "conn")

    def __init__(self, match, query, content_type, token, body, conn) -> None:
        self.match = match                # the {id} of /payments/{id}
        self.query = query                # the raw query string
        self.content_type = content_type  # Content-Type header, or None
        self.token = token                # X-Rinha-Token header, or None
        self.body = body
        self.conn = conn


def _abort_transport(tr) -> None:
    """Close a connection abruptly (RST where the socket allows it)."""
    if tr is None:
        return
    sock = tr.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError, TypeError):
            pass
    tr.abort()


# -- endpoints ---------------------------------------------------------------------

class Endpoints:
    """Every endpoint of the simulator, independent of the HTTP server.

    A handler takes a Request and returns a Reply, None (no answer: it aborted
    the connection), or a coroutine giving one of those when it has to wait.
    Answering at once when nothing waits (a payment with no delay) spares the
    server a task per request.
    """

    def __init__(self, state: SimState) -> None:
        self.state = state
        self._health_busy = Reply(
            429, b"Too many requests. Try again later.", _TEXT,
            (("Retry-After", str(int(state.health_limiter.window))),),
        )
        admin = self._admin
        # path -> {method: handler}; GET handlers answer HEAD too (as aiohttp's add_get).
        self.routes: dict[str, dict[str, object]] = {
            "/payments": {"POST": self.post_payment},
            "/payments/service-health": {"GET": self.service_health},
            "/admin/payments-summary": {"GET": admin(self.payments_summary)},
            "/admin/configurations/delay": {"PUT": admin(self.set_delay)},
            "/admin/configurations/failure": {"PUT": admin(self.set_failure)},
            "/admin/configurations/token": {"PUT": admin(self.set_token)},
            "/admin/purge-payments": {"POST": admin(self.purge)},
            "/admin/sim/stats": {"GET": admin(self.sim_stats)},
            "/admin/sim/fault": {"PUT": admin(self.sim_fault)},
            "/admin/sim/payments": {"GET": admin(self.sim_payments)},
        }
        # /payments/{id}, after every fixed path
        self.id_routes: dict[str, object] = {"GET": self.get_payment}

    # -- POST /payments --------------------------------------------------------
    def post_payment(self, req: Request):
        limiter = self.state.limiter
        slot = limiter.try_acquire()
        if slot is True:
            try:
                reply = self._process_payment(req)
            except BaseException:
                limiter.release()
                raise
            if type(reply) is _Coroutine:
                return self._release_after(reply)
            limiter.release()
            return reply
        if slot is False:
            self.state.counters["payments_429"] += 1
            return _PAYMENTS_BUSY
        return self._queued_payment(slot, req)

    async def _release_after(self, coro):
        try:
            return await coro
        finally:
            self.state.limiter.release()

    async def _queued_payment(self, slot: asyncio.Future, req: Request):
        limiter = self.state.limiter
        await limiter.wait(slot)
        if req.conn.client_gone():
            # The client left while queued: like a cancelled queued request.
            limiter.release()
            return _GAVE_UP
        try:
            reply = self._process_payment(req)
            if type(reply) is _Coroutine:
                reply = await reply
            return reply
        finally:
            limiter.release()

    def _process_payment(self, req: Request):
        st = self.state
        if not _is_json_content_type(req.content_type):
            # ASP.NET minimal APIs refuse to bind a JSON body sent under another type.
            st.counters["payments_415"] += 1
            return _UNSUPPORTED
        if req.body is None:
            return _TOO_LARGE
        try:
            cid, amount, ts = _parse_payment(req.body)
        except _BadRequest as e:
            st.counters["payments_400"] += 1
            return _message(str(e))
        delay = st.delay_ms
        if delay > 0:
            return self._delayed_payment(req, cid, amount, ts, delay)
        return self._settle_payment(req, cid, amount, ts)

    async def _delayed_payment(self, req: Request, cid: str, amount: Decimal, ts: int, delay: int):
        await asyncio.sleep(delay / 1000.0)
        reply = self._settle_payment(req, cid, amount, ts)
        if type(reply) is _Coroutine:
            reply = await reply
        return reply

    def _settle_payment(self, req: Request, cid: str, amount: Decimal, ts: int):
        """After the delay: fail, or store and answer (or misbehave, per the fault mode)."""
        st = self.state
        counters = st.counters
        if st.failure:
            counters["payments_500"] += 1
            return _FAILED
        fault = st.fault
        if fault == "reset_before":
            req.conn.abort()
            return None
        # Check-and-store has no await in between: atomic on the event loop.
        if not st.store_payment(cid, amount, ts):
            counters["payments_422"] += 1
            return _message(f"Payment could not be processed. CorrelationId already exists: {cid}.", 422)
        counters["payments_ok"] += 1
        if fault == "none":
            return _OK
        if fault == "reset":
            req.conn.abort()
            return None
        if fault == "garbage":
            return _GARBAGE
        if fault == "fail_after_store":
            counters["payments_500"] += 1
            return _FAILED
        return self._hang(req)

    async def _hang(self, req: Request):
        """Never answer; return once the client has given up (or the server stops)."""
        await req.conn.wait_gone()
        return None

    # -- GET /payments/service-health, GET /payments/{id} -----------------------
    def service_health(self, req: Request):
        limiter = self.state.health_limiter
        permit = limiter.try_acquire()
        if permit is True:
            return self._health_report()
        if permit is False:
            self.state.counters["health_429"] += 1
            return self._health_busy
        return self._held_health(permit)

    async def _held_health(self, permit: asyncio.Future):
        await self.state.health_limiter.wait(permit)
        return self._health_report()

    def _health_report(self) -> Reply:
        st = self.state
        st.counters["health_ok"] += 1
        failing = st.failure
        return _json_reply(
            orjson.dumps({"failing": failing, "minResponseTime": st.delay_ms}),
            st.health_failing_status if failing else 200,
        )

    def get_payment(self, req: Request):
        pid = req.match
        if _UUID_RE.match(pid) is None:
            return _NOT_A_UUID
        text = self.state.payment_json(pid.lower(), zulu=False)
        if text is None:
            return _NOT_FOUND_EMPTY
        return _json_reply(text)

    # -- admin ---------------------------------------------------------------
    def _admin(self, handler):
        st = self.state

        def checked(req: Request):
            if req.token != st.token:
                return _UNAUTHORIZED
            try:
                return handler(req)
            except _BadRequest as e:
                return _message(str(e))
            except _TooLarge:
                return _TOO_LARGE

        return checked

    @staticmethod
    def _json_object(req: Request) -> dict:
        if req.body is None:
            raise _TooLarge()
        try:
            data = orjson.loads(req.body)
        except orjson.JSONDecodeError:
            raise _BadRequest("invalid JSON") from None
        if not isinstance(data, dict):
            raise _BadRequest("body must be a JSON object")
        return data

    @staticmethod
    def _bound(query: dict[str, str], key: str) -> int | None:
        v = query.get(key)
        if v is None or v.strip() == "":
            return None
        try:
            return parse_timestamp_us(v.strip())
        except (ValueError, OverflowError):
            raise _BadRequest(f"{key} must be an ISO-8601 timestamp") from None

    def payments_summary(self, req: Request) -> Reply:
        st = self.state
        query = _query_first(req.query)
        f = self._bound(query, "from")
        t = self._bound(query, "to")
        n, total = st.summary(f, t)
        total_fee = total * st.fee
        return _json_reply(
            '{"totalAmount":%s,"totalRequests":%d,"totalFee":%s,"feePerTransaction":%s}'
            % (_dec_text(total), n, _dec_text(total_fee), st.fee_text)
        )

    def set_delay(self, req: Request) -> Reply:
        st = self.state
        v = self._json_object(req).get("delay")
        if isinstance(v, bool) or not isinstance(v, int) or not -(2**31) <= v < 2**31:
            raise _BadRequest("delay must be an integer (ms)")
        was, st.delay_ms = st.delay_ms, v
        return _json_reply(orjson.dumps({"config": "delay", "was": was, "is": v}))

    def set_failure(self, req: Request) -> Reply:
        st = self.state
        v = self._json_object(req).get("failure")
        if not isinstance(v, bool):
            raise _BadRequest("failure must be a boolean")
        was, st.failure = st.failure, v
        return _json_reply(orjson.dumps({"config": "failure", "was": was, "is": v}))

    def set_token(self, req: Request) -> Reply:
        v = self._json_object(req).get("token")
        if not isinstance(v, str):
            raise _BadRequest("token must be a string")
        self.state.token = v
        return _NO_CONTENT

    def purge(self, req: Request) -> Reply:
        self.state.purge()
        return _PURGED

    def sim_stats(self, req: Request) -> Reply:
        return _json_reply(orjson.dumps(self.state.stats()))

    def sim_fault(self, req: Request) -> Reply:
        st = self.state
        mode = self._json_object(req).get("mode")
        if mode not in FAULT_MODES:
            raise _BadRequest(f"mode must be one of {', '.join(FAULT_MODES)}")
        was, st.fault = st.fault, mode
        return _json_reply(orjson.dumps({"config": "fault", "was": was, "is": mode}))

    def sim_payments(self, req: Request) -> Reply:
        st = self.state
        fee = st.fee_text
        items = [
            '{"correlationId":"%s","amount":%s,"requestedAt":"%s","requestedAtUs":%d,"fee":%s}'
            % (cid, _dec_text(a), format_timestamp_us(ts, True), ts, fee)
            for cid, (a, ts) in st.payments.items()
        ]
        return _json_reply(
            '{"name":%s,"count":%d,"payments":[%s]}'
            % (orjson.dumps(st.name).decode(), len(items), ",".join(items))
        )


# -- the HTTP/1.1 server -----------------------------------------------------------

KEEPALIVE_TIMEOUT = 75.0  # as aiohttp.web: an idle keep-alive connection is closed after this
SHUTDOWN_TIMEOUT = 60.0   # as aiohttp's run_app: how long requests in flight may finish on SIGTERM

_STATUS_LINES = {
    (s.value, v): b"HTTP/%s %d %s\r\n" % (v, s.value, s.phrase.encode())
    for s in http.HTTPStatus
    for v in (b"1.0", b"1.1")
}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_date_cache = [0, b""]


def _date_and_end() -> bytes:
    """The Date header line and the blank line that ends a head (re-rendered once a second)."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = b"Date: %s\r\n\r\n" % email.utils.formatdate(now, usegmt=True).encode()
    return _date_cache[1]


def _render(reply: Reply, keep_alive: bool, http10: bool, head_only: bool) -> bytes:
    key = keep_alive * 4 + http10 * 2 + head_only
    head = reply._heads.get(key)
    if head is None:
        status = reply.status
        lines = [_STATUS_LINES.get((status, b"1.0" if http10 else b"1.1"))
                 or b"HTTP/1.1 %d Unknown\r\n" % status]
        if reply.content_type:
            lines.append(b"Content-Type: %s\r\n" % reply.content_type.encode())
        for name, value in reply.headers:
            lines.append(b"%s: %s\r\n" % (name.encode(), value.encode()))
        if status != 204 and status != 304 and (reply.body or not head_only):  # as aiohttp
            lines.append(b"Content-Length: %d\r\n" % len(reply.body))
        if not keep_alive and not http10:
            lines.append(b"Connection: close\r\n")
        elif keep_alive and http10:
            lines.append(b"Connection: keep-alive\r\n")
        head = reply._heads[key] = b"".join(lines)
    if head_only:
        return head + _date_and_end()
    return b"".join((head, _date_and_end(), reply.body))


def _log_error(what: str, exc: BaseException) -> None:
    print(f"simulator: {what}", file=sys.stderr)
    traceback.print_exception(exc, file=sys.stderr)


class _HttpProtocol(asyncio.Protocol):
    """One client connection: parse requests with httptools, answer them in order.

    A handler that returns a Reply is answered from the parser callback; one that
    returns a coroutine runs as a task, and answers of later (pipelined)
    requests wait behind it. Tasks are not cancelled when the client leaves: a
    payment whose client gave up during the delay is still stored, as with the
    real service.
    """

    __slots__ = (
        "_server", "_routes", "_id_routes", "_loop", "_parser", "_transport", "_closed",
        "_close_when_done", "_answers", "_gone", "_last_active", "_in_request",
        "_url", "_content_type", "_token", "_expect", "_body", "_body_size",
    )

    def __init__(self, server: SimServer) -> None:
        self._server = server
        self._routes = server.endpoints.routes
        self._id_routes = server.endpoints.id_routes
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport = None
        self._closed = False            # closing or closed: nothing more is written
        self._close_when_done = False   # close once every answer is written (server stopping)
        self._answers: collections.deque[list] = collections.deque()  # [bytes | None, keep_alive]
        self._gone: asyncio.Future | None = None  # set when the client leaves ("hang" waits on it)
        self._last_active = 0.0
        self._in_request = False
        self._reset_request()

    def _reset_request(self) -> None:
        self._url = b""
        self._content_type = None
        self._token = None
        self._expect = None
        self._body: list[bytes] | None = []
        self._body_size = 0

    # -- connection --------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self._transport = transport
        self._last_active = self._loop.time()
        self._server.connections.add(self)

    def connection_lost(self, exc) -> None:
        self._closed = True
        self._answers.clear()
        self._server.connections.discard(self)
        self._release_gone()

    def pause_writing(self) -> None:
        # The client is not reading its answers: stop reading its requests too.
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        if not self._closed:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close_when_done = True  # no protocol switch: answer what came, then close
            self._flush()
        except httptools.HttpParserCallbackError as e:
            _log_error("error handling a request", e.__context__ or e)
            self._fail(_INTERNAL_ERROR)
        except httptools.HttpParserError as e:
            self._fail(Reply(400, ("Bad Request: %s" % e).encode(), _TEXT))

    def _fail(self, reply: Reply) -> None:
        """Answer (after the answers already due) and close."""
        self._close_when_done = True
        self._answers.append([_render(reply, False, False, False), False])
        self._flush()

    # -- the Endpoints' view of the connection -------------------------------------
    def client_gone(self) -> bool:
        return self._closed or self._transport.is_closing()

    def abort(self) -> None:
        self._closed = True
        self._answers.clear()
        _abort_transport(self._transport)

    async def wait_gone(self) -> None:
        if self.client_gone() or self._server.stopping:
            return
        if self._gone is None:
            self._gone = self._loop.create_future()
        await asyncio.shield(self._gone)

    def _release_gone(self) -> None:
        if self._gone is not None and not self._gone.done():
            self._gone.set_result(None)

    # -- parser callbacks ----------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_request = True
        self._reset_request()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only three headers matter; the first of each counts (as headers.get in aiohttp).
        n = len(name)
        if n == 12:
            if self._content_type is None and name.lower() == b"content-type":
                self._content_type = value.decode("utf-8", "surrogateescape")
        elif n == 13:
            if self._token is None and name.lower() == b"x-rinha-token":
                self._token = value.decode("utf-8", "surrogateescape").strip(" \t")
        elif n == 6:
            if self._expect is None and name.lower() == b"expect":
                self._expect = value.decode("latin-1").strip(" \t")

    def on_headers_complete(self) -> None:
        expect = self._expect
        if expect and expect.lower() == "100-continue" and self._parser.get_http_version() == "1.1":
            self._answers.append([_CONTINUE, True])  # the interim answer, before the body is sent
            self._flush()

    def on_body(self, body: bytes) -> None:
        if self._body is not None:
            self._body_size += len(body)
            if self._body_size > MAX_BODY_BYTES:
                self._body = None  # read on, keep nothing: 413 for the handlers that read it
            else:
                self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_request = False
        if self._closed:
            return
        parser = self._parser
        keep_alive = parser.should_keep_alive() and not self._close_when_done
        http10 = parser.get_http_version() == "1.0"
        method = parser.get_method().decode("latin-1")
        url = self._url
        path, _, query = url.partition(b"?")
        if b"%" in path:
            path = urllib.parse.unquote_to_bytes(path)
        path = path.decode("utf-8", "surrogateescape")
        methods = self._routes.get(path)
        match = None
        if methods is None and path.startswith("/payments/") and "/" not in path[10:] and len(path) > 10:
            methods, match = self._id_routes, path[10:]
        head_only = method == "HEAD"
        if methods is None:
            reply = _NOT_FOUND
        else:
            handler = methods.get(method)
            if handler is None and head_only:
                handler = methods.get("GET")
            expect = self._expect
            if handler is None:
                reply = _method_not_allowed(frozenset(methods))
            elif expect and not http10 and expect.lower() != "100-continue":
                reply = Reply(417, b"Unknown Expect: %s" % expect.encode("latin-1"), _TEXT)
            else:
                body = self._body
                if body is not None:
                    body = body[0] if len(body) == 1 else b"".join(body)
                req = Request(match, query.decode("latin-1"), self._content_type, self._token, body, self)
                try:
                    reply = handler(req)
                except Exception as e:
                    _log_error("error handling a request", e)
                    reply = _INTERNAL_ERROR
        self._answer(reply, keep_alive, http10, head_only)

    # -- answering -------------------------------------------------------------------
    def _answer(self, reply, keep_alive: bool, http10: bool, head_only: bool) -> None:
        if type(reply) is Reply:
            data = _render(reply, keep_alive, http10, head_only)
            if self._answers:
                self._answers.append([data, keep_alive])
            else:
                self._write(data, keep_alive)
        elif reply is not None:  # a coroutine: its answer waits for it
            entry = [None, keep_alive]
            self._answers.append(entry)
            task = self._loop.create_task(reply)
            self._server.tasks.add(task)
            task.add_done_callback(functools.partial(self._task_done, entry, http10, head_only))
        # None: the handler aborted the connection, nothing to answer

    def _task_done(self, entry: list, http10: bool, head_only: bool, task: asyncio.Task) -> None:
        self._server.tasks.discard(task)
        if self._closed:
            return
        if task.cancelled():
            reply = None
        elif task.exception() is not None:
            _log_error("error handling a request", task.exception())
            reply = _INTERNAL_ERROR
        else:
            reply = task.result()
        if reply is None:  # nothing to answer (aborted, or a hang ended by shutdown)
            self._close()
            return
        entry[0] = _render(reply, entry[1], http10, head_only)
        self._flush()

    def _flush(self) -> None:
        answers = self._answers
        while answers and answers[0][0] is not None:
            data, keep_alive = answers.popleft()
            self._write(data, keep_alive)
        if self._close_when_done and not answers and not self._in_request:
            self._close()

    def _write(self, data: bytes, keep_alive: bool) -> None:
        if self._closed or self._transport.is_closing():  # uvloop raises on a closed handle
            return
        self._transport.write(data)
        self._last_active = self._loop.time()
        if not keep_alive:
            self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._answers.clear()
            self._transport.close()

    # -- server housekeeping ---------------------------------------------------------
    def close_if_idle(self, idle_since: float) -> None:
        if not self._answers and not self._in_request and self._last_active < idle_since:
            self._close()

    def stop(self) -> None:
        """The server is stopping: finish what was asked, then close; release hung handlers."""
        self._close_when_done = True
        self._release_gone()
        if not self._answers:
            self._close()


@functools.lru_cache(maxsize=None)
def _method_not_allowed(methods: frozenset) -> Reply:
    allowed = methods | ({"HEAD"} if "GET" in methods else set())
    return Reply(405, b"405: Method Not Allowed", _TEXT, (("Allow", ",".join(sorted(allowed))),))


class SimServer:
    """A running simulator: its listening socket, its connections and handler tasks."""

    def __init__(self, endpoints: Endpoints, loop: asyncio.AbstractEventLoop) -> None:
        self.endpoints = endpoints
        self.state = endpoints.state
        self.loop = loop
        self.connections: set[_HttpProtocol] = set()
        self.tasks: set[asyncio.Task] = set()
        self.stopping = False
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.Task | None = None

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def _sweep_idle(self) -> None:
        # One wake-up every 15 s rather than a timer per connection re-armed per request.
        while True:
            await asyncio.sleep(KEEPALIVE_TIMEOUT / 5)
            idle_since = self.loop.time() - KEEPALIVE_TIMEOUT
            for conn in list(self.connections):
                conn.close_if_idle(idle_since)

    async def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop listening, let requests in flight finish (up to ``timeout``), close everything."""
        if self.stopping:
            return
        self.stopping = True
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.stop()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn._close()
        await asyncio.sleep(0)  # let the transports report connection_lost


async def start_server(state: SimState, host: str = "127.0.0.1", port: int = 0,
                       backlog: int = 4096) -> SimServer:
    """Serve ``state`` on host:port (0: any free port, see SimServer.port)."""
    loop = asyncio.get_running_loop()
    srv = SimServer(Endpoints(state), loop)
    srv._server = await loop.create_server(lambda: _HttpProtocol(srv), host, port, backlog=backlog)
    srv._sweeper = loop.create_task(srv._sweep_idle())
    return srv


# -- command line ---------------------------------------------------------------------

async def _serve(args, state: SimState, announce: str) -> None:
    srv = await start_server(state, args.host, args.port)
    print(announce, flush=True)  # once the socket is bound: tests and scripts wait for this line
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    await stop
    await srv.shutdown()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Rinha de Backend 2025 payment processor simulator")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--fee", default="0.05", help="fee per transaction, e.g. 0.05 (default) or 0.15 (fallback)")
    p.add_argument("--token", default="123", help="initial X-Rinha-Token")
    p.add_argument("--name", default="default")
    p.add_argument("--max-active", type=int, default=800,
                   help="POST /payments served at once (<= 0: unlimited)")
    p.add_argument("--max-queued", type=int, default=500,
                   help="POST /payments waiting for a slot; beyond that 429")
    p.add_argument("--health-window", type=float, default=5.0,
                   help="seconds per health-check window (one call per window)")
    p.add_argument("--health-queue", type=int, default=2,
                   help="health-check callers held waiting for the next windows; beyond that 429")
    p.add_argument("--health-failing-status", type=int, default=503,
                   help="status of GET /payments/service-health while failure mode is on")
    args = p.parse_args(argv)
    try:
        fee = Decimal(args.fee)
    except decimal.InvalidOperation:
        p.error(f"--fee: not a decimal: {args.fee!r}")

    state = SimState(
        fee,
        token=args.token,
        name=args.name,
        max_active=args.max_active,
        max_queued=args.max_queued,
        health_window=args.health_window,
        health_queue=args.health_queue,
        health_failing_status=args.health_failing_status,
    )
    line = (
        f"payment-processor simulator '{args.name}' listening on http://{args.host}:{args.port} "
        f"fee={fee} max_active={args.max_active} max_queued={args.max_queued} "
        f"health_window={args.health_window}s"
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(_serve(args, state, line))
    else:
        uvloop.run(_serve(args, state, line))


if __name__ == "__main__":
    main(sys.argv[1:])
