"""The HTTP layer over a real Unix socket: framing, limits, timeouts, pipelining."""
import json
import shutil
import socket
import tempfile
import time
import uuid

import pytest

from stack import Stack, read_until_close


@pytest.fixture(scope="module")
def inst():
    path = tempfile.mkdtemp(prefix="rinha-", dir="/tmp")
    stack = Stack(path, with_haproxy=False, REQUEST_TIMEOUT_S=1, KEEPALIVE_TIMEOUT_S=1.5)
    yield stack.instances[0]
    stack.stop()
    shutil.rmtree(path, ignore_errors=True)


def connect(inst):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(inst.socket)
    return s


def read_responses(s, count):
    """Read `count` responses (Content-Length framed) from a kept-alive connection."""
    buf, out = b"", []
    while len(out) < count:
        while b"\r\n\r\n" not in buf:
            data = s.recv(65536)
            assert data, "connection closed early after %d responses" % len(out)
            buf += data
        head, rest = buf.split(b"\r\n\r\n", 1)
        length = int([l for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0].split(b":")[1])
        while len(rest) < length:
            rest += s.recv(65536)
        out.append((int(head.split(b" ")[1]), head, rest[:length]))
        buf = rest[length:]
    return out


def payment_request(extra_headers=b"", body=None):
    body = body or json.dumps({"correlationId": str(uuid.uuid4()), "amount": 1.5}).encode()
    return (b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%sContent-Length: %d\r\n\r\n%s"
            % (extra_headers, len(body), body))


def test_pipelined_requests_answered_in_order(inst):
    s = connect(inst)
    batch = payment_request() + b"GET /nope HTTP/1.1\r\n\r\n" + payment_request() + \
        b"GET /payments-summary HTTP/1.1\r\n\r\n" + b"POST /payments HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}"
    s.sendall(batch)
    statuses = [r[0] for r in read_responses(s, 5)]
    assert statuses == [202, 404, 202, 200, 400]
    s.close()


def test_request_split_byte_by_byte(inst):
    s = connect(inst)
    for byte in payment_request():
        s.send(bytes([byte]))
    assert read_responses(s, 1)[0][0] == 202
    s.close()


def test_chunked_body(inst):
    body = json.dumps({"correlationId": str(uuid.uuid4()), "amount": 2.25}).encode()
    s = connect(inst)
    s.sendall(b"POST /payments HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
              % (10, body[:10], len(body) - 10, body[10:]))
    assert read_responses(s, 1)[0][0] == 202
    s.close()


def test_connection_close_is_honoured(inst):
    s = connect(inst)
    s.sendall(b"GET /health HTTP/1.1\r\nConnection: close\r\n\r\n")
    data = read_until_close(s)
    assert data.startswith(b"HTTP/1.1 200") and b"connection: close" in data.lower()
    assert s.recv(1) == b""      # closed by the server, not a timeout of ours


def test_http10_closes_unless_keep_alive(inst):
    s = connect(inst)
    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
    assert read_until_close(s).startswith(b"HTTP/1.1 200")
    s = connect(inst)
    s.sendall(b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, head, _ = read_responses(s, 1)[0]
    assert status == 200 and b"connection: keep-alive" in head.lower()
    s.close()


def test_malformed_http_is_400_and_closed(inst):
    s = connect(inst)
    s.sendall(b"THIS IS NOT HTTP\r\n\r\n")
    data = read_until_close(s)
    assert data.startswith(b"HTTP/1.1 400") and b"Traceback" not in data


def test_oversized_head_is_431(inst):
    s = connect(inst)
    s.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert read_until_close(s).startswith(b"HTTP/1.1 431")


def test_header_flood_without_end_is_431(inst):
    s = connect(inst)
    s.sendall(b"GET /health HTTP/1.1\r\n")
    try:
        for i in range(2000):
            s.sendall(b"X-H%d: v\r\n" % i)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert read_until_close(s).startswith(b"HTTP/1.1 431")


def test_announced_oversized_body_is_413_before_reading_it(inst):
    s = connect(inst)
    s.sendall(b"POST /payments HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
    assert read_until_close(s).startswith(b"HTTP/1.1 413")


def test_chunked_oversized_body_is_413(inst):
    s = connect(inst)
    s.sendall(b"POST /payments HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    try:
        for _ in range(40):
            s.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert read_until_close(s).startswith(b"HTTP/1.1 413")


def test_stalled_request_gets_408(inst):
    s = connect(inst)
    s.sendall(b"POST /payments HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"corr")
    started = time.monotonic()
    data = read_until_close(s)
    assert data.startswith(b"HTTP/1.1 408")
    assert 0.8 < time.monotonic() - started < 3


def test_idle_keep_alive_connection_is_closed(inst):
    s = connect(inst)
    s.sendall(b"GET /health HTTP/1.1\r\n\r\n")
    assert read_responses(s, 1)[0][0] == 200
    started = time.monotonic()
    assert s.recv(100) == b""          # closed by the server without another answer
    assert 1.0 < time.monotonic() - started < 4


def test_instance_still_serves_after_abuse(inst):
    for _ in range(20):
        s = connect(inst)
        s.sendall(b"\x00\xff garbage \r\n\r\n" * 3)
        s.close()
    s = connect(inst)
    s.sendall(payment_request())
    assert read_responses(s, 1)[0][0] == 202
    s.close()
