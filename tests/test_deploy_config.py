"""Static checks of the Docker deployment (docker-compose.yml, Dockerfile, .dockerignore).

There is no Docker engine in the test environment, so these tests read the files
and check them against the limits of the official deployment (docs in SPEC.md):
1.5 CPU / 350 MB in total, bridge networking, no privileged mode or replicas,
port 9999, the external `payment-processor` network, and wiring that matches
haproxy.cfg and scripts/up.sh.
"""
import ast
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("haproxy", "api1", "api2")
APIS = ("api1", "api2")
MAX_CPUS = Decimal("1.5")
MAX_MEMORY = 350 * 1024 ** 2  # Docker reads "MB" as MiB; so do we (see parse_bytes)


@pytest.fixture(scope="module")
def compose():
    with open(ROOT / "docker-compose.yml") as f:
        return yaml.safe_load(f)


def env_of(service):
    """A service's environment as a dict (compose allows a mapping or KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def parse_bytes(value):
    """Compose/Docker byte value -> bytes. Docker's units are binary and
    case-insensitive: b, k/kb/kib, m/mb/mib, g/gb/gib."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?)(i?b)?\s*", str(value), re.IGNORECASE)
    assert m, f"unparseable memory value {value!r}"
    scale = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[m.group(2).lower()]
    return int(Decimal(m.group(1)) * scale)


def test_parse_bytes_units():
    assert parse_bytes("155MB") == parse_bytes("155M") == parse_bytes("155MiB") == 155 * 2 ** 20
    assert parse_bytes("1GB") == parse_bytes("1g") == 2 ** 30
    assert parse_bytes("512k") == 512 * 1024
    assert parse_bytes(1000) == parse_bytes("1000b") == 1000
    assert parse_bytes("0.5GB") == 512 * 2 ** 20


def limits_of(service):
    return ((service.get("deploy") or {}).get("resources") or {}).get("limits") or {}


def test_services_exist(compose):
    assert set(SERVICES) <= set(compose["services"])


def test_every_service_has_limits(compose):
    for name, svc in compose["services"].items():
        limits = limits_of(svc)
        assert "cpus" in limits and "memory" in limits, f"{name} has no cpus/memory limits"


def test_total_limits_within_official_budget(compose):
    services = compose["services"].values()
    cpus = sum(Decimal(str(limits_of(s)["cpus"])) for s in services)
    memory = sum(parse_bytes(limits_of(s)["memory"]) for s in services)
    assert cpus <= MAX_CPUS, f"{cpus} CPUs > {MAX_CPUS}"
    assert memory <= MAX_MEMORY, f"{memory / 2 ** 20} MB > 350 MB"


def test_no_host_network_privileged_or_replicas(compose):
    for name, svc in compose["services"].items():
        assert svc.get("network_mode") in (None, "bridge"), f"{name}: network_mode"
        assert not svc.get("privileged"), f"{name}: privileged"
        assert "replicas" not in (svc.get("deploy") or {}), f"{name}: deploy.replicas"
        assert "scale" not in svc, f"{name}: scale"
    for name, net in (compose.get("networks") or {}).items():
        if net and not net.get("external"):
            assert net.get("driver", "bridge") == "bridge", f"network {name} is not bridge"


def test_images_are_linux_amd64(compose):
    for name, svc in compose["services"].items():
        assert svc.get("platform", "linux/amd64") == "linux/amd64", name
        assert "image" in svc, f"{name} needs an image name"


def test_haproxy_publishes_9999(compose):
    haproxy = compose["services"]["haproxy"]
    published = set()
    for port in haproxy.get("ports", []):
        if isinstance(port, dict):
            published.add((str(port.get("published")), str(port.get("target"))))
        else:
            parts = str(port).split("/")[0].split(":")
            published.add((parts[-2], parts[-1]))
    assert ("9999", "9999") in published
    assert env_of(haproxy)["BIND"].rsplit(":", 1)[1] == "9999"
    assert set(haproxy.get("depends_on", [])) >= set(APIS)


def test_payment_processor_network_external_and_joined_by_apis(compose):
    net = compose["networks"]["payment-processor"]
    assert net.get("external") is True
    assert net.get("name", "payment-processor") == "payment-processor"
    for name in APIS:
        assert "payment-processor" in compose["services"][name]["networks"], name
    for name in SERVICES:
        assert "backend" in compose["services"][name]["networks"], name


def test_apis_wired_as_haproxy_cfg_expects(compose):
    services = compose["services"]
    socket_dir = env_of(services["haproxy"])["SOCKET_DIR"].rstrip("/")
    cfg = (ROOT / "haproxy.cfg").read_text()
    expected = set(re.findall(r'"unix@\$\{SOCKET_DIR\}/([^"]+)"', cfg))
    assert expected == {"api1.sock", "api2.sock"}

    envs = {name: env_of(services[name]) for name in APIS}
    assert envs["api1"]["INSTANCE_ID"] != envs["api2"]["INSTANCE_ID"]
    sockets = {posixpath_dirname_base(e["SOCKET_PATH"]) for e in envs.values()}
    assert sockets == {(socket_dir, s) for s in expected}
    assert len({e["PEER_LISTEN"] for e in envs.values()}) == 2
    assert envs["api1"]["PEER_CONNECT"] == envs["api2"]["PEER_LISTEN"]
    assert envs["api2"]["PEER_CONNECT"] == envs["api1"]["PEER_LISTEN"]
    for name, e in envs.items():
        assert e["PROCESSOR_DEFAULT_URL"] == "http://payment-processor-default:8080", name
        assert e["PROCESSOR_FALLBACK_URL"] == "http://payment-processor-fallback:8080", name
        assert e["PURGE_ENABLED"].lower() in ("1", "true", "yes", "on"), name
        # Every socket path lives in the volume shared with haproxy.
        for key in ("SOCKET_PATH", "PEER_LISTEN", "PEER_CONNECT"):
            assert os.path.dirname(e[key]) == socket_dir, (name, key)


