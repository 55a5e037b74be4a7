"""Payment requests over a bare HTTP/1.1 keep-alive client (PAYMENT_CLIENT=raw, the default).

Why not aiohttp for these: a payment request through aiohttp's ClientSession costs
~210 µs of CPU when it finds the process asleep, against ~60 µs here, and that CPU is
taken from the cores that answer POST /payments: the instances use a third less CPU on
the official-style k6 test (docs/PERFORMANCE.md, "The payment client"). aiohttp still
reads the health reports, and PAYMENT_CLIENT=aiohttp sends the payments through it too.

One request at a time per connection, answered in order; idle connections are kept per
processor for the next request (the dispatcher bounds how many are busy at once).
What a request ends in, and what it means for exactly-once:
- ConnectFailed: no connection was made, nothing was sent (a definite failure);
- a status code: the processor's answer, known from its head (the body is read only so
  that the connection can carry the next request);
- any other exception (reset, timeout, a malformed answer): the request left and the
  processor may have stored it (ambiguous).
"""
import asyncio
import socket
from collections import deque
from urllib.parse import urlsplit

import httptools


class ConnectFailed(Exception):
    """No connection to the processor: the request was not sent."""


class RawPool:
    """Keep-alive connections to one processor, for POSTs of JSON to one URL."""

    def __init__(self, url, connect_timeout_s, request_timeout_s):
        parts = urlsplit(url)
        self._host, self._port = parts.hostname, parts.port or 80
        self._head = b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\ncontent-length: " % (
            (parts.path or "/").encode(), parts.netloc.encode())
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self.idle = deque()           # open connections ready for a request, most recent last

    async def post(self, body):
        """The status code of the processor's answer (see the module's docstring for errors)."""
        loop = asyncio.get_running_loop()
        connection = self._idle_connection() or await self._connect(loop)
        waiter = connection.send(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
        timer = loop.call_later(self._request_timeout_s, _time_out, waiter)
        try:
            status = await waiter
        except BaseException:                       # timeout, reset, garbage, or cancelled
            connection.abort()
            raise
        finally:
            timer.cancel()
        connection.release()
        return status

    def _idle_connection(self):
        # Most recent first: the oldest are the likeliest to be closed by the server soon.
        return self.idle.pop() if self.idle else None

    async def _connect(self, loop):
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _RawConnection(self.idle), self._host, self._port),
                self._connect_timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectFailed(type(exc).__name__) from exc
        return connection

    def close(self):
        while self.idle:
            self.idle.pop().abort()


def _time_out(waiter):
    if not waiter.done():
        waiter.set_exception(TimeoutError("no answer in time"))


class _RawConnection(asyncio.Protocol):
    """One keep-alive connection: one request, its answer, then back to the idle deque."""

    def __init__(self, idle):
        self._idle = idle
        self._transport = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter = None           # the request's future: the status code, or an exception
        self._answer_complete = True  # the last answer was read to its end
        self._released = False        # the caller is done: back to idle once the answer is complete
        self.usable = False           # open and parked in the idle deque (leaves it when closed)

    def connection_made(self, transport):
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # one write per request: never hold it

    def send(self, request):
        self.usable = False
        self._released = False
        self._answer_complete = False
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        if self._transport.is_closing():         # lost between connecting and now
            self._fail(ConnectionResetError("connection closed before the request"))
        else:
            self._transport.write(request)
        return waiter

    def release(self):
        """The caller has its status; reuse the connection once the whole answer is read."""
        self._released = True
        if self._answer_complete:
            self._park()

    def _park(self):
        if not self._transport.is_closing():
            self.usable = True
            self._idle.append(self)

    def abort(self):
        self.usable = False
        if self._transport is not None:
            self._transport.abort()

    # ----- the answer, from the parser ------------------------------------------------
    def data_received(self, data):
        if self._waiter is None and self._answer_complete:
            self.abort()                  # bytes nobody asked for: the stream is out of step
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.abort()

    def on_headers_complete(self):
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(self._parser.get_status_code())

    def on_message_complete(self):
        self._answer_complete = True
        if not self._parser.should_keep_alive():
            self.usable = False
            self._transport.close()
        elif self._released:
            self._park()

    def connection_lost(self, exc):
        if self.usable:                   # closed while idle (the server's keep-alive timeout)
            self.usable = False
            self._idle.remove(self)
        self._fail(exc or ConnectionResetError("connection closed by the processor"))

    def _fail(self, exc):
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
