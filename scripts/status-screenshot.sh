#!/usr/bin/env bash
# Takes docs/status-page.png, the README's picture of the admin status page (`GET /`), from a
# real run: three echo backends (one of them a backup), one address where nothing listens (so
# its checks fail and it shows DOWN), Ringway with --admin in front of them, a few idle flows
# held open and a short bulk transfer, then headless Chromium at 1200x800.
#
#   scripts/status-screenshot.sh [OUT.png]     # needs cargo and chromium (apt-get install chromium)
#
# Everything runs on 127.0.0.0/8 and is bounded in time; every process it starts is stopped by
# PID (chromium by the process group it was started in).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/common.sh
source "$ROOT/scripts/lib/common.sh"

OUT=${1:-$ROOT/docs/status-page.png}
WORK=$(mktemp -d /tmp/ringway-status-shot.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

command -v chromium >/dev/null || die "chromium is not installed (apt-get install chromium)"
cd "$ROOT" || exit 1
log "building (cargo build --workspace)"
cargo build --workspace || die "build failed"
LOAD="$ROOT/target/debug/ringway-load"
RINGWAY="$ROOT/target/debug/ringway"

BACKENDS=()
for n in 1 2 3; do
    start_bg "$WORK/backend-$n.log" "$LOAD" serve --mode echo --listen 127.0.0.1:0 --duration 5m
    wait_line "$WORK/backend-$n.log" "listening on" 10 "$BG_PID" || die "backend $n did not start"
    BACKENDS+=("$(listen_addrs "$WORK/backend-$n.log" | head -1)")
done
DEAD="127.0.0.1:$(free_port)" # nothing listens there: its checks fail

PORT=$(free_port)
ADMIN=$(free_port)
start_bg "$WORK/ringway.log" "$RINGWAY" --listen "127.0.0.1:$PORT" --admin "127.0.0.1:$ADMIN" \
    --backend "${BACKENDS[0]},weight=2" --backend "${BACKENDS[1]}" --backend "$DEAD" \
    --backend "${BACKENDS[2]},backup" --health-interval 500ms --workers 2 --max-conns 4096 \
    --max-conns-per-source 256 --idle-timeout 10m
RPID=$BG_PID
wait_line "$WORK/ringway.log" "listening on" 10 "$RPID" || die "ringway did not start: $(tail -5 "$WORK/ringway.log")"
wait_line "$WORK/ringway.log" "backend $DEAD is DOWN" 15 "$RPID" || die "$DEAD never went down"

# Flows that stay open while the picture is taken, and bytes that moved.
start_bg "$WORK/idle.log" "$LOAD" idle --target "127.0.0.1:$PORT" --conns 48 \
    --sources 127.0.0.2-127.0.0.40 --hold 60s --ready-file "$WORK/idle.ready"
IDLE_PID=$BG_PID
"$LOAD" bulk --target "127.0.0.1:$PORT" --direction both --streams 4 --duration 2s \
    --sources 127.0.0.41-127.0.0.44 >"$WORK/bulk.log" 2>&1 || die "bulk load failed: $(tail -5 "$WORK/bulk.log")"
wait_line "$WORK/idle.ready" "" 30 "$IDLE_PID" || die "idle flows did not open: $(tail -5 "$WORK/idle.log")"
[ -s "$WORK/idle.ready" ] || die "idle flows did not open"

log "taking the screenshot of http://127.0.0.1:$ADMIN/"
mkdir -p "$(dirname "$OUT")"
# setsid: chromium and its helpers in a group of their own, killed by that id if it hangs.
# (setsid execs chromium in place when started in the background: $! is chromium's PID.)
setsid chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --disable-dev-shm-usage --hide-scrollbars --user-data-dir="$WORK/chromium" \
    --window-size=1200,800 --screenshot="$OUT" "http://127.0.0.1:$ADMIN/" \
    >"$WORK/chromium.log" 2>&1 &
CPID=$!
for _ in $(seq 1 600); do
    kill -0 "$CPID" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$CPID" 2>/dev/null; then
    log "chromium still running after 60 s: killing its process group"
    kill -KILL -- "-$CPID" 2>/dev/null
fi
wait "$CPID" 2>/dev/null
[ -s "$OUT" ] || die "no screenshot: $(tail -5 "$WORK/chromium.log")"
kill -USR1 "$IDLE_PID" 2>/dev/null # ends the hold
log "wrote $OUT"
