#!/usr/bin/env bash
# Chaos soak: Ringway under mixed, self-checking load while backends are killed and restarted,
# the backends file is rewritten and SIGHUP is sent.
#
#   scripts/soak.sh [--minutes N] [--seed N] [--step SECS] [--no-build]
#                   [--ringway BIN] [--load BIN] [--keep] [--proxy-arg ARG]...
#
# Builds the release binaries (unless --no-build or both binaries are given), starts four soak
# backends (ringway-load soak-serve, b1..b4) and Ringway with --backends-file (three of them),
# --admin, --access-log and active health checks, then runs `ringway-load soak` for N minutes
# (default 2): request/response at a fixed rate, connection churn with client and backend
# resets and half-closes, bulk transfers both ways, every byte checked. Every --step seconds
# (default 3) one chaos action: SIGKILL a backend, restart it, rewrite the backends file,
# SIGHUP, write a broken backends file (which must be rejected) and restore it. Every event
# goes to a chaos log that tells expected errors (a flow on a killed backend) from unexpected
# ones. Prints a table (flows, bytes, errors by kind, the proxy's RSS /
# descriptors / CPU over time) and exits non-zero on any unexpected error, on growth of RSS or
# descriptors from the first half to the second, on descriptors or flows left after the load,
# or if the proxy logged an error or a panic. Everything it starts is stopped on exit (by PID).
# --proxy-arg passes one more word to Ringway's command line (repeatable), e.g.
# `--proxy-arg --buffers --proxy-arg 16` to soak the buffer-exhaustion path.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/common.sh
source "$ROOT/scripts/lib/common.sh"

MINUTES=2 SEED="" STEP=3 BUILD=1 RINGWAY="" LOAD="" KEEP=0 PROXY_ARGS=()
usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
while [ $# -gt 0 ]; do
    case "$1" in
        --minutes) MINUTES=$2; shift ;;
        --seed) SEED=$2; shift ;;
        --step) STEP=$2; shift ;;
        --no-build) BUILD=0 ;;
        --ringway) RINGWAY=$2; shift ;;
        --load) LOAD=$2; shift ;;
        --keep) KEEP=1 ;;
        --proxy-arg) PROXY_ARGS+=("$2"); shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown option $1" ;;
    esac
    shift
done
case "$MINUTES" in ''|*[!0-9.]*) die "--minutes takes a number" ;; esac
: "${SEED:=$(date +%s)}"
LOAD_SECS=$(awk -v m="$MINUTES" 'BEGIN { printf "%d", m * 60 }')
[ "$LOAD_SECS" -ge 10 ] || die "--minutes: at least 10 seconds of load"

if [ -z "$RINGWAY" ] || [ -z "$LOAD" ]; then
    if [ "$BUILD" = 1 ]; then
        log "building release binaries"
        (cd "$ROOT" && cargo build --release -q -p ringway -p ringway-load) || die "build failed"
    fi
    : "${RINGWAY:=$ROOT/target/release/ringway}" "${LOAD:=$ROOT/target/release/ringway-load}"
fi
[ -x "$RINGWAY" ] || die "no ringway binary at $RINGWAY"
[ -x "$LOAD" ] || die "no ringway-load binary at $LOAD"

