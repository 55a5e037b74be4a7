"""Metrics, processors view, fee report and audit, structured logs, and the verification script.

GET /metrics is parsed with prometheus_client's reference parser (a test-only
dependency: the service writes the format itself) and checked line by line
against the exposition rules. Figures are checked against what a load run did.
"""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

import observe
from stack import ROOT, Stack, payment, request, wait_until
from test_e2e import send_many

ADMIN_TOKEN = "s3cret-admin"
PROCESSOR_TOKEN = "123"          # the simulators' X-Rinha-Token (tests/stack.py)


@pytest.fixture(scope="module")
def loaded():
    """One stack for the read-only checks: 200 payments of 19.90 paid, plus a few bad requests."""
    path = tempfile.mkdtemp(prefix="rinha-", dir="/tmp")
    stack = Stack(path, PROCESSOR_ADMIN_TOKEN=PROCESSOR_TOKEN, ADMIN_TOKEN=ADMIN_TOKEN)
    try:
        payments = [payment(19.90) for _ in range(200)]
        assert set(send_many(stack.port, payments)) == {202}
        assert request(stack.port, "POST", "/payments", {"correlationId": "nope", "amount": 1})[0] == 400
        assert request(stack.port, "GET", "/payments")[0] == 405
        assert request(stack.port, "GET", "/no/such/path")[0] == 404
        stack.wait_drained()
        time.sleep(1.2)                            # one sampler tick after the last payment
        stack.payments = payments
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(path, ignore_errors=True)


# ----- the exposition format ----------------------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$')


def parse_exposition(text):
    """Strict checks of the text format; returns {(name, frozenset(labels)): value}."""
    assert text.endswith("\n")
    samples, types, families_seen, current = {}, {}, [], None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name not in types, "TYPE %s twice" % name
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            types[name] = kind
            families_seen.append(name)
            current = name
            continue
        assert not line.startswith("#") and line, repr(line)
        match = _SAMPLE.match(line)
        assert match, "bad sample line %r" % line
        name, labels, value = match.group(1), match.group(2) or "", match.group(3)
        family = name
        if types.get(current) == "histogram":
            family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert family == current, "%s outside its family block (%s)" % (name, current)
        float(value)                               # NaN, +Inf and numbers parse
        pairs = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels))
        key = (name, pairs)
        assert key not in samples, "duplicate sample %s" % line
        samples[key] = float(value)
    return samples, types


def value(samples, name, **labels):
    want = {(k, str(v)) for k, v in labels.items()}
    found = [v for (n, pairs), v in samples.items() if n == name and want <= pairs]
    assert found, "no sample %s %s" % (name, labels)
    return sum(found)


def test_metrics_cover_both_instances_after_a_load(loaded):
    status, headers, body = request(loaded.port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}   # the reference parser accepts it
    samples, types = parse_exposition(text)
    n = len(loaded.payments)

    for instance in (1, 2):
        assert value(samples, "rinha_instance_reporting", instance=instance) == 1
    assert value(samples, "rinha_http_requests_total", route="/payments", status=202) == n
    assert value(samples, "rinha_http_requests_total", route="/payments", status=400) == 1
    assert value(samples, "rinha_http_requests_total", route="/payments", status=405) == 1
    assert value(samples, "rinha_http_requests_total", route="other", status=404) == 1
    assert ("rinha_http_requests_total", frozenset({("instance", "1"), ("route", "/no/such/path"),
                                                    ("status", "404")})) not in samples
    # The accept-path histogram: every POST /payments, cumulative buckets, +Inf == count.
    assert types["rinha_accept_latency_seconds"] == "histogram"
    for instance in (1, 2):
        buckets = sorted(((float(dict(p)["le"]), v) for (name, p), v in samples.items()
                          if name == "rinha_accept_latency_seconds_bucket" and ("instance", str(instance)) in p))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[-1][0] == math.inf
        assert counts[-1] == value(samples, "rinha_accept_latency_seconds_count", instance=instance)
        assert value(samples, "rinha_accept_latency_seconds_sum", instance=instance) > 0
    assert value(samples, "rinha_accept_latency_seconds_count") == n + 2
    p99 = value(samples, "rinha_accept_latency_window_seconds", instance=1, quantile="0.99")
    assert 0 < p99 < 1
    # Paying: every payment once, through the default processor, 5 % fee.
    assert value(samples, "rinha_payments_paid_total", processor="default") == n
    assert value(samples, "rinha_payments_paid_total", processor="fallback") == 0
    assert value(samples, "rinha_payments_paid_amount_total", processor="default") == pytest.approx(n * 19.90)
    assert value(samples, "rinha_payments_fees_total", processor="default") == pytest.approx(n * 19.90 * 0.05)
    assert value(samples, "rinha_payments_net_total", processor="default") == pytest.approx(n * 19.90 * 0.95)
    assert value(samples, "rinha_payment_attempts_total", processor="default") == n
    assert value(samples, "rinha_payments_retried_total") == 0
    assert value(samples, "rinha_payments_dead_lettered_total") == 0
    assert value(samples, "rinha_processor_requests_total", processor="default", outcome="paid") == n
    # Each instance's store holds both instances' records.
    for instance in (1, 2):
        assert value(samples, "rinha_books_payments", instance=instance, processor="default") == n
        assert value(samples, "rinha_books_fees", instance=instance, processor="default") == pytest.approx(
            n * 19.90 * 0.05)
        assert value(samples, "rinha_store_records", instance=instance) == n
        assert value(samples, "rinha_store_overwritten_total", instance=instance) == 0
        assert value(samples, "rinha_queue_pending", instance=instance) == 0
        assert value(samples, "rinha_queue_oldest_pending_age_seconds", instance=instance) == 0
        assert value(samples, "rinha_peer_link_up", instance=instance) == 1
        assert value(samples, "rinha_processor_circuit_state", instance=instance, processor="default",
                     state="closed") == 1
        assert value(samples, "rinha_processor_circuit_state", instance=instance, processor="default",
                     state="open") == 0
    assert value(samples, "rinha_peer_records_received_total") == n
    assert value(samples, "rinha_processor_health_failing", instance=1, processor="default") == 0
    assert value(samples, "rinha_fee_rate", processor="fallback") == 0.15
    assert "rinha_store_overwritten" in families     # counters lose _total in the parser's family names


