"""What an instance knows about itself, and the endpoints that show it.

  GET /metrics        Prometheus text exposition (format 0.0.4, rendered by prometheus_client),
                      both instances' figures labelled instance="1"/"2" (the answering
                      instance asks its peer)
  GET /metrics.json   the same figures as JSON, plus a per-second history (the dashboard reads it)
  GET /stats          alias of /metrics.json
  GET /processors     per processor: health reports (short history), circuit state,
                      recent latency and error rate, as each instance sees them
  GET /report         ?from&to: payments, gross, fees, net per processor; with
                      PROCESSOR_ADMIN_TOKEN set, an audit against the processors' own books
  GET /dashboard      dashboard.html: one self-contained page drawing live charts

Cost on the accept path: two perf_counter_ns() calls (the server takes the
first at on_message_begin) and request_done(): four integer stores into
fixed-size arrays and a counter (~0.25 us in all). The histogram is folded
from the ring later (_fold: once per second, on every scrape, and, should
RING_SIZE requests arrive between two of those, by the request that fills
the ring, so no sample is ever missed). Percentiles, the oldest pending
payment and every rendering happen only when asked, or once per second in
the sampler (run()); the window percentiles are cached for
PERCENTILE_CACHE_S so scrapers and dashboards cannot make them costly.

The peer's figures travel over the peer link's existing lookup request/answer
(PeerLink.lookup): a lookup of PEER_METRICS_KEY, which can never be a
correlationId, is answered with the peer's snapshot() instead of a payment.
"""
import asyncio
import logging
import math
import os
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from decimal import Decimal
from itertools import islice
from time import perf_counter_ns
from urllib.parse import urlencode

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from payments import PENDING
from processors import AMBIGUOUS, FAILED, SERVER_ERROR, ProcessorClient
from router import GET_ONLY, JSON, json_error, parse_window, window_texts
from store import PROCESSOR_NAMES
from timestamps import format_ms, now_ms

log = logging.getLogger("observe")

PEER_METRICS_KEY = "#metrics"          # not a UUID: no client lookup can ask for it
RING_SIZE = 8192                       # accept-path samples kept (power of two)
_RING_MASK = RING_SIZE - 1
WINDOW_S = 10                          # the sliding window of the accept p50/p99
PERCENTILE_CACHE_S = 0.5
SERIES_POINTS = 180                    # per-second history kept (3 minutes)
HEALTH_HISTORY = 12                    # health reports / circuit changes kept per processor
PROCESSOR_RECENT = 512                 # recent processor calls kept per processor
PROCESSOR_RECENT_S = 60.0
AUDIT_TIMEOUT_S = 5.0
# A one-sided window's open side, as a bound the processors read (they count everything when a
# bound is missing): before any payment, and the last instant .NET's DateTime holds.
AUDIT_EARLIEST, AUDIT_LATEST = "1970-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"
HALF_CENT = Decimal("0.005")
# Accept-path latency histogram (Prometheus buckets), in seconds and in ns for bisect.
HIST_BOUNDS_S = (0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0)
HIST_BOUNDS_NS = tuple(int(round(b * 1e9)) for b in HIST_BOUNDS_S)

PROMETHEUS = b"content-type: text/plain; version=0.0.4; charset=utf-8\r\ncache-control: no-store\r\n"
HTML = (b"content-type: text/html; charset=utf-8\r\ncache-control: no-store\r\nx-content-type-options: nosniff\r\n"
        b"content-security-policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src 'self' data:\r\n")
KNOWN_ROUTES = frozenset(("/payments", "/payments-summary", "/purge-payments", "/health", "/metrics",
                          "/metrics.json", "/stats", "/processors", "/report", "/dashboard",
                          "/admin/dead-letters/replay"))
SERIES_FIELDS = ("t", "accepted", "refused", "p99_us", "pending", "queued", "oldest_s", "in_flight_default",
                 "in_flight_fallback", "paid_default", "paid_fallback", "cents_default", "cents_fallback",
                 "circuit_default", "circuit_fallback", "failing_default", "failing_fallback", "link_up")
CIRCUIT_CODES = {"closed": 0, "half_open": 1, "open": 2}
DASHBOARD_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard.html")


