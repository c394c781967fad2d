#!/usr/bin/env bash
# RSS per idle flow of one or two Ringway builds, fresh proxy per measurement, runs interleaved.
#
#   scripts/idle-rss.sh [--flows "2000 5000"] [--in-flight "0 1"] [--repeats N] [--workers N]
#                       RINGWAY_A [RINGWAY_B]
#
# Each measurement starts a fresh proxy (one worker pinned to CPU 1, or --workers N on CPUs 0-1,
# with the flags scripts/bench.sh gives it) in front of `ringway-load serve --mode echo`, runs `ringway-load idle` (CPU 0) and
# takes the proxy's RSS growth once every flow was opened and checked once, divided by the flows:
# the same measurement as scripts/bench.sh's idle workload (scripts/lib/common.sh, idle_rss).
# --in-flight: check exchanges outstanding at once; 0 sends every check before reading a reply
# (the bench's way: replies overlap as much as they can), 1 checks one flow after the other.
# Prints one line per run and the median bytes per flow per build, flow count and overlap.
# Everything started is stopped on exit, by PID.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/common.sh
source "$ROOT/scripts/lib/common.sh"
FLOWS_LIST="2000 5000" IN_FLIGHT_LIST="0 1" REPS=3 WORKERS=1
usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --flows) FLOWS_LIST=$2; shift ;;
        --in-flight) IN_FLIGHT_LIST=$2; shift ;;
        --repeats) REPS=$2; shift ;;
        --workers) WORKERS=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) usage; die "unknown option $1" ;;
        *) break ;;
    esac
    shift
done
[ $# -ge 1 ] || { usage; exit 2; }
BINS=("$@")
LOAD="$ROOT/target/release/ringway-load"
[ -x "$LOAD" ] || die "build first: cargo build --release --workspace"
for b in "${BINS[@]}"; do [ -x "$b" ] || die "$b: not an executable"; done
ulimit -n "$(ulimit -Hn)" 2>/dev/null
CLIENT_CPUS=0
if [ "$WORKERS" = 1 ]; then PROXY_CPUS=1; else PROXY_CPUS=0-1; fi
SOURCES=127.0.0.2-127.0.0.20
WORK=$(mktemp -d /tmp/ringway-idle-rss.XXXXXX)
trap 'stop_all' EXIT
trap 'exit 130' INT

start_bg "$WORK/backends.log" taskset -c 0 "$LOAD" serve --mode echo --listen 127.0.0.1:0 \
    --listen 127.0.0.1:0 --listen 127.0.0.1:0
for _ in $(seq 100); do [ "$(listen_addrs "$WORK/backends.log" | wc -l)" -ge 3 ] && break; sleep 0.1; done
mapfile -t BE < <(listen_addrs "$WORK/backends.log")
[ ${#BE[@]} -ge 3 ] || die "backends did not start ($WORK/backends.log)"

declare -A RESULTS
for flows in $FLOWS_LIST; do
    for inflight in $IN_FLIGHT_LIST; do
        for rep in $(seq 1 "$REPS"); do
            for i in "${!BINS[@]}"; do
                port=$(free_port)
                start_bg "$WORK/ringway-$i.log" taskset -c "$PROXY_CPUS" "${BINS[$i]}" --listen "127.0.0.1:$port" \
                    --backend "${BE[0]}" --backend "${BE[1]}" --backend "${BE[2]}" --workers "$WORKERS" \
                    --hash-key src-ip --connect-timeout 3s --idle-timeout 10m --max-conns 9000
                pid=$BG_PID
                if ! wait_line "$WORK/ringway-$i.log" "listening on" 10 "$pid"; then
                    tail -3 "$WORK/ringway-$i.log" >&2; die "${BINS[$i]} did not start"
                fi
                idle_rss "$pid" "127.0.0.1:$port" "$flows" "$WORK" --sources "$SOURCES" --in-flight "$inflight"
                kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
                ok=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(r["first_ok"])' "$IDLE_OUT" 2>/dev/null || echo '?')
                log "$(printf '%s flows=%s in-flight=%s rep %s rc=%s checked=%s rss %s -> %s kB: %s B/flow' \
                    "${BINS[$i]}" "$flows" "$inflight" "$rep" "$IDLE_RC" "$ok" "$IDLE_RSS0" "$IDLE_RSS1" "$IDLE_PER_FLOW")"
                [ "$ok" = "$flows" ] || log "warning: only $ok of $flows flows were checked"
                RESULTS[$i/$flows/$inflight]+="$IDLE_PER_FLOW "
            done
        done
    done
done
echo "median RSS per idle flow (B), $REPS runs each, interleaved:"
for flows in $FLOWS_LIST; do
    for inflight in $IN_FLIGHT_LIST; do
        for i in "${!BINS[@]}"; do
            # shellcheck disable=SC2086
            printf '  %-40s flows=%-6s in-flight=%-3s median %5s B  (runs: %s)\n' "${BINS[$i]}" "$flows" "$inflight" \
                "$(printf '%s\n' ${RESULTS[$i/$flows/$inflight]} | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')" \
                "${RESULTS[$i/$flows/$inflight]% }"
        done
    done
done
