# Shared helpers for scripts/bench.sh and scripts/demo.sh. Source, don't run.
# Every process started through start_bg is recorded and stopped by stop_all (by PID only).

STARTED_PIDS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# start_bg LOGFILE CMD... : run CMD in the background, stdout+stderr to LOGFILE; sets BG_PID.
start_bg() {
    local logfile=$1; shift
    "$@" >"$logfile" 2>&1 &
    BG_PID=$!
    STARTED_PIDS+=("$BG_PID")
}

# stop_all: TERM every recorded process, wait a little, then KILL the ones still there.
stop_all() {
    local pid alive=()
    for pid in "${STARTED_PIDS[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null && alive+=("$pid")
        fi
    done
    local i
    for i in $(seq 1 30); do
        local still=()
        for pid in "${alive[@]}"; do
            kill -0 "$pid" 2>/dev/null && still+=("$pid")
        done
        alive=("${still[@]}")
        [ ${#alive[@]} -eq 0 ] && break
        sleep 0.1
    done
    for pid in "${alive[@]}"; do
        kill -KILL "$pid" 2>/dev/null
    done
    for pid in "${STARTED_PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    STARTED_PIDS=()
}

# free_port: print a TCP port that was free on 127.0.0.1 a moment ago.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# wait_port HOST PORT SECONDS: until something accepts on HOST:PORT (bounded).
wait_port() {
    local host=$1 port=$2 secs=$3 deadline
    deadline=$(( $(date +%s%N) + secs * 1000000000 ))
    while [ "$(date +%s%N)" -lt "$deadline" ]; do
        if timeout 1 bash -c "exec 3<>/dev/tcp/$host/$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.05
    done
    return 1
}

# wait_line FILE PATTERN SECONDS [PID]: until FILE has a line matching PATTERN (bounded);
# fails early if PID exits.
wait_line() {
    local file=$1 pattern=$2 secs=$3 pid=${4:-} deadline
    deadline=$(( $(date +%s%N) + secs * 1000000000 ))
    while [ "$(date +%s%N)" -lt "$deadline" ]; do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.05
    done
    return 1
}

# listen_addrs FILE: the addresses a `ringway-load serve` printed, one per line.
listen_addrs() { sed -n 's/^listening on \([^ ]*\) .*/\1/p' "$1"; }

# tree_pids PID: PID and all its descendants.
tree_pids() {
    local pid=$1 child
    echo "$pid"
    for child in $(pgrep -P "$pid" 2>/dev/null); do
        tree_pids "$child"
    done
}

# cpu_ticks PID: utime+stime (clock ticks) of PID and its descendants.
cpu_ticks() {
    local total=0 p v
    for p in $(tree_pids "$1"); do
        # fields after the ")" of the command name: state is field 3, utime 14, stime 15
        v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12 + $13}')
        total=$(( total + ${v:-0} ))
    done
    echo "$total"
}

# rss_kb PID: resident memory (kB) of PID and its descendants.
rss_kb() {
    local total=0 p v
    for p in $(tree_pids "$1"); do
        v=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null)
        total=$(( total + ${v:-0} ))
    done
    echo "$total"
}

# cpus_of PID: the CPU list PID may run on.
cpus_of() { taskset -pc "$1" 2>/dev/null | sed 's/.*: //'; }

# idle_rss PROXY_PID TARGET FLOWS WORKDIR LOAD_ARGS... : RSS per idle flow, the way
# scripts/bench.sh and scripts/idle-rss.sh measure it. Samples PROXY_PID's RSS, runs
# `$LOAD idle` (on $CLIENT_CPUS if set) against TARGET with FLOWS flows and any extra LOAD_ARGS,
# samples the RSS again as soon as every flow was opened and checked once (its ready file),
# then ends the hold (SIGUSR1) and waits for the load generator (bounded: 100 s to get ready).
# Sets IDLE_RSS0 and IDLE_RSS1 (kB), IDLE_RC (the load generator's exit code) and IDLE_OUT
# (its JSON result); IDLE_PER_FLOW is (RSS1 - RSS0) in bytes per flow.
idle_rss() {
    local pid=$1 target=$2 flows=$3 work=$4 ipid deadline cpus=${CLIENT_CPUS:-}
    shift 4
    local ready="$work/idle.ready"
    rm -f "$ready"
    IDLE_RSS0=$(rss_kb "$pid")
    if [ -n "$cpus" ]; then set -- taskset -c "$cpus" "$LOAD" idle "$@"; else set -- "$LOAD" idle "$@"; fi
    "$@" --target "$target" --conns "$flows" --hold 120s --ready-file "$ready" --json \
        >"$work/idle.out" 2>>"$work/load.err" &
    ipid=$!
    STARTED_PIDS+=("$ipid")
    deadline=$(( $(date +%s) + 100 ))
    while [ ! -s "$ready" ] && kill -0 "$ipid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 0.05; done
    IDLE_RSS1=$(rss_kb "$pid")
    kill -USR1 "$ipid" 2>/dev/null
    wait "$ipid"; IDLE_RC=$?
    IDLE_OUT=$(cat "$work/idle.out")
    IDLE_PER_FLOW=$(( (IDLE_RSS1 - IDLE_RSS0) * 1024 / flows ))
}
