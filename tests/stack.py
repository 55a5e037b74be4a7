"""Start the real stack for tests: simulators, instances, HAProxy, as processes.

Every port is picked free and every socket lives in a temporary directory, so
tests never collide with a `make up` running on the same machine.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "123"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
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
        self.env.update({k.upper(): str(v) for k, v in env.items()})
        self.log_path = os.path.join(stack.dir, "api%d.log" % instance_id)
        self.process = None
        self.start()

    def start(self):
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, "server.py")], env=self.env,
                                        stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(lambda: self.get("/health")[0] == 200, what="instance %d" % self.instance_id)

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
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


class Stack:
    """Simulators + two instances (+ HAProxy when with_haproxy)."""

    def __init__(self, tmp_dir, with_haproxy=True, sim_options=None, **instance_env):
        self.dir = str(tmp_dir)
        self.default = self.fallback = None
        self.instances = []
        self.haproxy = None
        sim_options = sim_options or {}
        try:
            self.default = Simulator("default", 0.05, self.dir, **sim_options)
            self.fallback = Simulator("fallback", 0.15, self.dir, **sim_options)
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
