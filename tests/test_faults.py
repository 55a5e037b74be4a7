"""Faults under load, against the real stack: process deaths, processor outages,
processors misbehaving at the connection level, the peer link coming and going.

Every test checks the books the same way:
  - paid twice: a correlationId stored by both processors (or answered 202 and
    paid by the fallback and the default): must be 0;
  - lost: answered 202 but stored by no processor after the faults are gone;
  - missing from the summary: stored by a processor but not reported by the
    backend (an inconsistency in the official test's terms);
and records its figures with record_metrics (results/reliability.jsonl), which
docs/RELIABILITY.md quotes. Longer versions: `make chaos` (scripts/chaos.py).
"""
import datetime as dt
import signal
import time

import pytest

from checks import assert_books_exact, audit, drain, post_payments
from stack import Load, instance_health, own_figures, proc_stats, record_metrics, scaled, summary_count, wait_until


# ----- kill -9 ----------------------------------------------------------------------------

@pytest.mark.parametrize("delay_ms", [0, 100], ids=["fast-processor", "processor-100ms"])
def test_kill9_one_instance_under_load(make_stack, delay_ms):
    """api2 dies mid-traffic (kill -9): HAProxy routes around it, api1 keeps answering payments and
    summaries, and api2 resynchronises from api1 when it returns. CI: 1 kill; chaos: 5.

    With a processor taking 100 ms, api2 holds ~15 payments in flight at the kill; api1 inherits
    them (tests below show each case alone)."""
    cycles, rate = scaled(1, 5), scaled(300, 500)
    stack = make_stack()
    one, two = stack.instances
    stack.default.configure(delay=delay_ms)
    load = Load(stack.port, rate=rate, workers=6, summary_interval=0.1).start()
    kills = []
    try:
        time.sleep(1.5)
        for _ in range(cycles):
            pending_at_kill = instance_health(two)["pending"]
            killed_at = time.monotonic()
            two.kill()
            time.sleep(2.0)
            restarted_at = time.monotonic()
            two.start()
            serving_at = time.monotonic()
            wait_until(lambda: two.peer_up() and one.peer_up(), timeout=10, what="link back")
            wait_until(lambda: two.summary() == one.summary(), timeout=10, what="resync")
            synced_at = time.monotonic()
            kills.append({"killed_at": killed_at, "pending_at_kill": pending_at_kill,
                          "restart_to_serving_s": round(serving_at - restarted_at, 3),
                          "serving_to_resynced_s": round(synced_at - serving_at, 3)})
            time.sleep(1.0)
    finally:
        load.stop()
    drain(stack)
    figures, _ = audit(stack, load)
    errors = [(round(min((t - k["killed_at"] for k in kills if t >= k["killed_at"]), default=-1), 3), what)
              for t, what in load.events]
    record_metrics("kill9-delay%dms" % delay_ms, cycles=cycles, rate_per_s=rate, client_errors=load.errors(),
                   error_events=errors[:10],
                   pending_at_kill=[k["pending_at_kill"] for k in kills],
                   restart_to_serving_s=max(k["restart_to_serving_s"] for k in kills),
                   serving_to_resynced_s=max(k["serving_to_resynced_s"] for k in kills),
                   load=load.report(), **figures)
    assert load.summary_errors == [], "summaries must keep answering"
    assert load.errors() <= 10 * cycles, errors        # only requests on the wire to api2 at a kill
    assert all(0 <= t < 1.0 for t, _ in errors), errors
    # Nothing dies with api2: api1 holds a replica of its pending payments (queued or inside the
    # processor) and inherits them once api2's socket refuses connections.
    assert_books_exact(stack, figures)


