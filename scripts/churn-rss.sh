#!/usr/bin/env bash
# Memory under connection churn: is the proxy's RSS bounded when connections come and go?
#
#   scripts/churn-rss.sh [--minutes N] [--step SECS] [--conns N] [--workers N]
#                        [--idle-timeout DUR] [--tolerance-pct P] [--access-log] [--no-build]
#
# Starts a `ringway-load serve --mode echo` backend and target/release/ringway in front of it
# (--admin on loopback; other flags at their defaults unless given), then drives
# `ringway-load connect` (a new connection for every 64-byte exchange) in steps of --step
# seconds (default 15) for --minutes (default 12). After every step it samples the proxy: VmRSS
# and RssAnon (/proc/PID/status), open descriptors (/proc/PID/fd), anonymous mappings
# (/proc/PID/maps), and from /metrics the flows accepted and active. It prints one table row
# per step and, at the end, a verdict: the median RSS of the last third of the steps against
# the middle third (the first third is warm-up: with an idle timeout, a few turns of the timer
# wheel, 128 s each, at the peak rate; see docs/benchmarks.md): "plateau" if the growth is within
# --tolerance-pct (default 3%) or 256 kB, whichever is larger, and descriptors did not grow,
# else "growth" (exit status 1). Everything it starts is stopped on exit (by saved PID).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/common.sh
source "$ROOT/scripts/lib/common.sh"

MINUTES=12 STEP=15 CONNS=16 WORKERS="" IDLE="" TOL_PCT=3 ACCESS_LOG=0 BUILD=1
usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) MINUTES=$2; shift ;;
        --step) STEP=$2; shift ;;
        --conns) CONNS=$2; shift ;;
        --workers) WORKERS=$2; shift ;;
        --idle-timeout) IDLE=$2; shift ;;
        --tolerance-pct) TOL_PCT=$2; shift ;;
        --access-log) ACCESS_LOG=1 ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown option $1" ;;
    esac
    shift
done
case "$MINUTES$STEP$CONNS$TOL_PCT" in *[!0-9.]*) die "numbers only for --minutes/--step/--conns/--tolerance-pct" ;; esac
STEPS=$(awk -v m="$MINUTES" -v s="$STEP" 'BEGIN{n=int(m*60/s); print (n<3?3:n)}')
[ "$STEPS" -le 2000 ] || die "--minutes/--step gives $STEPS steps; at most 2000"

LOAD="$ROOT/target/release/ringway-load"
RINGWAY="$ROOT/target/release/ringway"
cd "$ROOT" || exit 1
if [ "$BUILD" = 1 ]; then
    log "cargo build --release (ringway, ringway-load)"
    cargo build --release --workspace >/dev/null 2>&1 || die "release build failed"
fi
[ -x "$LOAD" ] && [ -x "$RINGWAY" ] || die "release binaries missing (drop --no-build)"

