"""A hunt for exactly-once holes: random, seeded fault schedules against the real stack.

One run starts the whole stack (two simulators, two instances dialing each other through
stack.PeerProxy forwarders, HAProxy), sends payments, repeats of earlier correlationIds (with
the same and with another amount, through HAProxy and straight to one instance) and summary
requests, while a schedule drawn from the seed changes the processors (delays, delays past the
timeout, failure, resets before and after storing, garbage, hangs, 500 after storing) and
brings faults one at a time: peer-link cuts (one or both directions, kept down a while), a
slow link, SIGSTOP of an instance (shorter and longer than PEER_STALL_S), kill -9 and restart,
SIGTERM and restart, SIGSTOP of one instance and kill -9 of the other meanwhile, purges. Then
everything heals, the queues drain, and the books are checked against the simulators' own:

  lost                  a correlationId answered 202 is stored by no processor, and neither
                        dead-lettered (with its reason) nor logged as abandoned;
  paid twice            a correlationId stored by both processors;
  stored, refused       stored by a processor although every request for it got a definite
                        refusal (4xx, or an instance's 503);
  wrong amount          stored with an amount no 202 was given for;
  record mismatch       an instance holds a record its processor does not hold with that
                        requestedAt and amount, or lacks one the processors hold, or holds
                        two for one correlationId;
  instances disagree    the two instances hold different records;
  summary mismatch      an instance's summary for a window with both bounds differs from the
                        processors' admin summaries;
  stuck                 payments still pending after the faults are gone.

A purge resets both the backend and the processors; what was accepted before the last one is
not checked against the processors, but the two instances must still hold the same records.

The fault model (what the guarantees assume, docs/RELIABILITY.md "Exactly once"): one
instance fails at a time, and an instance is killed only while its peer link is up and the
peer is alive (a death while the link is down loses what was accepted meanwhile: documented).
The SIGSTOP + kill -9 fault keeps the stop shorter than PEER_STALL_S, inside which a 202 still
means the peer holds the acceptance.

    .venv/bin/python tests/hunt.py --seeds 11 12      # replay seeds (the schedule is the seed's)
    .venv/bin/python tests/hunt.py --runs 20          # new seeds; failing ones are printed
"""
import argparse
import collections
import http.client
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from urllib.parse import quote

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from stack import Stack, UnixHTTPConnection, instance_health, request, stop_fast, wait_until  # noqa: E402
from timestamps import format_ms, parse_us  # noqa: E402

ADMIN = "hunt-admin"
ENV = dict(REQUEST_TIMEOUT_PROCESSOR_S="1", SHUTDOWN_GRACE_S="0.5", ADMIN_TOKEN=ADMIN, PEER_STALL_S="1.0",
           FALLBACK_AFTER_S="1.5", FALLBACK_WAIT_S="1", RETRY_MAX_S="0.5", BREAKER_PROBE_MAX_S="0.5")
PURGE_MARGIN_S = 2.5          # a requestedAt this long after a purge was first attempted after both books were reset

# Processor conditions, drawn per step for each processor (most often: unchanged or healthy).
DELAYS = (0, 0, 0, 20, 200, 1500)                     # 1500 > REQUEST_TIMEOUT_PROCESSOR_S: ambiguous
FAULTS = ("none",) * 6 + ("reset", "reset_before", "garbage", "hang", "fail_after_store")
EPISODES = ("quiet", "cut", "cut_and_hold", "slow_link", "stop_short", "stop_long", "kill9", "sigterm",
            "stop_and_kill9", "slow_then_kill9", "purge")


