#!/usr/bin/env bash
# `make down`: stop exactly the processes `make up` started (their pid files in $RUN_DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-$PWD/run}
shopt -s nullglob
pids=()
for pidfile in "$RUN_DIR"/*.pid; do
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid" && pids+=("$pid"); fi
  rm -f "$pidfile"
done
# Instances finish their pending payments on SIGTERM (bounded); wait, then insist.
for _ in $(seq 150); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 0.1
done
for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"; done
echo "down (${#pids[@]} processes stopped)"
exit 0
