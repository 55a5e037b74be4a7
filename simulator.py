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
    PUT  /admin/sim/fault  {"mode": "none"|"reset"|"reset_before"|"garbage"|"hang"}
    GET  /admin/sim/payments             every stored payment

Nothing is logged per request.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime as _dt
import decimal
import json
import re
import socket
import struct
import sys
from decimal import Decimal

import orjson
from aiohttp import web

__all__ = [
    "STATE_KEY",
    "SimState",
    "ConcurrencyLimiter",
    "FixedWindowLimiter",
    "parse_timestamp_us",
    "format_timestamp_us",
    "make_app",
    "main",
]

FAULT_MODES = ("none", "reset", "reset_before", "garbage", "hang")

# Largest magnitude a .NET System.Decimal can hold; the real service answers
# 400 for anything it cannot bind to a decimal.
_DOTNET_DECIMAL_MAX = Decimal("79228162514264337593543950335")
_CENT = Decimal("0.01")
_DEC_CTX = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN)

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z"
)

# ISO-8601 (extended format): a date, optionally a time (hh:mm[:ss[.fraction]]),
# optionally Z or an offset (+hh, +hhmm, +hh:mm). No offset means UTC.
_TS_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?\Z"
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
        try:
            await r
        except asyncio.CancelledError:
            try:
                self.waiters.remove(r)
            except ValueError:
                pass
            raise
        return True

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


def _reject_constant(name):
    raise _BadRequest(f"invalid number {name}")


def _parse_payment(body: bytes) -> tuple[str, Decimal, int]:
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
        raise _BadRequest("requestedAt must be an ISO-8601 timestamp string")
    try:
        ts = parse_timestamp_us(req_at)
    except (ValueError, OverflowError):
        raise _BadRequest("requestedAt must be an ISO-8601 timestamp string") from None
    amount = Decimal(amount)
    if not amount.is_finite() or abs(amount) > _DOTNET_DECIMAL_MAX:
        raise _BadRequest("amount out of range")
    # decimal.Round(amount, 2) in .NET: banker's rounding on the exact decimal value.
    amount = amount.quantize(_CENT, rounding=decimal.ROUND_HALF_EVEN, context=_DEC_CTX)
    return cid.lower(), amount, ts


def _is_json_content_type(request: web.Request) -> bool:
    """application/json or application/<anything>+json, like ASP.NET's body binding."""
    ct = request.content_type
    return ct == "application/json" or (ct.startswith("application/") and ct.endswith("+json"))


def _json_response(text: str | bytes, status: int = 200) -> web.Response:
    if isinstance(text, str):
        text = text.encode()
    return web.Response(body=text, status=status, content_type="application/json")


_OK_BODY = b'{"message":"payment processed successfully"}'
_GARBAGE_BODY = b"<<not json>> payment processed\x00{"


def _abort_connection(request: web.Request) -> None:
    """Close the client connection abruptly (RST where the socket allows it)."""
    tr = request.transport
    if tr is None:
        return
    sock = tr.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError, TypeError):
            pass
    tr.abort()


def _client_gone(request: web.Request) -> bool:
    tr = request.transport
    return tr is None or tr.is_closing()


async def _hang(request: web.Request) -> None:
    """Never answer; return once the client has given up (or the server stops)."""
    while not _client_gone(request):
        await asyncio.sleep(0.05)


# -- app -----------------------------------------------------------------------

STATE_KEY = web.AppKey("state", SimState)


