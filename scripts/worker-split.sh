#!/usr/bin/env bash
# How flows split between two workers, for one or two Ringway builds, runs interleaved.
#
#   scripts/worker-split.sh RUNS RINGWAY_A [RINGWAY_B]
#
# Each run starts a fresh proxy with --workers 2 --admin (on both CPUs, as the load generator
# and the three `ringway-load serve` echo backends), runs one workload, then reads
# ringway_flows_accepted_total{worker} (where flows started) and
# ringway_flows_handed_off_total{worker} (connections a worker passed on; absent in builds
# without the hand-off) from /metrics. Workloads: rr (32 long-lived connections, 1 s) and
# connect (16 loops of connect/echo/close, 2 s), from 127.0.0.2-127.0.0.20. Prints one line per
# run: build, workload, worker 0 / worker 1, how far the larger is from even, handed off.
# Everything started is stopped on exit, by PID.
set -u
[ $# -ge 2 ] || { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
RUNS=$1 A=$2 B=${3:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOAD="$ROOT/target/release/ringway-load"
[ -x "$LOAD" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
SOURCES=127.0.0.2-127.0.0.20
D=$(mktemp -d /tmp/ringway-split.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT

"$LOAD" serve --mode echo --listen 127.0.0.1:0 --listen 127.0.0.1:0 --listen 127.0.0.1:0 \
    >"$D/backends.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ "$(grep -c 'listening on' "$D/backends.log")" -ge 3 ] && break; sleep 0.1; done
mapfile -t BE < <(grep -o 'listening on [0-9.:]*' "$D/backends.log" | awk '{print $3}')
[ ${#BE[@]} -ge 3 ] || { echo "backends did not start ($D/backends.log)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run() {  # name binary workload
    local port admin pid out metrics
    port=$(free_port) admin=$(free_port)
    "$2" --listen "127.0.0.1:$port" --admin "127.0.0.1:$admin" --workers 2 \
        --backend "${BE[0]}" --backend "${BE[1]}" --backend "${BE[2]}" \
        --connect-timeout 3s --idle-timeout 10m >"$D/ringway-$port.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$admin/metrics" >/dev/null && break; sleep 0.1; done
    case $3 in
        rr) out=$("$LOAD" rr --target "127.0.0.1:$port" --duration 1s --conns 32 --sources $SOURCES --json) ;;
        connect) out=$("$LOAD" connect --target "127.0.0.1:$port" --duration 2s --conns 16 --sources $SOURCES --json) ;;
    esac
    metrics=$(curl -sf "http://127.0.0.1:$admin/metrics")
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    python3 - "$1" "$3" "$out" "$metrics" <<'PY'
import json, re, sys
name, w, out, metrics = sys.argv[1:5]
def per_worker(family):
    v = [0, 0]
    for m in re.finditer(r'^%s\{worker="(\d)"\} (\d+)' % family, metrics, re.M):
        v[int(m.group(1))] = int(m.group(2))
    return v
acc = per_worker("ringway_flows_accepted_total")
off = per_worker("ringway_flows_handed_off_total")
has_off = "ringway_flows_handed_off_total" in metrics
even = sum(acc) / 2
dev = (max(acc) - even) / even * 100 if even else 0
errors = json.loads(out).get("errors", 0)
print(f"{name:2s} {w:8s} {acc[0]:>7,}/{acc[1]:<7,} off even {dev:5.1f}%  handed off "
      f"{(str(off[0]) + '/' + str(off[1])) if has_off else '-':>9s}  errors {errors}")
PY
}
for _ in $(seq "$RUNS"); do
    for w in rr connect; do
        run A "$A" $w
        [ -n "$B" ] && run B "$B" $w
    done
done
