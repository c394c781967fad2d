#!/usr/bin/env bash
# Memory held for stalled readers and how fast it goes back once they leave (one worker).
#
#   scripts/memory-return.sh [--readers N] [--bin PATH] [-- extra ringway flags]
#
# e.g. `scripts/memory-return.sh --readers 400 -- --buffers 256` (a pool that gets tight, so
# stalled bytes move to spills). --bin runs another build for an A/B comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
readers=200 bin=target/release/ringway
while [ $# -gt 0 ]; do
    case $1 in
        --readers) readers=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "unknown argument $1 (see the comment at the top)" >&2; exit 2 ;;
    esac
done
[ "$bin" != target/release/ringway ] || cargo build --release -q
exec timeout 120 python3 scripts/lib/memory_return.py "$bin" "$readers" "$@"