WORK=$(mktemp -d /tmp/ringway-soak.XXXXXX)
CHAOS="$WORK/chaos.log" BACKENDS="$WORK/backends.txt" ACCESS="$WORK/access.log"
: >"$CHAOS"
cleanup() {
    stop_all
    if [ "$KEEP" = 1 ] || [ "${VERDICT:-1}" != 0 ]; then
        log "logs kept in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now_ms() { date +%s%3N; }
chaos() { echo "$(now_ms) $*" >>"$CHAOS"; }

# Backends: every process is bounded by --duration in case this script dies without cleanup.
BOUND="$((LOAD_SECS + 300))s"
NAMES=(b1 b2 b3 b4)
declare -A PORT PID
# Backend ports lie below the ephemeral range: a restarted backend binds its old port again, and
# while it is down the proxy's own backend connections must not be able to take that port as
# their local port (the restart would then fail with EADDRINUSE).
EPHEMERAL_LOW=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range)
# try_start NAME PORT: start backend NAME on PORT; whether it came up.
try_start() {
    local name=$1 port=$2
    start_bg "$WORK/$name.log" "$LOAD" soak-serve --listen "127.0.0.1:$port" \
        --name "$name" --duration "$BOUND"
    PID[$name]=$BG_PID
    wait_line "$WORK/$name.log" "listening on" 10 "$BG_PID"
}
# start_backend NAME: the first start picks a port (a few tries, then the kernel's choice); a
# restart reuses it.
start_backend() {
    local name=$1 port tries
    if [ -n "${PORT[$name]:-}" ]; then
        try_start "$name" "${PORT[$name]}" || die "backend $name did not restart on ${PORT[$name]}"
        return
    fi
    for tries in 1 2 3 4 5 0; do
        port=0
        if [ "$tries" != 0 ] && [ "$EPHEMERAL_LOW" -gt 11000 ]; then
            port=$(( 10000 + RANDOM % (EPHEMERAL_LOW - 10000) ))
        fi
        try_start "$name" "$port" && break
        [ "$tries" = 0 ] && die "backend $name did not start"
    done
    PORT[$name]=$(sed -n 's/^listening on 127\.0\.0\.1:\([0-9]*\) .*/\1/p' "$WORK/$name.log" | tail -1)
    [ -n "${PORT[$name]}" ] || die "backend $name: no port in its log"
}
# kill_backend NAME: SIGKILL, reap, and forget the PID (so it is never signalled again).
kill_backend() {
    local name=$1 pid=${PID[$1]}
    # Braces with stderr closed: bash's "Killed" job notice is noise here.
    { kill -KILL "$pid"; chaos kill "$name"; wait "$pid"; } 2>/dev/null
    local kept=() p
    for p in "${STARTED_PIDS[@]}"; do [ "$p" != "$pid" ] && kept+=("$p"); done
    STARTED_PIDS=("${kept[@]}")
    PID[$name]=""
}
for name in "${NAMES[@]}"; do
    start_backend "$name"
done
write_backends() {
    local name
    for name in "$@"; do echo "127.0.0.1:${PORT[$name]}"; done >"$BACKENDS.new"
    mv "$BACKENDS.new" "$BACKENDS"
    LISTED=("$@")
}
write_backends b1 b2 b3

start_bg "$WORK/ringway.log" env RUST_LOG=info RUST_LOG_STYLE=never "$RINGWAY" \
    --listen 127.0.0.1:0 --backends-file "$BACKENDS" --admin 127.0.0.1:0 \
    --access-log "$ACCESS" --health-interval 1s --health-timeout 500ms --workers 2 \
    "${PROXY_ARGS[@]}"
PROXY_PID=$BG_PID
wait_line "$WORK/ringway.log" "listening on" 30 "$PROXY_PID" || {
    cat "$WORK/ringway.log" >&2
    die "ringway did not start"
}
PROXY_ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$WORK/ringway.log" | head -1)
ADMIN_ADDR=$(sed -n 's|.*admin endpoint on http://\([0-9.:]*\)/.*|\1|p' "$WORK/ringway.log" | head -1)
[ -n "$PROXY_ADDR" ] && [ -n "$ADMIN_ADDR" ] || die "no listening/admin address in the log"
log "ringway (pid $PROXY_PID) on $PROXY_ADDR, admin $ADMIN_ADDR; $LOAD_SECS s of load, seed $SEED"

start_bg "$WORK/soak.out" "$LOAD" soak --target "$PROXY_ADDR" --duration "${LOAD_SECS}s" \
    --seed "$SEED" --proxy-pid "$PROXY_PID" --admin "$ADMIN_ADDR" --chaos-log "$CHAOS" \
    --access-log "$ACCESS"
SOAK_PID=$BG_PID