class Traffic:
    """Payments and summaries from a few threads; every answer is kept per correlationId."""

    def __init__(self, stack, seed, rate, workers=6):
        self.stack = stack
        self.rate = rate
        self.workers = workers
        self.seed = seed
        self.sent = collections.defaultdict(list)     # cid -> [(monotonic, amount, status or None, via HAProxy)]
        self.amounts = {}                             # cid -> the amount it was first sent with
        self.order = []                               # cids in the order first sent
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = []
        self.summaries = collections.Counter()        # status -> count
        self.errors = []                              # 5xx other than 503 answered by an instance

    def start(self):
        for n in range(self.workers):
            t = threading.Thread(target=self._pay, args=(random.Random("%s/%d" % (self.seed, n)), n), daemon=True)
            t.start()
            self.threads.append(t)
        t = threading.Thread(target=self._ask, args=(random.Random("%s/s" % self.seed),), daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(10)

    def _choose(self, rng, direct):
        """A new payment, or a repeat of a recent one (same amount, or another). Payments sent
        straight to an instance are never repeated: one id sent both ways, or to both instances,
        while the link is down, is the documented limit of idempotency (two copies)."""
        with self.lock:
            known = len(self.order)
            roll = rng.random()
            if known and not direct and roll < 0.12:
                cid = self.order[rng.randrange(max(0, known - 300), known)]
                return cid, self.amounts[cid]
            if known and not direct and roll < 0.16:
                cid = self.order[rng.randrange(max(0, known - 300), known)]
                return cid, self.amounts[cid] + 1.11
            cid = str(uuid.uuid4())
            amount = rng.choice((19.90, 20.05, 7.5, 1.01))
            self.amounts[cid] = amount
            if not direct:
                self.order.append(cid)
            return cid, amount

    def _connection(self, target):
        if isinstance(target, int):
            return http.client.HTTPConnection("127.0.0.1", target, timeout=3)
        return UnixHTTPConnection(target, timeout=3)

    def _pay(self, rng, n):
        interval = self.workers / self.rate
        next_at = time.monotonic() + interval * n / self.workers
        conns = {}
        while not self.stop_event.is_set():
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            elif now - next_at > 1.0:
                next_at = now
            next_at += interval
            direct = rng.random() < 0.1
            target = rng.choice(self.stack.instances).socket if direct else self.stack.port
            cid, amount = self._choose(rng, direct)
            body = json.dumps({"correlationId": cid, "amount": amount})
            status = None
            try:
                conn = conns.get(target) or self._connection(target)
                conns[target] = conn
                conn.request("POST", "/payments", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                status = response.status
                if response.will_close:
                    conns.pop(target).close()
                if status >= 500 and status != 503 and not isinstance(target, int):
                    self.errors.append((status, data[:100]))
            except (OSError, http.client.HTTPException):
                old = conns.pop(target, None)
                if old is not None:
                    old.close()
            with self.lock:
                self.sent[cid].append((time.monotonic(), amount, status, isinstance(target, int)))
        for conn in conns.values():
            conn.close()

    def _ask(self, rng):
        while not self.stop_event.wait(0.05):
            target = self.stack.port if rng.random() < 0.7 else rng.choice(self.stack.instances).socket
            end = time.time() - rng.uniform(0, 10)
            query = "?from=%s&to=%s" % (quote(format_ms(int((end - rng.uniform(0, 15)) * 1000))),
                                        quote(format_ms(int(end * 1000))))
            try:
                status, _, _ = request(target, "GET", "/payments-summary" + query, timeout=3)
            except (OSError, http.client.HTTPException):
                status = None
            self.summaries[status] += 1


def draw_schedule(seed, steps):
    """The seed's schedule: per step, new processor conditions (or None: unchanged) and an episode."""
    rng = random.Random(seed)
    schedule = []
    purged = False
    for n in range(steps):
        conditions = []
        for _ in range(2):
            if rng.random() < 0.4:
                conditions.append({"delay": rng.choice(DELAYS), "failure": rng.random() < 0.2,
                                   "fault": rng.choice(FAULTS)})
            else:
                conditions.append(None)
        episode = rng.choice(EPISODES)
        if episode == "purge":
            # One purge at most, early enough that most of the run is checked against the processors.
            episode = "quiet" if purged or n > steps * 0.6 else episode
            purged = purged or episode == "purge"
        schedule.append({"conditions": conditions, "episode": episode, "who": rng.randrange(2),
                         "both": rng.random() < 0.4, "hold_s": round(rng.uniform(0.2, 1.0), 2)})
    policy = rng.choice(("patient", "eager"))
    return policy, schedule


class Hunt:
    def __init__(self, seed, steps, rate=120, log=print):
        self.seed = seed
        self.policy, self.schedule = draw_schedule(seed, steps)
        self.rate = rate
        self.log = log
        self.tried = collections.Counter()
        self.purged_at = None                         # wall clock of the last purge
        self.abandoned = set()

    # ----- running ---------------------------------------------------------------------
    def run(self, keep=False):
        """The figures of one run; with keep, its directory (logs, audit logs) is left in /tmp."""
        workdir = tempfile.mkdtemp(prefix="rinha-hunt-", dir="/tmp")
        stack = None
        try:
            stack = Stack(workdir, peer_proxy=True, FALLBACK_POLICY=self.policy,
                          AUDIT_LOG=os.path.join(workdir, "audit{instance}.jsonl"), **ENV)
            traffic = Traffic(stack, self.seed, self.rate).start()
            started = time.monotonic()
            try:
                time.sleep(0.5)
                for step in self.schedule:
                    self._conditions(stack, step["conditions"])
                    self._episode(stack, step)
            finally:
                self._heal(stack)
                time.sleep(0.3)
                traffic.stop()
            figures = self._check(stack, traffic)
            figures["seconds"] = round(time.monotonic() - started, 1)
            return figures
        finally:
            if stack is not None:
                for instance in stack.instances:
                    if instance.process is not None and instance.process.poll() is None:
                        instance.process.send_signal(signal.SIGCONT)
                stop_fast(stack)
            if keep:
                self.log("kept %s" % workdir)
            else:
                shutil.rmtree(workdir, ignore_errors=True)

    def _conditions(self, stack, conditions):
        for sim, change in zip((stack.default, stack.fallback), conditions):
            if change is None:
                continue
            self.tried["processor:%s" % (change["fault"] if change["fault"] != "none" else
                                         "failing" if change["failure"] else "delay %d" % change["delay"])] += 1
            sim.configure(delay=change["delay"], failure=change["failure"])
            sim.fault(change["fault"])

    def _both_up(self, stack, timeout=20):
        # One failure at a time: the last one is over once each instance is up and linked and has
        # read all that a dead instance wrote to it (a slow link's old connection has drained).
        def up():
            return all(i.process.poll() is None and instance_health(i)["status"] == "ok" for i in stack.instances) \
                and all(i.peer_up() for i in stack.instances) and all(p.open_pairs <= 1 for p in stack.proxies)
        try:
            wait_until(up, timeout=timeout, what="both instances up and linked")
            return True
        except AssertionError:
            self.tried["precondition not met"] += 1
            return False

    def _restart(self, instance):
        instance.start(wait=False)

    def _episode(self, stack, step):
        kind, hold = step["episode"], step["hold_s"]
        who = stack.instances[step["who"]]
        other = stack.instances[1 - step["who"]]
        self.tried["episode:" + kind] += 1
        if kind == "quiet":
            time.sleep(hold)
        elif kind in ("cut", "cut_and_hold"):
            # Not while an instance starts: a blocked forwarder looks like no peer at all (its socket
            # is gone), which a starting instance rightly takes as "alone"; no real peer does that.
            if not self._both_up(stack):
                return
            proxies = stack.proxies if step["both"] else [stack.proxies[step["who"]]]
            for proxy in proxies:
                if kind == "cut_and_hold":
                    proxy.block()
                proxy.drop()
            time.sleep(hold)
            for proxy in stack.proxies:
                proxy.unblock()
        elif kind == "slow_link":
            proxy = stack.proxies[step["who"]]
            proxy.delay_s = 0.02
            time.sleep(hold)
            proxy.delay_s = 0.0
        elif kind in ("stop_short", "stop_long"):
            who.process.send_signal(signal.SIGSTOP)
            time.sleep(hold * 0.5 if kind == "stop_short" else 1.0 + hold)
            who.process.send_signal(signal.SIGCONT)
        elif kind == "kill9":
            if not self._both_up(stack):
                return
            who.kill()
            time.sleep(hold)
            self._restart(who)
        elif kind == "sigterm":
            if not self._both_up(stack):
                return
            who.process.send_signal(signal.SIGTERM)
            try:
                who.process.wait(15)
            except Exception:
                who.process.kill()
                who.process.wait(5)
            who._log.close()
            time.sleep(hold * 0.5)
            self._restart(who)
        elif kind == "stop_and_kill9":
            if not self._both_up(stack):
                return
            other.process.send_signal(signal.SIGSTOP)
            time.sleep(min(hold, 0.6) * 0.5)          # well inside PEER_STALL_S
            who.kill()
            time.sleep(0.05)
            other.process.send_signal(signal.SIGCONT)
            time.sleep(hold * 0.5)
            self._restart(who)
        elif kind == "slow_then_kill9":
            # Its last lines still on their way, slowly, when it dies: the peer hears its successor
            # first, then reads the dead epoch's last word.
            if not self._both_up(stack):
                return
            proxy = stack.proxies[step["who"]]          # what `who` sends to the other
            proxy.read_size, proxy.delay_s = 256, 0.1
            time.sleep(min(hold, 0.5))
            who.kill()
            self._restart(who)
            time.sleep(hold)
            proxy.read_size, proxy.delay_s = 65536, 0.0
        elif kind == "purge":
            if not self._both_up(stack):
                return
            status, _, _ = request(stack.port, "POST", "/purge-payments", headers={"X-Admin-Token": ADMIN})
            for sim in (stack.default, stack.fallback):
                sim.admin("POST", "/admin/purge-payments")
            if status == 200:
                self.purged_at = time.time()
            time.sleep(hold)

    def _heal(self, stack):
        for proxy in stack.proxies:
            proxy.unblock()
            proxy.delay_s, proxy.read_size = 0.0, 65536
        for sim in (stack.default, stack.fallback):
            sim.configure(delay=0, failure=False)
            sim.fault("none")
        for instance in stack.instances:
            if instance.process.poll() is None:
                instance.process.send_signal(signal.SIGCONT)
            else:
                instance._log.close()
                self._restart(instance)
        self._both_up(stack, timeout=30)

    # ----- checking --------------------------------------------------------------------
    def _check(self, stack, traffic):
        violations = collections.defaultdict(list)
        try:
            wait_until(lambda: all(instance_health(i)["pending"] == 0 for i in stack.instances), timeout=60,
                       what="the queues to drain")
        except AssertionError:
            violations["stuck"].append({i.instance_id: instance_health(i)["pending"] for i in stack.instances})
        time.sleep(1.0)                               # the last records cross the link
        for instance in stack.instances:
            for line in instance.log().splitlines():
                if '"abandoned: ' in line:
                    self.abandoned.update(json.loads(line)["msg"].split()[1:])
                if "Traceback" in line:
                    violations["traceback"].append(line[:300])
        cut_s = self.purged_at + PURGE_MARGIN_S if self.purged_at is not None else None
        cut_ms = int(cut_s * 1000) if cut_s is not None else None
        first_sent_wall = time.time() - time.monotonic()       # monotonic -> wall clock offset
        checked = {cid for cid, sends in traffic.sent.items()
                   if cut_s is None or sends[0][0] + first_sent_wall >= cut_s}
        stored = {}                                   # cid -> (processor, cents, requestedAt ms)
        for name, sim in (("default", stack.default), ("fallback", stack.fallback)):
            for p in sim.payments():
                entry = (name, round(p["amount"] * 100), p["requestedAtUs"] // 1000)
                if p["correlationId"] in stored:
                    violations["paid twice"].append(p["correlationId"])
                stored[p["correlationId"]] = entry
        for cid in checked:
            sends = traffic.sent[cid]
            accepted = {round(amount * 100) for _, amount, status, _ in sends if status == 202}
            if cid in stored:
                if accepted and stored[cid][1] not in accepted:
                    violations["wrong amount"].append((cid, stored[cid], sorted(accepted)))
                # Refused for certain: a 4xx, or an instance's own 503 (through HAProxy a 503 may
                # follow a retry of a request an instance that then died had taken).
                if not accepted and all(status is not None and (status < 500 or status == 503 and not via)
                                        for _, _, status, via in sends):
                    violations["stored, refused"].append((cid, [s[2] for s in sends]))
            elif accepted and cid not in self.abandoned:
                states = [self._lookup(i, cid) for i in stack.instances]
                if not any(s and s.get("status") == "dead_letter" and s.get("lastError") for s in states):
                    violations["lost"].append((cid, [s[2] for s in sends], states))
        records = [self._records(i) for i in stack.instances]
        for instance, held in zip(stack.instances, records):
            ids = collections.Counter(r["correlationId"] for r in held)
            twice = [cid for cid, n in ids.items() if n > 1]
            if twice:
                violations["record mismatch"].append(("two records", instance.instance_id, twice[:5]))
            mine = {r["correlationId"]: (r["processor"], round(float(r["amount"]) * 100),
                                         parse_us(r["requestedAt"]) // 1000) for r in held}
            for cid, entry in mine.items():
                if (cut_ms is None or entry[2] >= cut_ms) and stored.get(cid) != entry:
                    violations["record mismatch"].append(("not held so", instance.instance_id, cid, entry,
                                                          stored.get(cid)))
            for cid, entry in stored.items():
                if (cut_ms is None or entry[2] >= cut_ms) and cid not in mine:
                    violations["record mismatch"].append(("missing", instance.instance_id, cid, entry))
        keys = [sorted((r["correlationId"], r["processor"], r["requestedAt"], r["amount"]) for r in held)
                for held in records]
        if keys[0] != keys[1]:
            violations["instances disagree"].append((len(keys[0]), len(keys[1])))
        rng = random.Random(self.seed)
        times = sorted(entry[2] for entry in stored.values()) or [int(time.time() * 1000)]
        lo_all = max(times[0], cut_ms or times[0])
        windows = [(lo_all, times[-1])]
        for _ in range(12):
            a, b = sorted(rng.randint(lo_all - 500, times[-1] + 500) for _ in range(2))
            windows.append((max(a, cut_ms or a), b))
        for a, b in windows:
            query = "?from=%s&to=%s" % (quote(format_ms(a)), quote(format_ms(b)))
            theirs = {name: sim.summary(format_ms(a), format_ms(b))
                      for name, sim in (("default", stack.default), ("fallback", stack.fallback))}
            for instance in stack.instances:
                ours = instance.summary(query)
                for name in ("default", "fallback"):
                    if (ours[name]["totalRequests"], round(ours[name]["totalAmount"] * 100)) != (
                            theirs[name]["totalRequests"], round(theirs[name]["totalAmount"] * 100)):
                        violations["summary mismatch"].append((instance.instance_id, a, b, name, ours[name],
                                                               theirs[name]))
        if traffic.errors:
            violations["server errors"].extend(traffic.errors[:5])
        evidence = self._evidence(stack, violations) if violations else {}
        accepted = sum(1 for cid in checked if any(s[2] == 202 for s in traffic.sent[cid]))
        return {"seed": self.seed, "policy": self.policy, "steps": len(self.schedule),
                "payments_sent": sum(len(s) for s in traffic.sent.values()), "ids": len(traffic.sent),
                "checked_ids": len(checked), "accepted_checked": accepted, "stored": len(stored),
                "abandoned": len(self.abandoned), "summaries": dict((str(k), v) for k, v in traffic.summaries.items()),
                "faults": dict(self.tried), "windows_checked": len(windows),
                "violations": {k: v[:10] for k, v in violations.items()}, "evidence": evidence,
                "violation_counts": {k: len(v) for k, v in violations.items()}}

    @staticmethod
    def _evidence(stack, violations):
        """What the audit logs say of the first correlationIds named in the violations."""
        named = set()
        for found in violations.values():
            for item in found[:5]:
                for part in (item if isinstance(item, (list, tuple)) else [item]):
                    if isinstance(part, str) and len(part) == 36:
                        named.add(part)
        events = collections.defaultdict(list)
        for instance in stack.instances:
            path = instance.env.get("AUDIT_LOG")
            if not path or not os.path.exists(path):
                continue
            with open(path) as f:
                for line in f:
                    event = json.loads(line)
                    if event.get("correlationId") in named:
                        events[event["correlationId"]].append(dict(event, instance=instance.instance_id))
        return {cid: sorted(found, key=lambda e: e["at"]) for cid, found in events.items()}

    @staticmethod
    def _lookup(instance, cid):
        status, _, data = request(instance.socket, "GET", "/payments/" + cid)
        return json.loads(data) if status == 200 else None

    @staticmethod
    def _records(instance):
        held, offset = [], 0
        while offset is not None:
            status, _, data = request(instance.socket, "GET", "/admin/records?offset=%d" % offset,
                                      headers={"X-Admin-Token": ADMIN}, timeout=15)
            assert status == 200, data
            page = json.loads(data)
            held += page["records"]
            offset = page["next"]
        return held


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="*", help="replay these seeds")
    parser.add_argument("--runs", type=int, default=1, help="new random seeds to try (without --seeds)")
    parser.add_argument("--steps", type=int, default=25, help="faults per run")
    parser.add_argument("--rate", type=int, default=120, help="payments per second")
    parser.add_argument("--log", help="append one JSON line per run here")
    parser.add_argument("--keep", action="store_true", help="keep each run's directory (logs, audit logs)")
    args = parser.parse_args()
    seeds = args.seeds or [random.SystemRandom().randrange(1, 10 ** 9) for _ in range(args.runs)]
    failing = []
    for n, seed in enumerate(seeds, 1):
        figures = Hunt(seed, args.steps, args.rate).run(keep=args.keep)
        line = json.dumps(figures, sort_keys=True)
        print("run %d/%d seed %d: %s" % (n, len(seeds), seed, "VIOLATIONS" if figures["violations"] else "ok"),
              flush=True)
        print(line[:3000], flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(json.dumps(dict(figures, row="hunt", at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
                                   sort_keys=True) + "\n")
        if figures["violations"]:
            failing.append(seed)
    print("%d run(s), %d failing%s" % (len(seeds), len(failing),
                                       ": replay with --seeds " + " ".join(map(str, failing)) if failing else ""))
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
