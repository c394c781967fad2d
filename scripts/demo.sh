#!/usr/bin/env bash
# Ringway in two minutes: build, start three local backends and Ringway in front of them,
# show which backend serves which client (consistent hashing by client address), then run a
# short request/response load through the proxy and print its latency.
#
#   scripts/demo.sh            # needs Rust (cargo); everything runs on 127.0.0.0/8
#
# Exits 0 when traffic flowed through the proxy, non-zero otherwise. Stops everything it
# started, also on Ctrl-C.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/common.sh
source "$ROOT/scripts/lib/common.sh"

WORK=$(mktemp -d /tmp/ringway-demo.XXXXXX)
trap 'stop_all; rm -rf "$WORK"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

cd "$ROOT" || exit 1
log "building (cargo build --release)"
cargo build --release --workspace || die "build failed"
LOAD="$ROOT/target/release/ringway-load"
RINGWAY="$ROOT/target/release/ringway"
[ -x "$RINGWAY" ] || die "$RINGWAY was not built"

# three backends: each greets a new connection with its name, then echoes
BACKENDS=()
for n in 1 2 3; do
    start_bg "$WORK/backend-$n.log" "$LOAD" serve --mode hello --name "backend-$n" \
        --listen 127.0.0.1:0 --duration 5m
    wait_line "$WORK/backend-$n.log" "listening on" 10 "$BG_PID" || die "backend-$n did not start"
    addr=$(listen_addrs "$WORK/backend-$n.log" | head -1)
    BACKENDS+=("$addr")
    log "backend-$n listening on $addr"
done

# Ringway in front of them, hashing on the client's IP address
PORT=""
for _ in 1 2 3; do
    PORT=$(free_port)
    args=()
    for b in "${BACKENDS[@]}"; do args+=(--backend "$b"); done
    start_bg "$WORK/ringway.log" "$RINGWAY" --listen "127.0.0.1:$PORT" "${args[@]}" \
        --workers 1 --hash-key src-ip --connect-timeout 3s --idle-timeout 10m
    RPID=$BG_PID
    if wait_line "$WORK/ringway.log" "listening on" 10 "$RPID"; then break; fi
    log "ringway did not start on port $PORT:"; tail -5 "$WORK/ringway.log" >&2
    PORT=""
done
[ -n "$PORT" ] || die "ringway did not start"
log "ringway listening on 127.0.0.1:$PORT (pid $RPID): $(grep -m1 'listening on' "$WORK/ringway.log")"

echo
echo "== Which backend serves which client (3 connections from each client address) =="
"$LOAD" probe --target "127.0.0.1:$PORT" --sources 127.0.0.2-127.0.0.9 --times 3
probe_rc=$?

echo
echo "== 3 s of request/response load through Ringway (16 connections, 64-byte messages) =="
"$LOAD" rr --target "127.0.0.1:$PORT" --greeting --duration 3s --conns 16 \
    --sources 127.0.0.2-127.0.0.20
rr_rc=$?

echo
if [ "$probe_rc" -eq 0 ] && [ "$rr_rc" -eq 0 ]; then
    log "demo done: traffic flowed through ringway"
    exit 0
fi
log "demo FAILED: probe exit $probe_rc, load exit $rr_rc; ringway log:"
tail -20 "$WORK/ringway.log" >&2
exit 1
