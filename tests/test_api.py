"""The API's answers, against real instances (validation, idempotency, routes)."""
import datetime as dt
import json
import os
import tempfile
import shutil
import time
import uuid

import pytest

from stack import Stack, payment, request, wait_until


@pytest.fixture(scope="module")
def api():
    path = tempfile.mkdtemp(prefix="rinha-", dir="/tmp")
    stack = Stack(path, with_haproxy=False)
    yield stack
    stack.stop()
    shutil.rmtree(path, ignore_errors=True)


def post(instance, body, raw=False):
    status, headers, data = request(instance.socket, "POST", "/payments", body if raw else json.dumps(body))
    return status, headers, data


BAD_BODIES = [
    ("not json", b"{nope"),
    ("empty", b""),
    ("array", b"[1,2]"),
    ("string", b'"hello"'),
    ("missing id", json.dumps({"amount": 19.9})),
    ("missing amount", json.dumps({"correlationId": str(uuid.uuid4())})),
    ("id not uuid", json.dumps({"correlationId": "abc", "amount": 19.9})),
    ("id number", json.dumps({"correlationId": 12, "amount": 19.9})),
    ("id uuid without dashes", json.dumps({"correlationId": uuid.uuid4().hex, "amount": 19.9})),
    ("amount string", json.dumps({"correlationId": str(uuid.uuid4()), "amount": "19.90"})),
    ("amount bool", json.dumps({"correlationId": str(uuid.uuid4()), "amount": True})),
    ("amount null", json.dumps({"correlationId": str(uuid.uuid4()), "amount": None})),
    ("amount zero", json.dumps({"correlationId": str(uuid.uuid4()), "amount": 0})),
    ("amount negative", json.dumps({"correlationId": str(uuid.uuid4()), "amount": -5})),
    ("amount rounds to zero", json.dumps({"correlationId": str(uuid.uuid4()), "amount": 0.004})),
    ("amount too large", json.dumps({"correlationId": str(uuid.uuid4()), "amount": 1e12})),
    ("amount infinite", b'{"correlationId": "%s", "amount": 1e999}' % str(uuid.uuid4()).encode()),
    ("amount object", json.dumps({"correlationId": str(uuid.uuid4()), "amount": {"v": 1}})),
]