def test_kill9_payments_in_flight_at_the_processor_reach_the_summary(make_stack):
    """B1: ten payments are inside the processor (1 s delay) when api1 dies. The processor stores
    them; api1 never records them. api2 holds api1's pending payments (the peer replica), sees that
    api1's socket refuses connections (nobody listens: it is dead), inherits the ten pinned to the
    default processor with the same requestedAt, gets 422 "already stored" and records each once."""
    stack = make_stack(with_haproxy=False)
    stack.default.configure(delay=1000)
    one, two = stack.instances
    ids = post_payments(one, 10)
    time.sleep(0.4)                        # all ten are waiting out the processor's delay
    one.kill()
    wait_until(lambda: len(stack.default.payments()) == 10, timeout=10, what="the processor to store them")
    wait_until(lambda: summary_count(two.summary()) >= 10, timeout=10,
               what="the ten confirmed payments to reach api2's summary")
    drain(stack)
    figures, _ = audit(stack, accepted=ids)
    record_metrics("kill9-in-flight-at-processor", **figures)
    assert_books_exact(stack, figures)
    assert "inherited 10 of its pending payments (10 may have reached a processor)" in two.log()


def test_kill9_then_restart_behind_a_live_socket_inherits_through_the_new_epoch(make_stack):
    """The same, but api1's peer socket stays connectable (a proxy in front of it, as with any
    forwarder) and api1 comes back: api2 learns from the new epoch's hello that the old one is
    dead, and inherits then."""
    stack = make_stack(with_haproxy=False, peer_proxy=True)
    stack.default.configure(delay=1000)
    one, two = stack.instances
    ids = post_payments(one, 10)
    time.sleep(0.4)
    one.kill()
    time.sleep(1.0)
    assert "inherited" not in two.log()    # a refused proxy connection proves nothing; wait for the epoch
    one.start()
    drain(stack)
    figures, _ = audit(stack, accepted=ids)
    record_metrics("kill9-restart-new-epoch", **figures)
    assert_books_exact(stack, figures)
    assert "inherited 10 of its pending payments (10 may have reached a processor)" in two.log()
    assert one.summary() == two.summary()


def test_kill9_payments_still_queued_are_paid_by_the_peer(make_stack):
    """Accepted (202) but never sent: both processors fail, so api1 only queues and retries.
    api1 dies; api2 inherits them (in 1,000-payment steps) and pays each exactly once when the
    processors recover."""
    stack = make_stack(with_haproxy=False)
    stack.default.configure(failure=True)
    stack.fallback.configure(failure=True)
    one, two = stack.instances
    ids = post_payments(one, 2500)
    all_accepted = time.monotonic()
    time.sleep(0.5)
    assert own_figures(two)["peer"]["replica"] == 2500      # api1's pending payments, held by api2
    one.kill()
    wait_until(lambda: instance_health(two)["pending"] == 2500, timeout=5, what="api2 to inherit the 2,500")
    assert "inherited 2500 of its pending payments" in two.log()
    # They keep the time they have waited since api1 accepted them (FALLBACK_WAIT_S counts it),
    # not the moment api2 adopted them.
    oldest = own_figures(two)["queue"]["oldest_pending_age_s"]
    assert oldest >= time.monotonic() - all_accepted - 0.05, oldest
    stack.default.configure(failure=False)
    stack.fallback.configure(failure=False)
    drain(stack)
    figures, _ = audit(stack, accepted=ids)
    record_metrics("kill9-queued-not-sent", **figures)
    assert_books_exact(stack, figures)
    assert figures["stored"] == 2500


def test_kill9_before_the_dispatch_pass_the_peer_pays_with_the_claimed_requested_at(make_stack):
    """Accepted and claimed for the default processor (requestedAt fixed, the attempt announced to
    api2 with the acceptance), but api1 dies before its pass sends anything: api2 inherits them
    pinned to the default with the same requestedAt, and the default stores each once."""
    stack = make_stack(with_haproxy=False, DISPATCH_DELAY_S="3")
    one, two = stack.instances
    t_first = time.time()
    ids = post_payments(one, 10)
    t_last = time.time()
    one.kill()
    wait_until(lambda: "inherited 10 of its pending payments (10 may have reached a processor)" in two.log(),
               timeout=10, what="api2 to inherit the ten")
    drain(stack)
    figures, _ = audit(stack, accepted=ids)
    record_metrics("kill9-claimed-not-sent", **figures)
    assert_books_exact(stack, figures)
    stored = stack.default.payments()
    assert len(stored) == 10 and not stack.fallback.payments()
    requested = [dt.datetime.fromisoformat(p["requestedAt"].replace("Z", "+00:00")).timestamp() for p in stored]
    assert all(t_first - 0.002 <= r <= t_last + 0.002 for r in requested), (t_first, requested, t_last)


