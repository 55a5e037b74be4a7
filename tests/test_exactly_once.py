"""Exactly once, against the real stack: the holes an adversarial review of the books found.

Each test reproduces one defect (issue 15) with real processes: HAProxy, two instances, the
processor simulators and, where the peer link must be cut, delayed or held back, stack.PeerProxy.
Each failed on the code before its fix; docs/RELIABILITY.md ("Exactly once") states what each
one guarantees now.
"""
import datetime as dt
import http.client
import json
import signal
import socket
import threading
import time
import uuid
from decimal import ROUND_HALF_EVEN, Decimal

import pytest

from checks import assert_books_exact, audit, drain, post_payments
from stack import (Load, UnixHTTPConnection, books, instance_health, own_figures, payment, record_metrics,
                   request, summary_count, wait_until)


def processors_total(stack):
    return sum(sim.summary()["totalRequests"] for sim in (stack.default, stack.fallback))


def lookup(instance, correlation_id):
    status, _, data = instance.get("/payments/" + correlation_id)
    return json.loads(data) if status == 200 else None


def iso(seconds):
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# ----- 1. a restarted instance is not ready until it holds the peer's records -------------

def test_a_restarted_instance_answers_no_summary_until_it_holds_the_peers_records(make_stack):
    """kill -9 of api2, restarted at once: until api2 has api1's records up to api1's high-water
    mark it says 503 on /health and on the summary, never a summary from a partial store, and
    no summary through port 9999 is wrong meanwhile."""
    stack = make_stack()
    one, two = stack.instances
    load = Load(stack.port, rate=400, workers=8)
    load.start()
    time.sleep(1.5)
    load.stop()
    drain(stack)
    expected = one.summary()
    assert summary_count(expected) == processors_total(stack) > 300

    wrong_through_haproxy, through_haproxy = [], 0
    stop = threading.Event()

    def ask_haproxy():
        nonlocal through_haproxy
        while not stop.is_set():
            try:
                status, _, data = request(stack.port, "GET", "/payments-summary", timeout=2)
            except OSError:
                continue
            if status == 200:
                through_haproxy += 1
                if json.loads(data) != expected:
                    wrong_through_haproxy.append(json.loads(data))
    asker = threading.Thread(target=ask_haproxy, daemon=True)
    asker.start()

    two.kill()
    restarted_at = time.monotonic()
    two.start(wait=False)
    answers = []                          # (seconds since restart, what, status, correct)
    ready_at = correct_at = None
    deadline = restarted_at + 15
    while time.monotonic() < deadline:
        try:
            health = two.get("/health")
            summary = two.get("/payments-summary")
        except OSError:
            continue                      # not listening yet
        at = time.monotonic() - restarted_at
        correct = summary[0] == 200 and json.loads(summary[2]) == expected
        answers.append((at, health[0], summary[0], correct))
        if correct and correct_at is None:
            correct_at = at
        if health[0] == 200 and ready_at is None:
            ready_at = at
        if ready_at is not None and at > ready_at + 1.0:
            break
    stop.set()
    asker.join(5)
    first_answer = answers[0][0] if answers else None
    record_metrics("restart-not-ready-until-resynchronised", restart_to_ready_s=ready_at,
                   restart_to_correct_summary_s=correct_at, restart_to_first_answer_s=first_answer,
                   answering_to_ready_s=None if ready_at is None or first_answer is None else ready_at - first_answer,
                   answers_before_ready=sum(1 for a in answers if ready_at is None or a[0] < ready_at),
                   summaries_through_haproxy=through_haproxy, wrong_through_haproxy=len(wrong_through_haproxy))
    assert ready_at is not None and correct_at is not None, answers[-5:]
    wrong = [a for a in answers if a[2] == 200 and not a[3]]
    assert wrong == [], "summaries answered from a partial store: %s" % wrong[:5]
    early = [a for a in answers if a[1] == 200 and a[0] < correct_at]
    assert early == [], "/health said ready before the records were in: %s" % early[:5]
    assert json.loads(two.get("/health")[2])["status"] == "ok"
    assert wrong_through_haproxy == [], wrong_through_haproxy[:3]
    assert through_haproxy > 0


# ----- 2. a 202 only once the acceptance has left the process -------------------------------