def test_metrics_json_and_stats_have_the_sliding_window(loaded):
    for path in ("/metrics.json", "/stats"):
        status, _, body = request(loaded.port, "GET", path)
        assert status == 200
        data = json.loads(body)
        assert [s["instance"] for s in data["instances"]] == [1, 2]
        for snap in data["instances"]:
            window = snap["accept"]["window"]
            assert window["samples"] > 0 and 0 < window["p50_ms"] <= window["p99_ms"] <= window["max_ms"]
            rows = snap["series"]["rows"]
            assert rows and len(rows[0]) == len(snap["series"]["fields"])
        assert sum(s["accept"]["accepted"] for s in data["instances"]) == len(loaded.payments)


def test_processors_view(loaded):
    status, _, body = request(loaded.port, "GET", "/processors")
    assert status == 200
    data = json.loads(body)
    assert [v["instance"] for v in data["instances"]] == [1, 2]
    one = data["instances"][0]["processors"]
    for name in ("default", "fallback"):
        assert one[name]["circuit"] == "closed"
        assert one[name]["health"]["failing"] is False
        assert one[name]["health_history"], "instance 1 polls health: it has a history"
        assert one[name]["circuit_history"][0]["state"] == "closed"
    recent = [v["processors"]["default"]["recent"] for v in data["instances"]]
    assert sum(r["requests"] for r in recent) == len(loaded.payments)
    assert all(r["error_rate"] == 0 for r in recent if r["requests"])
    assert all(r["latency_ms"]["p50"] > 0 for r in recent if r["requests"])


def test_report_fees_and_audit_agree(loaded):
    status, _, body = request(loaded.port, "GET", "/report")
    assert status == 200
    report = json.loads(body)
    n = len(loaded.payments)
    default = report["processors"]["default"]
    assert default == {"payments": n, "gross": pytest.approx(n * 19.90), "fee_rate": 0.05,
                       "fees": pytest.approx(n * 19.90 * 0.05), "net": pytest.approx(n * 19.90 * 0.95)}
    assert report["total"]["payments"] == n
    audit = report["audit"]
    assert audit["enabled"] and audit["ok"], audit
    assert audit["differences"] == [] and audit["errors"] == []
    assert audit["processors"]["default"]["processor"]["payments"] == n
    # A window that holds nothing, and one that holds everything, agree too.
    for query in ("?from=2000-01-01T00:00:00.000Z&to=2000-01-02T00:00:00.000Z",
                  "?from=2000-01-01T00:00:00.000Z&to=2100-01-01T00:00:00.000Z"):
        report = json.loads(request(loaded.port, "GET", "/report" + query)[2])
        assert report["audit"]["ok"], report["audit"]
        assert report["total"]["payments"] in (0, n)
    assert request(loaded.port, "GET", "/report?from=yesterday")[0] == 400


