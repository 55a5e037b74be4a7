"""Malformed HTTP and malformed JSON thrown at a real instance over its Unix socket.

Three hypothesis generators, each case on a fresh connection:
  - raw HTTP: request lines, headers and bodies built from valid and broken
    parts (bad methods, targets, versions, line endings, Content-Length and
    Transfer-Encoding conflicts, upgrades, NULs, truncation, pipelining);
  - payment bodies: JSON (and almost-JSON) of every shape at POST /payments;
  - summary bounds: timestamps and junk at GET /payments-summary.
For every case: whatever comes back is a well-formed sequence of HTTP/1.1
responses, none is a 5xx, none carries a traceback, a source path or an
internal error text, and every JSON answer has nosniff and no-store.
Afterwards the instance still serves, and its log has no error.

FUZZ_EXAMPLES sets the cases per generator (CI default 1500; `make chaos`
runs many more). atheris is not used: the parser is httptools (C, already
fuzzed upstream) and everything above it is Python reached through the
socket, which hypothesis covers with shrinking and without a rebuild.
"""
import json
import os
import shutil
import socket
import tempfile
import time
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stack import Stack, payment, read_until_close, record_metrics, request, split_responses, stop_fast, unix_connect

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "1500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True,
                suppress_health_check=list(HealthCheck))
LEAKS = (b"Traceback", b"File \"", b".py", b"/work/", b"/tmp/", b"site-packages", b"Exception", b"internal error")
CASES = {"raw": 0, "json": 0, "summary": 0}
STATUSES = {}


@pytest.fixture(scope="module")
def target():
    path = tempfile.mkdtemp(prefix="rinha-", dir="/tmp")
    stack = Stack(path, with_haproxy=False, REQUEST_TIMEOUT_S=1, KEEPALIVE_TIMEOUT_S=1)
    yield stack.instances[0]
    stop_fast(stack)
    shutil.rmtree(path, ignore_errors=True)


def exchange(inst, data):
    """Send raw bytes, half-close, read every answer until the server closes."""
    s = unix_connect(inst.socket, timeout=3)
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass                               # the server refused early and closed: read what it said
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        s.close()


def check(raw, what):
    """Every property of one answer stream; returns the statuses."""
    for leak in LEAKS:
        assert leak not in raw, (what, leak, raw[:600])
    responses = split_responses(raw)
    for status, headers, body in responses:
        STATUSES[status] = STATUSES.get(status, 0) + 1
        assert 200 <= status < 500, (what, status, body[:300])
        if headers.get("content-type", "").startswith("application/json"):
            assert headers.get("x-content-type-options") == "nosniff", (what, headers)
            assert headers.get("cache-control") == "no-store", (what, headers)
            json.loads(body)
    return [r[0] for r in responses]


# ----- raw HTTP ---------------------------------------------------------------------------

ROUTES = ["/payments", "/payments-summary", "/purge-payments", "/health", "/payments/" + str(uuid.uuid4()),
          "/metrics", "/metrics.json", "/stats", "/processors", "/report?from=2025-01-01T00:00:00Z", "/dashboard",
          "/admin/dead-letters/replay", "/", "*", "/payments/", "/payments-summary?from=2025-01-01T00:00:00Z",
          "http://x/payments", "/%00", "/payments/../health", "/payments?x=1"]
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT", b"PRI",
           b"get", b"POST ", b"", b"G\x00T", b"\xff\xfe"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1", b"", b"HTTP/1.1 x"]
HEADER_NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Content-Type", b"Expect",
                b"Upgrade", b"X-Admin-Token", b"Content-Encoding", b"Trailer", b"X-Forwarded-For", b"content-length",
                b"Content-Length ", b" Content-Length", b"Host\x00", b"", b"X\r\nY"]
HEADER_VALUES = [b"0", b"5", b"-1", b"18446744073709551616", b"99999999999999999999999", b"1e3", b" 12 ", b"0x10",
                 b"chunked", b"gzip, chunked", b"chunked, gzip", b"identity", b"close", b"keep-alive", b"upgrade",
                 b"h2c", b"websocket", b"100-continue", b"application/json", b"\x00", b"\xff", b"a\rb", b"", b"16385"]