WORK=$(mktemp -d /tmp/ringway-churn.XXXXXX)
cleanup() { stop_all; log "logs kept in $WORK"; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# bounded even if this script is killed with SIGKILL: the backend stops by itself
LIMIT=$(( STEPS * (STEP + 5) + 120 ))
start_bg "$WORK/backend.log" "$LOAD" serve --mode echo --listen 127.0.0.1:0 --threads 1 --duration "${LIMIT}s"
BPID=$BG_PID
wait_line "$WORK/backend.log" "listening on" 10 "$BPID" || die "backend did not start"
BACKEND=$(listen_addrs "$WORK/backend.log" | head -1)

PORT=$(free_port) APORT=$(free_port)
args=(--listen "127.0.0.1:$PORT" --backend "$BACKEND" --admin "127.0.0.1:$APORT")
[ -n "$WORKERS" ] && args+=(--workers "$WORKERS")
[ -n "$IDLE" ] && args+=(--idle-timeout "$IDLE")
[ "$ACCESS_LOG" = 1 ] && args+=(--access-log "$WORK/access.log")
start_bg "$WORK/ringway.log" "$RINGWAY" "${args[@]}"
PID=$BG_PID
wait_line "$WORK/ringway.log" "listening on" 10 "$PID" || { tail -5 "$WORK/ringway.log" >&2; die "ringway did not start"; }
wait_port 127.0.0.1 "$APORT" 10 || die "admin port did not open"
log "ringway ${args[*]}"
log "backend $BACKEND (pid $BPID); ringway pid $PID on 127.0.0.1:$PORT, admin 127.0.0.1:$APORT; $STEPS steps of ${STEP}s, $CONNS concurrent connects"

metric() {  # name: sum of the samples of one metric family (no labels filter)
    curl -s -m 2 "http://127.0.0.1:$APORT/metrics" |
        awk -v m="$1" '$1 == m || index($1, m "{") == 1 { s += $2 } END { printf "%d", s }'
}
status_kb() { awk -v k="$2:" '$1 == k {print $2}' "/proc/$1/status" 2>/dev/null; }
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
# anonymous mappings (no file): malloc arenas, thread stacks, the buffer ring, mmap'd blocks
anon_maps() { awk 'NF == 5 || $6 ~ /^\[(heap|anon)/' "/proc/$1/maps" 2>/dev/null | wc -l; }

TABLE="$WORK/table.tsv"
printf 't_s\taccepted\tconn_per_s\tactive\trss_kb\tanon_kb\tfds\tanon_maps\tload_errors\n' >"$TABLE"
sample() {  # t conn_per_s load_errors
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$(metric ringway_flows_accepted_total)" "$2" \
        "$(metric ringway_flows_active)" "$(status_kb "$PID" VmRSS)" "$(status_kb "$PID" RssAnon)" \
        "$(fds "$PID")" "$(anon_maps "$PID")" "$3" >>"$TABLE"
    tail -1 "$TABLE" | awk -F'\t' '{printf "%7s %10s %10s %7s %9s %9s %5s %6s %7s\n", $1,$2,$3,$4,$5,$6,$7,$8,$9}'
}
printf '%7s %10s %10s %7s %9s %9s %5s %6s %7s\n' t_s accepted conn/s active rss_kB anon_kB fds maps errors
T0=$(date +%s)
sample 0 0 0
LOAD_ERR_TOTAL=0
for i in $(seq 1 "$STEPS"); do
    kill -0 "$PID" 2>/dev/null || die "ringway exited (see $WORK/ringway.log)"
    out=$("$LOAD" connect --target "127.0.0.1:$PORT" --duration "${STEP}s" --conns "$CONNS" \
        --sources 127.0.0.2-127.0.0.20 --json 2>>"$WORK/load.err")
    cps=$(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1]).get("cps",0)))' "$out" 2>/dev/null || echo 0)
    errs=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("errors",0))' "$out" 2>/dev/null || echo "?")
    [ "$errs" = "?" ] || LOAD_ERR_TOTAL=$((LOAD_ERR_TOTAL + errs))
    echo "$out" >>"$WORK/load.jsonl"
    sample "$(( $(date +%s) - T0 ))" "$cps" "$errs"
done
# after the load: flows gone, descriptors back?
sleep 1
sample "$(( $(date +%s) - T0 ))" 0 0
log "table: $TABLE; load generator errors over the run: $LOAD_ERR_TOTAL"

python3 - "$TABLE" "$TOL_PCT" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])][1:]
tol_pct = float(sys.argv[2])
# load steps only: skip the sample before the load and the one after it
steps = rows[1:-1]
n = len(steps)
third = max(1, n // 3)
mid = steps[third:2 * third]
last = steps[n - third:]
def med(rs, col):
    return statistics.median(float(r[col]) for r in rs)
m_rss, l_rss = med(mid, 4), med(last, 4)
m_fd, l_fd = med(mid, 6), med(last, 6)
tol = max(m_rss * tol_pct / 100, 256)
grow = l_rss - m_rss
first = float(steps[0][4])
peak = max(float(r[4]) for r in steps)
print(f"RSS: start {rows[0][4]} kB, after step 1 {first:.0f} kB, peak {peak:.0f} kB, end of load {steps[-1][4]} kB, "
      f"after the load {rows[-1][4]} kB")
print(f"median RSS middle third {m_rss:.0f} kB, last third {l_rss:.0f} kB: {grow:+.0f} kB (tolerance {tol:.0f} kB); "
      f"fds middle {m_fd:.0f}, last {l_fd:.0f}; after the load {rows[-1][6]} fds, {rows[-1][3]} flows active")
# how fast RSS grew per connection in each third: a leak keeps its slope, a high-water mark loses it
def slope(rs, prev):
    conns = float(rs[-1][1]) - float(prev[1])
    return (float(rs[-1][4]) - float(prev[4])) * 1024 / conns if conns > 0 else 0.0
thirds = [steps[:third], mid, last]
prevs = [rows[0], steps[third - 1], steps[n - third - 1]]
print("RSS growth per connection, by third: " +
      ", ".join(f"{slope(t, p):.2f} B" for t, p in zip(thirds, prevs)))
verdict = "plateau" if grow <= tol and l_fd <= m_fd + 8 else "growth"
print(f"verdict: {verdict}")
sys.exit(0 if verdict == "plateau" else 1)
PY
