#!/usr/bin/env bash
# Thousands of idle flows timing out at the same moment, next to live request/response traffic:
# how long do the live flows wait? Prints the live traffic's latency (ringway-load rr, fixed
# rate) while FLOWS idle flows, opened together, hit --idle-timeout together.
#
#   scripts/timeout-wave.sh [--flows N] [--bin PATH] [--rounds K]
#
# --bin runs another ringway binary (e.g. an older build) under the same load, for A/B runs.
# Needs an open-file limit above 2 x FLOWS (the proxy holds two descriptors a flow).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

flows=9000 bin=target/release/ringway rounds=1
while [ $# -gt 0 ]; do
    case $1 in
        --flows) flows=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        *) die "unknown argument $1 (see the comment at the top)" ;;
    esac
done
ulimit -n "$(ulimit -Hn)"
cargo build --release -q --workspace
load=target/release/ringway-load
work=$(mktemp -d)
trap 'stop_all; rm -rf "$work"' EXIT

backend=$(free_port)
start_bg "$work/backend.log" "$load" serve --listen "127.0.0.1:$backend" --mode echo --threads 2
wait_port 127.0.0.1 "$backend" 10 || die "echo backend did not start"

for round in $(seq 1 "$rounds"); do
    port=$(free_port)
    start_bg "$work/proxy.log" "$bin" --listen "127.0.0.1:$port" --workers 1 \
        --idle-timeout 4s --backend "127.0.0.1:$backend"
    proxy=$BG_PID
    wait_port 127.0.0.1 "$port" 10 || die "proxy did not start"
    # The idle flows: opened and checked together, then silent; they time out ~4 s later.
    start_bg "$work/idle.log" "$load" idle --target "127.0.0.1:$port" --conns "$flows" \
        --hold 20s --ready-file "$work/ready"
    for _ in $(seq 1 600); do [ -s "$work/ready" ] && break; sleep 0.1; done
    [ -s "$work/ready" ] || die "idle flows did not open: $(tail -3 "$work/idle.log")"
    # Live traffic across the wave: 2,000 requests a second for 14 s from another address.
    "$load" rr --target "127.0.0.1:$port" --conns 4 --rate 2000 --duration 14s \
        --sources 127.0.0.2 >"$work/rr.log" 2>&1 || true
    open_after=$(ls "/proc/$proxy/fd" | wc -l)
    echo "round $round: $flows idle flows timing out together; live rr: $(grep -E 'p50|max' "$work/rr.log" | tr '\n' ' ')"
    echo "  proxy descriptors after the wave: $open_after"
    kill -TERM "$proxy"; wait "$proxy" 2>/dev/null || true
    rm -f "$work/ready"
done