def make_app(
    fee=0.05,
    token: str = "123",
    name: str = "default",
    max_active: int = 800,
    max_queued: int = 500,
    health_window: float = 5.0,
    health_queue: int = 2,
    health_failing_status: int = 503,
    state: SimState | None = None,
) -> web.Application:
    """Build the aiohttp application. Its SimState is ``app[STATE_KEY]``."""
    st = state or SimState(
        fee,
        token=token,
        name=name,
        max_active=max_active,
        max_queued=max_queued,
        health_window=health_window,
        health_queue=health_queue,
        health_failing_status=health_failing_status,
    )
    counters = st.counters
    limiter = st.limiter

    async def _process_payment(request: web.Request) -> web.StreamResponse:
        if not _is_json_content_type(request):
            # ASP.NET minimal APIs refuse to bind a JSON body sent under another type.
            counters["payments_415"] += 1
            return web.Response(status=415)
        body = await request.read()
        try:
            cid, amount, ts = _parse_payment(body)
        except _BadRequest as e:
            counters["payments_400"] += 1
            return _json_response(orjson.dumps({"message": str(e)}), 400)
        delay = st.delay_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000.0)
        if st.failure:
            counters["payments_500"] += 1
            return web.Response(status=500)
        fault = st.fault
        if fault == "reset_before":
            _abort_connection(request)
            return web.Response(status=500)  # never reaches the client
        # Check-and-store has no await in between: atomic on the event loop.
        if not st.store_payment(cid, amount, ts):
            counters["payments_422"] += 1
            return _json_response(
                orjson.dumps(
                    {"message": f"Payment could not be processed. CorrelationId already exists: {cid}."}
                ),
                422,
            )
        counters["payments_ok"] += 1
        if fault == "none":
            return web.Response(body=_OK_BODY, content_type="application/json")
        if fault == "reset":
            _abort_connection(request)
            return web.Response(status=500)  # never reaches the client
        if fault == "garbage":
            return web.Response(body=_GARBAGE_BODY, content_type="application/json")
        # hang
        await _hang(request)
        return web.Response(status=504)

    async def post_payment(request: web.Request) -> web.StreamResponse:
        r = limiter.try_acquire()
        if r is False:
            counters["payments_429"] += 1
            return web.Response(status=429, text="Too many requests")
        if r is not True:
            await limiter.wait(r)
            if _client_gone(request):
                # The client left while queued: like a cancelled queued request.
                limiter.release()
                return web.Response(status=503)
        try:
            return await _process_payment(request)
        finally:
            limiter.release()

    async def service_health(request: web.Request) -> web.StreamResponse:
        if not await st.health_limiter.acquire():
            counters["health_429"] += 1
            return web.Response(
                status=429,
                text="Too many requests. Try again later.",
                headers={"Retry-After": str(int(st.health_limiter.window))},
            )
        counters["health_ok"] += 1
        failing = st.failure
        return _json_response(
            orjson.dumps({"failing": failing, "minResponseTime": st.delay_ms}),
            st.health_failing_status if failing else 200,
        )

    async def get_payment(request: web.Request) -> web.StreamResponse:
        pid = request.match_info["id"]
        if _UUID_RE.match(pid) is None:
            return web.Response(status=400, text="id must be a UUID")
        text = st.payment_json(pid.lower(), zulu=False)
        if text is None:
            return web.Response(status=404)
        return _json_response(text)

    # -- admin ---------------------------------------------------------------
    def authorized(request: web.Request) -> bool:
        return request.headers.get("X-Rinha-Token") == st.token

    async def read_json_object(request: web.Request) -> dict:
        body = await request.read()
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _BadRequest("invalid JSON") from None
        if not isinstance(data, dict):
            raise _BadRequest("body must be a JSON object")
        return data

    def admin(handler):
        async def wrapped(request: web.Request) -> web.StreamResponse:
            if not authorized(request):
                return web.Response(status=401)
            try:
                return await handler(request)
            except _BadRequest as e:
                return _json_response(orjson.dumps({"message": str(e)}), 400)

        return wrapped

    def _bound(request: web.Request, key: str) -> int | None:
        v = request.query.get(key)
        if v is None or v.strip() == "":
            return None
        try:
            return parse_timestamp_us(v.strip())
        except (ValueError, OverflowError):
            raise _BadRequest(f"{key} must be an ISO-8601 timestamp") from None

    @admin
    async def payments_summary(request: web.Request) -> web.StreamResponse:
        f = _bound(request, "from")
        t = _bound(request, "to")
        n, total = st.summary(f, t)
        total_fee = total * st.fee
        return _json_response(
            '{"totalAmount":%s,"totalRequests":%d,"totalFee":%s,"feePerTransaction":%s}'
            % (_dec_text(total), n, _dec_text(total_fee), st.fee_text)
        )

    @admin
    async def set_delay(request: web.Request) -> web.StreamResponse:
        data = await read_json_object(request)
        v = data.get("delay")
        if isinstance(v, bool) or not isinstance(v, int) or not -(2**31) <= v < 2**31:
            raise _BadRequest("delay must be an integer (ms)")
        was, st.delay_ms = st.delay_ms, v
        return _json_response(orjson.dumps({"config": "delay", "was": was, "is": v}))

    @admin
    async def set_failure(request: web.Request) -> web.StreamResponse:
        data = await read_json_object(request)
        v = data.get("failure")
        if not isinstance(v, bool):
            raise _BadRequest("failure must be a boolean")
        was, st.failure = st.failure, v
        return _json_response(orjson.dumps({"config": "failure", "was": was, "is": v}))

    @admin
    async def set_token(request: web.Request) -> web.StreamResponse:
        data = await read_json_object(request)
        v = data.get("token")
        if not isinstance(v, str):
            raise _BadRequest("token must be a string")
        st.token = v
        return web.Response(status=204)

    @admin
    async def purge(request: web.Request) -> web.StreamResponse:
        st.purge()
        return _json_response(b'{"message":"All payments purged."}')

    @admin
    async def sim_stats(request: web.Request) -> web.StreamResponse:
        return _json_response(orjson.dumps(st.stats()))

    @admin
    async def sim_fault(request: web.Request) -> web.StreamResponse:
        data = await read_json_object(request)
        mode = data.get("mode")
        if mode not in FAULT_MODES:
            raise _BadRequest(f"mode must be one of {', '.join(FAULT_MODES)}")
        was, st.fault = st.fault, mode
        return _json_response(orjson.dumps({"config": "fault", "was": was, "is": mode}))

    @admin
    async def sim_payments(request: web.Request) -> web.StreamResponse:
        fee = st.fee_text
        items = [
            '{"correlationId":"%s","amount":%s,"requestedAt":"%s","requestedAtUs":%d,"fee":%s}'
            % (cid, _dec_text(a), format_timestamp_us(ts, True), ts, fee)
            for cid, (a, ts) in st.payments.items()
        ]
        return _json_response(
            '{"name":%s,"count":%d,"payments":[%s]}'
            % (orjson.dumps(st.name).decode(), len(items), ",".join(items))
        )

    app = web.Application()
    app[STATE_KEY] = st
    r = app.router
    r.add_post("/payments", post_payment)
    r.add_get("/payments/service-health", service_health)
    r.add_get("/payments/{id}", get_payment)
    r.add_get("/admin/payments-summary", payments_summary)
    r.add_put("/admin/configurations/delay", set_delay)
    r.add_put("/admin/configurations/failure", set_failure)
    r.add_put("/admin/configurations/token", set_token)
    r.add_post("/admin/purge-payments", purge)
    r.add_get("/admin/sim/stats", sim_stats)
    r.add_put("/admin/sim/fault", sim_fault)
    r.add_get("/admin/sim/payments", sim_payments)
    return app


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

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass

    app = make_app(
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

    def announce(*_a, **_k) -> None:  # run_app calls this once, after the socket is bound
        print(line, flush=True)

    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        print=announce,
        backlog=4096,
        handle_signals=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
