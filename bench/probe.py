#!/usr/bin/env python3
"""Low-rate probe: what one request costs when it finds the server asleep.

Sends POSTs one at a time on one keep-alive connection, pausing between them
(3 ms by default, about the gap each instance sees at the test's peak), and
prints the round trip's percentiles. For each --pid it also prints the CPU
time and the voluntary context switches (times the process went to sleep and
was woken) per request, read from /proc before and after: the figures of
docs/PERFORMANCE.md's "Why accepting costs so much more here".

    python bench/probe.py run/api1.sock --pid $(cat run/api1.pid) --pid $(cat run/api2.pid)
    python bench/probe.py 127.0.0.1:9999 --requests 3000 --path /nothing

TARGET is a Unix socket path (with a slash: ./api.sock) or host:port. Only for quiet machines and
loopback targets: a busy machine measures its neighbours.
"""
import argparse
import os
import socket
import sys
import time
import uuid

CLK_TCK = os.sysconf("SC_CLK_TCK")


def connect(target):
    if "/" not in target:                         # host:port; a socket path has a slash
        host, port = target.rsplit(":", 1)
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect(target)
    return sock


def round_trip(sock, request):
    """Send one request, read its whole answer; its status code."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection mid-answer")
        body += chunk
    return int(head.split(b" ", 2)[1])


def process_counters(pid):
    """(CPU seconds, voluntary context switches) of a process and its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK      # utime + stime
    switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    switches += int(line.split()[1])
    return cpu, switches


def percentile(sorted_values, p):
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("target", help="Unix socket path or host:port")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--interval-ms", type=float, default=3.0, help="pause after each answer")
    ap.add_argument("--path", default="/payments", help="POST to this path (default /payments)")
    ap.add_argument("--pid", type=int, action="append", default=[], help="a process to count (repeatable)")
    args = ap.parse_args(argv)
    if args.requests < 1:
        ap.error("--requests must be >= 1")

    sock = connect(args.target)
    before = {pid: process_counters(pid) for pid in args.pid}
    latencies_us, statuses = [], {}
    for _ in range(args.requests):
        body = b'{"correlationId":"%s","amount":19.90}' % str(uuid.uuid4()).encode()
        request = (b"POST %s HTTP/1.1\r\nHost: probe\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (args.path.encode(), len(body), body))
        t0 = time.perf_counter_ns()
        status = round_trip(sock, request)
        latencies_us.append((time.perf_counter_ns() - t0) / 1000)
        statuses[status] = statuses.get(status, 0) + 1
        time.sleep(args.interval_ms / 1000)
    time.sleep(0.5)                     # work the requests started (paying them) finishes
    after = {pid: process_counters(pid) for pid in args.pid}
    sock.close()

    latencies_us.sort()
    print(f"{args.target} POST {args.path}: {args.requests} requests, one every ~{args.interval_ms:g} ms; "
          f"statuses {statuses}")
    print("  round trip  p50 %.0f µs  p90 %.0f µs  p99 %.0f µs  max %.0f µs" % tuple(
        percentile(latencies_us, p) for p in (0.5, 0.9, 0.99, 1.0)))
    for pid in args.pid:
        cpu = (after[pid][0] - before[pid][0]) / args.requests * 1e6
        wakes = (after[pid][1] - before[pid][1]) / args.requests
        print(f"  pid {pid}: CPU {cpu:.0f} µs per request, woken {wakes:.2f} times per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