def test_startup_log_line_carries_the_configuration_masked(loaded):
    first = loaded.instances[0].log().splitlines()
    ready = [json.loads(line) for line in first if '"instance 1 ready"' in line]
    assert len(ready) == 1
    entry = ready[0]
    assert entry["msg"] == "instance 1 ready" and entry["level"] == "INFO"
    config = entry["config"]
    assert config["instance_id"] == 1 and config["fee_default"] == 0.05 and config["fee_fallback"] == 0.15
    assert config["processor_admin_token"] == "***" and config["admin_token"] == "***"
    assert ADMIN_TOKEN not in loaded.instances[0].log()


def test_audit_lists_a_difference_and_is_off_without_a_token(make_stack):
    stack = make_stack(PROCESSOR_ADMIN_TOKEN=PROCESSOR_TOKEN)
    assert set(send_many(stack.port, [payment(10.00) for _ in range(20)])) == {202}
    stack.wait_drained()
    # A payment the processor holds that the backend never sent.
    status, _, _ = request(stack.default.port, "POST", "/payments",
                           {"correlationId": payment()["correlationId"], "amount": 7.5,
                            "requestedAt": "2026-01-01T00:00:00.000Z"})
    assert status == 200
    audit = json.loads(request(stack.port, "GET", "/report")[2])["audit"]
    assert not audit["ok"]
    fields = {(d["processor"], d["field"]): d for d in audit["differences"]}
    assert set(fields) == {("default", "payments"), ("default", "gross"), ("default", "fees")}
    assert fields[("default", "payments")]["backend"] == 20
    assert fields[("default", "payments")]["processor_value"] == 21
    assert fields[("default", "payments")]["difference"] == -1
    assert fields[("default", "gross")]["difference"] == pytest.approx(-7.5)
    # A wrong token is an error of the audit, not a difference.
    one = stack.instances[0]
    one.kill(signal.SIGTERM)
    one.env["PROCESSOR_ADMIN_TOKEN"] = "wrong"
    one.start()
    audit = json.loads(request(one.http_port, "GET", "/report")[2])["audit"]
    assert not audit["ok"] and {e["processor"] for e in audit["errors"]} == {"default", "fallback"}
    assert "HTTP 401" in audit["errors"][0]["error"]
    one.kill(signal.SIGTERM)
    one.env["PROCESSOR_ADMIN_TOKEN"] = ""
    one.start()
    assert json.loads(request(one.http_port, "GET", "/report")[2])["audit"] == {
        "enabled": False, "reason": "PROCESSOR_ADMIN_TOKEN is not set"}


def test_failing_processor_shows_in_circuit_error_rate_queue_and_age(make_stack):
    stack = make_stack()
    stack.default.configure(failure=True)
    assert set(send_many(stack.port, [payment(3.00) for _ in range(40)])) == {202}

    def figures():
        return json.loads(request(stack.port, "GET", "/metrics.json")[2])["instances"]
    wait_until(lambda: all(s["processors"][0]["circuit"] in ("open", "half_open") for s in figures()),
               timeout=15, what="the default circuit to open")
    time.sleep(1.5)
    snaps = figures()
    assert sum(s["queue"]["pending"] for s in snaps) == 40
    assert max(s["queue"]["oldest_pending_age_s"] for s in snaps) >= 1.0
    view = json.loads(request(stack.port, "GET", "/processors")[2])
    recent = [v["processors"]["default"]["recent"] for v in view["instances"]]
    assert all(r["error_rate"] == 1.0 for r in recent if r["requests"])
    samples, _ = parse_exposition(request(stack.port, "GET", "/metrics")[2].decode())
    assert value(samples, "rinha_queue_pending") == 40
    assert value(samples, "rinha_processor_requests_total", processor="default", outcome="server_error") >= 3
    assert value(samples, "rinha_processor_recent_error_rate", instance=1, processor="default") == 1
    stack.default.configure(failure=False)
    stack.wait_drained(timeout=40)
    time.sleep(1.2)
    snaps = figures()
    assert all(s["queue"]["oldest_pending_age_s"] == 0 for s in snaps)
    assert sum(p["retries"] for s in snaps for p in s["processors"]) > 0


