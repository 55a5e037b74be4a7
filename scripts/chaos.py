#!/usr/bin/env python3
"""`make chaos`: the fault, fuzz and slow-client experiments at full length, and the hunt.

The same tests as `make test` (tests/test_faults.py, tests/test_exactly_once.py,
tests/test_fuzz.py, tests/test_slow_clients.py), with CHAOS=1 lengthening them
(both processors down for 60 s, five kill -9 cycles, 60 peer-link cuts, 20
SIGSTOP cycles, 5 s per connection-level fault, ...) and FUZZ_EXAMPLES cases
per fuzz generator; then the exactly-once hunt (tests/hunt.py) with new random
seeds, each failing seed printed so it can be replayed. Everything runs on
loopback with free ports and temporary directories, like the tests; nothing is
left running.

    .venv/bin/python scripts/chaos.py [--fuzz-examples N] [--runs N] [--hunt-runs N] [--hunt-steps N]
                                      [pytest args...]

Writes results/<UTC stamp>-chaos.jsonl (one line per experiment, the figures
docs/RELIABILITY.md quotes) and prints a summary table. Exit status: pytest's
(every known bug is fixed: anything failing is new).
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = ["tests/test_faults.py", "tests/test_exactly_once.py", "tests/test_fuzz.py", "tests/test_slow_clients.py"]
COLUMNS = ("accepted", "lost", "paid_twice", "missing_from_summary", "client_errors")


def summarise(path):
    rows = []
    with open(path) as f:
        for line in f:
            rows.append(json.loads(line))
    print("\n%-30s %9s %6s %10s %8s %8s  %s" % (("experiment",) + COLUMNS + ("other figures",)))
    for row in rows:
        cells = [row.get(c, row.get("load", {}).get("unknown") if c == "client_errors" else None) for c in COLUMNS]
        other = {k: v for k, v in row.items() if k not in COLUMNS + ("row", "at", "load", "error_events",
                                                                      "statuses", "stored", "reported_default",
                                                                      "reported_fallback", "stored_not_accepted")}
        print("%-30s %9s %6s %10s %8s %8s  %s" % ((row["row"],) + tuple("-" if c is None else c for c in cells)
                                                 + (json.dumps(other, sort_keys=True)[:160],)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz-examples", type=int, default=10000, help="cases per fuzz generator (CI: 1500)")
    parser.add_argument("--runs", type=int, default=1, help="run the whole set this many times")
    parser.add_argument("--hunt-runs", type=int, default=10, help="hunt runs, each with a new seed (0: none)")
    parser.add_argument("--hunt-steps", type=int, default=30, help="faults per hunt run")
    args, pytest_args = parser.parse_known_args()
    os.makedirs(os.path.join(ROOT, "results"), exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    log = os.path.join(ROOT, "results", "%s-chaos.jsonl" % stamp)
    env = dict(os.environ, CHAOS="1", RELIABILITY_LOG=log, FUZZ_EXAMPLES=str(args.fuzz_examples))
    status = 0
    started = time.monotonic()
    for run in range(args.runs):
        print("chaos run %d/%d -> %s" % (run + 1, args.runs, os.path.relpath(log, ROOT)), flush=True)
        command = [sys.executable, "-m", "pytest", "-q", "-rxXf", "-p", "no:cacheprovider"] + TESTS + pytest_args
        status = subprocess.call(command, cwd=ROOT, env=env) or status
    if args.hunt_runs:
        print("hunt: %d run(s) with new seeds, %d faults each" % (args.hunt_runs, args.hunt_steps), flush=True)
        command = [sys.executable, os.path.join("tests", "hunt.py"), "--runs", str(args.hunt_runs),
                   "--steps", str(args.hunt_steps), "--log", log]
        status = subprocess.call(command, cwd=ROOT, env=env) or status
    if os.path.exists(log):
        summarise(log)
    print("\n%d run(s) in %.0f s; figures in %s" % (args.runs, time.monotonic() - started, os.path.relpath(log, ROOT)))
    return status


if __name__ == "__main__":
    sys.exit(main())