EOLS = [b"\r\n", b"\n", b"\r", b"\r\r\n"]


@st.composite
def raw_request(draw):
    eol = draw(st.sampled_from(EOLS)) if draw(st.integers(0, 9)) == 0 else b"\r\n"
    method = draw(st.sampled_from(METHODS) | st.binary(min_size=0, max_size=8))
    target = draw(st.sampled_from(ROUTES)).encode() if draw(st.booleans()) else draw(st.binary(max_size=40))
    version = draw(st.sampled_from(VERSIONS))
    line = draw(st.sampled_from([method + b" " + target + b" " + version, method + b" " + target,
                                 method + b"  " + target + b" " + version, target]))
    headers = draw(st.lists(st.tuples(st.sampled_from(HEADER_NAMES) | st.binary(max_size=12),
                                      st.sampled_from(HEADER_VALUES) | st.binary(max_size=24)), max_size=6))
    body_kind = draw(st.sampled_from(["none", "json", "binary", "chunked", "bad-chunked"]))
    if body_kind == "json":
        body = json.dumps(payment(draw(st.sampled_from([19.9, 0.01, -1, 1e300])))).encode()
    elif body_kind == "binary":
        body = draw(st.binary(max_size=64))
    elif body_kind == "chunked":
        data = json.dumps(payment()).encode()
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    elif body_kind == "bad-chunked":
        body = draw(st.sampled_from([b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nab\r\n", b"ffffffffffffffffff\r\n",
                                     b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: y\r\n\r\n", b"-1\r\n\r\n"]))
    else:
        body = b""
    if body and draw(st.booleans()):
        headers.append((b"Content-Length", str(len(body)).encode()))
    head = line + eol + b"".join(name + b": " + value + eol for name, value in headers) + eol
    data = head + body
    cut = draw(st.sampled_from(["whole", "whole", "truncated"]))
    if cut == "truncated" and data:
        data = data[:draw(st.integers(0, len(data) - 1))]
    return data


@FUZZ
@given(st.lists(raw_request(), min_size=1, max_size=3))
def test_fuzz_raw_http(target, requests):
    CASES["raw"] += 1
    data = b"".join(requests)
    check(exchange(target, data), data[:300])


# ----- payment bodies ---------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats(allow_nan=False)
                | st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
ids = (st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper()) | st.uuids().map(lambda u: u.hex)
       | st.uuids().map(lambda u: "{%s}" % u) | st.uuids().map(lambda u: str(u) + "\n") | st.text(max_size=40)
       | json_values)
amounts = (st.floats(allow_nan=False) | st.floats(min_value=-1, max_value=2e9) | st.integers(-(2 ** 70), 2 ** 70)
           | st.decimals(allow_nan=False, allow_infinity=False, places=4).map(float)
           | st.sampled_from([0.005, 0.004, 0.015, 1e-300, 5e-324, 999999999.995, 1000000000.0, 1000000000.01])
           | json_values)


@st.composite
def payment_body(draw):
    kind = draw(st.sampled_from(["object", "object", "object", "any-json", "mutated", "raw-number"]))
    if kind == "any-json":
        return json.dumps(draw(json_values)).encode()
    if kind == "raw-number":   # number texts json.dumps never writes
        number = draw(st.sampled_from([b"1e999", b"-0", b"00.1", b"1.", b".5", b"1e-999", b"NaN", b"Infinity",
                                       b"0x10", b"1_000", b"+1", b"9" * 400, b"1" + b"0" * 30]))
        return b'{"correlationId":"%s","amount":%s}' % (str(uuid.uuid4()).encode(), number)
    body = {}
    if draw(st.integers(0, 9)):
        body["correlationId"] = draw(ids)
    if draw(st.integers(0, 9)):
        body["amount"] = draw(amounts)
    body.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    data = json.dumps(body).encode()
    if kind == "mutated" and data:
        at = draw(st.integers(0, len(data) - 1))
        data = data[:at] + draw(st.binary(min_size=0, max_size=3)) + data[at + draw(st.integers(0, 2)):]
    return data


@FUZZ
@given(payment_body())
def test_fuzz_payment_json(target, body):
    CASES["json"] += 1
    head = b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    statuses = check(exchange(target, head % len(body) + body), body[:300])
    assert len(statuses) == 1 and statuses[0] in (202, 400, 409, 413), (statuses, body[:300])


# ----- summary bounds ---------------------------------------------------------------------

timestamps = (st.datetimes().map(lambda d: d.isoformat())
              | st.datetimes().map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (d.microsecond // 1000))
              | st.text(alphabet="0123456789-:TZ.+ ", max_size=40)
              | st.from_regex(r"\A\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d{1,15})?)?)?(Z|[+-]\d{2}(:?\d{2})?)?\Z")
              | st.text(max_size=30))


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["from", "to", "From", "to[]", ""]), timestamps), max_size=3),
       st.booleans())