def test_dead_letters_are_counted_per_processor(stack):
    taken = payment(4.00)
    status, _, _ = request(stack.default.port, "POST", "/payments",      # the id, with another amount
                           dict(taken, amount=5.00, requestedAt="2026-01-01T00:00:00.000Z"))
    assert status == 200
    assert stack.post_payment(taken)[0] == 202
    stack.wait_drained()
    samples, _ = parse_exposition(request(stack.port, "GET", "/metrics")[2].decode())
    assert value(samples, "rinha_payments_dead_lettered_total", processor="default") == 1
    assert value(samples, "rinha_payments_dead_lettered_total", processor="fallback") == 0


def run_verify(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "verify.py")] + list(args),
                          capture_output=True, text=True, timeout=60)


def test_verify_script_passes_on_a_stack_and_fails_without_an_instance(stack):
    url = "http://127.0.0.1:%d" % stack.port
    result = run_verify("--url", url, "--wait", "20", "--sockets", stack.dir,
                        "--processor", stack.default.url, "--processor", stack.fallback.url)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("verify: PASS (%s)" % url)
    for check in ("port", "instances", "peer link", "processors", "summary", "metrics"):
        assert re.search(r"^ok\s+%s\s" % check, result.stdout, re.M), check

    # Instance 2 gone: the metrics from instance 1 say so, and the verification fails.
    stack.instances[1].kill(signal.SIGKILL)
    started = time.monotonic()
    status, _, body = request(stack.instances[0].http_port, "GET", "/metrics")
    assert status == 200 and time.monotonic() - started < 2
    samples, _ = parse_exposition(body.decode())
    assert value(samples, "rinha_instance_reporting", instance=2) == 0
    assert value(samples, "rinha_instance_reporting", instance=1) == 1
    result = run_verify("--url", url, "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert not report["ok"] and report["checks"]["port"]["ok"]
    assert not report["checks"]["instances"]["ok"] and not report["checks"]["metrics"]["ok"]


# ----- unit checks of the accept-path recorder ------------------------------------------------
def _observer():
    return observe.Observer(SimpleNamespace(settings=SimpleNamespace(instance_id=1)))


def test_accept_recorder_keeps_every_sample_through_ring_wraps(monkeypatch):
    clock = [10_000_000_000_000]
    monkeypatch.setattr(observe, "perf_counter_ns", lambda: clock[0])
    obs = _observer()
    latencies = [(k % 7 + 1) * 40_000 for k in range(3 * observe.RING_SIZE + 123)]   # 40..280 us
    for took in latencies:
        clock[0] += 1_000_000                     # one request per ms
        obs.request_done("/payments", (202, b"", b""), clock[0] - took)
    obs._fold()
    assert sum(obs._hist) == len(latencies) == obs._accept_status[202]
    assert obs._lat_sum_ns == sum(latencies)
    bounds = observe.HIST_BOUNDS_NS
    for k, count in enumerate(obs._hist):
        low = bounds[k - 1] if k else -1
        high = bounds[k] if k < len(bounds) else math.inf
        assert count == sum(1 for t in latencies if low < t <= high)
    # The window: the last 10 s = the last 10,000 requests, capped by the ring.
    window = obs.accept_window()
    recent = sorted(latencies[-observe.RING_SIZE:])
    assert window["samples"] == observe.RING_SIZE
    assert window["p99_ms"] == recent[math.ceil(len(recent) * 0.99) - 1] / 1e6
    assert window["max_ms"] == 0.28
    # 10 s - 5.5 ms after the last request, the window holds the requests of the last 5.5 ms: 6 of them.
    clock[0] += 10_000_000_000 - 5_500_000
    obs._window_cache = (0, None)
    assert obs.accept_window()["samples"] == 6
    clock[0] += 10_000_000_000
    obs._window_cache = (0, None)
    assert obs.accept_window() == {"window_s": 10, "samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}


def test_route_labels_are_bounded():
    assert observe.route_of("/payments") == "/payments"
    assert observe.route_of("/payments/" + payment()["correlationId"]) == "/payments/{id}"
    assert observe.route_of("/whatever/%d" % time.time_ns()) == "other"
    assert observe.route_of("/metrics") == "/metrics"


def test_runbook_lists_every_setting():
    from dataclasses import fields
    from config import Settings
    with open(os.path.join(ROOT, "docs", "RUNBOOK.md")) as f:
        runbook = f.read()
    table = runbook[runbook.index("## 5. Settings"):]
    for field in fields(Settings):
        assert "| `%s` |" % field.name.upper() in table, "%s is not in docs/RUNBOOK.md" % field.name.upper()


def test_public_config_masks_secrets():
    settings = SimpleNamespace(public=lambda: {"admin_token": "x", "processor_admin_token": "", "port": 1})
    assert observe.public_config(settings) == {"admin_token": "***", "processor_admin_token": "", "port": 1}
