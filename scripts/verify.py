#!/usr/bin/env python3
"""Verify a deployment: is what answers on :9999 the whole, healthy stack?

    python3 scripts/verify.py [--url http://127.0.0.1:9999] [--wait 30]
                              [--sockets DIR] [--processor URL ...] [--json]

Checks (each printed as ok / FAIL, exit status 1 if any fails):
  port         the port accepts connections and GET /health answers 200
  instances    GET /health through the load balancer, several times, is answered
               by instance 1 and by instance 2 (with --sockets DIR: also each
               instance directly on DIR/api1.sock and DIR/api2.sock)
  peer link    both instances say their peer link is up
  processors   both processors are reachable from the instances: a health report
               read within the last MAX_REPORT_AGE_S seconds (GET /processors);
               with --processor URL (twice): also reachable from here, by a
               GET {url}/payments/<random id> (404 expected; it does not use the
               processors' rate-limited health endpoint)
  summary      GET /payments-summary answers 200 with both processors' totals
  metrics      GET /metrics answers and carries both instances' figures

Only the Python standard library is used, so it runs anywhere python3 does.
With --wait N, failing checks are retried for up to N seconds (a stack that
has just started needs a few seconds for its peer link and first health report).
"""
import argparse
import http.client
import json
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlparse

MAX_REPORT_AGE_S = 30.0
HEALTH_TRIES = 12


def get(url, timeout=3.0):
    """(status, body bytes) of a GET; status 0 when nothing answered."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"Connection": "close"}),
                                    timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (OSError, http.client.HTTPException):
        return 0, b""


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=3.0):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def get_unix(path, target):
    conn = UnixConnection(path)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def parse_iso_ms(text):
    from datetime import datetime
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000


# ----- the checks: each returns (ok, detail) ------------------------------------------
def check_port(args):
    parsed = urlparse(args.url)
    try:
        socket.create_connection((parsed.hostname, parsed.port or 80), timeout=3).close()
    except OSError as exc:
        return False, "nothing listens on %s:%s (%s)" % (parsed.hostname, parsed.port, exc)
    status, _ = get(args.url + "/health")
    return status == 200, "GET /health -> %s" % (status or "no answer")


def _health_bodies(args):
    seen = {}
    for _ in range(HEALTH_TRIES):
        status, body = get(args.url + "/health")
        if status == 200:
            data = json.loads(body)
            seen[data.get("instance")] = data
    return seen


def check_instances(args):
    seen = _health_bodies(args)
    details = ["through the load balancer: instance(s) %s in %d requests" % (sorted(seen), HEALTH_TRIES)]
    ok = {1, 2} <= set(seen)
    if args.sockets:
        for i in (1, 2):
            path = "%s/api%d.sock" % (args.sockets.rstrip("/"), i)
            status, body = get_unix(path, "/health")
            good = status == 200 and json.loads(body).get("instance") == i
            ok = ok and good
            details.append("%s -> %s" % (path, "instance %d" % i if good else status or "no answer"))
    return ok, "; ".join(details)


def check_peer(args):
    views = {}
    for i, data in _health_bodies(args).items():
        views[i] = data.get("peer")
    if args.sockets:
        for i in (1, 2):
            status, body = get_unix("%s/api%d.sock" % (args.sockets.rstrip("/"), i), "/health")
            if status == 200:
                views[i] = json.loads(body).get("peer")
    ok = views.get(1) == "up" and views.get(2) == "up"
    return ok, "peer link: " + ", ".join("instance %s %s" % (i, v) for i, v in sorted(views.items()))


def check_processors(args):
    status, body = get(args.url + "/processors")
    if status != 200:
        return False, "GET /processors -> %s" % (status or "no answer")
    data = json.loads(body)
    now = time.time() * 1000
    ok, details = True, []
    for name in ("default", "fallback"):
        ages = []
        for view in data.get("instances", []):
            report = view["processors"][name].get("health")
            if report and report.get("checkedAt"):
                ages.append((now - parse_iso_ms(report["checkedAt"])) / 1000)
        fresh = [a for a in ages if a <= MAX_REPORT_AGE_S]
        if fresh:
            details.append("%s reachable (health report %.1f s old)" % (name, min(fresh)))
        else:
            ok = False
            details.append("%s: no health report in the last %.0f s%s" % (
                name, MAX_REPORT_AGE_S, "" if not ages else " (last %.0f s ago)" % min(ages)))
    for url in args.processor or ():
        status, _ = get(url.rstrip("/") + "/payments/" + str(uuid.uuid4()))
        good = status in (404, 200)
        ok = ok and good
        details.append("%s from here -> %s" % (url, status or "no answer"))
    return ok, "; ".join(details)


def check_summary(args):
    status, body = get(args.url + "/payments-summary")
    if status != 200:
        return False, "GET /payments-summary -> %s" % (status or "no answer")
    data = json.loads(body)
    ok = all(isinstance(data.get(p), dict) and {"totalRequests", "totalAmount"} <= set(data[p])
             for p in ("default", "fallback"))
    return ok, "default %s / fallback %s payments" % (
        data.get("default", {}).get("totalRequests"), data.get("fallback", {}).get("totalRequests"))


def check_metrics(args):
    status, body = get(args.url + "/metrics")
    if status != 200:
        return False, "GET /metrics -> %s" % (status or "no answer")
    text = body.decode()
    reporting = {i: 'rinha_instance_reporting{instance="%d"} 1' % i in text for i in (1, 2)}
    return all(reporting.values()), "figures of instance(s) %s" % [i for i, r in reporting.items() if r]


CHECKS = (("port", check_port), ("instances", check_instances), ("peer link", check_peer),
          ("processors", check_processors), ("summary", check_summary), ("metrics", check_metrics))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:9999", help="the load balancer (default %(default)s)")
    parser.add_argument("--wait", type=float, default=0.0, help="retry failing checks for up to this many seconds")
    parser.add_argument("--sockets", help="directory with api1.sock and api2.sock: check each instance directly")
    parser.add_argument("--processor", action="append", help="a processor URL to probe from here (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()
    args.url = args.url.rstrip("/")
    deadline = time.monotonic() + args.wait
    results = {}
    for name, check in CHECKS:
        while True:
            try:
                ok, detail = check(args)
            except Exception as exc:                 # a malformed answer is a failure, not a crash
                ok, detail = False, "%s: %s" % (type(exc).__name__, exc)
            if ok or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        results[name] = {"ok": ok, "detail": detail}
        if not args.json:
            print("%-4s  %-10s  %s" % ("ok" if ok else "FAIL", name, detail), flush=True)
    passed = all(r["ok"] for r in results.values())
    if args.json:
        print(json.dumps({"url": args.url, "ok": passed, "checks": results}, indent=1))
    else:
        print("verify: %s (%s)" % ("PASS" if passed else "FAIL", args.url))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