def test_sigterm_never_loses_a_payment_answered_202_on_a_kept_alive_connection(make_stack):
    stack = make_stack(with_haproxy=False, SHUTDOWN_GRACE_S=0.5)
    one, two = stack.instances
    stack.default.configure(failure=True)
    stack.fallback.configure(failure=True)
    load = Load(two.socket, rate=3000, workers=8).start()   # as fast as 8 kept-alive clients go
    try:
        time.sleep(1.0)
        two.process.send_signal(signal.SIGTERM)
        two.process.wait(20)
        time.sleep(0.2)
    finally:
        load.stop()
    stack.default.configure(failure=False)
    stack.fallback.configure(failure=False)
    wait_until(lambda: instance_health(one)["pending"] == 0, timeout=30, what="api1 to drain")
    figures, _ = audit(stack, load)
    record_metrics("sigterm-keepalive-clients", **figures)
    assert figures["paid_twice"] == 0
    assert figures["lost"] == 0, "%d payments answered 202 were never paid" % figures["lost"]


def test_sigterm_logs_no_error(make_stack):
    stack = make_stack(with_haproxy=False)
    two = stack.instances[1]
    two.kill(signal.SIGTERM)
    assert two.process.returncode == 0
    errors = [line for line in two.log().splitlines() if '"level":"ERROR"' in line or "Traceback" in line]
    assert errors == []


# ----- both processors down ---------------------------------------------------------------

def test_both_processors_down_then_back(make_stack):
    """An outage of both (CI 10 s, chaos 60 s) under continued traffic: the queue cap answers 503,
    memory and CPU stay low, no retry storm, and after recovery every accepted payment is paid once."""
    capacity, outage_s, rate = scaled(400, 5000), scaled(10.0, 60.0), scaled(150, 200)
    stack = make_stack(QUEUE_CAPACITY=capacity)
    pids = [i.process.pid for i in stack.instances]
    load = Load(stack.port, rate=rate, workers=4, summary_interval=0.25).start()
    try:
        time.sleep(1.0)
        before = [proc_stats(pid) for pid in pids]
        attempts_before = sum(s.stats()["payments_500"] for s in (stack.default, stack.fallback))
        stack.default.configure(failure=True)
        stack.fallback.configure(failure=True)
        down_at = time.monotonic()
        peak_pending, peak_rss = 0, 0
        while time.monotonic() - down_at < outage_s:
            peak_pending = max(peak_pending, sum(instance_health(i)["pending"] for i in stack.instances))
            peak_rss = max(peak_rss, max(proc_stats(pid)["rss_kb"] for pid in pids))
            time.sleep(0.2)
        during = [proc_stats(pid) for pid in pids]
        attempts_down = sum(s.stats()["payments_500"] for s in (stack.default, stack.fallback)) - attempts_before
        stack.default.configure(failure=False)
        stack.fallback.configure(failure=False)
        up_at = time.monotonic()
        wait_until(lambda: all(instance_health(i)["pending"] == 0 for i in stack.instances), timeout=60,
                   what="backlog to drain")
        drain_s = time.monotonic() - up_at
    finally:
        load.stop()
    drain(stack)
    after = [proc_stats(pid) for pid in pids]
    figures, _ = audit(stack, load)
    cpu_down = [round(d["cpu_s"] - b["cpu_s"], 2) for b, d in zip(before, during)]
    record_metrics("both-processors-down", outage_s=outage_s, rate_per_s=rate, queue_capacity=capacity,
                   peak_pending=peak_pending, peak_rss_mb=round(peak_rss / 1024, 1),
                   rss_growth_mb=[round((a["hwm_kb"] - b["rss_kb"]) / 1024, 1) for b, a in zip(before, after)],
                   cpu_s_during_outage=cpu_down, attempts_during_outage=attempts_down, drain_s=round(drain_s, 2),
                   refused_503=load.refused.get(503, 0), load=load.report(), **figures)
    assert peak_pending <= 2 * capacity
    assert load.refused.get(503, 0) > 0, "the queue cap must have answered 503"
    assert set(load.refused) <= {503}, load.refused
    assert load.unknown == [] and load.summary_errors == []
    # no retry storm: under 5 attempts per second per processor per instance
    assert attempts_down < outage_s * 2 * 2 * 5, "a retry storm: %d attempts" % attempts_down
    assert max(cpu_down) < 0.25 * outage_s, cpu_down   # under a quarter of a core while accepting 150/s
    assert max(a["hwm_kb"] - b["rss_kb"] for b, a in zip(before, after)) < 40 * 1024
    assert drain_s < 15 + capacity / 500
    assert_books_exact(stack, figures)


