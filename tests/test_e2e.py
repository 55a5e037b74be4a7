"""End to end through real HAProxy, two real instances and the simulators.

Each test checks the two books against each other: what the backend reports
must equal what the processors stored, and no payment may be stored twice.
"""
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from stack import payment, proc_stats, request, wait_until
from timestamps import format_ms, now_ms


def send_many(port, payments, threads=16):
    """POST every payment through keep-alive connections; returns the statuses."""
    local = threading.local()

    def send(p):
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        local.conn.request("POST", "/payments", json.dumps(p), {"Content-Type": "application/json"})
        response = local.conn.getresponse()
        response.read()
        return response.status
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(send, payments))


def stored_ids(sim):
    return [p["correlationId"] for p in sim.payments()]


def assert_books_agree(stack, windows=()):
    """Backend summary (through HAProxy and from each instance) == processors' admin summaries."""
    for query, lo, hi in [("", None, None)] + list(windows):
        backend = stack.summary(query)
        for inst in stack.instances:
            if inst.process.poll() is None:
                assert inst.summary(query) == backend, "instances disagree for %r" % query
        for name, sim in (("default", stack.default), ("fallback", stack.fallback)):
            admin = sim.summary(lo, hi)
            assert backend[name]["totalRequests"] == admin["totalRequests"], (name, query, backend, admin)
            assert round(backend[name]["totalAmount"], 2) == round(admin["totalAmount"], 2), (name, query)


def assert_paid_exactly_once(stack, accepted_ids):
    default, fallback = stored_ids(stack.default), stored_ids(stack.fallback)
    everything = default + fallback
    assert len(everything) == len(set(everything)), "a payment was stored twice"
    assert set(everything) == set(accepted_ids), "accepted and paid differ"


def pay_all(stack, count, amount, timeout):
    """Send `count` payments, wait until none is pending, check each was paid exactly once and
    the books agree; the backend's summary."""
    payments = [payment(amount) for _ in range(count)]
    assert set(send_many(stack.port, payments)) == {202}
    stack.wait_drained(timeout=timeout)
    assert_paid_exactly_once(stack, [p["correlationId"] for p in payments])
    assert_books_agree(stack)
    return stack.summary()


def test_burst_books_agree_over_several_windows(stack):
    start = now_ms()
    payments = [payment(19.90) for _ in range(400)]
    assert set(send_many(stack.port, payments)) == {202}
    stack.wait_drained()
    end = now_ms()
    assert_paid_exactly_once(stack, [p["correlationId"] for p in payments])
    windows = []
    for i in range(6):
        lo = start + (end - start) * i // 6
        hi = lo + (end - start) // 3
        windows.append(("?from=%s&to=%s" % (format_ms(lo), format_ms(hi)), format_ms(lo), format_ms(hi)))
    assert_books_agree(stack, windows)
    assert stack.summary()["default"]["totalRequests"] == 400
    assert stack.summary()["fallback"]["totalRequests"] == 0
    # each instance paid part of them: the summary really combines both
    assert all(json.loads(i.get("/health")[2])["pending"] == 0 for i in stack.instances)


def test_default_failing_waits_for_default_then_drains(stack):
    stack.default.configure(failure=True)
    payments = [payment(10.00) for _ in range(60)]
    assert set(send_many(stack.port, payments)) == {202}
    time.sleep(2.0)
    assert stack.pending() == 60, "patient policy: nothing goes to the fallback during a short outage"
    assert stack.fallback.stats()["payments_ok"] == 0
    stack.default.configure(failure=False)
    stack.wait_drained(timeout=20)
    assert_paid_exactly_once(stack, [p["correlationId"] for p in payments])
    assert stack.summary()["default"]["totalRequests"] == 60
    assert_books_agree(stack)


def test_eager_policy_uses_the_fallback_while_default_fails(make_stack):
    stack = make_stack(FALLBACK_POLICY="eager")
    stack.default.configure(failure=True)
    assert pay_all(stack, 40, 3.00, timeout=20)["fallback"]["totalRequests"] > 0


