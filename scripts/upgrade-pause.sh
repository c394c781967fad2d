#!/usr/bin/env bash
# How long flows stand still during an upgrade handover (--upgrade-socket / --takeover), and
# how soon the old process is gone. Opens FLOWS idle flows (ringway-load idle, each checked end
# to end before and after), then upgrades ROUNDS times in a row and prints, per round, the
# successor's measured pause per flow (from the moment the old process stopped moving a flow's
# bytes to the moment the successor moves them again: p50, p99, max over every flow), the
# handover's duration, and how long the old process took to exit after it.
#
#   scripts/upgrade-pause.sh [--flows N] [--rounds K] [--workers W] [--bin PATH]
#
# Needs an open-file limit above 4 x FLOWS (both processes hold every flow for a moment).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/common.sh

flows=10000 rounds=3 workers=2 bin=target/release/ringway
while [ $# -gt 0 ]; do
    case $1 in
        --flows) flows=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --workers) workers=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        *) die "unknown argument $1 (see the comment at the top)" ;;
    esac
done
# Root may raise the hard limit; others get what they have.
ulimit -Hn $((flows * 2 + 4096)) 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -gt $((flows * 2 + 100)) ] || die "the open-file limit $(ulimit -n) is too low for $flows flows"
cargo build --release -q --workspace
load=target/release/ringway-load
work=$(mktemp -d)
trap 'stop_all; rm -rf "$work"' EXIT

backend=$(free_port)
start_bg "$work/backend.log" "$load" serve --listen "127.0.0.1:$backend" --mode echo
wait_port 127.0.0.1 "$backend" 10 || die "echo backend did not start"
port=$(free_port)
socket=$work/upgrade.sock
proxy_args=(--listen "127.0.0.1:$port" --backend "127.0.0.1:$backend" --workers "$workers"
    --upgrade-socket "$socket")

# wait_log FILE TEXT SECONDS
wait_log() {
    local deadline=$(( $(date +%s) + $3 ))
    until grep -q "$2" "$1" 2>/dev/null; do
        [ "$(date +%s)" -lt "$deadline" ] || die "no '$2' in $1 within $3 s: $(tail -3 "$1")"
        sleep 0.02
    done
}

start_bg "$work/proxy-0.log" "$bin" "${proxy_args[@]}"
old=$BG_PID
wait_log "$work/proxy-0.log" "waiting for a successor" 20
log "opening $flows idle flows"
start_bg "$work/idle.log" "$load" idle --target "127.0.0.1:$port" --conns "$flows" \
    --sources 127.0.0.2-127.0.0.40 --hold 600s --ready-file "$work/ready"
idle=$BG_PID
deadline=$(( $(date +%s) + 120 ))
until [ -s "$work/ready" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || die "the idle flows did not open: $(tail -3 "$work/idle.log")"
    kill -0 "$idle" 2>/dev/null || die "ringway-load idle ended: $(tail -3 "$work/idle.log")"
    sleep 0.1
done
opened=$(cat "$work/ready")
[ "$opened" -eq "$flows" ] || die "only $opened of $flows flows opened (a loaded machine? try fewer)"
log "$opened flows open and checked"

for round in $(seq 1 "$rounds"); do
    start_bg "$work/proxy-$round.log" "$bin" "${proxy_args[@]}" --takeover
    new=$BG_PID
    wait_log "$work/proxy-$round.log" "handover complete" 60
    # The old process: gone how long after the successor has every flow?
    t0=$(date +%s%N)
    while kill -0 "$old" 2>/dev/null && [ $(( $(date +%s%N) - t0 )) -lt 10000000000 ]; do
        if [ "$(ps -o stat= -p "$old" 2>/dev/null | cut -c1)" = Z ]; then break; fi
        sleep 0.001
    done
    gone_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    wait "$old" 2>/dev/null || die "old process exit status $? (round $round)"
    wait_log "$work/proxy-$((round - 1)).log" "exiting .* after the handover" 10
    pause=$(grep -o "pause per flow .*" "$work/proxy-$round.log" | head -1)
    moved=$(grep -o "handover complete: [0-9]* flows moved in [^ ]*" "$work/proxy-$((round - 1)).log")
    exiting=$(grep -o "exiting .* after the handover" "$work/proxy-$((round - 1)).log")
    printf 'round %d: %s; old process: %s, %s; gone %d ms after the successor finished\n' \
        "$round" "$pause" "$moved" "$exiting" "$gone_ms"
    old=$new
done

log "checking every flow again"
kill -USR1 "$idle"
wait "$idle" || true
cat "$work/idle.log"
grep -q "failed 0" "$work/idle.log" || die "flows failed across the upgrades"