@pytest.mark.parametrize("name,body", BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_payment_is_400_with_json_error(api, name, body):
    status, headers, data = post(api.instances[0], body, raw=True)
    assert status == 400, (name, data)
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert set(json.loads(data)) == {"error"}
    assert b"Traceback" not in data and b".py" not in data
    assert api.instances[0].get("/health")[0] == 200


def test_valid_payment_is_202_and_paid(api):
    p = payment(19.90)
    status, _, _ = post(api.instances[0], p)
    assert status == 202
    wait_until(lambda: json.loads(api.instances[1].get("/payments/" + p["correlationId"])[2])["status"] == "paid",
               what="payment paid")
    info = json.loads(api.instances[1].get("/payments/" + p["correlationId"])[2])
    assert info["processor"] == "default" and info["attempts"] == 1 and info["requestedAt"].endswith("Z")
    stored = [x for x in api.default.payments() if x["correlationId"] == p["correlationId"]]
    assert len(stored) == 1 and stored[0]["amount"] == 19.90
    assert stored[0]["requestedAt"].startswith(info["requestedAt"][:23])


def test_amount_rounded_half_even_like_the_processor(api):
    p = payment(10.005)
    assert post(api.instances[0], p)[0] == 202
    wait_until(lambda: any(x["correlationId"] == p["correlationId"] for x in api.default.payments()))
    stored = [x for x in api.default.payments() if x["correlationId"] == p["correlationId"]][0]
    assert stored["amount"] == 10.0
    info = json.loads(api.instances[0].get("/payments/" + p["correlationId"])[2])
    assert info["amount"] == 10.0


def test_same_payment_twice_is_accepted_once(api):
    p = payment(5.00)
    assert post(api.instances[0], p)[0] == 202
    assert post(api.instances[0], p)[0] == 202
    upper = dict(p, correlationId=p["correlationId"].upper())
    assert post(api.instances[0], upper)[0] == 202
    status, _, data = post(api.instances[0], dict(p, amount=6.00))
    assert status == 409 and b"different amount" in data
    wait_until(lambda: any(x["correlationId"] == p["correlationId"] for x in api.default.payments()))
    assert sum(x["correlationId"] == p["correlationId"] for x in api.default.payments()) == 1
    assert api.default.stats()["payments_422"] == 0


def test_unknown_path_404_and_wrong_method_405(api):
    inst = api.instances[0]
    assert request(inst.socket, "GET", "/nope")[0] == 404
    status, headers, _ = request(inst.socket, "GET", "/payments")
    assert status == 405 and headers["allow"] == "POST"
    status, headers, _ = request(inst.socket, "POST", "/payments-summary")
    assert status == 405 and headers["allow"] == "GET"
    assert request(inst.socket, "GET", "/payments/%s" % uuid.uuid4())[0] == 404
    assert request(inst.socket, "GET", "/payments/not-a-uuid")[0] == 404


@pytest.mark.parametrize("query", ["?from=yesterday", "?to=2025-13-01T00:00:00Z", "?from=2025-07-10T12:00:00Z&to=x"])
def test_malformed_summary_bounds_are_400(api, query):
    status, _, data = request(api.instances[0].socket, "GET", "/payments-summary" + query)
    assert status == 400 and "error" in json.loads(data)


def test_summary_shape_and_two_decimals(api):
    status, headers, data = request(api.instances[0].socket, "GET",
                                    "/payments-summary?from=2000-01-01T00:00:00.000Z&to=2000-01-01T00:00:01.000Z")
    assert status == 200 and headers["content-type"] == "application/json"
    assert data == b'{"default":{"totalRequests":0,"totalAmount":0.00},"fallback":{"totalRequests":0,"totalAmount":0.00}}'


def test_health(api):
    status, _, data = api.instances[1].get("/health")
    assert status == 200 and json.loads(data)["peer"] == "up"


def test_queue_full_is_503_and_not_accepted(make_stack):
    stack = make_stack(with_haproxy=False, QUEUE_CAPACITY=3)
    stack.default.configure(delay=1000)
    inst = stack.instances[0]
    statuses = [post(inst, payment())[0] for _ in range(3)]
    assert statuses == [202, 202, 202]
    rejected = payment()
    status, headers, _ = post(inst, rejected)
    assert status == 503 and headers["retry-after"] == "1"
    assert inst.get("/payments/" + rejected["correlationId"])[0] == 404
    stack.wait_drained()
    assert stack.instances[1].summary()["default"]["totalRequests"] == 3


def test_purge_disabled_by_default_is_403(make_stack):
    stack = make_stack(with_haproxy=False, PURGE_ENABLED="false")
    assert stack.instances[0].post("/purge-payments")[0] == 403


def test_accepted_payments_are_sent_after_the_dispatch_delay_together(make_stack, short_dir):
    # The 202 leaves first; the payments accepted within the delay are sent in one pass, each
    # with the requestedAt fixed when it was accepted (claimed for the default processor then).
    audit_path = os.path.join(short_dir, "audit.log")
    stack = make_stack(with_haproxy=False, DISPATCH_DELAY_S="0.5", AUDIT_LOG=audit_path)
    inst = stack.instances[0]
    ps = [payment() for _ in range(5)]
    t_first = time.time()
    assert [post(inst, p)[0] for p in ps] == [202] * 5
    t_last = time.time()
    for p in ps:
        info = json.loads(inst.get("/payments/" + p["correlationId"])[2])
        assert info["status"] == "pending" and info["attempts"] == 0, info
    assert not stack.default.payments()
    wait_until(lambda: len(stack.default.payments()) == 5, what="all five paid")
    attempts = lambda: [e for e in map(json.loads, open(audit_path)) if e["event"] == "attempt"]
    wait_until(lambda: len(attempts()) == 5, what="the five attempts in the audit log")
    sent = sorted(a["at"] / 1000 for a in attempts())
    assert sent[0] >= t_first + 0.45, sent[0] - t_first
    assert sent[-1] - sent[0] < 0.1, sent
    requested = [dt.datetime.fromisoformat(x["requestedAt"].replace("Z", "+00:00")).timestamp()
                 for x in stack.default.payments()]
    assert all(t_first - 0.002 <= r <= t_last + 0.002 for r in requested), (t_first, requested, t_last)