# The chaos: one action every STEP seconds until the load ends (bounded by time and count).
RANDOM=$SEED
alive_listed() {
    local n=0 name
    for name in "${LISTED[@]}"; do [ -n "${PID[$name]}" ] && n=$((n + 1)); done
    echo "$n"
}
KILLED=()
BAD_FILES=0
step=0
deadline=$(( $(date +%s) + LOAD_SECS - STEP ))
max_steps=$(( LOAD_SECS / STEP + 1 ))
while [ "$(date +%s)" -lt "$deadline" ] && [ "$step" -lt "$max_steps" ] && kill -0 "$SOAK_PID" 2>/dev/null; do
    sleep "$STEP" # pacing of the chaos, not synchronisation
    case $((step % 8)) in
        0|4)
            # SIGKILL a running backend, keeping at least two of the listed ones alive.
            candidates=()
            for name in "${NAMES[@]}"; do
                [ -n "${PID[$name]}" ] || continue
                listed=0
                for l in "${LISTED[@]}"; do [ "$l" = "$name" ] && listed=1; done
                if [ "$listed" = 0 ] || [ "$(alive_listed)" -gt 2 ]; then candidates+=("$name"); fi
            done
            if [ ${#candidates[@]} -gt 0 ]; then
                victim=${candidates[$((RANDOM % ${#candidates[@]}))]}
                kill_backend "$victim"
                KILLED+=("$victim")
            fi
            ;;
        1|5)
            for name in "${KILLED[@]}"; do
                start_backend "$name"
                chaos start "$name"
            done
            KILLED=()
            ;;
        2)
            # Rewrite the file: three of the four backends (the file watcher reloads it).
            drop=${NAMES[$((RANDOM % 4))]}
            keep=()
            for name in "${NAMES[@]}"; do [ "$name" != "$drop" ] && keep+=("$name"); done
            write_backends "${keep[@]}"
            chaos reload "$(IFS=,; echo "${keep[*]}")"
            ;;
        3)
            kill -HUP "$PROXY_PID"
            chaos sighup
            ;;
        6)
            # A broken file: it must be rejected as a whole, the running backends kept.
            { echo "127.0.0.1:${PORT[b1]}"; echo "127.0.0.1:not-a-port"; } >"$BACKENDS.new"
            mv "$BACKENDS.new" "$BACKENDS"
            kill -HUP "$PROXY_PID"
            chaos badfile
            BAD_FILES=$((BAD_FILES + 1))
            ;;
        7)
            write_backends "${LISTED[@]}"
            chaos restore
            ;;
    esac
    step=$((step + 1))
done
for name in "${KILLED[@]}"; do
    start_backend "$name"
    chaos start "$name"
done

# The soak client ends by itself (load, then at most ~30 s of settling checks).
wait "$SOAK_PID"
SOAK_RC=$?
cat "$WORK/soak.out"

VERDICT=0
[ "$SOAK_RC" = 0 ] || VERDICT=1
if ! kill -0 "$PROXY_PID" 2>/dev/null; then
    echo "ringway exited during the soak"
    VERDICT=1
fi
if grep -q -e "panicked" -e " ERROR " "$WORK/ringway.log"; then
    echo "ringway logged errors:"
    grep -e "panicked" -e " ERROR " "$WORK/ringway.log" | head -20
    VERDICT=1
fi
# One SIGHUP follows each broken file; the file watcher may log its own rejection as well.
rejected=$(grep -c "SIGHUP: .*keeping the running backends" "$WORK/ringway.log")
if [ "$rejected" -lt "$BAD_FILES" ]; then
    echo "ringway logged $rejected rejections of a bad backends file; $BAD_FILES were written"
    VERDICT=1
fi
warns=$(grep -c " WARN " "$WORK/ringway.log")
echo "ringway log: $(wc -l <"$WORK/ringway.log") lines, $warns warnings (backends going down and up are expected)"
if [ "$VERDICT" = 0 ]; then
    log "soak passed"
else
    log "soak FAILED (seed $SEED)"
fi
exit "$VERDICT"