def send_concurrently(target, bodies, threads, deadline_s):
    """POST bodies over `threads` kept-alive connections to a Unix socket until deadline_s;
    returns {correlationId: status or None (no answer)}."""
    results = {}
    work = list(bodies)
    lock = threading.Lock()
    deadline = time.monotonic() + deadline_s

    def run():
        conn = None
        while time.monotonic() < deadline:
            with lock:
                if not work:
                    break
                body = work.pop()
            cid = body["correlationId"]
            try:
                if conn is None:
                    conn = UnixHTTPConnection(target, timeout=3)
                conn.request("POST", "/payments", json.dumps(body), {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                results[cid] = response.status
            except (OSError, http.client.HTTPException):
                results[cid] = None
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()
    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    return workers, results


def flood_with_the_peer_stopped(one, two, deadline_s, then):
    """api2 stopped (SIGSTOP): 3,000 payments at api1 over 12 connections for deadline_s, and
    then() (api1's fault) while they come; api2 resumed. {correlationId: status or None}."""
    two.process.send_signal(signal.SIGSTOP)
    try:
        workers, results = send_concurrently(one.socket, [payment(3.00) for _ in range(3000)], threads=12,
                                             deadline_s=deadline_s)
        then()
        for w in workers:
            w.join(5)
    finally:
        two.process.send_signal(signal.SIGCONT)
    return results


def test_a_202_is_written_only_once_the_acceptance_is_in_the_kernel(make_stack):
    """The peer stops reading (SIGSTOP): its socket buffer fills, and api1 must not answer 202
    for a payment whose acceptance sits in its own memory. api1 is then killed -9 and the peer
    resumed: every payment answered 202 is paid exactly once and reported, none dead-lettered."""
    stack = make_stack(with_haproxy=False)
    one, two = stack.instances
    before_kill = []

    def kill_one():
        time.sleep(0.6)
        before_kill.append(instance_health(one))
        one.kill()

    results = flood_with_the_peer_stopped(one, two, deadline_s=0.6, then=kill_one)
    figures_before_kill = before_kill[0]
    accepted = [cid for cid, status in results.items() if status == 202]
    unknown = [cid for cid, status in results.items() if status is None]
    wait_until(lambda: "is gone: inherited" in two.log(), timeout=10, what="api2 to inherit")
    drain(stack)
    figures, stored = audit(stack, accepted=accepted, unknown=unknown)
    dead = [cid for cid in accepted if (lookup(two, cid) or {}).get("status") == "dead_letter"]
    record_metrics("peer-stopped-then-kill9", sent=len(results), unknown=len(unknown),
                   refused_503=sum(1 for s in results.values() if s == 503), dead_lettered=len(dead),
                   pending_at_kill=figures_before_kill["pending"], **figures)
    assert len(accepted) > 50, "the test must have accepted payments before the buffer filled"
    assert dead == []
    assert_books_exact(stack, figures)


def test_a_peer_that_stops_reading_is_dropped_after_the_stall_limit(make_stack):
    """The peer frozen for longer than PEER_STALL_S: payments wait at most that long, then the
    link is dropped and the instance runs alone (as when the link is cut); once the peer resumes,
    the link comes back and both report what the processors hold."""
    stack = make_stack(with_haproxy=False, PEER_STALL_S="0.5")
    one, two = stack.instances
    two.process.send_signal(signal.SIGSTOP)
    try:
        load = Load(one.socket, rate=600, workers=8, timeout=3).start()
        time.sleep(2.5)
        load.stop()
    finally:
        two.process.send_signal(signal.SIGCONT)
    wait_until(lambda: one.peer_up() and two.peer_up(), timeout=10, what="link back")
    drain(stack)
    figures, _ = audit(stack, load)
    slowest = max(load.latencies)
    record_metrics("peer-stopped-past-the-stall-limit", slowest_answer_s=round(slowest, 3), load=load.report(),
                   **figures)
    assert slowest < 0.5 + 0.5, slowest          # bounded waiting
    assert load.unknown == []
    assert set(load.refused) <= {503}
    assert len(load.accepted) > 500              # it ran alone once the link was dropped
    assert_books_exact(stack, figures)


# ----- 3. the audit compares like with like --------------------------------------------------

def test_the_audit_sends_both_bounds_so_a_one_sided_window_shows_no_difference(make_stack):
    stack = make_stack(with_haproxy=False, PROCESSOR_ADMIN_TOKEN="123")
    one = stack.instances[0]
    post_payments(one, 5)
    drain(stack)
    time.sleep(0.05)
    middle = iso(time.time())
    time.sleep(0.05)
    post_payments(one, 3)
    drain(stack)
    for query in ("?from=" + middle, "?to=" + middle, "", "?from=" + middle + "&to=2100-01-01T00:00:00.000Z"):
        report = json.loads(one.get("/report" + query)[2])
        assert report["audit"]["ok"], (query, report["audit"])
    # The summary keeps the natural meaning of one bound: the other side is open.
    assert one.summary("?from=" + middle)["default"]["totalRequests"] == 3
    assert one.summary("?to=" + middle)["default"]["totalRequests"] == 5


# ----- 4. one timestamp grammar, the processors' --------------------------------------------

def test_summary_bounds_read_exactly_as_the_processors_read_them(make_stack):
    stack = make_stack(with_haproxy=False)
    one = stack.instances[0]
    post_payments(one, 6)
    drain(stack)
    stored = sorted(p["requestedAtUs"] for p in stack.default.payments())
    at = stored[3] // 1000                             # a stored requestedAt, in ms
    seconds, ms = divmod(at, 1000)
    base = dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    local = dt.datetime.fromtimestamp(seconds, dt.timezone(dt.timedelta(hours=5, minutes=30)))
    local_text = local.strftime("%Y-%m-%dT%H:%M:%S")
    forms = [
        base + ".%03dZ" % ms, base + ",%03dZ" % ms, base.replace("T", "t") + ".%03dz" % ms,
        base.replace("T", " ") + ".%03d" % ms, base + ".%03d" % ms, base + ".%03d4Z" % ms,
        base + ".%03d999999Z" % ms, base + ".%03d0001Z" % ms, base + "Z", base,
        local_text + ".%03d+05:30" % ms, local_text + ".%03d+0530" % ms,
        base + ".%03d-00:00" % ms, base[:10], base[:16] + "Z",
        # forms the processors refuse
        base.replace("-", "").replace(":", "") + "Z", "2025-W28-4", base + ".%03dZ " % ms + "x",
        base + "+5", base + ".Z", base[:13] + "Z", "2025-07-10T24:00:00Z", "2025-07-10T12:34:60Z",
    ]
    from urllib.parse import quote
    mismatches = []
    for lower in forms:
        for upper in (forms[0], forms[1], forms[6], "2100-01-01T00:00:00Z"):
            query = "from=%s&to=%s" % (quote(lower), quote(upper))
            status, _, data = one.get("/payments-summary?" + query)
            theirs = request(stack.default.port, "GET", "/admin/payments-summary?" + query,
                             headers={"X-Rinha-Token": "123"})
            if (status == 200) != (theirs[0] == 200):
                mismatches.append((lower, upper, status, theirs[0]))
            elif status == 200:
                ours = json.loads(data)["default"]["totalRequests"]
                if ours != json.loads(theirs[2])["totalRequests"]:
                    mismatches.append((lower, upper, ours, json.loads(theirs[2])["totalRequests"]))
    assert mismatches == []


# ----- 5. a repeat across an instance failure is counted once --------------------------------

def test_a_repeat_after_the_accepting_instance_died_is_not_counted_again(make_stack):
    """X is paid through api1 (both instances hold its record); api1 is killed; X is posted
    again to api2, whose first attempt would be ambiguous. The books hold one record of X."""
    stack = make_stack(with_haproxy=False, REQUEST_TIMEOUT_PROCESSOR_S="0.5")
    one, two = stack.instances
    x = payment(7.00)
    assert one.post("/payments", x)[0] == 202
    drain(stack)
    assert summary_count(two.summary()) == 1
    one.kill()
    stack.default.configure(delay=1000)          # an attempt now times out: ambiguous
    assert two.post("/payments", x)[0] == 202
    assert two.post("/payments", dict(x, amount=8.00))[0] == 409
    time.sleep(0.8)
    stack.default.configure(delay=0)
    drain(stack)
    assert summary_count(two.summary()) == processors_total(stack) == 1


# ----- 6. a link cut, then the sender dying during its resync ---------------------------------

def test_the_sender_dying_between_its_resync_records_and_their_end_counts_nothing_twice(make_stack):
    """api2 pays X while its link to api1 is cut; when the link returns it resends X's record,
    but dies (kill -9) before the end of the resync (held back by the proxy). api1, which still
    held X as in flight at api2, must not record X a second time."""
    stack = make_stack(with_haproxy=False, peer_proxy=True)
    one, two = stack.instances
    to_one = stack.proxies[1]                    # api2 dials api1 through it: api2's records and replica
    stack.default.configure(delay=1000)
    x = payment(5.00)
    assert two.post("/payments", x)[0] == 202
    time.sleep(0.2)                              # api1's replica holds X, at the default processor
    to_one.block()
    to_one.drop()
    wait_until(lambda: (lookup(two, x["correlationId"]) or {}).get("status") == "paid", timeout=10,
               what="api2 to pay X")
    to_one.hold_prefix = b'["E"'
    to_one.unblock()
    wait_until(lambda: summary_count(one.summary()) == 1, timeout=10, what="X's record to reach api1")
    assert to_one.held, "the end of the resync must have been held back"
    two.kill()
    to_one.hold_prefix = None
    stack.default.configure(delay=0)
    two.start()
    drain(stack)
    time.sleep(0.5)
    assert summary_count(one.summary()) == summary_count(two.summary()) == processors_total(stack) == 1


# ----- 7. a body naming correlationId twice, or escaped, never splits the instances ----------

def decoy_bodies(cid):
    pad = " " * 15500
    return {
        "duplicate id, decoy first": '{"correlationId":"%s","correlationId":"%s","amount":10.00}' % (uuid.uuid4(), cid),
        "duplicate id, decoy last": '{"correlationId":"%s","amount":10.00,"correlationId":"%s"}' % (cid, uuid.uuid4()),
        "duplicate amount": '{"correlationId":"%s","amount":10.00,"amount":20.00}' % cid,
        "escaped key": '{"correlation\\u0049d":"%s","amount":10.00}' % cid,
        "escaped key and decoy": '{"correlationId":"%s","correlation\\u0049d":"%s","amount":10.00}' % (uuid.uuid4(), cid),
        "escaped value": '{"correlationId":"\\u00%x%s","amount":10.00}' % (ord(cid[0]), cid[1:]),
        "whitespace": ' {\n "correlationId" :\t"%s" ,  "amount" : 10.00 } ' % cid,
        "upper case": '{"correlationId":"%s","amount":10.00}' % cid.upper(),
        "amount first": '{"amount":10.00,"correlationId":"%s"}' % cid,
        "nested decoy": '{"meta":{"correlationId":"%s"},"correlationId":"%s","amount":10.00}' % (uuid.uuid4(), cid),
        "decoy in a string": '{"note":"\\"correlationId\\":\\"%s\\"","correlationId":"%s","amount":10.00}' % (
            uuid.uuid4(), cid),
        "padding before the key": '{' + pad + '"correlationId":"%s","amount":10.00}' % cid,
        "padding in a field": '{"pad":"%s","correlationId":"%s","amount":10.00}' % ("x" * 15500, cid),
    }


def test_the_instance_that_accepts_a_payment_is_the_one_haproxy_routes_its_id_to(make_stack):
    """Through port 9999, for each body form and several ids: either a 400, or a 202 from the
    instance that a plain repeat of the id reaches (which then answers 409 for another amount)."""
    stack = make_stack()
    outcomes = {}
    for n in range(6):
        for name, body in decoy_bodies(str(uuid.uuid4())).items():
            cid = json.loads(body)["correlationId"]      # what a JSON parser keeps (the last of two)
            status, _, answer = request(stack.port, "POST", "/payments", body)
            outcomes.setdefault(name, []).append(status)
            assert status in (202, 400), (name, status, answer)
            if status == 202:
                repeat = request(stack.port, "POST", "/payments", {"correlationId": cid.lower(), "amount": 20.00})
                assert repeat[0] == 409, (name, "a plain repeat reached an instance that did not know it")
    for name in ("duplicate id, decoy first", "duplicate id, decoy last", "duplicate amount", "escaped key",
                 "escaped key and decoy"):
        assert set(outcomes[name]) == {400}, (name, outcomes[name])
    for name in ("whitespace", "upper case", "amount first", "nested decoy", "decoy in a string", "escaped value"):
        assert set(outcomes[name]) == {202}, (name, outcomes[name])
    stack.wait_drained()
    stored, paid_twice = books(stack)
    assert paid_twice == 0


def test_a_duplicate_key_is_a_400_on_the_instance_itself(make_stack):
    stack = make_stack(with_haproxy=False)
    one = stack.instances[0]
    cid = str(uuid.uuid4())
    for body in ('{"correlationId":"%s","correlationId":"%s","amount":1}' % (cid, cid),
                 '{"correlationId":"%s","amount":1,"amount":1}' % cid):
        status, _, data = request(one.socket, "POST", "/payments", body)
        assert status == 400 and b"more than once" in data, data
    assert lookup(one, cid) is None


# ----- 8. amounts are read from their decimal text ------------------------------------------

def test_amounts_are_rounded_half_even_on_their_decimal_text(make_stack):
    stack = make_stack(with_haproxy=False)
    one = stack.instances[0]
    texts = ["1.005000000000000000001", "1.005", "2.675", "0.125", "0.135", "19.90", "1e1", "12.3456789e1",
             "0.0150000000000000000000001", "1000000.004999999999999999"]
    for text in texts:
        status, _, data = request(one.socket, "POST", "/payments",
                                  '{"correlationId":"%s","amount":%s}' % (uuid.uuid4(), text))
        assert status == 202, (text, data)
    drain(stack)
    ours = Decimal(str(one.summary()["default"]["totalAmount"]))
    theirs = Decimal(str(stack.default.summary()["totalAmount"]))
    oracle = sum(Decimal(t).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN) for t in texts)
    assert ours == theirs == oracle


# ----- suspected: a purge racing a record in flight ------------------------------------------

def test_a_record_sent_before_a_purge_and_read_after_it_never_splits_the_books(make_stack):
    """api1 pays X; its record to api2 is delayed on the link; meanwhile api2 is purged. The
    record arrives after the purge: both instances must end with the same books."""
    stack = make_stack(with_haproxy=False, peer_proxy=True)
    one, two = stack.instances
    stack.proxies[0].delay_s = 0.4              # what api1 sends to api2 arrives 0.4 s late
    post_payments(one, 3)
    time.sleep(0.1)                              # paid at api1, records on their way
    assert request(two.socket, "POST", "/purge-payments")[0] == 200
    time.sleep(1.0)
    stack.proxies[0].delay_s = 0
    wait_until(lambda: one.summary() == two.summary(), timeout=5, what="the books to agree")
    time.sleep(0.5)
    assert one.summary() == two.summary()


# ----- suspected: a dead letter's end lost with its instance ----------------------------------

def test_a_payment_the_peer_inherits_after_a_lost_end_is_counted_once(make_stack):
    """X is paid through api2, which then restarts (its book is new; its store has X back from
    api1). A second copy of X reaches api1 straight to its socket; api1's attempt meets the
    processor's 422; api1's link to api2 is cut before api2 hears how it ended, and api1 dies.
    api2 inherits that copy as in flight at the default: X must still be counted once."""
    stack = make_stack(with_haproxy=False, peer_proxy=True)
    one, two = stack.instances
    to_two = stack.proxies[0]                    # api1 dials api2 through it: api1's replica at api2
    x = payment(6.00)
    assert two.post("/payments", x)[0] == 202
    drain(stack)
    two.kill(signal.SIGTERM)
    two.start()
    wait_until(lambda: summary_count(two.summary()) == 1, timeout=10, what="api2's resync")
    stack.default.configure(delay=500)
    assert one.post("/payments", x)[0] == 202
    time.sleep(0.15)                             # api2's replica of api1 holds the copy in flight
    to_two.block()
    to_two.drop()
    time.sleep(1.0)                              # the processor has answered api1 by now
    one.kill()
    stack.default.configure(delay=0)
    to_two.unblock()
    one.start()
    drain(stack)
    time.sleep(0.5)
    assert summary_count(one.summary()) == summary_count(two.summary()) == processors_total(stack) == 1


# ----- suspected: a repeat during SIGTERM's grace --------------------------------------------

def test_a_repeat_during_the_shutdown_grace_is_answered_from_what_is_known(make_stack):
    """X is pending at the instance HAProxy routes it to when that instance gets SIGTERM: a repeat
    through HAProxy in the grace period is answered 202 (same amount) or 409 (another amount),
    never accepted as a second copy by the peer."""
    stack = make_stack(SHUTDOWN_GRACE_S="3")
    stack.default.configure(failure=True)
    stack.fallback.configure(failure=True)
    two = stack.instances[1]
    ids = post_payments(two, 20, amount=10.00)   # straight to api2: HAProxy sends repeats to both
    two.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    for cid in ids:
        assert stack.post_payment({"correlationId": cid, "amount": 20.00})[0] == 409
        assert stack.post_payment({"correlationId": cid, "amount": 10.00})[0] == 202
    two.process.wait(20)
    stack.default.configure(failure=False)
    stack.fallback.configure(failure=False)
    wait_until(lambda: instance_health(stack.instances[0])["pending"] == 0, timeout=30, what="api1 to drain")
    time.sleep(0.3)
    stored, paid_twice = books(stack)
    assert paid_twice == 0
    assert set(stored) == set(ids)
    amounts = {p["correlationId"]: p["amount"] for p in stack.default.payments() + stack.fallback.payments()}
    assert all(amounts[cid] == 10.0 for cid in ids), amounts


# ----- suspected: a processor that stores, then fails its answer ------------------------------

def test_a_payment_a_processor_stored_before_failing_its_answer_is_not_paid_twice(make_stack):
    """The default stores each payment and answers 500 (fault fail_after_store); with the eager
    policy the payments move to the fallback once the default's breaker opens. Before a payment
    moves, the processor it failed at is asked whether it holds it (GET /payments/{id})."""
    stack = make_stack(FALLBACK_POLICY="eager")
    stack.default.fault("fail_after_store")
    ids = []
    for _ in range(20):
        p = payment(2.00)
        assert stack.post_payment(p)[0] == 202
        ids.append(p["correlationId"])
    time.sleep(1.0)
    stack.default.fault("none")
    drain(stack)
    figures, stored = audit(stack, accepted=ids)
    record_metrics("processor-fail-after-store", **figures)
    assert_books_exact(stack, figures)


# ----- found by the review: both instances stopping at once ---------------------------------

def abandoned_ids(instance):
    ids = set()
    for line in instance.log().splitlines():
        if '"abandoned: ' in line:
            ids.update(json.loads(line)["msg"].split()[1:])
    return ids


@pytest.mark.parametrize("offset_ms", [0.0, 0.5, 1.0])
def test_both_instances_stopping_at_once_report_what_neither_took(make_stack, offset_ms):
    """SIGTERM to both (a `docker compose down`) while both hold payments they cannot pay: each
    offers its leftovers to the other, which is stopping too. A hand-over counts only once the
    peer says it took the payments, and a stopping instance takes none: every payment ends paid,
    or named in an 'abandoned' line; none is silently dropped."""
    stack = make_stack(with_haproxy=False, SHUTDOWN_GRACE_S="0.05")
    stack.default.configure(failure=True)
    stack.fallback.configure(failure=True)
    one, two = stack.instances
    accepted = post_payments(one, 40) + post_payments(two, 40)
    time.sleep(0.3)
    one.process.send_signal(signal.SIGTERM)
    time.sleep(offset_ms / 1000)
    two.process.send_signal(signal.SIGTERM)
    for instance in stack.instances:
        instance.process.wait(20)
    stack.default.configure(failure=False)
    stack.fallback.configure(failure=False)
    stored = {p["correlationId"] for sim in (stack.default, stack.fallback) for p in sim.payments()}
    reported = abandoned_ids(one) | abandoned_ids(two)
    silently_lost = [cid for cid in accepted if cid not in stored and cid not in reported]
    assert silently_lost == [], "%d payments neither paid nor reported" % len(silently_lost)


# ----- found by the review: a peer that reads some of the backlog, then stops ----------------

def test_a_payment_whose_acceptance_reached_the_peer_is_never_refused(make_stack):
    """api1's link to api2 reads slowly (a throttled forwarder): api1's buffer towards it never
    empties, and the oldest 202 waiting has waited PEER_STALL_S: the link is dropped. A payment
    whose acceptance left api1 before that must be answered 202 (api2 holds it), only the others
    503. api1 is then killed before it reconnects: api2 inherits exactly what it holds, and
    nothing answered 503 is paid."""
    stack = make_stack(with_haproxy=False, peer_proxy=True, PEER_STALL_S="0.5")
    one, two = stack.instances
    to_two = stack.proxies[0]
    to_two.read_size, to_two.delay_s = 2048, 0.05          # ~40 KB/s: less than api1 writes
    bodies = [payment(2.50) for _ in range(4000)]
    workers, results = send_concurrently(one.socket, bodies, threads=12, deadline_s=1.5)
    for w in workers:
        w.join(10)
    wait_until(lambda: "peer read nothing" in one.log(), timeout=10, what="the link to be dropped")
    to_two.block()                                          # api1 cannot reconnect...
    wait_until(lambda: to_two.open_pairs == 0, timeout=60, interval=0.2,
               what="the forwarder to pass on what api1 had sent")      # ...but what left it arrives
    one.kill()
    to_two.read_size, to_two.delay_s = 65536, 0.0
    to_two.unblock()
    one.start()
    drain(stack)
    accepted = {cid for cid, status in results.items() if status == 202}
    refused = {cid for cid, status in results.items() if status == 503}
    stored = {p["correlationId"] for sim in (stack.default, stack.fallback) for p in sim.payments()}
    record_metrics("slow-link-then-kill9", accepted=len(accepted), refused_503=len(refused), stored=len(stored))
    assert refused, "the link must have stalled with payments waiting"
    assert stored & refused == set(), "%d payments answered 503 were paid" % len(stored & refused)
    assert accepted <= stored, "%d payments answered 202 were not paid" % len(accepted - stored)


# ----- found by the second review: a probe that never reached its processor ------------------

def test_a_probe_settled_at_the_other_processor_does_not_lock_the_breaker(make_stack):
    """The default fails; the fallback stores payments and answers 500 (fail_after_store). With
    `eager`, a payment goes back to the default as its breaker's probe, but is first found at
    the fallback, so the probe never reaches the default. Once both are healthy, the default
    must take payments again (its breaker was left half-open for good before)."""
    stack = make_stack(with_haproxy=False, FALLBACK_POLICY="eager", HEALTH_ENABLED="false",
                       BREAKER_PROBE_S="0.2", BREAKER_PROBE_MAX_S="0.4", RETRY_MAX_S="0.3")
    one = stack.instances[0]
    stack.default.configure(failure=True)
    stack.fallback.fault("fail_after_store")
    first = post_payments(one, 30, amount=2.00)
    time.sleep(4.0)
    stack.default.configure(failure=False)
    stack.fallback.fault("none")
    # A payment now and then keeps probing the default until its breaker closes.
    later = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and own_figures(one)["processors"][0]["circuit"] != "closed":
        later += post_payments(one, 1, amount=1.00)
        time.sleep(0.2)
    assert own_figures(one)["processors"][0]["circuit"] == "closed", "the default's breaker never closed"
    drain(stack)
    figures, _ = audit(stack, accepted=first + later)
    assert_books_exact(stack, figures)


# ----- found by the second review: inheritance before a dead epoch's last records ------------

def test_a_dead_epochs_payments_are_inherited_only_after_its_last_records_are_read(make_stack):
    """api2 pays its ten payments at the fallback while its link to api1 is cut; the link heals,
    slowly (3 s a read), so api2's resync is still on its way when api2 is killed -9 and restarted.
    api1 learns from the new epoch that the old one is dead, but must not inherit its replica
    until the old connection has delivered everything (the records that show the ten paid)."""
    stack = make_stack(with_haproxy=False, peer_proxy=True, FALLBACK_POLICY="eager", HEALTH_ENABLED="false",
                       RETRY_MAX_S="0.3", BREAKER_PROBE_S="0.3", BREAKER_PROBE_MAX_S="0.5")
    one, two = stack.instances
    to_one = stack.proxies[1]
    stack.default.configure(failure=True)
    stack.fallback.configure(failure=True)
    post_payments(two, 10, amount=5.00)
    time.sleep(1.0)                                  # api1's replica of api2 holds the ten
    to_one.block()
    to_one.drop()
    stack.fallback.configure(failure=False)          # api2 pays them at the fallback meanwhile
    wait_until(lambda: instance_health(two)["pending"] == 0, timeout=20, what="api2 to pay them")
    to_one.delay_s = 3.0
    to_one.unblock()
    time.sleep(1.0)                                  # api2 has dialled again and written its resync
    two.kill()
    stack.default.configure(failure=False)
    two.start(wait=False)
    wait_until(lambda: summary_count(one.summary()) == 10, timeout=30, what="the old connection's records")
    to_one.delay_s = 0.0
    drain(stack, timeout=30)
    time.sleep(1.0)
    stored, paid_twice = books(stack)
    assert paid_twice == 0
    assert summary_count(one.summary()) == processors_total(stack) == 10


# ----- found by the third review: a dead epoch's last lines, read late ------------------------

def test_a_dead_epochs_last_acceptances_read_late_are_inherited(make_stack):
    """api1's lines to api2 lag on a slow link; api1 answers five 202s (their acceptances have
    left api1), is killed -9 and restarted. api2 hears the new api1 (over its own, fast, dial)
    before it reads the old connection's tail. That tail is the dead epoch's last word: its
    acceptances belong in the replica api2 inherits, and all five are paid, once."""
    stack = make_stack(with_haproxy=False, peer_proxy=True)
    one, two = stack.instances
    to_two = stack.proxies[0]                       # api1 dials api2 through it
    for sim in (stack.default, stack.fallback):
        sim.configure(failure=True)                 # nothing is paid meanwhile: all stay pending
    to_two.read_size = 64
    to_two.delay_s = 0.25
    ids = post_payments(one, 5, amount=7.00)
    time.sleep(0.05)
    one.kill()
    one.start(wait=False)
    time.sleep(8.0)                                 # the slow tail reaches api2, the old connection ends
    to_two.delay_s, to_two.read_size = 0.0, 65536
    for sim in (stack.default, stack.fallback):
        sim.configure(failure=False)
    drain(stack, timeout=30)
    stored, paid_twice = books(stack)
    assert paid_twice == 0
    assert set(ids) <= set(stored), "a 202 never paid: %s" % sorted(set(ids) - set(stored))
    assert summary_count(two.summary()) == processors_total(stack) == 5


def test_a_202_waiting_when_sigterm_comes_is_decided_before_the_hand_over(make_stack):
    """The peer stops reading (SIGSTOP) while payments' 202s wait for their acceptances to leave
    api1, and api1 gets SIGTERM with a grace shorter than the stall limit. api1 waits for those
    answers to be decided (503: the link is dropped with the bytes) before it hands anything
    over, rather than handing them over behind the stalled bytes and answering 202 for payments
    nobody will pay. Every 202 is paid, no 503 is."""
    stack = make_stack(with_haproxy=False, PEER_STALL_S="1.0", SHUTDOWN_GRACE_S="0.1",
                       HEALTH_ENABLED="false")
    one, two = stack.instances

    def stop_one():
        time.sleep(0.4)
        one.process.send_signal(signal.SIGTERM)
        one.process.wait(20)

    results = flood_with_the_peer_stopped(one, two, deadline_s=0.5, then=stop_one)
    accepted = {cid for cid, status in results.items() if status == 202}
    refused = {cid for cid, status in results.items() if status == 503}
    time.sleep(2.0)                                 # api2 reads what api1 wrote, and inherits its pending
    drain(stack)
    stored, paid_twice = books(stack)
    record_metrics("peer-stopped-then-sigterm", accepted=len(accepted), refused_503=len(refused),
                   stored=len(stored))
    assert len(accepted) > 50, "the test must have accepted payments before the buffer filled"
    assert paid_twice == 0
    assert accepted <= set(stored), "%d payments answered 202 were never paid" % len(accepted - set(stored))
    assert refused & set(stored) == set(), "%d payments answered 503 were paid" % len(refused & set(stored))


def test_a_repeat_at_the_restarted_instance_knows_what_its_predecessor_left_pending(make_stack):
    """api1 accepts X (api2's replica holds it), then more payments while its link to api2 is
    slow, and is killed -9 and restarted. The new api1 is ready once api2's snapshot is in, but
    api2 inherits X only when the old connection's slow tail has been read. Meanwhile X's repeat
    reaches the new api1 (HAProxy routes it there): it must be answered from what api2 knows,
    409 with another amount, and never accepted as a second copy."""
    stack = make_stack(with_haproxy=False, peer_proxy=True)
    one, two = stack.instances
    to_two = stack.proxies[0]                       # api1 dials api2 through it
    for sim in (stack.default, stack.fallback):
        sim.configure(failure=True)                 # nothing is paid meanwhile: all stay pending
    x = payment(6.00)
    assert one.post("/payments", x)[0] == 202
    wait_until(lambda: two.get("/payments/" + x["correlationId"])[0] == 200, what="api2's replica to hold X")
    to_two.read_size, to_two.delay_s = 64, 0.25
    post_payments(one, 5, amount=7.00)              # their lines make the old connection's slow tail
    one.kill()
    one.start()
    assert to_two.open_pairs >= 1, "the old connection must still be draining"
    status_other_amount = one.post("/payments", dict(x, amount=6.50))[0]
    status_same = one.post("/payments", x)[0]
    to_two.read_size, to_two.delay_s = 65536, 0.0
    for sim in (stack.default, stack.fallback):
        sim.configure(failure=False)
    drain(stack, timeout=30)
    stored, paid_twice = books(stack)
    assert (status_other_amount, status_same) == (409, 202)
    assert paid_twice == 0
    assert summary_count(one.summary()) == processors_total(stack) == 6


# ----- found by the second review: a client that leaves while its 202 waits -----------------

def test_a_client_leaving_while_its_202_waits_does_not_answer_its_repeat_early(make_stack):
    """api2 frozen (less than PEER_STALL_S), api1's buffer to it full: X's 202 waits. X's client
    closes its connection; a repeat of X must get the answer X's acceptance earns (202 only once
    it has left api1), not one decided by the first request going away. api1 is then killed
    -9 and api2 resumed: if the repeat got 202, X is paid."""
    stack = make_stack(with_haproxy=False, HEALTH_ENABLED="false")
    one, two = stack.instances
    stack.default.configure(failure=True)
    stack.fallback.configure(failure=True)
    two.process.send_signal(signal.SIGSTOP)
    try:
        workers, results = send_concurrently(one.socket, [payment(3.00) for _ in range(4000)], threads=12,
                                             deadline_s=0.35)
        time.sleep(0.3)
        x = payment(7.00)
        body = json.dumps(x).encode()
        first = socket.socket(socket.AF_UNIX)
        first.connect(one.socket)
        first.sendall(b"POST /payments HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.05)
        first.close()                                # its client gives up
        try:
            repeat = request(one.socket, "POST", "/payments", x, timeout=0.4)[0]
        except OSError:
            repeat = None                            # still waiting: right
        one.kill()
    finally:
        two.process.send_signal(signal.SIGCONT)
    for w in workers:
        w.join(5)
    wait_until(lambda: "is gone: inherited" in two.log(), timeout=15, what="api2 to inherit")
    stack.default.configure(failure=False)
    stack.fallback.configure(failure=False)
    drain(stack, timeout=60)
    stored = {p["correlationId"] for sim in (stack.default, stack.fallback) for p in sim.payments()}
    accepted = {cid for cid, status in results.items() if status == 202}
    assert accepted <= stored
    if repeat == 202:
        assert x["correlationId"] in stored, "the repeat was answered 202 for a payment nobody holds"


# ----- the fourth session's hunt: a repeat read before the dead peer's last lines --------------

def test_a_repeat_read_before_the_dead_peers_last_lines_is_not_paid_at_another_processor(make_stack):
    """api2 pays X at the fallback (the default failing, `eager`) while its lines to api1 lag on a
    slow link, and is killed -9. X is posted again to api1, the default healthy by now: api1 does
    not know X yet (the dead process's last lines are still on their way) and accepts the repeat,
    but pays it only once those lines are in. They say X is paid: the processors hold X once
    (hunt seed 474739661 found it: a repeat paid at the default 0.35 s after the fallback had it)."""
    stack = make_stack(with_haproxy=False, peer_proxy=True, FALLBACK_POLICY="eager", HEALTH_ENABLED="false",
                       RETRY_MAX_S="0.3", BREAKER_PROBE_S="5", BREAKER_PROBE_MAX_S="5")
    one, two = stack.instances
    to_one = stack.proxies[1]                       # api2 dials api1 through it
    stack.default.configure(failure=True)
    post_payments(two, 4, amount=1.00)              # api2's default breaker opens; they go to the fallback
    wait_until(lambda: instance_health(two)["pending"] == 0, timeout=20, what="api2 to pay them")
    to_one.read_size, to_one.delay_s = 64, 0.25     # api2's next lines reach api1 ~1 s late
    x = payment(3.00)
    assert two.post("/payments", x)[0] == 202
    wait_until(lambda: (lookup(two, x["correlationId"]) or {}).get("status") == "paid", timeout=10,
               what="api2 to pay X")
    two.kill()
    stack.default.configure(failure=False)
    assert one.post("/payments", x)[0] == 202      # unknown to api1 still: a copy, held
    time.sleep(1.5)                                 # the copy would have been paid by now
    to_one.delay_s, to_one.read_size = 0.0, 65536
    try:
        wait_until(lambda: summary_count(one.summary()) == 5, timeout=10, what="api2's last record at api1")
    except AssertionError:
        raise AssertionError("api1 %s, books %s, X at api1 %s, api1's link %s" % (
            one.summary(), books(stack), lookup(one, x["correlationId"]), own_figures(one)["peer"]))
    drain(stack, timeout=30)
    stored, paid_twice = books(stack)
    assert paid_twice == 0
    assert stored[x["correlationId"]] == "fallback"
    assert summary_count(one.summary()) == processors_total(stack) == 5
    assert own_figures(one)["peer"]["gates_expired"] == 0   # held until the dead connection's end, not by a deadline


def test_two_copies_accepted_at_once_are_paid_once_and_never_both_withdrawn(make_stack):
    """Both links slow: X is posted to api1 and at once to api2, each accepting a copy before it
    has read the other's acceptance. When each hears the other's word, the copy accepted first
    is kept on both sides: X is paid once, and never dropped by both (each 202 holds)."""
    stack = make_stack(with_haproxy=False, peer_proxy=True)
    one, two = stack.instances
    for proxy in stack.proxies:
        proxy.read_size, proxy.delay_s = 128, 0.2
    ids = []
    for _ in range(5):
        x = payment(6.00)
        assert one.post("/payments", x)[0] == 202
        assert two.post("/payments", x)[0] == 202
        ids.append(x["correlationId"])
    time.sleep(2.0)
    for proxy in stack.proxies:
        proxy.read_size, proxy.delay_s = 65536, 0.0
    drain(stack, timeout=30)
    stored, paid_twice = books(stack)
    assert paid_twice == 0
    assert set(ids) <= set(stored), "a 202 never paid: %s" % sorted(set(ids) - set(stored))
    wait_until(lambda: summary_count(one.summary()) == summary_count(two.summary()) == 5, timeout=10,
               what="both instances to hold the five records")
    assert own_figures(one)["peer"]["gates_expired"] == own_figures(two)["peer"]["gates_expired"] == 0