def test_patient_policy_falls_back_after_a_long_outage(make_stack):
    stack = make_stack(FALLBACK_AFTER_S=1.5)
    stack.default.configure(failure=True)
    assert pay_all(stack, 30, 3.00, timeout=20)["fallback"]["totalRequests"] == 30


def test_patient_policy_falls_back_when_a_slow_default_lets_the_queue_wait(make_stack):
    # Healthy but slow: its two slots per instance never free up while payments wait.
    stack = make_stack(FALLBACK_WAIT_S=1.5, MAX_IN_FLIGHT_DEFAULT=2)
    stack.default.configure(delay=1000)
    summary = pay_all(stack, 40, 4.00, timeout=30)
    assert summary["fallback"]["totalRequests"] > 0
    assert summary["default"]["totalRequests"] >= 4      # the default kept its share meanwhile


def test_slow_default_and_failing_fallback_do_not_make_the_dispatcher_spin(make_stack):
    # The head of the queue has waited long enough for the fallback, but the fallback's breaker
    # is open: the dispatcher sleeps until a completion or the breaker's probe, not every 1 ms.
    stack = make_stack(FALLBACK_WAIT_S=0.2, MAX_IN_FLIGHT_DEFAULT=2, with_haproxy=False)
    stack.default.configure(delay=5000)
    stack.fallback.configure(failure=True)
    for inst in stack.instances:
        for _ in range(10):
            assert inst.post("/payments", payment(2.00))[0] == 202
    time.sleep(1.5)                       # fallback tried and failed: its breaker is open
    pids = [inst.process.pid for inst in stack.instances]
    before = [proc_stats(pid)["cpu_s"] for pid in pids]
    time.sleep(3.0)
    used = [proc_stats(pid)["cpu_s"] - b for pid, b in zip(pids, before)]
    assert max(used) < 0.05, used         # spinning every 1 ms took ~0.11 s per 3 s here
    stack.fallback.configure(failure=False)
    stack.wait_drained(timeout=30)


def test_patient_policy_keeps_a_slow_default_that_keeps_up(make_stack):
    stack = make_stack(FALLBACK_WAIT_S=0.5, MAX_IN_FLIGHT_DEFAULT=32)
    stack.default.configure(delay=300)
    assert pay_all(stack, 40, 4.00, timeout=30)["fallback"]["totalRequests"] == 0


def test_both_failing_then_recovering_pays_everything_once(stack):
    stack.default.configure(failure=True, delay=200)
    stack.fallback.configure(failure=True, delay=300)
    payments = [payment(7.77) for _ in range(150)]
    assert set(send_many(stack.port, payments)) == {202}

    def failed_attempts():
        return stack.default.stats()["payments_500"] + stack.fallback.stats()["payments_500"]
    time.sleep(1)              # every payment's first attempt has gone out and failed (one wave)
    first_wave = failed_attempts()
    time.sleep(3)
    retries_while_down = failed_attempts() - first_wave
    # breakers open: a few probes per second, not a retry storm over 150 payments
    assert first_wave <= 150 + 10, first_wave
    assert retries_while_down < 40, retries_while_down
    stack.default.configure(failure=False, delay=0)
    stack.fallback.configure(failure=False, delay=0)
    stack.wait_drained(timeout=30)
    assert_paid_exactly_once(stack, [p["correlationId"] for p in payments])
    assert_books_agree(stack)


