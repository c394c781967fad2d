#!/usr/bin/env bash
# Proxy CPU per unit of work, two Ringway builds (or one) against HAProxy, runs interleaved.
#
#   scripts/cpu-ab.sh WORKLOAD REPEATS SECONDS RINGWAY_A [RINGWAY_B]
#
# WORKLOAD: rr (32 connections, 64-byte echo), connect (16 loops), down or up (4 bulk streams).
# Each proxy gets one worker pinned to CPU 1; the backends (three `ringway-load serve`) and the
# load generator run on CPU 0. Runs alternate A, B, HAProxy, REPEATS times, and each prints the
# proxy's utime+stime divided by the requests, connections or bytes the load generator counted
# (as scripts/bench.sh does), so two builds can be compared in one run on a noisy machine.
# Everything started is stopped on exit, by PID.
# WORKERS=N (default 1): each proxy gets N workers (HAProxy N threads) on CPUs 0..N-1, shared
# with the load generator and backends (as `scripts/bench.sh --workers N`).
# HAPROXY_OPTIONS adds a line to HAProxy's defaults section and HAPROXY_GLOBAL one to its global
# section, e.g. HAPROXY_OPTIONS="option splice-auto" HAPROXY_GLOBAL="maxpipes 256" to compare
# against its splice (its default of maxconn/4 pipes needs more descriptors than the limit here).
set -u
[ $# -ge 4 ] || { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
W=$1 REPS=$2 DUR=$3 A=$4 B=${5:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LOAD="$ROOT/target/release/ringway-load"
[ -x "$LOAD" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
command -v haproxy >/dev/null || { echo "haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }
SOURCES=127.0.0.2-127.0.0.20
WORKERS=${WORKERS:-1}
PROXY_CPUS=1
[ "$WORKERS" -gt 1 ] && PROXY_CPUS=0-$((WORKERS - 1))
D=$(mktemp -d /tmp/ringway-cpu-ab.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
case $W in rr|connect) mode=echo ;; down) mode=source ;; up) mode=sink ;;
    *) echo "unknown workload $W" >&2; exit 2 ;; esac

taskset -c 0 "$LOAD" serve --mode $mode --listen 127.0.0.1:0 --listen 127.0.0.1:0 \
    --listen 127.0.0.1:0 >"$D/backends.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ "$(grep -c 'listening on' "$D/backends.log")" -ge 3 ] && break; sleep 0.1; done
mapfile -t BE < <(grep -o 'listening on [0-9.:]*' "$D/backends.log" | awk '{print $3}')
[ ${#BE[@]} -ge 3 ] || { echo "backends did not start ($D/backends.log)" >&2; exit 1; }

# Three ports the OS says are free: the proxies listen on port, port+1 and port+2.
port=$(python3 -c '
import socket
for _ in range(200):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p > 65000: continue
    try:
        for q in (p, p + 1, p + 2):
            t = socket.socket(); t.bind(("127.0.0.1", q)); t.close()
        print(p); break
    except OSError: pass
')
start_ringway() {  # binary port -> LAST_PID
    taskset -c "$PROXY_CPUS" "$1" --listen "127.0.0.1:$2" --backend "${BE[0]}" --backend "${BE[1]}" \
        --backend "${BE[2]}" --workers "$WORKERS" --connect-timeout 3s --idle-timeout 10m \
        --max-conns 9000 >"$D/ringway-$2.log" 2>&1 &
    LAST_PID=$!
    pids+=("$LAST_PID")
}
start_ringway "$A" $port; PA=$LAST_PID
if [ -n "$B" ]; then start_ringway "$B" $((port + 1)); PB=$LAST_PID; fi
cat >"$D/haproxy.cfg" <<CFG
global
    nbthread $WORKERS
    maxconn 9000
    ${HAPROXY_GLOBAL:-}
defaults
    mode tcp
    timeout connect 3s
    timeout client 10m
    timeout server 10m
    maxconn 9000
    ${HAPROXY_OPTIONS:-}
frontend fe
    bind 127.0.0.1:$((port + 2))
    default_backend be
backend be
    balance source
    hash-type consistent
    server b1 ${BE[0]}
    server b2 ${BE[1]}
    server b3 ${BE[2]}
CFG
taskset -c "$PROXY_CPUS" haproxy -f "$D/haproxy.cfg" -db >"$D/haproxy.log" 2>&1 &
PH=$!
pids+=("$PH")
for p in $((port)) $((port + 2)) ${B:+$((port + 1))}; do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() {  # name pid port
    local t0 t1 out
    t0=$(ticks "$2")
    case $W in
        rr) out=$(taskset -c 0 "$LOAD" rr --target "127.0.0.1:$3" --duration "${DUR}s" --conns 32 --sources $SOURCES --json) ;;
        connect) out=$(taskset -c 0 "$LOAD" connect --target "127.0.0.1:$3" --duration "${DUR}s" --conns 16 --sources $SOURCES --json) ;;
        *) out=$(taskset -c 0 "$LOAD" bulk --target "127.0.0.1:$3" --duration "${DUR}s" --streams 4 --direction "$W" --sources $SOURCES --json) ;;
    esac
    t1=$(ticks "$2")
    python3 - "$1" "$W" "$((t1 - t0))" "$(getconf CLK_TCK)" "$out" <<'PY'
import json, sys
name, w, ticks, hz, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = json.loads(out)
cpu = ticks / hz
if w in ("rr", "connect"):
    n = r["ok"]; per = cpu / max(n, 1) * 1e6; unit = "s per 1M " + ("requests" if w == "rr" else "connections")
else:
    n = r["bytes_up"] + r["bytes_down"]; per = cpu / max(n, 1) * 1e9; unit = "s per GB"
lat = r.get("latency_us") or {}
tail = f"  p99 {lat['p99']:.0f} us p99.9 {lat['p999']:.0f} us" if "p999" in lat else ""
print(f"{name:8s} {w:7s} cpu {cpu:6.2f} s  {per:8.3f} {unit}  errors {r.get('errors', 0)}{tail}")
PY
}
for _ in $(seq "$REPS"); do
    run A "$PA" $port
    [ -n "$B" ] && run B "$PB" $((port + 1))
    run haproxy "$PH" $((port + 2))
done
