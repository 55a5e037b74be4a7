"""The books after a fault, compared with the processors' own: shared by the fault tests.

  paid twice           a correlationId stored by both processors: must be 0;
  lost                 answered 202 but stored by no processor once the faults are gone;
  stored not accepted  stored by a processor but never answered 202 (nor left unanswered);
  missing from summary stored by a processor but not reported by the backend (what the
                       official test calls an inconsistency).
"""
import json
import time

from stack import books, instance_health, payment, summary_count, wait_until


def live(stack):
    return [i for i in stack.instances if i.process is not None and i.process.poll() is None]


def drain(stack, timeout=30.0):
    """Wait until no live instance holds a pending payment and both summaries agree; seconds taken."""
    started = time.monotonic()
    wait_until(lambda: all(instance_health(i)["pending"] == 0 for i in live(stack)), timeout=timeout,
               what="queues to drain")
    wait_until(lambda: len({json.dumps(i.summary(), sort_keys=True) for i in live(stack)}) == 1, timeout=10,
               what="instances to agree")
    return time.monotonic() - started


def audit(stack, load=None, accepted=None, unknown=()):
    """The books after the faults: (figures, stored ids). See the module docstring."""
    stored, paid_twice = books(stack)
    accepted = set(accepted if accepted is not None else load.accepted)
    unknown = set(load.unknown if load is not None else unknown)
    reported = live(stack)[0].summary()
    figures = {
        "accepted": len(accepted),
        "stored": len(stored),
        "paid_twice": paid_twice,
        "lost": len(accepted - set(stored)),
        "stored_not_accepted": len(set(stored) - accepted - unknown),
        "missing_from_summary": len(stored) - summary_count(reported),
    }
    for name in ("default", "fallback"):
        figures["reported_" + name] = reported[name]["totalRequests"]
    return figures, stored


def assert_books_exact(stack, figures):
    assert figures["paid_twice"] == 0, figures
    assert figures["lost"] == 0, figures
    assert figures["stored_not_accepted"] == 0, figures
    assert figures["missing_from_summary"] == 0, figures
    for name, sim in (("default", stack.default), ("fallback", stack.fallback)):
        admin = sim.summary()
        assert figures["reported_" + name] == admin["totalRequests"], (name, figures, admin)


def post_payments(instance, count, amount=4.00):
    """count payments straight to one instance, each answered 202; their correlationIds."""
    ids = []
    for _ in range(count):
        p = payment(amount)
        assert instance.post("/payments", p)[0] == 202
        ids.append(p["correlationId"])
    return ids
