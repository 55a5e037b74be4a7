"""Micro-benchmarks of one real instance (make microbench).

accept path : N pipelined POST /payments over the instance's Unix socket,
              processors unreachable (breakers open, nothing paid), so the
              instance's CPU time is the accept path alone. Reports CPU us per
              request (from /proc) and requests/s on one core.
worker path : the same N payments with a healthy simulator: the extra CPU per
              payment is what paying one costs (aiohttp client, store, peer).
scrape      : then GET /metrics SCRAPES times on that instance (N records held):
              CPU per scrape (rendering ~250 samples with prometheus_client).
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from stack import Simulator, free_port, wait_until, request  # noqa: E402

N = int(os.environ.get("MICRO_N", "20000"))
DEPTH = 64
SCRAPES = 200
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    fields = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def start_instance(tmp, default_url, fallback_url):
    sock = os.path.join(tmp, "api.sock")
    env = dict(os.environ, INSTANCE_ID="1", SOCKET_PATH=sock, PROCESSOR_DEFAULT_URL=default_url,
               PROCESSOR_FALLBACK_URL=fallback_url, QUEUE_CAPACITY=str(N * 2), HEALTH_ENABLED="false",
               LOG_LEVEL="WARNING")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py")], env=env, cwd=ROOT)
    wait_until(lambda: request(sock, "GET", "/health")[0] == 200, what="instance")
    return proc, sock


def blast(sock_path, count):
    """Pipelined POSTs, DEPTH in flight; returns wall seconds."""
    bodies = [json.dumps({"correlationId": str(uuid.uuid4()), "amount": 19.9}).encode() for _ in range(count)]
    reqs = [b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (len(b), b) for b in bodies]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    answer = b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n"
    sent = received = 0
    buf = b""
    started = time.perf_counter()
    while received < count:
        while sent < count and sent - received < DEPTH:
            s.sendall(reqs[sent])
            sent += 1
        buf += s.recv(65536)
        n = buf.count(answer)
        if n:
            received += n
            buf = buf.replace(answer, b"")
    elapsed = time.perf_counter() - started
    s.close()
    return elapsed


def scrape_cpu_us(proc, sock):
    before = cpu_seconds(proc.pid)
    for _ in range(SCRAPES):
        assert request(sock, "GET", "/metrics")[0] == 200
    return (cpu_seconds(proc.pid) - before) / SCRAPES * 1e6


def measure(tmp, default_url, fallback_url, settle):
    """(CPU us per payment, payments/s, CPU us per /metrics scrape afterwards)."""
    proc, sock = start_instance(tmp, default_url, fallback_url)
    try:
        blast(sock, 2000)                               # warm-up
        settle(proc, sock)
        before = cpu_seconds(proc.pid)
        wall = blast(sock, N)
        settle(proc, sock)
        per_payment = (cpu_seconds(proc.pid) - before) / N * 1e6
        return per_payment, N / wall, scrape_cpu_us(proc, sock)
    finally:
        proc.terminate()
        proc.wait(15)


def main():
    tmp = tempfile.mkdtemp(prefix="rinha-micro-", dir="/tmp")
    nowhere = "http://127.0.0.1:%d" % free_port()      # nothing listens: connect refused
    accept_us, accept_rps, _ = measure(tmp, nowhere, nowhere, lambda p, s: time.sleep(0.5))
    sim = Simulator("micro", 0.05, tmp, max_active=0)

    def drained(proc, sock):
        wait_until(lambda: json.loads(request(sock, "GET", "/health")[2])["pending"] == 0, timeout=120)
    try:
        total_us, _, scrape_us = measure(tmp, sim.url, sim.url, drained)
    finally:
        sim.stop()
    print(json.dumps({
        "requests": N,
        "accept_cpu_us_per_request": round(accept_us, 1),
        "accept_requests_per_s_one_core": round(accept_rps),
        "accept_plus_pay_cpu_us_per_payment": round(total_us, 1),
        "pay_cpu_us_per_payment": round(total_us - accept_us, 1),
        "metrics_scrape_cpu_us": round(scrape_us),
    }, indent=1))


if __name__ == "__main__":
    main()
