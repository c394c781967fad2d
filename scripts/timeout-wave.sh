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

# Two echo backends: one for the idle flows, one for the live traffic, so what is measured is
# the proxy, not a backend busy closing thousands of connections itself. (Which is which is
# settled below, from the mapping.)
idle_backend=$(free_port)
start_bg "$work/idle-backend.log" "$load" serve --listen "127.0.0.1:$idle_backend" --mode echo
live_backend=$(free_port)
start_bg "$work/live-backend.log" "$load" serve --listen "127.0.0.1:$live_backend" --mode echo
wait_port 127.0.0.1 "$idle_backend" 10 || die "echo backend did not start"
wait_port 127.0.0.1 "$live_backend" 10 || die "echo backend did not start"
backends=(--backend "127.0.0.1:$idle_backend" --backend "127.0.0.1:$live_backend")
# The idle flows come from 127.0.0.1: whichever backend it maps to is the idle one; then find a
# client address that maps to the other.
if ! "$bin" --listen 127.0.0.1:1 "${backends[@]}" --show-mapping 127.0.0.1 \
    | grep -q ":$idle_backend\$"; then
    read -r idle_backend live_backend <<<"$live_backend $idle_backend"
fi
live_source=
for n in $(seq 2 60); do
    if "$bin" --listen 127.0.0.1:1 "${backends[@]}" --show-mapping "127.0.0.$n" \
        | grep -q ":$live_backend\$"; then
        live_source=127.0.0.$n
        break
    fi
done
[ -n "$live_source" ] || die "no client address maps to the live backend"

for round in $(seq 1 "$rounds"); do
    port=$(free_port)
    admin=$(free_port)
    start_bg "$work/proxy.log" "$bin" --listen "127.0.0.1:$port" --workers 1 \
        --idle-timeout 4s --admin "127.0.0.1:$admin" "${backends[@]}"
    proxy=$BG_PID
    wait_port 127.0.0.1 "$port" 10 || die "proxy did not start"
    # The idle flows: opened and checked together, then silent; they time out ~4 s later.
    start_bg "$work/idle.log" "$load" idle --target "127.0.0.1:$port" --conns "$flows" \
        --hold 20s --ready-file "$work/ready"
    for _ in $(seq 1 600); do [ -s "$work/ready" ] && break; sleep 0.1; done
    [ -s "$work/ready" ] || die "idle flows did not open: $(tail -3 "$work/idle.log")"
    # Live traffic across the wave: 2,000 requests a second for 14 s from another address.
    "$load" rr --target "127.0.0.1:$port" --conns 4 --rate 2000 --duration 14s \
        --sources "$live_source" >"$work/rr.log" 2>&1 || true
    open_after=$(ls "/proc/$proxy/fd" | wc -l)
    # The proxy's own view: event-loop turns over 10 / 50 / 250 ms (builds before it: n/a).
    slow=$(python3 -c '
import sys, urllib.request
text = urllib.request.urlopen("http://127.0.0.1:%s/metrics" % sys.argv[1], timeout=5).read().decode()
rows = [l.split("\"")[1] + "s: " + l.split()[-1] for l in text.splitlines()
        if l.startswith("ringway_event_loop_slow_turns_total{")]
print(", ".join(rows) or "n/a")' "$admin" 2>/dev/null || echo n/a)
    echo "round $round: $flows idle flows timing out together; live rr: $(grep -E 'p50|max' "$work/rr.log" | tr '\n' ' ')"
    echo "  proxy descriptors after the wave: $open_after; event-loop turns slower than $slow"
    kill -TERM "$proxy"; wait "$proxy" 2>/dev/null || true
    rm -f "$work/ready"
done
