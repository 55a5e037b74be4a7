"""rawclient.py against real TCP servers that answer, reset, stall or talk nonsense.

What each ending means for exactly-once is the point: ConnectFailed only when nothing
was sent; a status only when the processor answered; anything else is ambiguous.
"""
import asyncio
import socket

import pytest
import uvloop

from rawclient import ConnectFailed, RawPool

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
BODY = b'{"correlationId":"x","amount":1.0,"requestedAt":"2025-07-15T12:00:00.000Z"}'


class ScriptedProcessor:
    """A TCP server that reads one request at a time and does what `behave` says."""

    def __init__(self, behave):
        self.behave = behave            # async (request bytes, reader, writer) -> None
        self.connections = 0
        self.requests = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d/payments" % self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _serve(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int([line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")][0]
                             .split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                await self.behave(request, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(coroutine):
    return uvloop.run(coroutine)


async def answer_ok(request, reader, writer):
    writer.write(OK)


def test_answers_reuse_one_connection_and_send_a_well_formed_request():
    async def main():
        async with ScriptedProcessor(answer_ok) as processor:
            pool = RawPool(processor.url, 1, 2)
            statuses = [await pool.post(BODY) for _ in range(5)]
            pool.close()
            return statuses, processor
    statuses, processor = run(main())
    assert statuses == [200] * 5
    assert processor.connections == 1
    head, body = processor.requests[0].split(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /payments HTTP/1.1"
    headers = dict(line.lower().split(b": ", 1) for line in lines[1:])
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(BODY) and body == BODY
    assert headers[b"host"].startswith(b"127.0.0.1:")


def test_status_codes_come_back_as_they_are():
    async def behave(request, reader, writer):
        status = {0: 422, 1: 500, 2: 429}[len(processor.requests) - 1]
        writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 5\r\n\r\nerror" % status)

    async def main():
        nonlocal processor
        async with ScriptedProcessor(behave) as processor:
            pool = RawPool(processor.url, 1, 2)
            return [await pool.post(BODY) for _ in range(3)]
    processor = None
    assert run(main()) == [422, 500, 429]
    assert processor.connections == 1


def test_nothing_listening_is_connect_failed():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()                                    # the port is free: connection refused

    async def main():
        with pytest.raises(ConnectFailed):
            await RawPool("http://127.0.0.1:%d/payments" % port, 1, 2).post(BODY)
    run(main())


def test_reset_after_the_request_is_not_connect_failed():
    async def behave(request, reader, writer):
        writer.transport.abort()

    async def main():
        async with ScriptedProcessor(behave) as processor:
            with pytest.raises(Exception) as caught:
                await RawPool(processor.url, 1, 2).post(BODY)
            assert not isinstance(caught.value, ConnectFailed)
            assert len(processor.requests) == 1     # it did arrive: the outcome is ambiguous
    run(main())


def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped():
    async def behave(request, reader, writer):
        if len(processor.requests) > 1:
            writer.write(OK)                        # only the first request hangs

    async def main():
        nonlocal processor
        async with ScriptedProcessor(behave) as processor:
            pool = RawPool(processor.url, 1, 0.2)
            with pytest.raises(TimeoutError):
                await pool.post(BODY)
            assert await pool.post(BODY) == 200     # a new connection: the stalled one is not reused
            return processor.connections
    processor = None
    assert run(main()) == 2


def test_garbage_is_an_error_not_a_status():
    async def behave(request, reader, writer):
        writer.write(b"this is not HTTP\r\n\r\n")

    async def main():
        async with ScriptedProcessor(behave) as processor:
            with pytest.raises(Exception) as caught:
                await RawPool(processor.url, 1, 2).post(BODY)
            assert not isinstance(caught.value, (ConnectFailed, TimeoutError))
    run(main())


def test_connection_close_answer_is_not_reused():
    async def behave(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}")
        writer.close()

    async def main():
        async with ScriptedProcessor(behave) as processor:
            pool = RawPool(processor.url, 1, 2)
            assert [await pool.post(BODY) for _ in range(3)] == [200, 200, 200]
            return processor.connections
    assert run(main()) == 3


def test_a_connection_the_server_closed_while_idle_leaves_the_pool():
    async def behave(request, reader, writer):
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()                              # a keep-alive timeout after the answer

    async def main():
        async with ScriptedProcessor(behave) as processor:
            pool = RawPool(processor.url, 1, 2)
            assert await pool.post(BODY) == 200
            await asyncio.sleep(0.2)
            assert len(pool.idle) == 0
            assert await pool.post(BODY) == 200
            return processor.connections
    assert run(main()) == 2


def test_status_is_known_from_the_head_and_the_body_is_read_before_reuse():
    async def behave(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n01234")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"56789")

    async def main():
        async with ScriptedProcessor(behave) as processor:
            pool = RawPool(processor.url, 1, 2)
            assert await pool.post(BODY) == 200
            assert len(pool.idle) == 0              # the rest of the body is still on its way
            await asyncio.sleep(0.3)
            assert len(pool.idle) == 1
            assert await pool.post(BODY) == 200
            return processor.connections
    assert run(main()) == 1


def test_concurrent_requests_each_get_their_own_connection():
    async def behave(request, reader, writer):
        await asyncio.sleep(0.05)
        writer.write(OK)

    async def main():
        async with ScriptedProcessor(behave) as processor:
            pool = RawPool(processor.url, 1, 2)
            statuses = await asyncio.gather(*(pool.post(BODY) for _ in range(4)))
            assert len(pool.idle) == 4
            statuses += await asyncio.gather(*(pool.post(BODY) for _ in range(4)))
            return statuses, processor.connections
    assert run(main()) == ([200] * 8, 4)


def test_an_unknown_payment_client_is_refused_at_start():
    import dataclasses

    from config import Settings
    from processors import ProcessorClient
    with pytest.raises(ValueError, match="PAYMENT_CLIENT"):
        ProcessorClient(dataclasses.replace(Settings(), payment_client="curl"))
    assert ProcessorClient(dataclasses.replace(Settings(), payment_client="aiohttp"))._raw is None
