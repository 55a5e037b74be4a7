"""One API instance: an HTTP/1.1 server on a raw asyncio.Protocol (httptools, uvloop).

The protocol's parser callbacks each do one small thing; responses are
written in request order (pipelining) from one place, _write_ready. Limits:
head > max_head_bytes -> 431, body > max_body_bytes -> 413, malformed -> 400,
a request not complete within request_timeout_s -> 408; each closes the
connection. Idle keep-alive connections close after keepalive_timeout_s.
Both timeouts are a deadline per connection that one sweep checks every
SWEEP_S, not a timer handle created and cancelled for every request; what
is due is closed EXPIRE_CHUNK connections per loop step.
Pipelined requests are parsed in slices, and parsing stops while the client
is not reading its answers, so a flood cannot pile answers up in memory.

Run: python server.py (settings from the environment, see config.py).
"""
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections import deque
from http import HTTPStatus
from itertools import islice
from time import perf_counter_ns

import httptools
import orjson
import uvloop

from audit import AuditLog
from config import Settings
from observe import PEER_METRICS_KEY, ObservedClient, Observer, public_config
from payments import Payment, PaymentBook, entry_cents, entry_id, left_behind, wire_cents, wire_id
from peer import PeerLink
from processors import Breaker, Dispatcher, HealthMonitor
from router import Router, describe_local, json_error
from store import PaymentStore, record_cents, record_correlation_id, record_processor, record_requested_at

log = logging.getLogger("server")

_STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
_KEEP_ALIVE = b"connection: keep-alive\r\n"
_CLOSE = b"connection: close\r\n"
_INTERNAL_ERROR = json_error(500, "internal error")
# Back-pressure on pipelining: parse at most this many bytes before checking whether the
# client reads its answers, and hold parsing while this many answers are still being computed.
_FEED_SLICE = 4 * 1024
SWEEP_S = 0.1             # how often connection deadlines are checked (their precision)
EXPIRE_CHUNK = 64         # timed-out connections closed per loop step (~0.5 ms), so requests get between
_MAX_PENDING_ANSWERS = 32
ADOPT_CHUNK = 1000        # payments adopted per loop step from the peer (~2 ms; a long outage leaves 10^4+)
_response_cache = {}


def render(response, keep_alive, http10=False):
    """(status, header_lines, body) -> bytes; answers without a body are cached."""
    status, headers, body = response
    key = (status, headers, keep_alive, http10) if not body else None
    if key is not None:
        cached = _response_cache.get(key)
        if cached is not None:
            return cached
    connection = (_KEEP_ALIVE if http10 else b"") if keep_alive else _CLOSE
    data = b"%s%scontent-length: %d\r\n%s\r\n%s" % (_STATUS_LINES[status], headers, len(body), connection, body)
    if key is not None:
        _response_cache[key] = data
    return data


class _Adoption:
    """Payments from the peer being adopted a chunk per loop step (Instance._adopt_in_steps)."""
    __slots__ = ("left", "adopted", "next_step", "report")

    def __init__(self, payments, report):
        self.left = iter(payments)   # Payments not adopted yet
        self.adopted = 0             # adopted so far (known ones are skipped, not counted)
        self.next_step = None        # the loop handle of the next chunk
        self.report = report         # report(adopted), once all are in