def route_of(path):
    """A request path -> its route label (bounded set: no label per correlationId)."""
    if path in KNOWN_ROUTES:
        return path
    if path.startswith("/payments/"):
        return "/payments/{id}"
    return "other"


def public_config(settings):
    """The effective configuration for the startup log line, secrets masked."""
    config = settings.public()
    for name, value in config.items():
        if value and (name.endswith("token") or name.endswith("password") or name.endswith("secret")):
            config[name] = "***"
    return config


def fee_rates(settings):
    return (Decimal(str(settings.fee_default)), Decimal(str(settings.fee_fallback)))


def _money(value):
    """Decimal -> float for JSON (fees have at most 4 decimals with 2-decimal rates)."""
    return float(round(value, 6))


def _percentile(sorted_values, q):
    """Nearest-rank percentile of a sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


class ObservedClient(ProcessorClient):
    """The processor client, timing every payment request and counting its outcome."""

    def __init__(self, settings, observer):
        super().__init__(settings)
        self._observer = observer

    async def pay(self, processor, body):
        started = perf_counter_ns()
        outcome, detail = await super().pay(processor, body)
        self._observer.processor_call(processor, perf_counter_ns() - started, outcome)
        return outcome, detail


class Observer:
    def __init__(self, instance):
        self.instance = instance
        self.settings = instance.settings
        self.started_at = time.time()
        # Accept path: a ring of (latency, end time) and a cumulative histogram.
        self._lat = array("q", bytes(8 * RING_SIZE))     # latency (ns) of request n at slot n & _RING_MASK
        self._end = array("q", bytes(8 * RING_SIZE))     # perf_counter_ns() when it ended
        self._n = 0                                      # requests recorded
        self._folded = 0                                 # ... of which the histogram holds the first _folded
        self._hist = [0] * (len(HIST_BOUNDS_NS) + 1)
        self._lat_sum_ns = 0
        self._accept_status = [0] * 600          # POST /payments answers by status code
        self._requests = {}                      # (route, status) -> count, every other route
        self._window_cache = (0, None)
        # Paying.
        self.paid = [0, 0]                       # payments this instance had confirmed, per processor
        self.paid_cents = [0, 0]
        self.calls = [{}, {}]                    # outcome -> count, per processor
        self.call_seconds = [0.0, 0.0]
        self.recent = (deque(maxlen=PROCESSOR_RECENT), deque(maxlen=PROCESSOR_RECENT))
        # Sampled once per second.
        self.health_history = (deque(maxlen=HEALTH_HISTORY), deque(maxlen=HEALTH_HISTORY))
        self.circuit_history = (deque(maxlen=HEALTH_HISTORY), deque(maxlen=HEALTH_HISTORY))
        self.series = deque(maxlen=SERIES_POINTS)
        self._last_reports = [None, None]
        self._last_circuits = [None, None]
        self._series_ring_at = 0                  # ring index at the last sample
        self._dashboard = None

    # ----- the hot path ------------------------------------------------------------
    def request_done(self, path, response, started_ns):
        """Called by the server after a request's answer was written (or queued)."""
        if path == "/payments" and type(response) is tuple:
            now = perf_counter_ns()
            n = self._n
            slot = n & _RING_MASK
            self._lat[slot] = now - started_ns
            self._end[slot] = now
            self._n = n + 1
            self._accept_status[response[0]] += 1
            if n - self._folded == _RING_MASK:    # the ring is full of unfolded samples
                self._fold()
            return
        if type(response) is tuple:               # async answers: counted by the server when they end
            self.count(path, response[0])

    def _fold(self):
        """Add the samples recorded since the last fold to the histogram and the sum."""
        n = self._n
        start = max(self._folded, n - RING_SIZE)
        if start >= n:
            return
        a, b = start & _RING_MASK, n & _RING_MASK
        values = self._lat[a:b].tolist() if a < b else self._lat[a:].tolist() + self._lat[:b].tolist()
        values.sort()
        hist, below = self._hist, 0
        for k, bound in enumerate(HIST_BOUNDS_NS):
            upto = bisect_right(values, bound)       # le: latency <= bound
            hist[k] += upto - below
            below = upto
        hist[-1] += len(values) - below
        self._lat_sum_ns += sum(values)
        self._folded = n

    def count(self, path, status):
        key = (route_of(path) if path is not None else "(unparsed)", status)
        self._requests[key] = self._requests.get(key, 0) + 1

    # ----- paying --------------------------------------------------------------------
    def on_paid(self, record):
        """Dispatcher's on_paid hook: record = (epoch, seq, requestedAt, cents, processor)."""
        processor = record[4]
        self.paid[processor] += 1
        self.paid_cents[processor] += record[3]

    def processor_call(self, processor, took_ns, outcome):
        calls = self.calls[processor]
        calls[outcome] = calls.get(outcome, 0) + 1
        self.call_seconds[processor] += took_ns / 1e9
        self.recent[processor].append((time.monotonic(), took_ns, outcome))

    # ----- sampler -------------------------------------------------------------------
    async def run(self):
        """Once per second: health/circuit history and one point of the per-second series."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += 1.0
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                self.sample()
            except Exception:                     # never let the sampler die
                log.exception("metrics sampler failed")

    def sample(self):
        inst = self.instance
        now = now_ms()
        for p in (0, 1):
            report = inst.health.reports[p]
            if report is not None and report is not self._last_reports[p]:
                self._last_reports[p] = report
                entry = dict(report)
                entry["receivedAt"] = format_ms(now)
                self.health_history[p].append(entry)
            state = inst.breakers[p].state
            if state != self._last_circuits[p]:
                self._last_circuits[p] = state
                self.circuit_history[p].append({"state": state, "at": format_ms(now)})
        self._fold()
        # p99 of the accept path over the samples taken since the last point.
        n = self._n
        start = max(self._series_ring_at, n - RING_SIZE)
        self._series_ring_at = n
        a, b = start & _RING_MASK, n & _RING_MASK
        if start >= n:
            values = []
        elif a < b:
            values = self._lat[a:b].tolist()
        else:
            values = self._lat[a:].tolist() + self._lat[:b].tolist()
        values.sort()
        p99 = _percentile(values, 99)
        book = inst.book
        reports = inst.health.reports
        self.series.append([
            now, self._accept_status[202], sum(self._accept_status) - self._accept_status[202],
            None if p99 is None else p99 // 1000, book.pending, book.queued(), round(self.oldest_pending_age(), 3),
            inst.dispatcher.in_flight[0], inst.dispatcher.in_flight[1],
            self.paid[0], self.paid[1], self.paid_cents[0], self.paid_cents[1],
            CIRCUIT_CODES.get(inst.breakers[0].state, 2), CIRCUIT_CODES.get(inst.breakers[1].state, 2),
            None if reports[0] is None else int(reports[0]["failing"]),
            None if reports[1] is None else int(reports[1]["failing"]),
            int(inst.peer.link_up),
        ])

    # ----- figures -------------------------------------------------------------------
    def accept_window(self):
        """p50/p99/max (ms) of the accept path over the last WINDOW_S seconds (cached briefly)."""
        now = perf_counter_ns()
        cached_at, cached = self._window_cache
        if cached is not None and now - cached_at < PERCENTILE_CACHE_S * 1e9:
            return cached
        cutoff = now - WINDOW_S * 1_000_000_000
        i, end, lat = self._n & _RING_MASK, self._end, self._lat
        # end[] is ascending from slot i (oldest) round to slot i-1 (newest); unused slots hold 0.
        if i > 0 and end[0] < cutoff:
            values = lat[bisect_left(end, cutoff, 0, i):i].tolist()
        else:
            values = lat[bisect_left(end, cutoff, i, RING_SIZE):].tolist() + lat[:i].tolist()
        values.sort()
        result = {
            "window_s": WINDOW_S,
            "samples": len(values),
            "p50_ms": None if not values else _percentile(values, 50) / 1e6,
            "p99_ms": None if not values else _percentile(values, 99) / 1e6,
            "max_ms": None if not values else values[-1] / 1e6,
        }
        self._window_cache = (now, result)
        return result

    def oldest_pending_age(self):
        """Seconds since the oldest still-pending payment was accepted (0 when none).

        Looks where pending payments can be: the queues (their first entries:
        they are FIFO except for retries), the retry backoff heap,
        and the attempts in flight. The cost is bounded by those sizes, never
        by the number of payments ever accepted.
        """
        book = self.instance.book
        if not book.pending:
            return 0.0
        candidates = [payment for queue in (book.ready, book.pinned[0], book.pinned[1])
                      for payment in islice(queue, 64)]
        candidates += [entry[-1] for entry in getattr(book, "_waiting", ())]
        candidates += book.in_flight
        ages = [payment.accepted_at for payment in candidates if payment.state == PENDING]
        return max(0.0, time.monotonic() - min(ages)) if ages else 0.0

    def processor_recent(self, processor):
        cutoff = time.monotonic() - PROCESSOR_RECENT_S
        calls = [c for c in self.recent[processor] if c[0] >= cutoff]
        latencies = sorted(c[1] for c in calls)
        errors = sum(1 for c in calls if c[2] in (FAILED, SERVER_ERROR, AMBIGUOUS))
        outcomes = {}
        for c in calls:
            outcomes[c[2]] = outcomes.get(c[2], 0) + 1
        return {
            "window_s": PROCESSOR_RECENT_S,
            "requests": len(calls),
            "error_rate": round(errors / len(calls), 4) if calls else None,
            "outcomes": outcomes,
            "latency_ms": None if not calls else {
                "mean": round(sum(latencies) / len(latencies) / 1e6, 3),
                "p50": round(_percentile(latencies, 50) / 1e6, 3),
                "p99": round(_percentile(latencies, 99) / 1e6, 3),
                "max": round(latencies[-1] / 1e6, 3),
            },
        }

    def snapshot(self):
        """This instance's figures, JSON-ready (also what the peer is sent)."""
        inst = self.instance
        book, store, peer, dispatcher = inst.book, inst.store, inst.peer, inst.dispatcher
        rates = fee_rates(self.settings)
        books = store.summary()
        self._fold()
        requests = [["/payments", status, n] for status, n in enumerate(self._accept_status) if n]
        requests += [[route, status, n] for (route, status), n in sorted(self._requests.items(), key=str)]
        cumulative, buckets = 0, []
        for bound, n in zip(HIST_BOUNDS_S + (None,), self._hist):
            cumulative += n
            buckets.append([bound, cumulative])
        processors = []
        dead = getattr(dispatcher, "dead", None)
        for p, name in enumerate(PROCESSOR_NAMES):
            gross = Decimal(self.paid_cents[p]) / 100
            books_gross = Decimal(books.cents[p]) / 100
            report = inst.health.reports[p]
            processors.append({
                "name": name,
                "fee_rate": float(rates[p]),
                "attempts": dispatcher.attempts[p],
                "retries": dispatcher.retries[p],
                "paid": self.paid[p],
                "paid_amount": _money(gross),
                "fees": _money(gross * rates[p]),
                "net": _money(gross - gross * rates[p]),
                "dead_lettered": None if dead is None else dead[p],
                "in_flight": dispatcher.in_flight[p],
                "circuit": inst.breakers[p].state,
                "health": report,
                "health_history": list(self.health_history[p]),
                "circuit_history": list(self.circuit_history[p]),
                "calls": dict(self.calls[p]),
                "call_seconds": round(self.call_seconds[p], 6),
                "recent": self.processor_recent(p),
                "books": {"payments": books.count[p], "amount": _money(books_gross),
                          "fees": _money(books_gross * rates[p]),
                          "net": _money(books_gross - books_gross * rates[p])},
            })
        return {
            "instance": self.settings.instance_id,
            "at": format_ms(now_ms()),
            "uptime_s": round(time.time() - self.started_at, 1),
            "connections": len(inst.connections),
            "requests": requests,
            "accept": {"count": cumulative, "sum_s": self._lat_sum_ns / 1e9, "buckets": buckets,
                       "accepted": self._accept_status[202], "window": self.accept_window()},
            "queue": {"pending": book.pending, "queued": book.queued(), "capacity": book.queue_capacity,
                      "oldest_pending_age_s": round(self.oldest_pending_age(), 4),
                      "paid": book.paid, "dead": book.dead},
            "processors": processors,
            "store": {"records": len(store), "capacity": store.capacity, "overwritten": store.overwritten},
            "peer": {"link_up": peer.link_up, "replica": peer.replica_size(), "records_sent": peer.records_sent,
                     "records_received": peer.records_received, "connects": peer.connects,
                     "held_for_word": peer.held_for_word(), "gates_expired": peer.gates_expired},
            # from_start: the first row is the first sample since the process started (counters were 0 before).
            "series": {"fields": SERIES_FIELDS, "rows": list(self.series),
                       "from_start": len(self.series) < SERIES_POINTS},
        }

    async def both(self):
        """[instance 1's snapshot or None, instance 2's snapshot or None]."""
        mine = self.snapshot()
        theirs = None
        peer = self.instance.peer
        if peer.link_up:
            theirs = await peer.lookup(PEER_METRICS_KEY)
            if not isinstance(theirs, dict) or "instance" not in theirs:
                theirs = None
        result = [None, None]
        for snap in (mine, theirs):
            if snap is not None and snap["instance"] in (1, 2):
                result[snap["instance"] - 1] = snap
        if result[self.settings.instance_id - 1] is None:     # an instance id outside 1/2
            result.append(mine)
        return result

    # ----- endpoints -----------------------------------------------------------------
    def route(self, method, path, query):
        """Answer one of our endpoints, or None when the path is not ours."""
        if path == "/metrics":
            handler = self._metrics_text
        elif path in ("/metrics.json", "/stats"):
            handler = self._metrics_json
        elif path == "/processors":
            handler = self._processors
        elif path == "/report":
            return self.report(query) if method == b"GET" else GET_ONLY
        elif path == "/dashboard":
            return self.dashboard() if method == b"GET" else GET_ONLY
        else:
            return None
        if method != b"GET":
            return GET_ONLY
        return handler()

    async def _metrics_json(self):
        snaps = await self.both()
        body = orjson.dumps({"answered_by": self.settings.instance_id, "instances": snaps,
                             "fee_rates": {"default": self.settings.fee_default,
                                           "fallback": self.settings.fee_fallback}})
        return 200, JSON, body

    async def _processors(self):
        snaps = await self.both()
        view = []
        for snap in snaps:
            if snap is None:
                continue
            view.append({"instance": snap["instance"], "processors": {
                p["name"]: {k: p[k] for k in ("fee_rate", "circuit", "circuit_history", "health", "health_history",
                                               "recent", "in_flight", "attempts", "retries", "paid",
                                               "dead_lettered")}
                for p in snap["processors"]}})
        urls = {"default": self.settings.processor_default_url, "fallback": self.settings.processor_fallback_url}
        return 200, JSON, orjson.dumps({"answered_by": self.settings.instance_id, "urls": urls, "instances": view})

    async def _metrics_text(self):
        snaps = await self.both()
        return 200, PROMETHEUS, render_prometheus(snaps, self.settings)

    def dashboard(self):
        if self._dashboard is None:
            try:
                with open(DASHBOARD_PATH, "rb") as f:
                    self._dashboard = (200, HTML, f.read())
            except OSError:
                return json_error(404, "dashboard.html is not deployed with this instance")
        return self._dashboard

    # ----- GET /report ---------------------------------------------------------------
    def report(self, query):
        bounds = parse_window(query)
        if type(bounds) is not list:
            return bounds                    # the 400 answer
        texts = window_texts(query)
        totals = self.instance.store.summary(*bounds)
        rates = fee_rates(self.settings)
        processors, total = {}, {"payments": 0, "gross": Decimal(0), "fees": Decimal(0), "net": Decimal(0)}
        for p, name in enumerate(PROCESSOR_NAMES):
            gross = Decimal(totals.cents[p]) / 100
            fees = gross * rates[p]
            processors[name] = {"payments": totals.count[p], "gross": gross, "fee_rate": rates[p],
                                "fees": fees, "net": gross - fees}
            total["payments"] += totals.count[p]
            total["gross"] += gross
            total["fees"] += fees
            total["net"] += gross - fees
        report = {"from": texts["from"], "to": texts["to"], "answered_by": self.settings.instance_id,
                  "processors": processors, "total": total}
        if not self.settings.processor_admin_token:
            report["audit"] = {"enabled": False, "reason": "PROCESSOR_ADMIN_TOKEN is not set"}
            return 200, JSON, _dumps_decimal(report)
        return self._audited(report, bounds)

    async def _audited(self, report, bounds):
        report["audit"] = await self.audit(report["processors"], bounds)
        return 200, JSON, _dumps_decimal(report)

    async def audit(self, ours, bounds):
        """Compare our books with each processor's admin summary for the same window.

        Both bounds are always sent, as the milliseconds our summary used: a processor counts
        everything when either bound is missing, where our one-sided window is open on one side
        only, so a missing bound goes as the earliest or latest instant the processors read."""
        import aiohttp                             # already loaded by processors.py
        from_ms, to_ms = bounds
        query = urlencode({"from": format_ms(from_ms) if from_ms is not None else AUDIT_EARLIEST,
                           "to": format_ms(to_ms) if to_ms is not None else AUDIT_LATEST})
        urls = (self.settings.processor_default_url, self.settings.processor_fallback_url)
        headers = {"X-Rinha-Token": self.settings.processor_admin_token}
        timeout = aiohttp.ClientTimeout(total=AUDIT_TIMEOUT_S)

        async def fetch(session, url):
            target = url.rstrip("/") + "/admin/payments-summary?" + query
            try:
                async with session.get(target, headers=headers) as response:
                    data = await response.read()
                    if response.status != 200:
                        return None, "HTTP %d from %s" % (response.status, target)
                    return orjson.loads(data), None
            except Exception as exc:
                return None, "%s from %s" % (type(exc).__name__, target)

        async with aiohttp.ClientSession(timeout=timeout) as session:
            answers = await asyncio.gather(*(fetch(session, url) for url in urls))
        differences, processors, errors = [], {}, []
        for name, (theirs, error) in zip(PROCESSOR_NAMES, answers):
            mine = ours[name]
            if error is not None:
                errors.append({"processor": name, "error": error})
                processors[name] = {"error": error}
                continue
            their_amount = Decimal(str(theirs.get("totalAmount", 0)))
            their_fee = Decimal(str(theirs.get("totalFee", 0)))
            their_rate = Decimal(str(theirs.get("feePerTransaction", 0)))
            processors[name] = {"processor": {"payments": theirs.get("totalRequests"), "gross": their_amount,
                                              "fees": their_fee, "fee_rate": their_rate},
                                "backend": {"payments": mine["payments"], "gross": mine["gross"],
                                            "fees": mine["fees"], "fee_rate": mine["fee_rate"]}}
            for field, backend, processor in (("payments", mine["payments"], theirs.get("totalRequests")),
                                              ("gross", mine["gross"], their_amount),
                                              ("fee_rate", mine["fee_rate"], their_rate),
                                              ("fees", mine["fees"], their_fee)):
                # Fees: the processor may round its total to cents, either way; half a cent is no difference.
                same = abs(backend - processor) <= HALF_CENT if field == "fees" else backend == processor
                if not same:
                    differences.append({"processor": name, "field": field, "backend": backend,
                                        "processor_value": processor,
                                        "difference": (backend - processor)
                                        if isinstance(processor, (int, Decimal)) else None})
        return {"enabled": True, "checked_at": format_ms(now_ms()), "ok": not differences and not errors,
                "differences": differences, "errors": errors, "processors": processors}


