"""Start the real stack for tests: simulators, instances, HAProxy, as processes.

Every port is picked free and every socket lives in a temporary directory, so
tests never collide with a `make up` running on the same machine.
"""
import collections
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "123"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(process, grace_s):
    """SIGTERM, then SIGKILL if the process is still there after grace_s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_until(predicate, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(interval)
    raise AssertionError("timed out waiting for %s" % what)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=5.0):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def request(target, method, path, body=None, headers=None, timeout=5.0):
    """One HTTP request; target is a TCP port or a Unix socket path. -> (status, headers, body)."""
    if isinstance(target, int):
        conn = http.client.HTTPConnection("127.0.0.1", target, timeout=timeout)
    else:
        conn = UnixHTTPConnection(target, timeout=timeout)
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    all_headers = {"Content-Type": "application/json"}
    all_headers.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def payment(amount=19.90, correlation_id=None):
    return {"correlationId": correlation_id or str(uuid.uuid4()), "amount": amount}


class Simulator:
    def __init__(self, name, fee, log_dir, **options):
        self.name = name
        self.port = free_port()
        args = [sys.executable, os.path.join(ROOT, "simulator.py"), "--port", str(self.port),
                "--fee", str(fee), "--name", name, "--token", TOKEN]
        for key, value in options.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        self._log = open(os.path.join(log_dir, "sim-%s.log" % name), "wb")
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        wait_until(lambda: socket.create_connection(("127.0.0.1", self.port), 0.2).close() or True,
                   what="simulator %s" % name)

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def admin(self, method, path, body=None):
        status, _, data = request(self.port, method, path, body, {"X-Rinha-Token": TOKEN}, timeout=15)
        assert status in (200, 204), (status, data)
        return json.loads(data) if data else None

    def configure(self, delay=None, failure=None):
        if delay is not None:
            self.admin("PUT", "/admin/configurations/delay", {"delay": delay})
        if failure is not None:
            self.admin("PUT", "/admin/configurations/failure", {"failure": failure})

    def fault(self, mode):
        self.admin("PUT", "/admin/sim/fault", {"mode": mode})

    def summary(self, from_=None, to=None):
        query = "&".join("%s=%s" % (k, v) for k, v in (("from", from_), ("to", to)) if v)
        return self.admin("GET", "/admin/payments-summary" + ("?" + query if query else ""))

    def payments(self):
        return self.admin("GET", "/admin/sim/payments")["payments"]

    def stats(self):
        return self.admin("GET", "/admin/sim/stats")

    def stop(self):
        terminate(self.process, 5)
        self._log.close()


class Instance:
    def __init__(self, stack, instance_id, **env):
        self.stack = stack
        self.instance_id = instance_id
        self.socket = os.path.join(stack.dir, "api%d.sock" % instance_id)
        self.http_port = free_port()
        peer = 3 - instance_id
        self.env = dict(os.environ)
        self.env.update({
            "INSTANCE_ID": str(instance_id),
            "SOCKET_PATH": self.socket,
            "HTTP_PORT": str(self.http_port),
            "PEER_LISTEN": os.path.join(stack.dir, "peer%d.sock" % instance_id),
            "PEER_CONNECT": os.path.join(stack.dir, "peer%d.sock" % peer),
            "PROCESSOR_DEFAULT_URL": stack.default.url,
            "PROCESSOR_FALLBACK_URL": stack.fallback.url,
            "PURGE_ENABLED": "true",
            "LOG_LEVEL": "INFO",
        })
        # "{instance}" in a value stands for the instance's number (AUDIT_LOG=.../audit{instance}.log).
        self.env.update({k.upper(): str(v).replace("{instance}", str(instance_id)) for k, v in env.items()})
        self.log_path = os.path.join(stack.dir, "api%d.log" % instance_id)
        self.process = None
        self.start()

    def start(self, wait=True):
        """Start the process; with wait, until /health answers 200 (the instance is ready)."""
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py")], env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        if not wait:
            return
        try:
            wait_until(lambda: self.get("/health")[0] == 200, what="instance %d" % self.instance_id)
        except BaseException:
            terminate(self.process, 5)        # never leave a half-started instance behind
            self._log.close()
            raise

    def get(self, path):
        return request(self.http_port, "GET", path)

    def post(self, path, body=None):
        return request(self.http_port, "POST", path, body)

    def summary(self, query=""):
        status, _, data = self.get("/payments-summary" + query)
        assert status == 200, (status, data)
        return json.loads(data)

    def peer_up(self):
        return json.loads(self.get("/health")[2])["peer"] == "up"

    def kill(self, sig=signal.SIGKILL):
        self.process.send_signal(sig)
        self.process.wait(20)
        self._log.close()

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self):
        terminate(self.process, 15)   # an instance may spend its grace period finishing payments
        self._log.close()


class Stack:
    """Simulators + two instances (+ HAProxy when with_haproxy)."""

    def __init__(self, tmp_dir, with_haproxy=True, sim_options=None, peer_proxy=False, **instance_env):
        self.dir = str(tmp_dir)
        self.default = self.fallback = None
        self.instances = []
        self.haproxy = None
        self.proxies = []
        sim_options = sim_options or {}
        try:
            self.default = Simulator("default", 0.05, self.dir, **sim_options)
            self.fallback = Simulator("fallback", 0.15, self.dir, **sim_options)
            if peer_proxy:
                # Each instance dials its peer through a proxy the test can cut (PeerProxy.drop).
                self.proxies = [PeerProxy(os.path.join(self.dir, "peerproxy%d.sock" % i),
                                          os.path.join(self.dir, "peer%d.sock" % (3 - i))) for i in (1, 2)]
                self.instances = [Instance(self, i, **dict(instance_env, PEER_CONNECT=self.proxies[i - 1].path))
                                  for i in (1, 2)]
            else:
                self.instances = [Instance(self, 1, **instance_env), Instance(self, 2, **instance_env)]
            wait_until(lambda: all(i.peer_up() for i in self.instances), what="peer link")
            if with_haproxy:
                self.start_haproxy()
        except BaseException:
            self.stop()
            raise

    def start_haproxy(self):
        self.port = free_port()
        env = dict(os.environ, BIND="127.0.0.1:%d" % self.port, SOCKET_DIR=self.dir)
        self.haproxy = subprocess.Popen(["haproxy", "-f", os.path.join(ROOT, "haproxy.cfg")], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: request(self.port, "GET", "/health")[0] == 200, what="haproxy")

    def post_payment(self, body):
        return request(self.port, "POST", "/payments", body)

    def summary(self, query=""):
        status, _, data = request(self.port, "GET", "/payments-summary" + query)
        assert status == 200, (status, data)
        return json.loads(data)

    def pending(self):
        return sum(json.loads(i.get("/health")[2])["pending"] for i in self.instances if i.process.poll() is None)

    def wait_drained(self, timeout=30.0):
        wait_until(lambda: self.pending() == 0, timeout=timeout, what="queues to drain")
        time.sleep(0.1)   # the last records cross the peer link

    def stop(self):
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.terminate()
            self.haproxy.wait(5)
        for instance in self.instances:
            instance.stop()
        for sim in (self.default, self.fallback):
            if sim is not None:
                sim.stop()
        for proxy in self.proxies:
            proxy.close()


# ----- helpers for the fault, fuzz and slow-client tests (docs/RELIABILITY.md) -------------

def proc_stats(pid):
    """A process's current and peak RSS (KiB), CPU seconds (user + system), open fds and Unix sockets."""
    stats = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                stats["rss_kb" if line.startswith("VmRSS") else "hwm_kb"] = int(line.split()[1])
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    fields = data[data.rindex(")") + 2:].split()
    stats["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    fds = os.listdir("/proc/%d/fd" % pid)
    stats["fds"] = len(fds)
    # Unix sockets apart: client connections (and the peer link) are Unix sockets, the pool of
    # connections to the processors is TCP and grows with the load on its own.
    with open("/proc/%d/net/unix" % pid) as f:
        unix_inodes = {line.split()[6] for line in f.readlines()[1:] if len(line.split()) > 6}
    links = []
    for fd in fds:
        try:
            links.append(os.readlink("/proc/%d/fd/%s" % (pid, fd)))
        except OSError:
            pass
    stats["unix_sockets"] = sum(1 for link in links if link.startswith("socket:[") and link[8:-1] in unix_inodes)
    return stats


def instance_health(instance):
    """GET /health of one instance as a dict."""
    return json.loads(instance.get("/health")[2])


def own_figures(instance):
    """The instance's own snapshot from its GET /metrics.json ([instance 1's, instance 2's])."""
    return json.loads(instance.get("/metrics.json")[2])["instances"][instance.instance_id - 1]


def stop_fast(stack):
    """Stack.stop, but the simulators are killed instead of shut down gracefully.

    A simulator holding a health call in its rate limiter takes ~5 s to shut
    down gracefully; nothing in a simulator needs a clean exit.
    """
    if stack.haproxy is not None and stack.haproxy.poll() is None:
        stack.haproxy.terminate()
        stack.haproxy.wait(5)
    for instance in stack.instances:
        if instance.process is not None and instance.process.poll() is None:
            instance.stop()
    for sim in (stack.default, stack.fallback):
        if sim is not None and sim.process.poll() is None:
            sim.process.kill()
            sim.process.wait(5)
    stack.stop()


def unix_connect(path, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def read_until_close(sock, limit=1 << 22):
    """Everything the server sends until it closes the connection (or the socket times out)."""
    chunks, size = [], 0
    try:
        while size < limit:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
            size += len(data)
    except (socket.timeout, ConnectionResetError):
        pass
    return b"".join(chunks)


def split_responses(data):
    """Raw bytes from the server -> [(status, {lower-case header: value}, body)], Content-Length framed.

    Raises ValueError on anything that is not a well-formed sequence of responses
    (a trailing partial response included).
    """
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("incomplete response head: %r" % data[:200])
        lines = head.split(b"\r\n")
        version, status, _ = (lines[0].split(b" ", 2) + [b""])[:3]
        if version != b"HTTP/1.1" or not status.isdigit():
            raise ValueError("bad status line: %r" % lines[0])
        headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ValueError("bad header line: %r" % line)
            headers[name.strip().lower().decode()] = value.strip().decode("latin-1")
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            raise ValueError("truncated body")
        out.append((int(status), headers, rest[:length]))
        data = rest[length:]
    return out


class PeerProxy:
    """A Unix-socket forwarder between an instance and its peer's socket, that a test can cut.

    drop() severs every current connection (both ends see the link go, as if
    the peer had died, but neither instance loses anything in memory);
    block()/unblock() make new connections fail meanwhile.
    delay_s holds what the dialing instance sends for that long before passing it on (in order),
    read_size bytes at a time (so delay_s and read_size together make a slow link);
    hold_prefix (bytes) keeps back every line the dialing instance sends that starts with it
    (e.g. b'["E"', the end of a resync), until hold_prefix is set to None.
    """

    def __init__(self, path, upstream):
        self.path = path
        self.upstream = upstream
        self.connections = 0
        self.open_pairs = 0           # connections whose two directions are not both finished
        self.drops = 0
        self.delay_s = 0.0
        self.read_size = 65536
        self.hold_prefix = None
        self.held = []                # lines kept back by hold_prefix
        self._lock = threading.Lock()
        self._pairs = []
        self._listener = None
        self._stopped = False
        self.unblock()

    def unblock(self):
        if self._listener is not None:
            return
        if os.path.exists(self.path):
            os.unlink(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        listener.settimeout(0.1)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def block(self):
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()          # the accept thread notices within 0.1 s
            if os.path.exists(self.path):
                os.unlink(self.path)

    def drop(self):
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.drops += 1

    def close(self):
        self._stopped = True
        self.block()
        self.drop()

    def _held(self, line, prefix):
        if line.startswith(prefix):
            self.held.append(line)
            return True
        return False

    def _accept(self, listener):
        while self._listener is listener and not self._stopped:
            try:
                client, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.upstream)
            except OSError:
                client.close()
                upstream.close()
                continue
            pair = (client, upstream)
            with self._lock:
                self._pairs.append(pair)
                self.connections += 1
                self.open_pairs += 1
            done = []
            for src, dst, outgoing in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, pair, done, outgoing), daemon=True).start()

    def _pump(self, src, dst, pair, done, outgoing):
        partial = b""
        try:
            while True:
                data = src.recv(self.read_size if outgoing else 65536)
                if not data:
                    break
                if outgoing and self.delay_s:
                    time.sleep(self.delay_s)
                prefix = self.hold_prefix
                if outgoing and prefix is not None:
                    lines = (partial + data).split(b"\n")
                    partial = lines.pop()
                    data = b"".join(line + b"\n" for line in lines if not self._held(line, prefix))
                    if not data:
                        continue
                elif partial:
                    data, partial = partial + data, b""
                dst.sendall(data)
        except OSError:
            pass
        # Pass the end on and let the other direction carry on: as with a real socket, what one
        # side wrote before it died is still read by the other, even after a write to it failed.
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        done.append(1)
        if len(done) == 2:            # the second pump to finish closes both sockets
            for s in pair:
                s.close()
            with self._lock:
                self.open_pairs -= 1