class HttpProtocol(asyncio.Protocol):
    __slots__ = ("_instance", "_settings", "_router", "_loop", "_transport", "_parser", "_url",
                 "_body", "_body_size", "_head_size", "_head_exact", "_in_request", "_deadline",
                 "_deadline_is_request", "_responses", "_closing", "_paused", "_unparsed", "_admin_token", "_t0",
                 "_observe", "_routing_key")

    def __init__(self, instance):
        self._instance = instance
        self._settings = instance.settings
        self._router = instance.router
        self._loop = instance.loop
        self._transport = None
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._body = []
        self._body_size = 0
        self._head_size = 0      # raw bytes seen while a head is incomplete (header floods)
        self._head_exact = 0     # url + header bytes of the current request
        self._in_request = False
        self._deadline = 0.0             # loop time when the current timeout expires; 0: none
        self._deadline_is_request = False  # which: 408 for a request, or close an idle connection
        # Answers in request order: bytes, or an asyncio.Task still computing one.
        self._responses = deque()
        self._closing = False
        self._paused = False
        self._unparsed = b""     # received but held back until the client reads its answers
        self._admin_token = None  # X-Admin-Token of the current request (admin routes check it)
        self._routing_key = None  # X-Routing-Key: the correlationId HAProxy routed the request by
        self._t0 = 0              # perf_counter_ns() when the current request began (observe.py)
        self._observe = instance.observer.request_done

    # ----- connection ----------------------------------------------------------------
    def connection_made(self, transport):
        self._transport = transport
        self._instance.connections.add(self)
        self._set_idle_deadline()

    def connection_lost(self, exc):
        self._instance.connections.discard(self)
        self._closing = True
        self._cancel_timers()
        for item in self._responses:
            if not isinstance(item, bytes):
                item.cancel()
        self._responses.clear()

    def pause_writing(self):
        # The client is not reading its answers: stop reading its requests too.
        self._paused = True
        self._transport.pause_reading()

    def resume_writing(self):
        self._paused = False
        self._continue_reading()

    def data_received(self, data):
        if self._closing:
            return
        if self._unparsed or self._holding():
            self._unparsed += data                    # held back, in order, until answers drain
            self._transport.pause_reading()
            return
        if len(data) <= _FEED_SLICE:
            self._feed(data)
        else:
            self._feed_slices(data)

    def _feed_slices(self, data):
        """Parse a large read slice by slice; hold the rest while the client is not keeping up."""
        start = 0
        while start < len(data) and not self._closing:
            if self._holding():
                self._unparsed = data[start:]
                self._transport.pause_reading()
                return
            self._feed(data[start:start + _FEED_SLICE])
            start += _FEED_SLICE

    def _holding(self):
        """The client is not reading its answers, or too many are still being computed."""
        return self._paused or len(self._responses) > _MAX_PENDING_ANSWERS

    def _continue_reading(self):
        """Called when answers drained: parse what was held back, then read again."""
        if self._closing or self._holding():
            return
        data, self._unparsed = self._unparsed, b""
        if data:
            self._feed_slices(data)
        if not self._unparsed and not self._closing and not self._paused:
            self._transport.resume_reading()

    def _feed(self, data):
        if not self._in_request:
            self._head_size = 0
        if self._head_size >= 0:                      # still in a request's head
            self._head_size += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request was answered (with connection: close) in on_message_complete;
            # what follows is a protocol we do not speak. One answer only, then close.
            self._closing = True
            self._cancel_timers()
            self._write_ready()
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _Reject):
                self._fail(exc.__context__.status, exc.__context__.message)
            else:                                      # our own bug: answer 500, keep the process
                log.error("unexpected error while parsing", exc_info=exc.__context__)
                self._fail(500, "internal error")
        except httptools.HttpParserError:
            self._fail(400, "malformed HTTP request")
        except Exception:
            log.exception("unexpected error while handling a request")
            self._fail(500, "internal error")
        else:
            if self._head_size > self._settings.max_head_bytes and not self._closing:
                self._fail(431, "request head too large")

    # ----- parser callbacks ----------------------------------------------------------
    def on_message_begin(self):
        self._t0 = perf_counter_ns()
        self._in_request = True
        self._head_exact = 0
        self._admin_token = None
        self._routing_key = None
        self._url = b""
        self._body = []
        self._body_size = 0
        self._deadline = self._loop.time() + self._settings.request_timeout_s
        self._deadline_is_request = True

    def on_url(self, url):
        self._url += url
        self._head_exact += len(url)
        if self._head_exact > self._settings.max_head_bytes:
            raise _Reject(431, "request head too large")

    def on_header(self, name, value):
        self._head_exact += len(name) + len(value) + 4
        if self._head_exact > self._settings.max_head_bytes:
            raise _Reject(431, "request head too large")
        # Refuse an announced oversized body before reading any of it.
        if len(name) == 14 and name.lower() == b"content-length" and value.isdigit() \
                and int(value) > self._settings.max_body_bytes:
            raise _Reject(413, "request body too large")
        elif len(name) == 13:
            lower = name.lower()
            if lower == b"x-routing-key":
                self._routing_key = value.decode("latin-1")
            elif lower == b"x-admin-token":
                self._admin_token = value.decode("latin-1")

    def on_headers_complete(self):
        self._head_size = -1                          # what follows is body

    def on_body(self, body):
        self._body_size += len(body)
        if self._body_size > self._settings.max_body_bytes:
            raise _Reject(413, "request body too large")
        self._body.append(body)

    def on_message_complete(self):
        self._in_request = False
        self._head_size = 0
        self._deadline = 0.0
        keep_alive = self._parser.should_keep_alive() and not self._parser.should_upgrade()
        http10 = self._parser.get_http_version() == "1.0"
        url = self._url
        query_at = url.find(b"?")
        if query_at >= 0:
            path, query = url[:query_at].decode("latin-1"), url[query_at + 1:].decode("latin-1")
        else:
            path, query = url.decode("latin-1"), ""
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        try:
            response = self._router.handle(self._parser.get_method(), path, query, body, self._admin_token,
                                           self._routing_key)
        except Exception:
            log.exception("unexpected error in a handler")
            response, keep_alive = _INTERNAL_ERROR, False
        if type(response) is tuple:
            self._responses.append(render(response, keep_alive, http10))
        else:
            task = self._loop.create_task(self._finish_async(response, keep_alive, http10, path))
            self._responses.append(task)
        if not keep_alive:
            self._closing = True
        self._write_ready()
        self._observe(path, response, self._t0)

    # ----- writing answers, in order -------------------------------------------------
    async def _finish_async(self, coroutine, keep_alive, http10, path=None):
        try:
            response = await coroutine
        except Exception:
            log.exception("unexpected error in a handler")
            response, keep_alive = _INTERNAL_ERROR, False
        self._instance.observer.count(path, response[0])
        return render(response, keep_alive, http10)

    def _write_ready(self):
        responses = self._responses
        while responses:
            head = responses[0]
            if type(head) is not bytes:
                if not head.done():
                    head.add_done_callback(self._on_async_done)
                    return
                head = head.result()
            responses.popleft()
            self._transport.write(head)
        if self._closing:
            self._close_now()
        elif not self._in_request:
            self._set_idle_deadline()

    def _on_async_done(self, task):
        if not task.cancelled() and self._transport is not None and not self._transport.is_closing():
            self._write_ready()
            if self._unparsed:
                self._continue_reading()

    def _fail(self, status, message):
        """Answer an error that ends the connection (after earlier answers)."""
        if self._closing:
            return                                    # already ending; nothing more to say
        self._closing = True
        self._cancel_timers()
        self._instance.observer.count(None, status)
        self._responses.append(render(json_error(status, message), keep_alive=False))
        self._write_ready()

    # ----- timeouts (checked by Instance._sweep) -------------------------------------
    def is_due(self, now):
        return self._deadline and now >= self._deadline

    def expire_if_due(self, now):
        if self.is_due(now):
            self._deadline = 0.0
            if not self._deadline_is_request:
                self._close_now()                     # idle keep-alive connection
            elif not self._closing:
                self._fail(408, "request not completed in time")

    def _set_idle_deadline(self):
        self._deadline = self._loop.time() + self._settings.keepalive_timeout_s
        self._deadline_is_request = False

    def _close_now(self):
        """Close gracefully if our answers are out, else drop the connection (the client is not reading)."""
        if self._transport.get_write_buffer_size():
            self._transport.abort()
        else:
            self._transport.close()

    def _cancel_timers(self):
        self._deadline = 0.0


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing and answer with an error."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Instance:
    """Everything one API instance is made of, wired together."""

    def __init__(self, settings, loop):
        self.settings = settings
        self.loop = loop
        self.connections = set()             # open HttpProtocols (their deadlines are swept)
        self.stopping = False
        # The host's monotonic clock (one for every process on it, never set back): a restarted
        # instance's epoch is always later than its predecessor's.
        epoch = "%d-%d" % (settings.instance_id, time.monotonic_ns())
        self.store = PaymentStore(settings.store_capacity, epoch)
        self.audit = AuditLog(settings.audit_log, loop)
        self.book = PaymentBook(settings.queue_capacity, settings.index_capacity, self.audit)
        self.observer = Observer(self)
        self.client = ObservedClient(settings, self.observer)
        self.breakers = tuple(Breaker(settings.breaker_failures, settings.breaker_probe_s, settings.breaker_probe_max_s)
                              for _ in range(2))
        self.peer = PeerLink(settings, self.store, on_purge=self._purge_here,
                             on_health=lambda processor, report: self.health.apply(processor, report, share=False),
                             on_lookup=self._answer_lookup,
                             on_adopt=self._adopt,
                             pending=self.book.pending_payments,
                             on_inherit=self._inherit,
                             on_settled=self._settled_at_peer,
                             adopting=lambda: bool(self._adopting))
        self.book.on_new = self.peer.watch
        self.book.on_accepted = self._on_accepted
        self.health = HealthMonitor(settings, self.client, self.breakers, self.peer)
        self.dispatcher = Dispatcher(settings, self.book, self.store, self.client, self.breakers,
                                     on_paid=self._on_paid, audit=self.audit, replica=self.peer)
        self.router = Router(self)
        self._servers = []
        self._tasks = []
        self._adopting = []      # adoptions still in progress (see _adopt_in_steps)
        self._sealed = False     # stopping, and the pending payments are taken for the hand-over

    def _sweep(self):
        """Expire the connections whose request or keep-alive timeout has passed."""
        self.loop.call_later(SWEEP_S, self._sweep)     # first: nothing below may stop the sweeps
        now = self.loop.time()
        due = [protocol for protocol in self.connections if protocol.is_due(now)]
        if due:
            self._expire_step(iter(due), now)

    def _expire_step(self, due, now):
        """EXPIRE_CHUNK of the connections due per loop step: answering and closing one costs
        ~7 µs, and a slowloris's connections time out by the thousand in the same sweep."""
        taken = 0
        for protocol in islice(due, EXPIRE_CHUNK):
            taken += 1
            try:
                protocol.expire_if_due(now)           # checks again: it may have moved on since
            except Exception:
                log.exception("unexpected error while expiring a connection")
        if taken == EXPIRE_CHUNK:                     # maybe more
            self.loop.call_soon(self._expire_step, due, now)

    def _on_accepted(self, payment):
        """Before the 202 is written: the peer's replica hears of the payment (and of its attempt
        at the default processor, when the dispatcher claims it for the next pass)."""
        self.dispatcher.claim(payment)
        self.peer.watch_now(payment)

    def _on_paid(self, record, payment):
        self.observer.on_paid(record)
        self.peer.publish(record, payment)

    def _settled_at_peer(self, record):
        """A record from the peer: a copy of that payment pending here (adopted, or accepted
        twice across a failure) is paid already; one with an attempt under way settles itself."""
        payment = self.book.get(record_correlation_id(record))
        if payment is not None and self.book.settle_by_record(payment, record_processor(record),
                                                              record_requested_at(record), record_cents(record)):
            self.peer.forget(payment)

    def _answer_lookup(self, key):
        """The peer asks about a payment, or (observe.PEER_METRICS_KEY) for our figures."""
        if key == PEER_METRICS_KEY:
            return self.observer.snapshot()
        return describe_local(self, key)

    def _adopt(self, payments_wire):
        """The peer hands its pending payments over (it is shutting down): taken, unless this
        instance is stopping too (the peer then reports them as abandoned)."""
        if self.stopping:
            return False
        now = time.monotonic()
        self.book.expect({wire_id(wire): wire_cents(wire) for wire in payments_wire})
        self._adopt_in_steps((Payment.from_wire(wire, now) for wire in payments_wire), lambda adopted: log.info(
            "adopted %d payments handed over by the peer", adopted))
        return True

    def _inherit(self, epoch, entries):
        """The peer died (epoch gone): carry on with the pending payments it left behind, or, once
        this instance has handed over its own (it is stopping), report them as abandoned."""
        if self._sealed:
            self._report_abandoned([entry_id(entry) for entry in entries], "the peer died while this instance stopped")
            return
        now = time.monotonic()
        at_processor = sum(1 for entry in entries if entry[1] is not None)
        self.book.expect({entry_id(entry): entry_cents(entry) for entry in entries})
        self._adopt_in_steps((left_behind(entry, now) for entry in entries), lambda adopted: log.warning(
            "peer %s is gone: inherited %d of its pending payments (%d may have reached a processor)",
            epoch, adopted, at_processor))

    def _adopt_in_steps(self, payments, report):
        """Adopt payments ADOPT_CHUNK per loop step, so that payment requests are answered in
        between; report(adopted) once all are in."""
        adoption = _Adoption(payments, report)
        self._adopting.append(adoption)
        self._adopt_step(adoption, ADOPT_CHUNK)

    def _adopt_step(self, adoption, chunk):
        taken = 0
        held = self.store.held
        for payment in islice(adoption.left, chunk):
            taken += 1
            if held(payment.correlation_id) is None:
                adoption.adopted += self.book.adopt(payment)
            else:                                         # already paid, whoever paid it
                self.book.not_arriving(payment.correlation_id)
        if taken == chunk:                       # maybe more
            adoption.next_step = self.loop.call_soon(self._adopt_step, adoption, chunk)
            return
        self._adopting.remove(adoption)
        adoption.report(adoption.adopted)

    def _report_abandoned(self, correlation_ids, why):
        """Accepted payments this instance will not pay and nobody took over: every id is
        reported, in lines short enough for log collectors that split long lines. (The peer may
        still pay those its replica holds, if it inherits them.)"""
        log.error("%d pending payments abandoned: %s", len(correlation_ids), why)
        for start in range(0, len(correlation_ids), 200):
            log.error("abandoned: %s", " ".join(correlation_ids[start:start + 200]))
        for correlation_id in correlation_ids:
            self.audit.record("abandoned", correlation_id)

    def _finish_adopting(self):
        """Stopping: adopt the rest now, so it is handed over with everything else."""
        for adoption in list(self._adopting):
            adoption.next_step.cancel()
            self._adopt_step(adoption, None)     # islice(..., None): all that is left

    def _purge_here(self, purged_at):
        self.store.purge(purged_at)
        self.book.forget_finished()

    async def start(self):
        s = self.settings
        self.audit.open()
        await self.client.start()
        await self.peer.start()
        self._tasks.append(self.loop.create_task(self.dispatcher.run()))
        if s.health_enabled:
            self._tasks.append(self.loop.create_task(self.health.run()))
        self._tasks.append(self.loop.create_task(self.observer.run()))
        self.loop.call_later(SWEEP_S, self._sweep)
        factory = lambda: HttpProtocol(self)
        if s.socket_path:
            if os.path.exists(s.socket_path):
                os.unlink(s.socket_path)
            self._servers.append(await self.loop.create_unix_server(factory, s.socket_path, backlog=4096))
            os.chmod(s.socket_path, 0o666)   # HAProxy may run as another user
        if s.http_port:
            self._servers.append(await self.loop.create_server(factory, "127.0.0.1", s.http_port, backlog=4096))

    async def stop(self):
        """Stop taking requests; finish pending payments within the grace period,
        hand the rest to the peer with their exactly-once state, then close."""
        self.stopping = True                 # payments now get 503 (not accepted); /health says 503
        for server in self._servers:
            server.close()
        deadline = self.loop.time() + self.settings.shutdown_grace_s
        while self.book.pending and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.router.decide_waiting(self.settings.peer_stall_s + 1.0)
        for task in self._tasks:
            task.cancel()
        await self.dispatcher.stop()         # in-flight attempts end as ambiguous, so they stay pinned
        self._finish_adopting()
        self._sealed = True
        leftover = self.book.take_all_pending()
        if leftover:
            left = {wire_id(wire) for wire in await self.peer.hand_over([p.to_wire() for p in leftover])}
            for payment in leftover:
                if payment.correlation_id not in left:
                    self.audit.record("handed_over", payment.correlation_id)
            if len(left) < len(leftover):
                log.info("handed %d pending payments over to the peer", len(leftover) - len(left))
            if left:
                self._report_abandoned([p.correlation_id for p in leftover if p.correlation_id in left],
                                       "the peer did not confirm taking them")
        await self.peer.drain()             # the last paid records reach the peer
        await self.peer.close()
        await self.client.close()
        self.audit.close()
        if self.settings.socket_path and os.path.exists(self.settings.socket_path):
            os.unlink(self.settings.socket_path)


class _JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {"ts": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "msg": record.getMessage()}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        config = getattr(record, "config", None)       # log.info(..., extra={"config": {...}})
        if config is not None:
            entry["config"] = config
        return orjson.dumps(entry, default=str).decode()


def setup_logging(level):
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


async def serve(settings):
    loop = asyncio.get_running_loop()
    instance = Instance(settings, loop)
    await instance.start()
    # What exists now lives as long as the process: keep the collector from
    # scanning it again (a full collection took ~13 ms with 9k payments held),
    # and make full collections ten times rarer.
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 100)
    log.info("instance %d ready", settings.instance_id, extra={"config": public_config(settings)})
    stopping = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stopping.done() or stopping.set_result(None))
    await stopping
    log.info("instance %d stopping", settings.instance_id)
    await instance.stop()


def main():
    settings = Settings.from_env()
    setup_logging(settings.log_level)
    uvloop.run(serve(settings))


if __name__ == "__main__":
    main()
