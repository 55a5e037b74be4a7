"""Tests of the payment processor simulator (simulator.py), over real loopback sockets.

Most tests talk to one simulator started as a subprocess through its CLI; the
limiter tests build their own instance with make_app() on a real port so that
they can use small limits and a fresh health window.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from decimal import Decimal

import aiohttp
import orjson
import pytest
from aiohttp import web
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
    app = simulator.make_app(**kw)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", app[simulator.STATE_KEY]
    finally:
        await runner.cleanup()


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