def test_ambiguous_outcomes_are_counted_once(make_stack):
    stack = make_stack(REQUEST_TIMEOUT_PROCESSOR_S=1)
    ids = []
    for mode in ("hang", "reset", "reset_before", "garbage"):
        stack.default.fault(mode)
        p = payment(4.20)
        ids.append(p["correlationId"])
        assert stack.post_payment(p)[0] == 202
        time.sleep(0.3 if mode != "hang" else 1.3)
        stack.default.fault("none")
        wait_until(lambda: stack.pending() == 0, timeout=15, what="payment after %s" % mode)
        time.sleep(0.1)
    assert_paid_exactly_once(stack, ids)
    assert stack.summary()["default"]["totalRequests"] == 4
    assert_books_agree(stack)
    infos = [json.loads(stack.instances[0].get("/payments/" + i)[2]) for i in ids]
    assert all(info["status"] == "paid" and info["processor"] == "default" for info in infos)
    assert infos[0]["attempts"] >= 2 and "no definite answer" in (infos[0]["lastError"] or "")


def test_processor_already_holding_the_id_is_counted_with_what_it_holds(stack):
    """A 422 means the processor holds the id: with the same amount it is this payment, counted
    once with the requestedAt the processor holds (GET /payments/{id}); with another amount it
    is not this payment: a dead letter, not counted."""
    same, other = payment(1.00), payment(1.00)
    stored_at = "2025-07-10T12:34:56.789Z"
    for p, amount in ((same, 1.00), (other, 3.00)):
        status, _, _ = request(stack.default.port, "POST", "/payments",
                               {"correlationId": p["correlationId"], "amount": amount, "requestedAt": stored_at})
        assert status == 200
        assert stack.post_payment(p)[0] == 202
    wait_until(lambda: stack.pending() == 0, what="both settled")
    time.sleep(0.1)
    paid = json.loads(request(stack.port, "GET", "/payments/" + same["correlationId"])[2])
    assert paid["status"] == "paid" and paid["requestedAt"] == stored_at
    dead = json.loads(request(stack.port, "GET", "/payments/" + other["correlationId"])[2])
    assert dead["status"] == "dead_letter" and "another amount" in dead["lastError"]
    assert stack.summary()["default"]["totalRequests"] == 1
    window = "?from=%s&to=%s" % (stored_at, stored_at)
    assert stack.summary(window)["default"]["totalRequests"] == 1


def test_purge_reaches_both_instances(stack):
    assert set(send_many(stack.port, [payment() for _ in range(20)])) == {202}
    stack.wait_drained()
    assert stack.summary()["default"]["totalRequests"] == 20
    assert request(stack.port, "POST", "/purge-payments")[0] == 200
    for inst in stack.instances:
        assert inst.summary()["default"]["totalRequests"] == 0


def test_peer_down_then_back_resynchronises(stack):
    first = [payment(2.00) for _ in range(50)]
    assert set(send_many(stack.port, first)) == {202}
    stack.wait_drained()
    one, two = stack.instances
    two.kill()
    wait_until(lambda: not one.peer_up(), what="link down")
    # HAProxy takes api2 out; payments keep flowing through api1
    second = [payment(2.00) for _ in range(50)]
    statuses = send_many(stack.port, second)
    assert statuses.count(202) == 50, statuses
    wait_until(lambda: one.summary()["default"]["totalRequests"] == 100, what="api1 alone has all")
    two.start()
    wait_until(lambda: one.peer_up() and two.peer_up(), what="link back")
    wait_until(lambda: two.summary() == one.summary(), what="resync")
    assert two.summary()["default"]["totalRequests"] == 100
    assert_paid_exactly_once(stack, [p["correlationId"] for p in first + second])
    assert_books_agree(stack)


def test_health_checks_never_exceed_the_processor_limit(make_stack):
    # A 0.5 s window stands for the official 5 s; the instances poll at 0.55 s.
    stack = make_stack(with_haproxy=False, sim_options={"health_window": 0.5}, HEALTH_INTERVAL_S=0.55)
    time.sleep(3)
    stack.instances[0].kill()          # the poller goes away: the other takes over
    time.sleep(3)
    for sim in (stack.default, stack.fallback):
        stats = sim.stats()
        assert stats["health_429"] == 0, stats
        assert stats["health_ok"] >= 5, stats