# ----- processors misbehaving at the connection level ------------------------------------

def test_connection_level_faults_under_load(make_stack):
    """Resets after and before storing, garbage bodies, hangs, and answers slower than the
    timeout, each for a while under traffic; then healthy again: every payment paid once."""
    stack = make_stack(REQUEST_TIMEOUT_PROCESSOR_S=1)
    rows = {}
    accepted = []
    for fault in ("reset", "reset_before", "garbage", "hang", "slower-than-timeout"):
        before = stack.default.stats()
        load = Load(stack.port, rate=120, workers=4).start()
        try:
            time.sleep(0.3)
            if fault == "slower-than-timeout":
                stack.default.configure(delay=1500)
            else:
                stack.default.fault(fault)
            time.sleep(scaled(1.5, 5.0))
            stack.default.fault("none")
            stack.default.configure(delay=0)
            time.sleep(0.3)
        finally:
            load.stop()
        drain_s = drain(stack, timeout=30)
        accepted += load.accepted
        assert load.errors() == 0, (fault, load.events[:5])
        after = stack.default.stats()
        figures, _ = audit(stack, accepted=accepted)
        rows[fault] = dict(figures, drain_s=round(drain_s, 2), sent=load.report()["sent"],
                           processor_ok=after["payments_ok"] - before["payments_ok"],
                           processor_422=after["payments_422"] - before["payments_422"])
        assert_books_exact(stack, figures)
        assert figures["reported_fallback"] == 0, "patient policy: a short fault never pays the fallback"
    for fault, row in rows.items():
        record_metrics("processor-" + fault, **row)
    assert rows["reset"]["processor_422"] > 0, "a reset after storing must be settled through a 422"


def test_processor_concurrency_limit_answers_429(make_stack):
    """The processors serve 2 at once and queue 2 more: everything else is a 429."""
    stack = make_stack(sim_options={"max_active": 2, "max_queued": 2})
    stack.default.configure(delay=20)
    stack.fallback.configure(delay=20)
    load = Load(stack.port, rate=150, workers=4).start()
    try:
        time.sleep(scaled(2.0, 10.0))
    finally:
        load.stop()
    drain_s = drain(stack, timeout=40)
    figures, _ = audit(stack, load)
    rejected = stack.default.stats()["payments_429"] + stack.fallback.stats()["payments_429"]
    record_metrics("processor-429", processor_429=rejected, drain_s=round(drain_s, 2), load=load.report(), **figures)
    assert rejected > 0
    assert load.errors() == 0
    assert_books_exact(stack, figures)


