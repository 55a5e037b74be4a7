#!/usr/bin/env bash
# kill -9 one instance of `make up`, then start it again with the same environment,
# as docker's restart policy would. For fault runs by hand, e.g. in the middle of k6:
#   scripts/kill-and-restart.sh 33 & k6 run -e MAX_REQUESTS=550 rinha.js
# Usage: scripts/kill-and-restart.sh [DELAY_S=0] [INSTANCE=2] [DOWN_S=2]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-$PWD/run}
delay=${1:-0} n=${2:-2} down=${3:-2}
sleep "$delay"
pid=$(cat "$RUN_DIR/api$n.pid")
mapfile -d '' environment <"/proc/$pid/environ"   # read before the process is gone
command=$(tr '\0' ' ' <"/proc/$pid/cmdline")
kill -9 "$pid"
echo "killed api$n (pid $pid); restarting in ${down}s"
sleep "$down"
env -i "${environment[@]}" nohup $command >>"$RUN_DIR/api$n.log" 2>&1 &
echo $! >"$RUN_DIR/api$n.pid"
echo "api$n restarted (pid $!)"