class Load:
    """Steady background payment traffic, recording what every client saw.

    target is a TCP port (HAProxy) or a Unix socket path (one instance).
    `rate` payments per second spread over `workers` keep-alive connections;
    with summary_interval, one more thread asks for the summary that often.

    Every payment ends in exactly one of:
      accepted  -- answered 202;
      refused   -- any other definite answer (4xx, the instance's 503 queue-full
                   or HAProxy's 503 "no server"): never accepted;
      unknown   -- no answer, or HAProxy's 502/504: the request may have reached
                   an instance, so it may or may not have been accepted.
    """

    def __init__(self, target, rate=200.0, workers=4, amount=19.90, timeout=3.0, summary_interval=None):
        self.target = target
        self.rate = rate
        self.workers = workers
        self.amount = amount
        self.timeout = timeout
        self.summary_interval = summary_interval
        self.accepted = []
        self.refused = collections.Counter()
        self.unknown = []
        self.latencies = []
        self.events = []              # (monotonic time, what) for every answer but 202 / 200
        self.summaries_ok = 0
        self.summary_errors = []
        self._stop = threading.Event()
        self._threads = []
        self.started_at = self.stopped_at = None

    def _connection(self):
        if isinstance(self.target, int):
            return http.client.HTTPConnection("127.0.0.1", self.target, timeout=self.timeout)
        return UnixHTTPConnection(self.target, timeout=self.timeout)

    def start(self):
        self.started_at = time.monotonic()
        for n in range(self.workers):
            thread = threading.Thread(target=self._pay_loop, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.summary_interval:
            thread = threading.Thread(target=self._summary_loop, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout + 5)
        self.stopped_at = time.monotonic()
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _pay_loop(self, n):
        interval = self.workers / self.rate
        next_at = time.monotonic() + interval * n / self.workers
        conn = None
        while not self._stop.is_set():
            now = time.monotonic()
            if next_at > now:
                time.sleep(next_at - now)
            elif now - next_at > 1.0:
                next_at = now                     # fell behind (a stall): do not burst to catch up
            next_at += interval
            correlation_id = str(uuid.uuid4())
            body = json.dumps({"correlationId": correlation_id, "amount": self.amount})
            started = time.monotonic()
            try:
                if conn is None:
                    conn = self._connection()
                conn.request("POST", "/payments", body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                status = response.status
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                self.unknown.append(correlation_id)
                self.events.append((time.monotonic(), "payment: %s" % type(exc).__name__))
                continue
            self.latencies.append(time.monotonic() - started)
            if status == 202:
                self.accepted.append(correlation_id)
                continue
            if status in (502, 504):
                self.unknown.append(correlation_id)
            else:
                self.refused[status] += 1
            # Instances and HAProxy both answer errors in JSON now: the body says which error.
            self.events.append((time.monotonic(), "payment: %d %s" % (status, data[:80].decode(errors="replace"))))
        if conn is not None:
            conn.close()

    def _summary_loop(self):
        conn = None
        while not self._stop.wait(self.summary_interval):
            try:
                if conn is None:
                    conn = self._connection()
                conn.request("GET", "/payments-summary")
                response = conn.getresponse()
                data = response.read()
                if response.status == 200 and b'"default"' in data:
                    self.summaries_ok += 1
                else:
                    self.summary_errors.append(response.status)
                    self.events.append((time.monotonic(), "summary: %d" % response.status))
                if response.will_close:
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                self.summary_errors.append(type(exc).__name__)
                self.events.append((time.monotonic(), "summary: %s" % type(exc).__name__))
        if conn is not None:
            conn.close()

    def errors(self):
        """Client-visible errors: payments not answered 202 for another reason than a 4xx, plus summary errors."""
        payment_errors = len(self.unknown) + sum(n for status, n in self.refused.items() if status >= 500)
        return payment_errors + len(self.summary_errors)

    def p99_ms(self):
        return percentile(self.latencies, 99) * 1000

    def report(self):
        return {"sent": len(self.accepted) + sum(self.refused.values()) + len(self.unknown),
                "accepted": len(self.accepted), "refused": dict(self.refused), "unknown": len(self.unknown),
                "summaries_ok": self.summaries_ok, "summary_errors": len(self.summary_errors),
                "p99_ms": round(self.p99_ms(), 2) if self.latencies else None}


def percentile(values, p):
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def books(stack):
    """What the processors stored: ({correlationId: processor name}, duplicates across or within them)."""
    stored, duplicates = {}, 0
    for name, sim in (("default", stack.default), ("fallback", stack.fallback)):
        for p in sim.payments():
            if p["correlationId"] in stored:
                duplicates += 1
            stored[p["correlationId"]] = name
    return stored, duplicates


def summary_count(summary):
    return summary["default"]["totalRequests"] + summary["fallback"]["totalRequests"]


def record_metrics(row, **metrics):
    """Append one experiment's figures to results/reliability.jsonl (RELIABILITY_LOG overrides the path).

    docs/RELIABILITY.md quotes these figures; every fault test records its own.
    """
    path = os.environ.get("RELIABILITY_LOG") or os.path.join(ROOT, "results", "reliability.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    entry = dict(row=row, at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **metrics)
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    print("\n" + json.dumps(entry, sort_keys=True))
    return entry


SLOW_HEAD = b"POST /payments HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"


def slow_clients_main(argv=None):
    """Hold many slow connections to one Unix socket, in a process of their own (no GIL shared with
    the test's own clients). Each of COUNT slots keeps one connection; when the server closes it, the
    slot opens another (as a slowloris attacker does) until DURATION_S ends. Prints one JSON line: per
    connection, seconds until the server closed it (None: still open at the end, with its age then)
    and the status line it answered, if any.

        python -c 'import stack; stack.slow_clients_main()' SOCKET MODE COUNT INTERVAL_S DURATION_S

    MODE: head   -- a request head sent one byte per interval, never finished (slowloris)
          body   -- a complete head announcing 1000 bytes, then the body one byte per interval
          idle   -- connect and send nothing
          reader -- pipeline 4000 requests at once, then never read an answer (no reconnect)
    """
    import selectors
    path, mode, count, interval, duration = (argv or sys.argv[1:])[:5]
    count, interval, duration = int(count), float(interval), float(duration)
    finished = []

    def open_one():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if mode == "reader":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(path)
        c = {"sock": s, "opened": time.monotonic(), "closed": None, "status": None, "sent": 0}
        if mode == "body":
            s.sendall(SLOW_HEAD + b"Content-Length: 1000\r\n\r\n")
        if mode == "reader":
            s.settimeout(2)
            try:
                s.sendall(b"GET /payments-summary HTTP/1.1\r\nHost: x\r\n\r\n" * 4000)
            except OSError:
                pass
        s.setblocking(False)
        return c

    def close_one(c, now):
        c["closed"] = now - c["opened"]
        finished.append(c)
        c["sock"].close()
        return open_one() if mode != "reader" and now < deadline - interval else None

    deadline = time.monotonic() + duration
    conns = [open_one() for _ in range(count)]
    selector = selectors.DefaultSelector()       # epoll: cheap with a thousand sockets
    for i, c in enumerate(conns):
        selector.register(c["sock"], selectors.EVENT_READ, i)
    payload = SLOW_HEAD + b"X-Slow: " + b"a" * 100000
    next_send = time.monotonic()

    def note_status(c, data):
        if data and c["status"] is None:
            c["status"] = data.split(b"\r\n", 1)[0].decode("latin-1")

    def replace(i, now):
        try:
            note_status(conns[i], conns[i]["sock"].recv(65536))   # an answer sent before the close
        except OSError:
            pass
        selector.unregister(conns[i]["sock"])
        conns[i] = close_one(conns[i], now)
        if conns[i] is not None:
            selector.register(conns[i]["sock"], selectors.EVENT_READ, i)

    while time.monotonic() < deadline:
        now = time.monotonic()
        if mode == "reader":
            time.sleep(0.05)
            continue
        if mode in ("head", "body") and now >= next_send:
            next_send = now + interval
            for i, c in enumerate(conns):
                if c is None:
                    continue
                try:
                    c["sock"].send(payload[c["sent"]:c["sent"] + 1] if mode == "head" else b"x")
                    c["sent"] += 1
                except OSError:
                    replace(i, now)
        if not any(conns):
            break
        for key, _ in selector.select(min(0.05, max(0.0, next_send - time.monotonic()))):
            i = key.data
            c = conns[i]
            try:
                data = c["sock"].recv(65536)
            except OSError:
                data = b""
            note_status(c, data)
            if not data:
                replace(i, time.monotonic())
    end = time.monotonic()
    report = [{"closed_after_s": c["closed"], "status": c["status"]} for c in finished]
    report += [{"closed_after_s": None, "open_for_s": end - c["opened"], "status": c["status"]}
               for c in conns if c is not None]
    print(json.dumps(report))
    for c in conns:
        if c is not None:
            c["sock"].close()


def start_slow_clients(path, mode, count, interval_s, duration_s):
    """slow_clients_main in a subprocess; .communicate() gives its JSON line."""
    code = "import sys; sys.path.insert(0, %r); import stack; stack.slow_clients_main()" % os.path.dirname(
        os.path.abspath(__file__))
    return subprocess.Popen([sys.executable, "-c", code, path, mode, str(count), str(interval_s), str(duration_s)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


CHAOS = os.environ.get("CHAOS") == "1"


def scaled(ci, chaos):
    """The CI figure, or the longer one under `make chaos` (CHAOS=1)."""
    return chaos if CHAOS else ci
