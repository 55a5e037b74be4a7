"""The benchmark's reference targets answer the backend's endpoints:
bench/floor.cfg (HAProxy alone, the floor) and bench/minimal_instance.py behind
the project's haproxy.cfg (the hop: no project work behind HAProxy); bench/probe.py
and bench/paired.py (two stacks in one k6 run) measure what they say."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CFG = ROOT / "bench" / "floor.cfg"


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


def _start(cmd, env=None):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop(processes):
    for p in processes:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        p.stdout.close()


def _wait_listening(p, port):
    deadline = time.monotonic() + 10
    while True:
        assert p.poll() is None, p.stdout.read().decode(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, "HAProxy did not listen within 10 s"
            time.sleep(0.05)


def _start_minimal_instance(sock):
    """bench/minimal_instance.py listening on `sock` (the process, once its socket exists)."""
    p = _start([sys.executable, str(ROOT / "bench" / "minimal_instance.py"), str(sock)])
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert p.poll() is None, p.stdout.read().decode(errors="replace")
        assert time.monotonic() < deadline, "minimal instance did not listen within 10 s"
        time.sleep(0.05)
    return p


@pytest.fixture
def floor():
    port = _free_port()
    p = _start([HAPROXY, "-f", str(CFG), "-db"], dict(os.environ, FLOOR_BIND=f"127.0.0.1:{port}"))
    try:
        _wait_listening(p, port)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop([p])


@pytest.fixture
def hop(tmp_path):
    """bench/run.py's hop target: the project's haproxy.cfg in front of two minimal instances."""
    port = _free_port()
    processes = []
    try:
        for i in (1, 2):
            sock = tmp_path / f"api{i}.sock"
            processes.append(_start_minimal_instance(sock))
        env = dict(os.environ, BIND=f"127.0.0.1:{port}", SOCKET_DIR=str(tmp_path))
        processes.append(_start([HAPROXY, "-f", str(ROOT / "haproxy.cfg"), "-db"], env))
        _wait_listening(processes[-1], port)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(processes)


def _call(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status, r.read()


@pytest.fixture(params=["floor", "hop"])
def target(request):
    return request.getfixturevalue(request.param)


def test_reference_targets_answer_like_a_backend(target):
    status, _ = _call("POST", f"{target}/payments",
                      {"correlationId": "4a7901b8-7d26-4d9d-aa19-4dc1c7cf60b3", "amount": 19.90})
    assert status == 202

    status, body = _call("GET", f"{target}/payments-summary"
                                "?from=2025-07-10T12:34:56.000Z&to=2025-07-10T12:35:56.000Z")
    assert status == 200
    summary = json.loads(body)
    assert set(summary) == {"default", "fallback"}
    for side in summary.values():
        assert set(side) == {"totalRequests", "totalAmount"}
        assert isinstance(side["totalRequests"], int)
        assert isinstance(side["totalAmount"], (int, float))

    status, _ = _call("GET", f"{target}/payments-summary")
    assert status == 200
    status, _ = _call("POST", f"{target}/purge-payments")
    assert status == 200


def test_probe_counts_a_minimal_instance(tmp_path):
    """bench/probe.py: round trips, and CPU and wake-ups per request of the processes it is given."""
    sock = tmp_path / "m.sock"
    server = _start_minimal_instance(sock)
    try:
        out = subprocess.run([sys.executable, str(ROOT / "bench" / "probe.py"), str(sock), "--requests", "40",
                              "--interval-ms", "1", "--pid", str(server.pid)],
                             capture_output=True, text=True, timeout=60)
    finally:
        _stop([server])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "statuses {202: 40}" in out.stdout
    # The minimal instance sleeps between requests: woken about once per request.
    wakes = float(out.stdout.split("woken ")[1].split()[0])
    assert 0.5 <= wakes <= 2.0, out.stdout


K6 = shutil.which("k6") or str(Path(sys.executable).parent / "k6")


@pytest.mark.skipif(not os.access(K6, os.X_OK), reason="k6 is not installed")
def test_paired_runs_two_stacks_in_one_k6_run(tmp_path):
    """bench/paired.py: both sides answer every other payment of one k6 run, side B with its own
    setting, the sides swap ports in the second round, and nothing is left running."""
    ports = (9999, 9998, 8001, 8002, 8011, 8012)          # paired.py's fixed slots
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use (a stack from `make up`?): paired.py needs it")
    schedule = tmp_path / "schedule.json"
    schedule.write_text('[{"at": 0, "default": {"delay": 0, "failure": false},'
                        ' "fallback": {"delay": 0, "failure": false}}]')
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "paired.py"), "--duration", "4", "--max-requests", "20",
                          "--schedule", str(schedule), "--rounds", "2", "--b-env", "DISPATCH_DELAY_S=0.005"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    saved = ROOT / out.stdout.split("saved ")[-1].strip()
    report = json.loads(saved.read_text())
    assert "DISPATCH_DELAY_S=0.005" in report["sides"]["B"]
    first, second = report["rounds"]
    assert first["ports"] == {"A": 9999, "B": 9998} and second["ports"] == {"A": 9998, "B": 9999}
    for rec in report["rounds"]:
        a, b = rec["A"], rec["B"]
        assert a["failed"] == 0 and b["failed"] == 0
        assert a["ok"] > 10 and abs(a["ok"] - b["ok"]) <= 1      # every other payment
        assert rec["ratios"]["p50_ms"] == round(b["p50_ms"] / a["p50_ms"], 3)
    # Side B's instances ran with its setting: in round 2 it was on the first slot (port 9999).
    log = (ROOT / "run" / "paired-0" / "api1.log").read_text().splitlines()
    ready = [json.loads(line) for line in log if '"config"' in line]
    assert ready and ready[0]["config"]["dispatch_delay_s"] == 0.005
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"
