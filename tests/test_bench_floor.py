"""bench/floor.cfg: HAProxy alone answers the backend's endpoints (the benchmark floor)."""

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

CFG = Path(__file__).resolve().parent.parent / "bench" / "floor.cfg"


def _haproxy():
    for cand in (shutil.which("haproxy"), "/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


HAPROXY = _haproxy()
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_floor_cfg_is_valid():
    out = subprocess.run([HAPROXY, "-c", "-f", str(CFG)], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def floor():
    port = _free_port()
    env = dict(os.environ, FLOOR_BIND=f"127.0.0.1:{port}")
    p = subprocess.Popen([HAPROXY, "-f", str(CFG), "-db"], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert p.poll() is None, p.stdout.read().decode(errors="replace")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "HAProxy did not listen within 10 s"
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        p.stdout.close()


def _call(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read()


def test_floor_answers_like_a_backend(floor):
    status, _ = _call("POST", f"{floor}/payments",
                      {"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.90})
    assert status == 202

    status, body = _call("GET", f"{floor}/payments-summary"
                                "?from=2025-07-10T12:34:56.000Z&to=2025-07-10T12:35:56.000Z")
    assert status == 200
    summary = json.loads(body)
    assert set(summary) == {"default", "fallback"}
    for side in summary.values():
        assert set(side) == {"totalRequests", "totalAmount"}
        assert isinstance(side["totalRequests"], int)
        assert isinstance(side["totalAmount"], (int, float))

    status, _ = _call("GET", f"{floor}/payments-summary")
    assert status == 200
    status, _ = _call("POST", f"{floor}/purge-payments")
    assert status == 200