@pytest.mark.parametrize("health", ["429", "held"])
def test_health_endpoint_refusing_or_holding(make_stack, health):
    """service-health answering 429, or holding every call for seconds, while the default
    processor fails and recovers: payments still settle on breakers alone, once each."""
    if health == "429":     # one call per 2 s, no queue: polling every 0.25 s gets mostly 429
        options = {"health_window": 2.0, "health_queue": 0}
    else:                   # one call per 3 s, one caller held until the next window
        options = {"health_window": 3.0, "health_queue": 1}
    stack = make_stack(sim_options=options, HEALTH_INTERVAL_S=0.25, REQUEST_TIMEOUT_PROCESSOR_S=2)
    load = Load(stack.port, rate=100, workers=4).start()
    try:
        time.sleep(1.0)
        stack.default.configure(failure=True)
        time.sleep(2.0)
        stack.default.configure(failure=False)
        time.sleep(2.0)
    finally:
        load.stop()
    drain_s = drain(stack, timeout=30)
    figures, _ = audit(stack, load)
    stats = stack.default.stats()
    record_metrics("health-" + health, health_ok=stats["health_ok"], health_429=stats["health_429"],
                   drain_s=round(drain_s, 2), load=load.report(), **figures)
    if health == "429":
        assert stats["health_429"] > 0
    assert load.errors() == 0
    assert_books_exact(stack, figures)


# ----- the peer link ----------------------------------------------------------------------

def test_peer_link_cut_repeatedly_under_load(make_stack):
    """The Unix socket between the instances is severed repeatedly (CI 12 times, chaos 60; some
    times kept down a while) during traffic: afterwards both instances report exactly what the
    processors hold."""
    cuts = scaled(12, 60)
    stack = make_stack(peer_proxy=True)
    one, two = stack.instances
    load = Load(stack.port, rate=300, workers=6, summary_interval=0.1).start()
    try:
        time.sleep(0.5)
        for n in range(cuts):
            proxy = stack.proxies[n % 2] if n % 3 else None
            for p in ([proxy] if proxy else stack.proxies):
                if n % 4 == 3:
                    p.block()
                p.drop()
            time.sleep(0.35)
            for p in stack.proxies:
                p.unblock()
            last_cut_over = time.monotonic()
            time.sleep(0.1)
    finally:
        load.stop()
    wait_until(lambda: one.peer_up() and two.peer_up(), timeout=10, what="link back")
    drain(stack)
    resync_s = time.monotonic() - last_cut_over      # the last cut healed, the books agreed again
    figures, _ = audit(stack, load)
    record_metrics("peer-link-cuts", cuts=sum(p.drops for p in stack.proxies),
                   reconnects=sum(p.connections for p in stack.proxies), resync_s=round(resync_s, 2),
                   load=load.report(), **figures)
    assert sum(p.connections for p in stack.proxies) >= 2 + cuts
    assert load.errors() == 0, load.events[:5]
    assert two.summary() == one.summary()
    assert_books_exact(stack, figures)
    # A cut link (the socket gone, or connecting to a forwarder) is not a dead peer: nothing inherited.
    assert "inherited" not in one.log() + two.log()


def test_peer_stopped_and_continued_repeatedly(make_stack):
    """api2 frozen (SIGSTOP) for 0.6 s, 5 times (chaos: 20) under traffic: clients wait but see
    no error; afterwards the summaries are exact."""
    cycles = scaled(5, 20)
    stack = make_stack()
    one, two = stack.instances
    load = Load(stack.port, rate=200, workers=6, summary_interval=0.1, timeout=5).start()
    try:
        time.sleep(0.5)
        for _ in range(cycles):
            two.process.send_signal(signal.SIGSTOP)
            time.sleep(0.6)
            two.process.send_signal(signal.SIGCONT)
            time.sleep(0.6)
    finally:
        two.process.send_signal(signal.SIGCONT)
        load.stop()
    drain(stack)
    figures, _ = audit(stack, load)
    record_metrics("peer-sigstop", cycles=cycles, client_errors=load.errors(), load=load.report(), **figures)
    assert load.errors() == 0, load.events[:5]
    assert two.summary() == one.summary()
    assert_books_exact(stack, figures)
    assert "inherited" not in one.log()     # a frozen peer still listens: not dead