def test_fuzz_summary_bounds(target, params, encode):
    CASES["summary"] += 1
    from urllib.parse import quote
    query = "&".join("%s=%s" % (k, quote(v, safe="") if encode else v.replace(" ", "%20").replace("#", "%23"))
                     for k, v in params)
    data = ("GET /payments-summary?%s HTTP/1.1\r\nHost: x\r\n\r\n" % query).encode("utf-8", "surrogatepass")
    statuses = check(exchange(target, data), data[:300])
    assert statuses in ([200], [400], [431]), (statuses, data[:300])


# ----- afterwards -------------------------------------------------------------------------

def test_fuzzed_instance_still_serves_and_logged_no_error(target):
    """Runs after the generators (file order): the instance is up, answers, and logged no error."""
    assert target.process.poll() is None, "the instance died"
    status, _, _ = request(target.socket, "POST", "/payments", payment(19.90))
    assert status == 202
    assert target.get("/health")[0] == 200
    time.sleep(0.2)
    errors = [line for line in target.log().splitlines()
              if '"level":"ERROR"' in line or '"level":"CRITICAL"' in line or "Traceback" in line]
    record_metrics("fuzz", cases=dict(CASES), total_cases=sum(CASES.values()),
                   statuses={str(k): v for k, v in sorted(STATUSES.items())}, errors_logged=len(errors))
    assert errors == [], errors[:3]


# ----- every route and every error: clean answers ----------------------------------------

OBSERVABILITY = ["/metrics", "/metrics.json", "/stats", "/processors", "/report", "/dashboard"]


@pytest.fixture(scope="module")
def sweep_stack():
    path = tempfile.mkdtemp(prefix="rinha-", dir="/tmp")
    stack = Stack(path, QUEUE_CAPACITY=3, PURGE_ENABLED="false", ADMIN_TOKEN="t0ken", REQUEST_TIMEOUT_S=1)
    stack.default.configure(failure=True)      # payments stay pending: the queue cap is reachable
    stack.fallback.configure(failure=True)
    yield stack
    for inst in stack.instances:               # nothing to keep: skip the shutdown grace and hand-over
        inst.process.kill()
    stop_fast(stack)
    shutil.rmtree(path, ignore_errors=True)


def clean(status, headers, body, what):
    headers = {k.lower(): v for k, v in headers.items()}
    for leak in LEAKS:
        assert leak not in body, (what, leak, body[:300])
    if headers.get("content-type", "").startswith("application/json"):
        assert headers.get("x-content-type-options") == "nosniff", (what, headers)
        assert headers.get("cache-control") == "no-store", (what, headers)
        json.loads(body)
    else:
        assert status == 202 and body == b"" or status < 300, ("non-JSON answer", what, status, headers)


