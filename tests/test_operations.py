"""Shutdown hand-over, cross-instance idempotency, the audit log, admin-token protection."""
import json
import os
import signal
import time

from stack import payment, request, wait_until
from test_e2e import assert_books_agree, assert_paid_exactly_once, send_many


def test_sigterm_hands_pending_payments_to_the_peer(make_stack):
    stack = make_stack(SHUTDOWN_GRACE_S=1)
    stack.default.configure(failure=True)
    stack.fallback.configure(failure=True)
    payments = [payment(5.00) for _ in range(80)]
    assert set(send_many(stack.port, payments)) == {202}
    one, two = stack.instances
    pending_before = json.loads(one.get("/health")[2])["pending"]
    assert pending_before > 0
    started = time.monotonic()
    one.kill(signal.SIGTERM)
    assert time.monotonic() - started < 8, "SIGTERM must end within the grace period plus hand-over"
    assert "handed %d pending payments over" % pending_before in one.log()
    assert json.loads(two.get("/health")[2])["pending"] == 80
    time.sleep(0.5)                          # api1's socket now refuses: its replica holds nothing more
    assert "inherited" not in two.log()      # handed over, not inherited a second time
    stack.default.configure(failure=False)
    stack.fallback.configure(failure=False)
    wait_until(lambda: json.loads(two.get("/health")[2])["pending"] == 0, timeout=30, what="drain")
    assert_paid_exactly_once(stack, [p["correlationId"] for p in payments])
    assert two.summary()["default"]["totalRequests"] == 80


def test_sigterm_without_a_peer_names_every_payment_it_abandons(make_stack):
    stack = make_stack(with_haproxy=False, SHUTDOWN_GRACE_S=0.3)
    one, two = stack.instances
    two.kill()                                 # nobody to hand over to
    stack.default.configure(failure=True)
    stack.fallback.configure(failure=True)
    ids = []
    for _ in range(450):
        p = payment(1.00)
        assert one.post("/payments", p)[0] == 202
        ids.append(p["correlationId"])
    one.kill(signal.SIGTERM)
    log = one.log()
    assert "450 pending payments abandoned: the peer did not confirm taking them" in log
    lines = [line for line in log.splitlines() if '"abandoned: ' in line]
    assert len(lines) == 3 and max(len(line) for line in lines) < 8000    # 200 ids a line
    assert all(cid in log for cid in ids)


def test_sigterm_finishes_in_flight_work_when_processors_are_up(stack):
    stack.default.configure(delay=300)
    payments = [payment(1.00) for _ in range(40)]
    assert set(send_many(stack.port, payments)) == {202}
    stack.instances[0].kill(signal.SIGTERM)
    two = stack.instances[1]
    wait_until(lambda: json.loads(two.get("/health")[2])["pending"] == 0, timeout=30, what="drain")
    time.sleep(0.2)
    assert_paid_exactly_once(stack, [p["correlationId"] for p in payments])
    assert two.summary()["default"]["totalRequests"] == 40


def test_repeats_through_haproxy_reach_the_same_instance(stack):
    payments = [payment(2.50) for _ in range(60)]
    # each payment sent three times, interleaved, concurrently
    statuses = send_many(stack.port, payments * 3, threads=12)
    assert set(statuses) == {202}
    stack.wait_drained()
    assert_paid_exactly_once(stack, [p["correlationId"] for p in payments])
    # a repeat that reached the other instance would have been sent again and answered 422
    assert stack.default.stats()["payments_422"] == 0
    assert stack.summary()["default"]["totalRequests"] == 60
    assert_books_agree(stack)


def test_audit_log_has_every_lifecycle_event(make_stack, short_dir):
    stack = make_stack(with_haproxy=False, AUDIT_LOG=os.path.join(short_dir, "audit.log"))
    inst = stack.instances[0]
    p = payment(3.33)
    assert inst.post("/payments", p)[0] == 202
    wait_until(lambda: json.loads(inst.get("/payments/" + p["correlationId"])[2])["status"] == "paid")
    time.sleep(0.5)   # the batch is written every 0.2 s
    lines = [json.loads(line) for line in open(os.path.join(short_dir, "audit.log"))]
    events = [e["event"] for e in lines if e["correlationId"] == p["correlationId"]]
    assert events == ["accepted", "attempt", "paid"]
    paid = [e for e in lines if e["event"] == "paid"][0]
    assert paid["processor"] == "default" and paid["requestedAt"].endswith("Z") and paid["at"] > 0


def test_admin_token_guards_purge_and_replay(make_stack):
    stack = make_stack(with_haproxy=False, ADMIN_TOKEN="s3cret")
    sock = stack.instances[0].socket
    assert request(sock, "POST", "/purge-payments")[0] == 401
    assert request(sock, "POST", "/purge-payments", headers={"X-Admin-Token": "wrong"})[0] == 401
    assert request(sock, "POST", "/purge-payments", headers={"X-Admin-Token": "s3cret"})[0] == 200
    assert request(sock, "POST", "/admin/dead-letters/replay")[0] == 401
    status, _, data = request(sock, "POST", "/admin/dead-letters/replay", headers={"X-Admin-Token": "s3cret"})
    assert status == 200 and json.loads(data) == {"replayed": 0}


def test_replay_is_off_without_a_token(stack):
    assert request(stack.port, "POST", "/admin/dead-letters/replay")[0] == 403


def test_replayed_dead_letter_is_paid_once_the_cause_is_gone(make_stack):
    stack = make_stack(ADMIN_TOKEN="t")
    p = payment(9.99)
    # the processor already holds this id with another amount (another system paid it): a dead letter
    assert request(stack.default.port, "POST", "/payments",
                   dict(p, amount=1.00, requestedAt="2025-07-10T12:00:00.000Z"))[0] == 200
    assert stack.post_payment(p)[0] == 202
    wait_until(lambda: json.loads(request(stack.port, "GET", "/payments/" + p["correlationId"])[2])["status"]
               == "dead_letter")
    # an operator clears the processor's record, then replays
    stack.default.admin("POST", "/admin/purge-payments")
    replayed = sum(json.loads(request(i.socket, "POST", "/admin/dead-letters/replay",
                                      headers={"X-Admin-Token": "t"})[2])["replayed"] for i in stack.instances)
    assert replayed == 1
    wait_until(lambda: stack.summary()["default"]["totalRequests"] == 1, what="replayed payment paid")
    assert len(stack.default.payments()) == 1


def test_haproxy_answers_json_with_the_api_headers_when_no_instance_is_up(make_stack):
    stack = make_stack()
    for instance in stack.instances:
        instance.kill()
    status, headers, body = request(stack.port, "POST", "/payments", payment())
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff" and headers["cache-control"] == "no-store"
    assert json.loads(body) == {"error": "service unavailable"}