def posixpath_dirname_base(path):
    return os.path.dirname(path).rstrip("/"), os.path.basename(path)


def volume_mounts(service):
    """(source, target, read_only) of each volume entry, short or long syntax."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append((v.get("source"), v["target"], bool(v.get("read_only"))))
        else:
            parts = v.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def test_shared_socket_volume(compose):
    socket_dir = env_of(compose["services"]["haproxy"])["SOCKET_DIR"].rstrip("/")
    assert "sockets" in compose["volumes"]
    for name in SERVICES:
        assert ("sockets", socket_dir, False) in volume_mounts(compose["services"][name]), name


def test_haproxy_mounts_repo_cfg(compose):
    haproxy = compose["services"]["haproxy"]
    cfgs = [(src, tgt, ro) for src, tgt, ro in volume_mounts(haproxy) if tgt.endswith(".cfg")]
    assert len(cfgs) == 1
    src, target, ro = cfgs[0]
    assert (ROOT / src).resolve() == ROOT / "haproxy.cfg"
    assert ro, "haproxy.cfg should be mounted read-only"
    command = haproxy.get("command")
    if command is None:  # the official image's default command reads this path
        assert target == "/usr/local/etc/haproxy/haproxy.cfg"
    else:
        assert target in (command if isinstance(command, str) else " ".join(command))


def test_apis_stop_gracefully(compose):
    for name in APIS:
        grace = str(compose["services"][name].get("stop_grace_period", "10s"))
        m = re.fullmatch(r"(\d+)s", grace)
        assert m and int(m.group(1)) > 10, f"{name}: drain takes up to 10 s"


def test_apis_come_back_after_a_crash(compose):
    # The peer inherits a dead instance's pending payments; the instance itself must return too.
    for name in APIS:
        assert compose["services"][name].get("restart") in ("unless-stopped", "always", "on-failure"), name


def test_apis_share_one_built_image(compose):
    api1, api2 = (compose["services"][n] for n in APIS)
    assert api1["image"] == api2["image"]
    assert api1.get("build") in (".", {"context": "."})


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy not installed")
def test_haproxy_cfg_valid_with_compose_env(compose):
    env = dict(os.environ, **env_of(compose["services"]["haproxy"]))
    r = subprocess.run(["haproxy", "-c", "-f", str(ROOT / "haproxy.cfg")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


# --- Dockerfile and .dockerignore -----------------------------------------------------

def dockerfile_instructions():
    """(INSTRUCTION, args) of the Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    logical, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    out = []
    for line in logical:
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(instructions):
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def copied_sources(instructions):
    """Sources of COPY/ADD lines that copy from the build context (not --from=stage)."""
    sources = []
    for word, args in instructions:
        if word not in ("COPY", "ADD"):
            continue
        parts = shlex.split(args)
        if any(p.startswith("--from") for p in parts):
            continue
        parts = [p for p in parts if not p.startswith("--")]
        sources.extend(parts[:-1])
    return sources


def local_imports(module, seen=None):
    """Top-level repo modules imported by `module` (a repo .py file stem), transitively."""
    seen = set() if seen is None else seen
    seen.add(module)
    tree = ast.parse((ROOT / f"{module}.py").read_text())
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        for name in names:
            if name not in seen and (ROOT / f"{name}.py").is_file():
                local_imports(name, seen)
    return seen


def test_dockerfile_runs_as_non_root():
    final = final_stage(dockerfile_instructions())
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage sets no USER"
    assert users[-1].split(":")[0] not in ("root", "0")
    word, args = final[0]
    assert args.split()[0].startswith("python:3.11-slim")
    cmd = [args for word, args in final if word == "CMD"]
    assert cmd and cmd[-1].replace(" ", "") == '["python","server.py"]'
    env = " ".join(args for word, args in final if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env


def test_dockerfile_final_stage_installs_no_build_tools():
    final = " ".join(args for word, args in final_stage(dockerfile_instructions()) if word == "RUN")
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "make "):
        assert tool not in final, f"final stage runs {tool.strip()}"


def test_dockerfile_copies_every_imported_module_and_no_tests():
    sources = copied_sources(dockerfile_instructions())
    assert sources
    for src in sources:
        top = src.strip("./").split("/")[0]
        assert top not in ("tests", "bench", "docs", "."), f"COPY {src}"
        assert src != "simulator.py"
    needed = {f"{m}.py" for m in local_imports("server")}
    assert needed >= {"server.py", "config.py", "router.py", "processors.py", "store.py",
                      "payments.py", "peer.py", "timestamps.py"}
    copied = {p.name for src in sources for p in ROOT.glob(src)}
    missing = needed - copied
    assert not missing, f"server.py imports {sorted(missing)} but the Dockerfile does not copy them"
    assert "requirements.txt" in copied


def dockerignore_patterns():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.lstrip().startswith("#")]


def ignored(path, patterns):
    result = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        candidates = {pat, pat.removeprefix("**/")}
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, c) for p in prefixes for c in candidates):
            result = not negate
    return result


def test_dockerignore_keeps_context_small_but_keeps_what_copy_needs():
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", "run", "results", "tests/test_x.py", "bench/run.py",
                 "docs/a.md", "__pycache__/x.pyc", "sub/__pycache__/x.pyc"):
        assert ignored(path, patterns), f"{path} is sent to the build context"
    for src in copied_sources(dockerfile_instructions()):
        for p in ROOT.glob(src):
            assert not ignored(p.relative_to(ROOT).as_posix(), patterns), f"{src} is ignored"