def test_every_route_and_error_is_clean(sweep_stack):
    one, two = sweep_stack.instances
    known = payment(12.34)
    seen = {}

    def check_one(target, method, path, body=None, headers=None, expect=None):
        status, hdrs, data = request(target, method, path, body, headers)
        clean(status, hdrs, data, (method, path))
        if expect is not None:
            assert status == expect, (method, path, status, data)
        seen[(method, path.split("?")[0] if not path.startswith("/payments/") else "/payments/{id}", status)] = \
            hdrs.get("content-type", hdrs.get("Content-Type"))
        return status

    for target in (one.socket, sweep_stack.port):
        check_one(target, "GET", "/health", expect=200)
        check_one(target, "GET", "/payments-summary", expect=200)
        check_one(target, "GET", "/payments-summary?from=2025-01-01T00:00:00Z&to=2030-01-01T00:00:00.000Z", expect=200)
        check_one(target, "GET", "/payments-summary?from=yesterday", expect=400)
        check_one(target, "POST", "/payments", b"{nope", expect=400)
        check_one(target, "POST", "/payments", {"correlationId": "x", "amount": 1}, expect=400)
        check_one(target, "GET", "/payments/%s" % uuid.uuid4(), expect=404)
        check_one(target, "GET", "/nope", expect=404)
        for method, path, allowed in (("GET", "/payments", "POST"), ("PUT", "/payments-summary", "GET"),
                                      ("DELETE", "/purge-payments", "POST"), ("GET", "/admin/dead-letters/replay",
                                                                               "POST"),
                                      ("POST", "/health", "GET"), ("POST", "/payments/%s" % uuid.uuid4(), "GET")):
            status, hdrs, data = request(target, method, path)
            clean(status, hdrs, data, (method, path))
            assert status == 405 and hdrs.get("allow", hdrs.get("Allow")) == allowed, (method, path, status)
        check_one(target, "POST", "/purge-payments", expect=403)
        check_one(target, "POST", "/admin/dead-letters/replay", expect=401)
        check_one(target, "POST", "/admin/dead-letters/replay", headers={"X-Admin-Token": "wrong"}, expect=401)
        check_one(target, "POST", "/admin/dead-letters/replay", headers={"X-Admin-Token": "t0ken"}, expect=200)
        for path in OBSERVABILITY:                 # present in some versions: clean when present
            check_one(target, "GET", path)
    # stateful answers, on the instance itself
    assert check_one(one.socket, "POST", "/payments", known) == 202
    check_one(one.socket, "POST", "/payments", dict(known, amount=1.00), expect=409)
    check_one(one.socket, "GET", "/payments/" + known["correlationId"], expect=200)
    check_one(two.socket, "GET", "/payments/" + known["correlationId"], expect=200)   # asked of the peer
    while check_one(one.socket, "POST", "/payments", payment()) == 202:
        pass
    status, hdrs, data = request(one.socket, "POST", "/payments", payment())
    clean(status, hdrs, data, "queue full")
    assert status == 503 and hdrs["retry-after"] == "1"
    # framing errors, from the server itself
    for raw, expect in ((b"NOT HTTP\r\n\r\n", 400),
                        (b"POST /payments HTTP/1.1\r\nContent-Length: 100000\r\n\r\n", 413),
                        (b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
                        (b"POST /payments HTTP/1.1\r\nContent-Length: 50\r\n\r\n{", 408)):
        s = unix_connect(one.socket, timeout=5)
        try:
            s.sendall(raw)
            (status, hdrs, body), = split_responses(read_until_close(s))
        finally:
            s.close()
        clean(status, hdrs, body, raw[:30])
        assert status == expect and hdrs["connection"] == "close"
        seen[("raw", raw[:12].decode(), status)] = hdrs.get("content-type")
    # HAProxy's own error pages (no instance behind, or a request it refuses) leak nothing either
    status, _, body = request(sweep_stack.port, "GET", "/health", headers={"Content-Length": "x"})
    for leak in LEAKS:
        assert leak not in body
    record_metrics("route-sweep", answers=len(seen),
                   statuses=sorted({"%s %s %d" % k for k in seen if k[0] != "raw"}),
                   non_json=sorted({"%s %s %d -> %s" % (k + (v,)) for k, v in seen.items()
                                    if v is not None and not v.startswith("application/json")}))
