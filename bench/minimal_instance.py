"""The least a Python instance can do behind HAProxy: the "hop" target of bench/run.py.

A bare asyncio.Protocol on uvloop, listening on a Unix socket like server.py,
that answers every request at once without parsing it: 202 to a payment, an
empty summary (200) to GETs and to the purge. No validation, no store, no
peer, no paying. Put behind the project's own haproxy.cfg, it measures what
the architecture's extra hop (HAProxy -> a Python process -> HAProxy) costs
on this machine, so the project's p99 can be split into "the hop" and "our
work" (docs/PERFORMANCE.md).

It assumes one request per read, which holds for k6 and HAProxy's health
checks (one request per round trip); it is a measuring stick, not a server.

Run: python bench/minimal_instance.py SOCKET_PATH
"""
import asyncio
import os
import sys

import uvloop

ACCEPTED = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n"
_EMPTY = b'{"default":{"totalRequests":0,"totalAmount":0},"fallback":{"totalRequests":0,"totalAmount":0}}'
SUMMARY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(_EMPTY), _EMPTY)


class MinimalProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        is_payment = data.startswith(b"POST /payments ")
        self.transport.write(ACCEPTED if is_payment else SUMMARY)


async def serve(path):
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.get_running_loop().create_unix_server(MinimalProtocol, path)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(sys.argv[1]))
