"""Tests of the payment processor simulator (simulator.py), over real loopback sockets.

Most tests talk to one simulator started as a subprocess through its CLI; the
limiter tests build their own instance on a real port with start_server() (the
server the CLI runs), so that they can use small limits and a fresh health window. The last tests
check the HTTP framing of start_server() and that the fast payment parser agrees
with the general one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from decimal import Decimal

import aiohttp
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import simulator  # noqa: E402

TOKEN = "123"
ADMIN = {"X-Rinha-Token": TOKEN}
TS = "2025-07-10T12:34:56.789Z"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(coro):
    return asyncio.run(coro)


def payment(amount=19.90, cid=None, requested_at=TS) -> dict:
    return {"correlationId": cid or str(uuid.uuid4()), "amount": amount, "requestedAt": requested_at}


async def call(session, method, url, *, json=None, data=None, headers=None, timeout=5.0):
    """(status, body bytes) of one request."""
    async with session.request(
        method, url, json=json, data=data, headers=headers,
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as r:
        return r.status, await r.read()


async def call_json(session, method, url, **kw):
    status, body = await call(session, method, url, **kw)
    return status, (orjson.loads(body) if body else None)


# -- the subprocess simulator ----------------------------------------------------

@pytest.fixture(scope="module")
def sim_url():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "simulator.py"), "--port", str(port), "--fee", "0.05",
         "--host", "127.0.0.1", "--token", TOKEN, "--name", "default", "--health-window", "0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()  # printed once the socket is bound
        assert "listening" in line and str(port) in line, (line, proc.stderr.read() if proc.poll() else "")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err = proc.stderr.read()
        assert "Traceback" not in err, err


@pytest.fixture()
def sim(sim_url):
    """The shared simulator, reset to a clean state before each test."""

    async def reset():
        async with aiohttp.ClientSession() as s:
            for method, path, body in (
                ("POST", "/admin/purge-payments", None),
                ("PUT", "/admin/configurations/delay", {"delay": 0}),
                ("PUT", "/admin/configurations/failure", {"failure": False}),
                ("PUT", "/admin/sim/fault", {"mode": "none"}),
            ):
                st, _ = await call(s, method, sim_url + path, json=body, headers=ADMIN)
                assert st == 200, (path, st)

    run(reset())
    return sim_url


async def stored(s, url) -> list[dict]:
    st, body = await call_json(s, "GET", url + "/admin/sim/payments", headers=ADMIN)
    assert st == 200
    return body["payments"]


async def summary(s, url, **params) -> dict:
    q = "&".join(f"{k}={v}" for k, v in params.items())
    st, body = await call_json(s, "GET", f"{url}/admin/payments-summary?{q}", headers=ADMIN)
    assert st == 200, st
    return body


def test_delay_then_500_stores_nothing(sim):
    async def go():
        async with aiohttp.ClientSession() as s:
            await call(s, "PUT", sim + "/admin/configurations/delay", json={"delay": 200}, headers=ADMIN)
            await call(s, "PUT", sim + "/admin/configurations/failure", json={"failure": True}, headers=ADMIN)
            t = time.monotonic()
            st, _ = await call(s, "POST", sim + "/payments", json=payment())
            elapsed = time.monotonic() - t
            assert st == 500
            assert elapsed >= 0.19
            assert await stored(s, sim) == []
            assert (await summary(s, sim))["totalRequests"] == 0
            _, stats = await call_json(s, "GET", sim + "/admin/sim/stats", headers=ADMIN)
            assert stats["payments_500"] >= 1

    run(go())


def test_200_stores_rounded_amount_half_even(sim):
    async def go():
        async with aiohttp.ClientSession() as s:
            cases = {"19.905": "19.90", "19.915": "19.92", "19.9": "19.90", "7": "7.00",
                     "0.125": "0.12", "0.135": "0.14", "19.9049999999": "19.90"}
            ids = {}
            for text, _ in cases.items():
                cid = str(uuid.uuid4())
                ids[text] = cid
                raw = ('{"correlationId":"%s","amount":%s,"requestedAt":"%s"}' % (cid, text, TS)).encode()
                st, body = await call_json(s, "POST", sim + "/payments", data=raw,
                                           headers={"Content-Type": "application/json"})
                assert st == 200, (text, st)
                assert body == {"message": "payment processed successfully"}
            by_id = {p["correlationId"]: p for p in await stored(s, sim)}
            for text, want in cases.items():
                p = by_id[ids[text]]
                assert Decimal(str(p["amount"])) == Decimal(want), (text, p)
                assert p["requestedAt"] == TS
                assert p["fee"] == 0.05
            # GET /payments/{id}, with the amount as an exact 2-decimal JSON number
            st, raw = await call(s, "GET", f"{sim}/payments/{ids['19.905']}")
            assert st == 200
            assert b'"amount":19.90' in raw
            assert b'"requestedAt":"2025-07-10T12:34:56.789"' in raw
            st, raw = await call(s, "GET", f"{sim}/payments/{ids['19.905'].upper()}")
            assert st == 200
            total = sum(Decimal(v) for v in cases.values())
            summ = await summary(s, sim)
            assert summ["totalRequests"] == len(cases)
            assert Decimal(str(summ["totalAmount"])) == total
            assert Decimal(str(summ["totalFee"])) == total * Decimal("0.05")
            assert summ["feePerTransaction"] == 0.05

    run(go())


def test_duplicate_is_422_and_changes_nothing(sim):
    async def go():
        async with aiohttp.ClientSession() as s:
            cid = str(uuid.uuid4())
            assert (await call(s, "POST", sim + "/payments", json=payment(10, cid)))[0] == 200
            assert (await call(s, "POST", sim + "/payments", json=payment(20, cid)))[0] == 422
            assert (await call(s, "POST", sim + "/payments",
                               json=payment(20, cid.upper(), "2025-01-01T00:00:00Z")))[0] == 422
            [p] = await stored(s, sim)
            assert (p["amount"], p["requestedAt"]) == (10, TS)

            # Two concurrent requests with the same id during a delay: exactly one wins.
            await call(s, "PUT", sim + "/admin/configurations/delay", json={"delay": 100}, headers=ADMIN)
            cid2 = str(uuid.uuid4())
            results = await asyncio.gather(
                *(call(s, "POST", sim + "/payments", json=payment(1, cid2)) for _ in range(5)))
            assert sorted(st for st, _ in results) == [200, 422, 422, 422, 422]
            assert len(await stored(s, sim)) == 2

    run(go())


BAD_BODIES = [
    b"not json",
    b"",
    b"[]",
    b'"x"',
    b'{"amount": 19.9, "requestedAt": "2025-07-10T12:34:56.789Z"}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "requestedAt": "2025-07-10T12:34:56.789Z"}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.9}',
    b'{"correlationId": "not-a-uuid", "amount": 19.9, "requestedAt": "2025-07-10T12:34:56.789Z"}',
    b'{"correlationId": 12, "amount": 19.9, "requestedAt": "2025-07-10T12:34:56.789Z"}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": "19.9", "requestedAt": "2025-07-10T12:34:56.789Z"}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": true, "requestedAt": "2025-07-10T12:34:56.789Z"}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": NaN, "requestedAt": "2025-07-10T12:34:56.789Z"}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": null, "requestedAt": "2025-07-10T12:34:56.789Z"}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.9, "requestedAt": "yesterday"}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.9, "requestedAt": "2025-02-30T00:00:00Z"}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.9, "requestedAt": 1752582896000}',
    b'{"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 1e1000000, "requestedAt": "2025-07-10"}',
]


def test_malformed_bodies_are_400_immediately(sim):
    async def go():
        async with aiohttp.ClientSession() as s:
            # the delay is not applied to a request that cannot be bound
            await call(s, "PUT", sim + "/admin/configurations/delay", json={"delay": 1000}, headers=ADMIN)
            t = time.monotonic()
            results = await asyncio.gather(
                *(call(s, "POST", sim + "/payments", data=b,
                       headers={"Content-Type": "application/json"}) for b in BAD_BODIES))
            assert time.monotonic() - t < 0.9
            for b, (st, _) in zip(BAD_BODIES, results):
                assert st == 400, b
            assert await stored(s, sim) == []
            # a JSON body under another Content-Type is refused (415), as ASP.NET does
            good = orjson.dumps(payment())
            for ctype in ("text/plain", "application/x-www-form-urlencoded"):
                st, _ = await call(s, "POST", sim + "/payments", data=good, headers={"Content-Type": ctype})
                assert st == 415, ctype
            assert await stored(s, sim) == []
            st, _ = await call(s, "GET", sim + "/payments/not-a-uuid")
            assert st == 400
            st, _ = await call(s, "GET", f"{sim}/payments/{uuid.uuid4()}")
            assert st == 404

    run(go())


def test_admin_token_401_and_token_change(sim):
    async def go():
        async with aiohttp.ClientSession() as s:
            admin_calls = [
                ("GET", "/admin/payments-summary", None),
                ("PUT", "/admin/configurations/delay", {"delay": 5}),
                ("PUT", "/admin/configurations/failure", {"failure": True}),
                ("PUT", "/admin/configurations/token", {"token": "x"}),
                ("POST", "/admin/purge-payments", None),
                ("GET", "/admin/sim/stats", None),
                ("PUT", "/admin/sim/fault", {"mode": "hang"}),
                ("GET", "/admin/sim/payments", None),
            ]
            for method, path, body in admin_calls:
                for hdr in (None, {"X-Rinha-Token": "wrong"}):
                    st, _ = await call(s, method, sim + path, json=body, headers=hdr)
                    assert st == 401, (path, hdr)
            # nothing changed
            _, stats = await call_json(s, "GET", sim + "/admin/sim/stats", headers=ADMIN)
            assert stats["payments_ok"] >= 0
            st, body = await call_json(s, "GET", sim + "/admin/payments-summary", headers=ADMIN)
            assert st == 200
            st, _ = await call(s, "PUT", sim + "/admin/configurations/token",
                               json={"token": "s3cret"}, headers=ADMIN)
            assert st == 204
            try:
                st, _ = await call(s, "GET", sim + "/admin/payments-summary", headers=ADMIN)
                assert st == 401
                st, body = await call_json(s, "GET", sim + "/admin/payments-summary",
                                           headers={"X-Rinha-Token": "s3cret"})
                assert st == 200 and body["totalRequests"] == 0
            finally:
                st, _ = await call(s, "PUT", sim + "/admin/configurations/token",
                                   json={"token": TOKEN}, headers={"X-Rinha-Token": "s3cret"})
                assert st == 204
            st, body = await call_json(s, "PUT", sim + "/admin/configurations/delay",
                                       json={"delay": 7}, headers=ADMIN)
            assert (st, body) == (200, {"config": "delay", "was": 0, "is": 7})
            st, _ = await call(s, "PUT", sim + "/admin/configurations/delay",
                               json={"delay": "soon"}, headers=ADMIN)
            assert st == 400
            st, _ = await call(s, "PUT", sim + "/admin/sim/fault", json={"mode": "explode"}, headers=ADMIN)
            assert st == 400

    run(go())


def test_summary_bounds_are_inclusive(sim):
    async def go():
        async with aiohttp.ClientSession() as s:
            times = ["2025-07-10T12:00:00.000Z", "2025-07-10T12:00:05.500Z",
                     "2025-07-10T12:00:10.000Z", "2025-07-10T12:00:10.000123Z"]
            for i, t in enumerate(times):
                assert (await call(s, "POST", sim + "/payments", json=payment(10 + i, requested_at=t)))[0] == 200

            async def count(**p):
                return (await summary(s, sim, **p))["totalRequests"]

            frm, to = times[0], times[2]
            assert await count(**{"from": frm, "to": to}) == 3  # both ends included
            got = await summary(s, sim, **{"from": frm, "to": to})
            assert Decimal(str(got["totalAmount"])) == Decimal("33.00")
            assert await count(**{"from": "2025-07-10T12:00:00.001Z", "to": to}) == 2
            assert await count(**{"from": frm, "to": "2025-07-10T12:00:09.999Z"}) == 2
            assert await count(**{"from": frm, "to": "2025-07-10T12:00:10.000123Z"}) == 4
            # other spellings of the same instants: offset, naive (UTC), more fraction digits
            assert await count(**{"from": "2025-07-10T09:00:00-03:00", "to": "2025-07-10T12:00:10"}) == 3
            assert await count(**{"from": "2025-07-10T12:00:00.0000000Z",
                                  "to": "2025-07-10T12:00:10.0001239Z"}) == 4
            # a missing bound means everything; from > to means nothing
            assert await count(**{"from": frm}) == 4
            assert await count(to=frm) == 4
            assert await count() == 4
            assert await count(**{"from": to, "to": frm}) == 0
            st, _ = await call(s, "GET", sim + "/admin/payments-summary?from=garbage&to=x", headers=ADMIN)
            assert st == 400

    run(go())


def test_purge(sim):
    async def go():
        async with aiohttp.ClientSession() as s:
            cid = str(uuid.uuid4())
            assert (await call(s, "POST", sim + "/payments", json=payment(cid=cid)))[0] == 200
            assert (await call(s, "POST", sim + "/admin/purge-payments"))[0] == 401
            assert (await summary(s, sim))["totalRequests"] == 1
            st, body = await call_json(s, "POST", sim + "/admin/purge-payments", headers=ADMIN)
            assert st == 200 and body == {"message": "All payments purged."}
            assert (await summary(s, sim))["totalRequests"] == 0
            assert (await call(s, "GET", f"{sim}/payments/{cid}"))[0] == 404
            # the id can be used again after a purge
            assert (await call(s, "POST", sim + "/payments", json=payment(cid=cid)))[0] == 200

    run(go())


def test_client_giving_up_during_delay_still_stores(sim):
    async def go():
        async with aiohttp.ClientSession() as s:
            await call(s, "PUT", sim + "/admin/configurations/delay", json={"delay": 300}, headers=ADMIN)
            cid = str(uuid.uuid4())
            with pytest.raises(asyncio.TimeoutError):
                await call(s, "POST", sim + "/payments", json=payment(cid=cid), timeout=0.1)
            await asyncio.sleep(0.35)
            assert [p["correlationId"] for p in await stored(s, sim)] == [cid]

    run(go())


def test_faults(sim):
    async def go():
        async with aiohttp.ClientSession() as s:
            async def fault(mode):
                st, _ = await call(s, "PUT", sim + "/admin/sim/fault", json={"mode": mode}, headers=ADMIN)
                assert st == 200

            async def ids():
                return {p["correlationId"] for p in await stored(s, sim)}

            await fault("reset")
            cid = str(uuid.uuid4())
            with pytest.raises(aiohttp.ClientError):
                await call(s, "POST", sim + "/payments", json=payment(cid=cid))
            assert cid in await ids()

            await fault("reset_before")
            cid = str(uuid.uuid4())
            with pytest.raises(aiohttp.ClientError):
                await call(s, "POST", sim + "/payments", json=payment(cid=cid))
            assert cid not in await ids()

            await fault("garbage")
            cid = str(uuid.uuid4())
            st, body = await call(s, "POST", sim + "/payments", json=payment(cid=cid))
            assert st == 200
            with pytest.raises(ValueError):
                orjson.loads(body)
            assert cid in await ids()

            await fault("hang")
            cid = str(uuid.uuid4())
            with pytest.raises(asyncio.TimeoutError):
                await call(s, "POST", sim + "/payments", json=payment(cid=cid), timeout=0.3)
            assert cid in await ids()

            await fault("none")
            assert (await call(s, "POST", sim + "/payments", json=payment()))[0] == 200
            await asyncio.sleep(0.1)  # the hung handler notices its client left
            _, stats = await call_json(s, "GET", sim + "/admin/sim/stats", headers=ADMIN)
            assert stats["active"] == 0 and stats["queued"] == 0

    run(go())


# -- in-process instances with small limits -------------------------------------

@contextlib.asynccontextmanager
async def serve(**kw):
    state = simulator.SimState(kw.pop("fee", 0.05), **kw)
    srv = await simulator.start_server(state, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{srv.port}", state
    finally:
        await srv.shutdown(timeout=0.5)


def test_health_rate_limit_shared_window_queue_of_two():
    async def go():
        async with serve(fee=0.15, name="fallback", health_window=0.5) as (url, state), \
                aiohttp.ClientSession() as s:
            state.delay_ms = 42

            async def timed():
                t = time.monotonic()
                st, body = await call(s, "GET", url + "/payments/service-health")
                return st, body, time.monotonic() - t

            # 1st caller answered at once, 2 held for the next windows, the 4th refused at once
            results = await asyncio.gather(*(timed() for _ in range(4)))
            results.sort(key=lambda r: r[2])
            statuses = [r[0] for r in results]
            assert sorted(statuses) == [200, 200, 200, 429]
            fast = [r for r in results if r[2] < 0.2]
            assert sorted(r[0] for r in fast) == [200, 429]
            held = sorted(r[2] for r in results if r[0] == 200 and r[2] >= 0.2)
            assert len(held) == 2
            assert 0.3 < held[0] < 0.75 and 0.8 < held[1] < 1.25
            assert orjson.loads(results[-1][1]) == {"failing": False, "minResponseTime": 42}
            assert state.counters["health_ok"] == 3 and state.counters["health_429"] == 1

            # a permit not used in its window is not carried over; the next window has one
            await asyncio.sleep(0.55)
            state.failure = True
            st1, body1 = await call(s, "GET", url + "/payments/service-health")
            assert st1 == 503  # the real service answers 503 while failing
            assert orjson.loads(body1) == {"failing": True, "minResponseTime": 42}

    run(go())


def test_payments_concurrency_limit_429():
    async def go():
        async with serve(fee=0.05, max_active=2, max_queued=1) as (url, state), \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            state.delay_ms = 300

            async def timed(i):
                t = time.monotonic()
                st, _ = await call(s, "POST", url + "/payments", json=payment(i))
                return st, time.monotonic() - t

            results = await asyncio.gather(*(timed(i) for i in range(5)))
            statuses = sorted(st for st, _ in results)
            assert statuses == [200, 200, 200, 429, 429]
            assert all(dt < 0.2 for st, dt in results if st == 429)
            # the queued one waited for a slot: about two delays
            assert max(dt for st, dt in results if st == 200) >= 0.55
            assert state.limiter.max_active_seen == 2
            assert state.counters["payments_429"] == 2 and state.counters["payments_ok"] == 3
            assert state.limiter.active == 0 and state.limiter.queued == 0
            assert len(state.payments) == 3

    run(go())


def test_client_leaving_while_queued_is_not_served():
    async def go():
        async with serve(max_active=1, max_queued=1) as (url, state), \
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            state.delay_ms = 300
            first = asyncio.ensure_future(call(s, "POST", url + "/payments", json=payment()))
            await asyncio.sleep(0.05)
            with pytest.raises(asyncio.TimeoutError):  # queued behind the first, then gives up
                await call(s, "POST", url + "/payments", json=payment(), timeout=0.1)
            assert (await first)[0] == 200
            await asyncio.sleep(0.1)
            assert len(state.payments) == 1
            assert state.limiter.active == 0 and state.limiter.queued == 0

    run(go())


# -- HTTP framing of the server the CLI runs -------------------------------------

async def exchange(port, data: bytes, *, until_close=False, timeout=3.0) -> bytes:
    """Send raw bytes on a fresh connection; read until the peer closes (or the timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                out += chunk
    except TimeoutError:
        if until_close:
            raise
    finally:
        writer.close()
    return out


def responses(raw: bytes) -> list[tuple[int, dict, bytes]]:
    """Split a stream of HTTP/1.x responses with Content-Length (or none) into (status, headers, body)."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        n = int(headers.get("content-length", 0))
        out.append((int(lines[0].split()[1]), headers, raw[:n]))
        raw = raw[n:]
    return out


def post(body: bytes, extra: str = "", version: str = "1.1") -> bytes:
    return (f"POST /payments HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def test_server_http_framing():
    async def go():
        async with serve() as (url, state):
            port = int(url.rsplit(":", 1)[1])
            body = orjson.dumps(payment())

            # pipelined: answers in request order, even when the first must wait
            state.delay_ms = 200
            raw = await exchange(port, post(body) + b"GET /payments/" + orjson.loads(body)["correlationId"].encode()
                                 + b" HTTP/1.1\r\nHost: x\r\n\r\n" + post(body, "Connection: close\r\n"),
                                 until_close=True)
            (s1, _, b1), (s2, _, b2), (s3, h3, b3) = responses(raw)
            assert (s1, b1) == (200, b'{"message":"payment processed successfully"}')
            assert s2 == 404  # read before the delayed payment was stored
            assert s3 == 422 and h3["connection"] == "close"
            state.delay_ms = 0

            # HEAD, unknown paths and methods, as aiohttp.web answers them
            cid = orjson.loads(body)["correlationId"]
            [(st, h, b)] = responses(await exchange(port, f"HEAD /payments/{cid} HTTP/1.1\r\nHost: x\r\n"
                                                    "Connection: close\r\n\r\n".encode(), until_close=True))
            assert st == 200 and b == b"" and int(h["content-length"]) > 0
            [(st, _, b)] = responses(await exchange(port, b"GET /nope HTTP/1.1\r\nConnection: close\r\n\r\n"))
            assert (st, b) == (404, b"404: Not Found")
            [(st, h, _)] = responses(await exchange(port, b"GET /payments HTTP/1.1\r\nConnection: close\r\n\r\n"))
            assert st == 405 and h["allow"] == "POST"
            [(st, h, _)] = responses(await exchange(
                port, b"DELETE /admin/payments-summary HTTP/1.1\r\nConnection: close\r\n\r\n"))
            assert st == 405 and h["allow"] == "GET,HEAD"

            # Expect: 100-continue gets the interim answer before the body is sent
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            other = orjson.dumps(payment())
            writer.write(post(other, "Expect: 100-continue\r\n")[:-len(other)])
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(other)
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)).startswith(b"HTTP/1.1 200 OK")
            writer.close()

            # HTTP/1.0 without keep-alive: answered in 1.0, then closed
            [(st, _, _)] = responses(raw := await exchange(port, post(orjson.dumps(payment()), version="1.0"),
                                                           until_close=True))
            assert st == 200 and raw.startswith(b"HTTP/1.0 200 OK\r\n")

            # a body over 1 MiB: 413; malformed HTTP: 400 and the connection closed
            [(st, _, _)] = responses(await exchange(port, post(b" " * (1024 * 1024 + 1), "Connection: close\r\n"),
                                                    until_close=True))
            assert st == 413
            [(st, h, _)] = responses(await exchange(port, b"GARBAGE\r\n\r\n", until_close=True))
            assert st == 400 and h["connection"] == "close"
            assert len(state.payments) == 3

    run(go())


def test_server_closes_idle_keepalive_connections(monkeypatch):
    monkeypatch.setattr(simulator, "KEEPALIVE_TIMEOUT", 0.5)

    async def go():
        async with serve() as (url, _):
            port = int(url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 404")
            await reader.readexactly(14)
            t = time.monotonic()
            assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by the server
            assert 0.3 < time.monotonic() - t < 1.5
            writer.close()

    run(go())


def test_server_shutdown_finishes_requests_in_flight():
    async def go():
        state = simulator.SimState(0.05)
        srv = await simulator.start_server(state, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{srv.port}"
        async with aiohttp.ClientSession() as s:
            state.delay_ms = 300
            delayed = asyncio.ensure_future(call(s, "POST", url + "/payments", json=payment()))
            await asyncio.sleep(0.1)
            t = time.monotonic()
            await srv.shutdown()
            assert (await delayed)[0] == 200
            assert 0.1 < time.monotonic() - t < 1.0
            assert len(state.payments) == 1
            with pytest.raises(aiohttp.ClientConnectionError):  # no longer listening
                await call(s, "GET", url + "/payments/service-health")

        # a hung request does not hold the shutdown
        srv = await simulator.start_server(state, "127.0.0.1", 0)
        state.delay_ms, state.fault = 0, "hang"
        async with aiohttp.ClientSession() as s:
            hung = asyncio.ensure_future(call(s, "POST", f"http://127.0.0.1:{srv.port}/payments", json=payment()))
            await asyncio.sleep(0.1)
            t = time.monotonic()
            await srv.shutdown()
            assert time.monotonic() - t < 0.5
            with pytest.raises(aiohttp.ClientError):
                await hung
            assert len(state.payments) == 2

    run(go())


def test_cli_sigterm_exits_cleanly_after_requests_in_flight():
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "simulator.py"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in proc.stdout.readline()

        async def go():
            url = f"http://127.0.0.1:{port}"
            async with aiohttp.ClientSession() as s:
                await call(s, "PUT", url + "/admin/configurations/delay", json={"delay": 300}, headers=ADMIN)
                delayed = asyncio.ensure_future(call(s, "POST", url + "/payments", json=payment()))
                await asyncio.sleep(0.1)
                proc.terminate()
                assert (await delayed)[0] == 200

        run(go())
        assert proc.wait(5) == 0
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- unit tests of the pieces ----------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("2025-07-10T12:34:56.789Z", "2025-07-10T12:34:56.789000+00:00"),
    ("2025-07-10T12:34:56Z", "2025-07-10T12:34:56+00:00"),
    ("2025-07-10T12:34:56.1234567Z", "2025-07-10T12:34:56.123456+00:00"),
    ("2025-07-10T12:34:56.789", "2025-07-10T12:34:56.789000+00:00"),
    ("2025-07-10T15:34:56.789+03:00", "2025-07-10T12:34:56.789000+00:00"),
    ("2025-07-10T09:34:56.789-0300", "2025-07-10T12:34:56.789000+00:00"),
    ("2025-07-10", "2025-07-10T00:00:00+00:00"),
])
def test_parse_timestamp(text, expected):
    import datetime as dt
    want = dt.datetime.fromisoformat(expected)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    assert simulator.parse_timestamp_us(text) == (want - epoch) // dt.timedelta(microseconds=1)


@pytest.mark.parametrize("text", ["", "2025-7-10", "2025-07-10T25:00:00Z", "2025-07-10T12:34:56.Z",
                                  "2025-07-10T12:34:56+3", "12:34:56", "2025-13-01T00:00:00Z"])
def test_parse_timestamp_rejects(text):
    with pytest.raises(ValueError):
        simulator.parse_timestamp_us(text)


@settings(max_examples=200, deadline=None)
@given(hs.integers(min_value=0, max_value=253402300799 * 1_000_000))
def test_timestamp_format_parse_roundtrip(us):
    assert simulator.parse_timestamp_us(simulator.format_timestamp_us(us)) == us
    assert simulator.parse_timestamp_us(simulator.format_timestamp_us(us, zulu=False)) == us


def test_state_is_usable_without_http():
    st = simulator.SimState(0.05, token="t")
    assert st.store_payment("a", Decimal("1.00"), 10)
    assert not st.store_payment("a", Decimal("2.00"), 20)
    assert st.store_payment("b", Decimal("2.50"), 20)
    assert st.summary(10, 10) == (1, Decimal("1.00"))
    assert st.summary(None, 15) == (2, Decimal("3.50"))
    st.purge()
    assert st.summary(None, None) == (0, Decimal(0))


def _outcome(parse, body):
    try:
        cid, amount, ts = parse(body)
    except simulator._BadRequest as e:
        return ("400", str(e))
    return cid, str(amount), ts  # str: Decimal("-0.00") == Decimal("0.00")


_digits = hs.text("0123456789", min_size=1, max_size=45)
_amount_text = hs.one_of(
    hs.sampled_from(["19.9", "19.90", "0", "-0", "-0.0", "0.005", "0.015", "-2.345", "1e2", "1E-3", "2.5e+1",
                     "79228162514264337593543950335", "79228162514264337593543950335.004",
                     "79228162514264337593543950336", "1e400", "02", "1.", ".5", "+1", "NaN", "-"]),
    hs.builds(lambda sign, i, f, e: sign + i + f + e,
              hs.sampled_from(["", "-"]), _digits,
              hs.one_of(hs.just(""), _digits.map(lambda d: "." + d)),
              hs.one_of(hs.just(""), hs.builds(lambda c, sg, d: c + sg + d[:7], hs.sampled_from("eE"),
                                               hs.sampled_from(["", "+", "-"]), _digits))),
)
_OUT_OF_RANGE = {0: [0], 1: [0, 13], 2: [0, 29, 30, 31, 32], 3: [24, 99], 4: [60], 5: [60]}


def _iso(fields, change, z):
    """A timestamp from valid fields, with at most one of them replaced by a value out of its range."""
    fields = list(fields)
    if change is not None:
        field, pick = change
        fields[field] = _OUT_OF_RANGE[field][pick % len(_OUT_OF_RANGE[field])]
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03d%s" % (*fields, z)


_timestamp_text = hs.one_of(
    hs.builds(_iso,
              hs.tuples(hs.integers(1, 9999), hs.integers(1, 12), hs.integers(1, 28), hs.integers(0, 23),
                        hs.integers(0, 59), hs.integers(0, 59), hs.integers(0, 999)),
              hs.one_of(hs.none(), hs.tuples(hs.integers(0, 5), hs.integers(0, 4))),
              hs.sampled_from(["Z", "Z", "Z", "z", "", "+03:00"])),
    hs.sampled_from(["2025-07-10", "2025-07-10T12:34:56Z", "2025-07-10T12:34:56.1234567Z", "yesterday", "",
                     "2025-07-10T12:34:56.78Z", "2025-02-30T00:00:00.000Z", "2025-07-10T12:34:56.789\u00e9Z"]),
)


@settings(max_examples=1000, deadline=None)
@given(hs.uuids().map(str), hs.booleans(), _amount_text, _timestamp_text,
       hs.sampled_from(["", " ", "\n", "\t ", "\x0b", "\u00a0"]))
def test_fast_payment_parser_agrees_with_json_loads(cid, upper, amount, ts, ws):
    cid = cid.upper() if upper else cid
    body = ('{%s"correlationId"%s:%s"%s",%s"amount":%s%s,"requestedAt"%s:"%s"%s}%s'
            % (ws, ws, ws, cid, ws, ws, amount, ws, ts, ws, ws)).encode()
    want = _outcome(simulator._parse_payment_json, body)
    assert _outcome(simulator._parse_payment, body) == want
    assert _outcome(simulator._parse_payment, body) == want  # again: the amount may now be cached
    if ws in ("", " ", "\n", "\t ") and re.fullmatch(r"-?(0|[1-9]\d{0,20})(\.\d{1,20})?([eE][-+]?\d{1,6})?", amount) \
            and re.fullmatch(r"[ -~]*", ts):
        assert simulator._FAST_PAYMENT_RE.match(body), body  # the fast path is the one tested


@pytest.mark.parametrize("amount,ts,ws", [
    ("19.9", "2025-07-10T12:34:56.789Z", ""),
    ("19.9", "2025-07-10T24:00:00.000Z", ""),
    ("19.9", "2025-07-10T23:60:00.000Z", ""),
    ("19.9", "2025-07-10T23:59:60.000Z", ""),
    ("19.9", "2025-07-10T23:59:59.999Z", ""),
    ("19.9", "2024-02-29T00:00:00.000Z", ""),
    ("19.9", "2025-02-29T00:00:00.000Z", ""),
    ("19.9", "2025-04-31T00:00:00.000Z", ""),
    ("19.9", "0000-01-01T00:00:00.000Z", ""),
    ("19.9", "0001-01-01T00:00:00.000Z", ""),
    ("19.9", "9999-12-31T23:59:59.999Z", ""),
    ("19.9", "1969-12-31T23:59:59.999Z", ""),
    ("19.9", "2025-07-10t12:34:56.789z", ""),
    ("19.9", "2025-07-10T12:34:56.78Z", ""),
    ("19.9", "2025-07-10T12:34:56.7891Z", ""),
    ("19.9", "2025-07-10T12:34:56Z", ""),
    ("19.9", "2025-07-10T12:34:56.789+03:00", ""),
    ("-0", TS, ""), ("-0.0", TS, ""), ("0e0", TS, ""), ("-0e5", TS, ""), ("7", TS, ""), ("0.125", TS, ""),
    ("0.135", TS, ""), ("-2.345", TS, ""), ("1E+2", TS, ""), ("1e-3", TS, ""), ("1e1000000", TS, ""),
    ("1e999999", TS, ""), ("79228162514264337593543950335.005", TS, ""), ("79228162514264337593543950336", TS, ""),
    ("1" * 45, TS, ""), ("1e400", "2025-07-10T24:00:00.000Z", ""),
    ("19.9", TS, " "), ("19.9", TS, "\r\n\t"), ("19.9", TS, "\x0b"), ("19.9", TS, "\x0c"), ("19.9", TS, "\u00a0"),
])
def test_fast_payment_parser_boundaries(amount, ts, ws):
    cid = "4A7901B8-7d26-4d9d-aa19-4dc1c7cf60b3"
    body = ('%s{"correlationId":%s"%s","amount":%s%s,"requestedAt":"%s"}%s' % (ws, ws, cid, amount, ws, ts, ws)).encode()
    assert _outcome(simulator._parse_payment, body) == _outcome(simulator._parse_payment_json, body)
    assert _outcome(simulator._parse_payment, body) == _outcome(simulator._parse_payment_json, body)
