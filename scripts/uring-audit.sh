#!/usr/bin/env bash
# What io_uring does per unit of work in one Ringway worker: system calls, submissions, poll arms
# and io-wq punts, with the opcodes submitted and punted.
#
#   scripts/uring-audit.sh WORKLOAD SECONDS [RINGWAY_BINARY] [OUTDIR]
#
# WORKLOAD: rr, connect, down or up, set up as scripts/cpu-ab.sh does (one worker on CPU 1, three
# `ringway-load serve` backends and the load generator on CPU 0). Over the whole run `perf stat`
# counts io_uring_enter calls and the io_uring tracepoints (submit_req, poll_arm,
# queue_async_work = a punt to an iou-wrk thread, complete) and prints them per request,
# connection or MB. Over the middle two seconds it records every submission and punt with its
# opcode, and `ps -L` shows the iou-wrk threads and their CPU. With PROFILE=1 it also writes a
# call-graph profile (perf record -F 2000 -g) to OUTDIR/perf.data. Needs perf and tracefs access
# (root, or kernel.perf_event_paranoid <= -1). Everything started is stopped on exit, by PID.
set -u
[ $# -ge 2 ] || { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
W=$1 DUR=$2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${3:-$ROOT/target/release/ringway}
OUT=${4:-$(mktemp -d /tmp/ringway-uring-audit.XXXXXX)}
LOAD="$ROOT/target/release/ringway-load"
[ -x "$LOAD" ] && [ -x "$BIN" ] || { echo "build first: cargo build --release --workspace" >&2; exit 1; }
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
[ "$DUR" -ge 4 ] || { echo "SECONDS must be at least 4" >&2; exit 2; }
mkdir -p "$OUT"
SOURCES=127.0.0.2-127.0.0.20
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT
case $W in rr|connect) mode=echo ;; down) mode=source ;; up) mode=sink ;;
    *) echo "unknown workload $W" >&2; exit 2 ;; esac

taskset -c 0 "$LOAD" serve --mode $mode --listen 127.0.0.1:0 --listen 127.0.0.1:0 \
    --listen 127.0.0.1:0 >"$OUT/backends.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ "$(grep -c 'listening on' "$OUT/backends.log")" -ge 3 ] && break; sleep 0.1; done
mapfile -t BE < <(grep -o 'listening on [0-9.:]*' "$OUT/backends.log" | awk '{print $3}')
[ ${#BE[@]} -ge 3 ] || { echo "backends did not start ($OUT/backends.log)" >&2; exit 1; }
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
taskset -c 1 "$BIN" --listen "127.0.0.1:$port" --backend "${BE[0]}" --backend "${BE[1]}" \
    --backend "${BE[2]}" --workers 1 --connect-timeout 3s --idle-timeout 10m \
    --max-conns 9000 >"$OUT/ringway.log" 2>&1 &
P=$!
pids+=("$P")
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

EVENTS=syscalls:sys_enter_io_uring_enter,io_uring:io_uring_submit_req,io_uring:io_uring_poll_arm
EVENTS=$EVENTS,io_uring:io_uring_queue_async_work,io_uring:io_uring_complete,task-clock
perf stat -e "$EVENTS" -p "$P" -o "$OUT/stat.txt" -- sleep "$DUR" &
pids+=($!)
STAT=$!
case $W in
    rr) taskset -c 0 "$LOAD" rr --target "127.0.0.1:$port" --duration "${DUR}s" --conns 32 --sources $SOURCES --json >"$OUT/load.json" & ;;
    connect) taskset -c 0 "$LOAD" connect --target "127.0.0.1:$port" --duration "${DUR}s" --conns 16 --sources $SOURCES --json >"$OUT/load.json" & ;;
    *) taskset -c 0 "$LOAD" bulk --target "127.0.0.1:$port" --duration "${DUR}s" --streams 4 --direction "$W" --sources $SOURCES --json >"$OUT/load.json" & ;;
esac
LOADPID=$!
pids+=("$LOADPID")
sleep 1
if [ "${PROFILE:-0}" = 1 ]; then
    perf record -F 2000 -g -p "$P" -o "$OUT/perf.data" -- sleep $((DUR - 3)) >/dev/null 2>&1 &
    pids+=($!)
fi
perf record -c 1 -e io_uring:io_uring_submit_req -e io_uring:io_uring_queue_async_work \
    -p "$P" -o "$OUT/ops.data" -- sleep 2 >/dev/null 2>&1
ps -L -o tid,comm,time -p "$P" >"$OUT/threads.txt"
wait "$LOADPID" "$STAT"
perf script -i "$OUT/ops.data" 2>/dev/null >"$OUT/ops.txt"
python3 - "$W" "$OUT" <<'PY'
import collections, json, re, sys
w, out = sys.argv[1], sys.argv[2]
r = json.load(open(out + "/load.json"))
if w in ("rr", "connect"):
    n, unit = r["ok"], "request" if w == "rr" else "connection"
else:
    n, unit = (r["bytes_up"] + r["bytes_down"]) / 1e6, "MB"
stat = open(out + "/stat.txt").read()
def count(name):
    m = re.search(r"([\d,.]+)\s+(?:msec\s+)?" + re.escape(name), stat)
    return float(m.group(1).replace(",", "")) if m else 0.0
print(f"{w}: {n:,.0f} {unit}s, errors {r.get('errors', 0)}; per {unit}:")
for label, name in [("io_uring_enter calls", "syscalls:sys_enter_io_uring_enter"),
                    ("submissions", "io_uring:io_uring_submit_req"),
                    ("poll arms", "io_uring:io_uring_poll_arm"),
                    ("io-wq punts", "io_uring:io_uring_queue_async_work"),
                    ("completions", "io_uring:io_uring_complete")]:
    print(f"  {label:22s} {count(name) / max(n, 1):8.3f}")
print(f"  {'proxy CPU (us)':22s} {count('task-clock') * 1000 / max(n, 1):8.2f}")
sub, punt = collections.Counter(), collections.Counter()
for line in open(out + "/ops.txt"):
    m = re.search(r"opcode (\w+)", line)
    if m:
        (punt if "queue_async_work" in line else sub)[m.group(1)] += 1
print("opcodes submitted (2 s sample):", dict(sub.most_common()))
print("opcodes punted to io-wq (2 s sample):", dict(punt.most_common()) or "none")
PY
echo "threads (iou-wrk-* are io-wq workers):"
cat "$OUT/threads.txt"
echo "raw files in $OUT"
