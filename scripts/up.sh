#!/usr/bin/env bash
# `make up`: the stack as plain processes on loopback, no Docker.
#   HAProxy on 127.0.0.1:$PORT (9999) -> api1, api2 over Unix sockets in $RUN_DIR
#   plus a processor simulator for each of PROCESSOR_DEFAULT_URL / PROCESSOR_FALLBACK_URL
#   left unset (127.0.0.1:8001 fee 0.05, 127.0.0.1:8002 fee 0.15).
# Pid files and logs go to $RUN_DIR; `make down` stops exactly those pids.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-$PWD/run}
PY=${PY:-$PWD/.venv/bin/python}
PORT=${PORT:-9999}
mkdir -p "$RUN_DIR"

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
need_port() {
  if port_taken "$1"; then echo "error: port $1 is taken (is the stack already up? try: make down)" >&2; exit 1; fi
}

start() {  # start NAME CMD...: background process, pid in $RUN_DIR/NAME.pid, log in NAME.log
  local name=$1; shift
  nohup "$@" >"$RUN_DIR/$name.log" 2>&1 &
  echo $! >"$RUN_DIR/$name.pid"
}

wait_http() {  # wait_http URL [unix-socket]: up to 10 s for a 200
  local url=$1 sock=${2:-}
  for _ in $(seq 100); do
    if [ -n "$sock" ]; then curl -sf --unix-socket "$sock" "$url" >/dev/null 2>&1 && return 0
    else curl -sf "$url" >/dev/null 2>&1 && return 0; fi
    sleep 0.1
  done
  echo "error: $url did not answer (see $RUN_DIR/*.log)" >&2; exit 1
}

need_port "$PORT"
if [ -z "${PROCESSOR_DEFAULT_URL:-}" ]; then
  need_port 8001
  start sim-default "$PY" simulator.py --port 8001 --fee 0.05 --name default
  export PROCESSOR_DEFAULT_URL=http://127.0.0.1:8001
fi
if [ -z "${PROCESSOR_FALLBACK_URL:-}" ]; then
  need_port 8002
  start sim-fallback "$PY" simulator.py --port 8002 --fee 0.15 --name fallback
  export PROCESSOR_FALLBACK_URL=http://127.0.0.1:8002
fi

wait_sim() { for _ in $(seq 100); do port_taken "$1" && return 0; sleep 0.1; done; echo "error: simulator on $1 did not start" >&2; exit 1; }
[ -f "$RUN_DIR/sim-default.pid" ] && wait_sim 8001
[ -f "$RUN_DIR/sim-fallback.pid" ] && wait_sim 8002

for i in 1 2; do
  peer=$((3 - i))
  INSTANCE_ID=$i SOCKET_PATH="$RUN_DIR/api$i.sock" \
  PEER_LISTEN="$RUN_DIR/peer$i.sock" PEER_CONNECT="$RUN_DIR/peer$peer.sock" \
  PURGE_ENABLED=${PURGE_ENABLED:-true} \
    start "api$i" "$PY" server.py
done
for i in 1 2; do wait_http "http://api/health" "$RUN_DIR/api$i.sock"; done

BIND="127.0.0.1:$PORT" SOCKET_DIR="$RUN_DIR" haproxy -D -f haproxy.cfg -p "$RUN_DIR/haproxy.pid"
wait_http "http://127.0.0.1:$PORT/health"
echo "up: http://127.0.0.1:$PORT  (default $PROCESSOR_DEFAULT_URL, fallback $PROCESSOR_FALLBACK_URL; logs in $RUN_DIR)"