def _dumps_decimal(value):
    return orjson.dumps(value, default=lambda v: _money(v) if isinstance(v, Decimal) else str(v))


# ----- Prometheus text exposition ---------------------------------------------------------
def _sample_value(value):
    """None (not known yet) is NaN; True/False are 1/0."""
    if value is None:
        return math.nan
    if value is True or value is False:
        return int(value)
    return value


class _Families:
    """One scrape's metric families, filled in by name from the snapshots (a prometheus_client
    collector: the library renders the text format; nothing is counted through it)."""

    def __init__(self):
        self._by_name = {}

    def add(self, name, kind, help_text, labels, value):
        family = self._by_name.get(name)
        if family is None:
            family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            family = self._by_name[name] = family_type(name, help_text, labels=[k for k, _ in labels])
        family.add_metric([str(v) for _, v in labels], _sample_value(value))

    def add_histogram(self, name, help_text, instance, buckets, sum_s):
        family = self._by_name.get(name)
        if family is None:
            family = self._by_name[name] = HistogramMetricFamily(name, help_text, labels=["instance"])
        family.add_metric([str(instance)], buckets, sum_value=sum_s)

    def collect(self):
        return list(self._by_name.values())

    def render(self):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)


def render_prometheus(snaps, settings):
    """Both instances' snapshots -> the text exposition format (0.0.4)."""
    out = _Families()
    # Group each metric's samples together, as the format requires: one pass per metric.
    present = [s for s in snaps if s is not None]
    answering = settings.instance_id
    for wanted in (1, 2):
        got = any(s["instance"] == wanted for s in present)
        out.add("rinha_instance_reporting", "gauge",
                "1 when this scrape carries the instance's own figures (0: the peer did not answer)",
                [("instance", wanted)], got)
    out.add("rinha_answering_instance", "gauge", "The instance that answered this scrape",
            [("instance", answering)], 1)
    for p, name in enumerate(PROCESSOR_NAMES):
        out.add("rinha_fee_rate", "gauge", "Fee rate per processor (FEE_DEFAULT / FEE_FALLBACK)",
                [("processor", name)], (settings.fee_default, settings.fee_fallback)[p])

    def each(name, kind, help_text, getter):
        for s in present:
            for labels, value in getter(s):
                out.add(name, kind, help_text, [("instance", s["instance"])] + labels, value)

    each("rinha_uptime_seconds", "gauge", "Seconds since the instance started",
         lambda s: [([], s["uptime_s"])])
    each("rinha_http_connections", "gauge", "Open client connections (HAProxy's keep-alive connections)",
         lambda s: [([], s["connections"])])
    each("rinha_http_requests_total", "counter", "Requests answered, by route and status",
         lambda s: [([("route", r), ("status", st)], n) for r, st, n in s["requests"]])
    for s in present:
        acc = s["accept"]
        out.add_histogram("rinha_accept_latency_seconds",
                          "POST /payments inside the instance: first byte parsed to answer written", s["instance"],
                          [("+Inf" if bound is None else repr(float(bound)), cumulative)
                           for bound, cumulative in acc["buckets"]], acc["sum_s"])
    each("rinha_accept_latency_window_seconds", "gauge",
         "POST /payments latency over the last %d s (sliding window of the last %d requests at most)"
         % (WINDOW_S, RING_SIZE),
         lambda s: [([("quantile", q)], None if s["accept"]["window"][k] is None else s["accept"]["window"][k] / 1e3)
                    for q, k in (("0.5", "p50_ms"), ("0.99", "p99_ms"), ("1", "max_ms"))])
    each("rinha_accept_latency_window_samples", "gauge", "Requests in the sliding window",
         lambda s: [([], s["accept"]["window"]["samples"])])
    each("rinha_queue_pending", "gauge", "Payments accepted and not yet settled (queued, backing off or in flight)",
         lambda s: [([], s["queue"]["pending"])])
    each("rinha_queue_depth", "gauge", "Payments waiting in the dispatch queues",
         lambda s: [([], s["queue"]["queued"])])
    each("rinha_queue_capacity", "gauge", "QUEUE_CAPACITY", lambda s: [([], s["queue"]["capacity"])])
    each("rinha_queue_oldest_pending_age_seconds", "gauge", "Age of the oldest pending payment",
         lambda s: [([], s["queue"]["oldest_pending_age_s"])])

    def per_processor(key):
        return lambda s: [([("processor", p["name"])], p[key]) for p in s["processors"]]
    each("rinha_processor_in_flight", "gauge", "Payment requests in flight", per_processor("in_flight"))
    each("rinha_payments_paid_total", "counter", "Payments this instance had confirmed", per_processor("paid"))
    each("rinha_payments_paid_amount_total", "counter", "Amount this instance had confirmed",
         per_processor("paid_amount"))
    each("rinha_payments_fees_total", "counter", "Fees on that amount at the known rates", per_processor("fees"))
    each("rinha_payments_net_total", "counter", "Amount minus fees", per_processor("net"))
    each("rinha_payment_attempts_total", "counter", "Payment requests sent", per_processor("attempts"))
    each("rinha_payments_retried_total", "counter", "Payment requests that were retries", per_processor("retries"))
    each("rinha_payments_dead_lettered_total", "counter", "Payments dead-lettered after this processor's answer",
         per_processor("dead_lettered"))
    each("rinha_processor_requests_total", "counter", "Payment requests by outcome",
         lambda s: [([("processor", p["name"]), ("outcome", o)], n) for p in s["processors"]
                    for o, n in sorted(p["calls"].items())])
    each("rinha_processor_request_seconds_total", "counter", "Time spent in payment requests",
         per_processor("call_seconds"))
    each("rinha_processor_recent_error_rate", "gauge",
         "Failed or ambiguous share of payment requests in the last %d s" % PROCESSOR_RECENT_S,
         lambda s: [([("processor", p["name"])], p["recent"]["error_rate"]) for p in s["processors"]])
    each("rinha_processor_recent_latency_seconds", "gauge",
         "Payment request latency in the last %d s" % PROCESSOR_RECENT_S,
         lambda s: [([("processor", p["name"]), ("quantile", q)],
                     None if p["recent"]["latency_ms"] is None else p["recent"]["latency_ms"][k] / 1e3)
                    for p in s["processors"] for q, k in (("0.5", "p50"), ("0.99", "p99"))])
    each("rinha_processor_health_failing", "gauge", "Last health report: failing (1) or not (0)",
         lambda s: [([("processor", p["name"])], None if p["health"] is None else p["health"]["failing"])
                    for p in s["processors"]])
    each("rinha_processor_health_min_response_seconds", "gauge", "Last health report: minResponseTime",
         lambda s: [([("processor", p["name"])],
                     None if p["health"] is None else p["health"]["minResponseTime"] / 1e3)
                    for p in s["processors"]])
    each("rinha_processor_circuit_state", "gauge", "Circuit breaker state (1 for the current state)",
         lambda s: [([("processor", p["name"]), ("state", st)], p["circuit"] == st) for p in s["processors"]
                    for st in ("closed", "half_open", "open")])
    each("rinha_books_payments", "gauge", "Payments in this instance's store (both instances' records)",
         lambda s: [([("processor", p["name"])], p["books"]["payments"]) for p in s["processors"]])
    each("rinha_books_amount", "gauge", "Amount in this instance's store",
         lambda s: [([("processor", p["name"])], p["books"]["amount"]) for p in s["processors"]])
    each("rinha_books_fees", "gauge", "Fees on the stored amount at the known rates",
         lambda s: [([("processor", p["name"])], p["books"]["fees"]) for p in s["processors"]])
    each("rinha_books_net", "gauge", "Stored amount minus fees",
         lambda s: [([("processor", p["name"])], p["books"]["net"]) for p in s["processors"]])
    each("rinha_store_records", "gauge", "Records held in the ring", lambda s: [([], s["store"]["records"])])
    each("rinha_store_capacity", "gauge", "STORE_CAPACITY", lambda s: [([], s["store"]["capacity"])])
    each("rinha_store_overwritten_total", "counter", "Records lost to wrap-around",
         lambda s: [([], s["store"]["overwritten"])])
    each("rinha_peer_link_up", "gauge", "The peer link is up and synchronised",
         lambda s: [([], s["peer"]["link_up"])])
    each("rinha_peer_records_sent_total", "counter", "Records sent to the peer",
         lambda s: [([], s["peer"]["records_sent"])])
    each("rinha_peer_records_received_total", "counter", "New records received from the peer",
         lambda s: [([], s["peer"]["records_received"])])
    each("rinha_peer_held_payments", "gauge", "New payments held until the peer's word on them is in",
         lambda s: [([], s["peer"].get("held_for_word", 0))])
    each("rinha_peer_gates_expired_total", "counter",
         "New payments released by the deadline, without the peer's word on them",
         lambda s: [([], s["peer"].get("gates_expired", 0))])
    each("rinha_peer_connects_total", "counter", "Times the peer link came up",
         lambda s: [([], s["peer"]["connects"])])
    each("rinha_peer_replica_payments", "gauge", "The peer's pending payments held here (inherited if it dies)",
         lambda s: [([], s["peer"].get("replica", 0))])
    return out.render()
