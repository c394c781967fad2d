#!/usr/bin/env bash
# Benchmark Ringway against HAProxy, nginx (stream) and no proxy at all, on loopback.
#
#   scripts/bench.sh [--quick] [--workers N] [--cpus LIST] [--client-cpus LIST]
#                    [--repeats N] [--duration SECS] [--conns N] [--rate REQ_PER_S]
#                    [--idle-flows N] [--contenders "direct ringway haproxy nginx"]
#                    [--no-install] [--no-build]
#
# Builds the release binaries, installs haproxy/nginx if missing, starts test backends
# (ringway-load serve), one proxy instance per backend kind and contender, runs every workload
# interleaved across contenders and repeated (median reported), and prints one markdown table.
# Results: bench/results/{latest,quick}.{json,md,svg} and the raw runs as .jsonl.
# Everything it starts is stopped on exit (by saved PID).
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/common.sh
source "$ROOT/scripts/lib/common.sh"

QUICK=0 WORKERS=1 PROXY_CPUS="" CLIENT_CPUS="" REPEATS="" DURATION="" CONNS=32 RATE=""
IDLE_FLOWS="" CONTENDERS="direct ringway haproxy nginx" INSTALL=1 BUILD=1
SOURCES="127.0.0.2-127.0.0.20"

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --workers) WORKERS=$2; shift ;;
        --cpus) PROXY_CPUS=$2; shift ;;
        --client-cpus) CLIENT_CPUS=$2; shift ;;
        --repeats) REPEATS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --conns) CONNS=$2; shift ;;
        --rate) RATE=$2; shift ;;
        --idle-flows) IDLE_FLOWS=$2; shift ;;
        --contenders) CONTENDERS=$2; shift ;;
        --no-install) INSTALL=0 ;;
        --no-build) BUILD=0 ;;
        -h|--help) usage; exit 0 ;;
        *) usage; die "unknown option $1" ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    : "${REPEATS:=1}" "${DURATION:=1}" "${IDLE_FLOWS:=2000}"
    NAME=quick
else
    : "${REPEATS:=3}" "${DURATION:=5}" "${IDLE_FLOWS:=5000}"
    NAME=latest
fi
NCPU=$(nproc)
if [ -z "$PROXY_CPUS" ]; then
    if [ "$WORKERS" -lt "$NCPU" ]; then PROXY_CPUS="$WORKERS-$((NCPU - 1))"; else PROXY_CPUS="0-$((NCPU - 1))"; fi
fi
if [ -z "$CLIENT_CPUS" ]; then
    if [ "$WORKERS" -lt "$NCPU" ]; then CLIENT_CPUS="0-$((WORKERS - 1))"; else CLIENT_CPUS="0-$((NCPU - 1))"; fi
fi
HARD_NOFILE=$(ulimit -Hn)
ulimit -n "$HARD_NOFILE" 2>/dev/null
MAX_CONNS=9000
if [ "$IDLE_FLOWS" -gt "$MAX_CONNS" ]; then
    die "--idle-flows $IDLE_FLOWS: a proxy holds 2 fds per flow and the fd limit is $HARD_NOFILE; use <= $MAX_CONNS"
fi

OUT_DIR="$ROOT/bench/results"
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/ringway-bench.XXXXXX)
RAW="$WORK/runs.jsonl"
: >"$RAW"
cleanup() {
    stop_all
    log "logs and raw runs kept in $WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

LOAD="$ROOT/target/release/ringway-load"
RINGWAY="$ROOT/target/release/ringway"
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- build and install
cd "$ROOT" || exit 1
if [ "$BUILD" = 1 ]; then
    log "building release binaries (cargo build --release --workspace)"
    if ! cargo build --release --workspace 2>"$WORK/build.log"; then
        log "workspace build failed (see $WORK/build.log); building ringway-load alone"
        tail -5 "$WORK/build.log" >&2
        cargo build --release -p ringway-load 2>>"$WORK/build.log" || die "cannot build ringway-load"
    fi
fi
[ -x "$LOAD" ] || die "$LOAD missing"

need_pkgs=()
command -v haproxy >/dev/null || need_pkgs+=(haproxy)
command -v nginx >/dev/null || need_pkgs+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need_pkgs+=(libnginx-mod-stream)
if [ ${#need_pkgs[@]} -gt 0 ]; then
    if [ "$INSTALL" = 1 ]; then
        log "installing ${need_pkgs[*]}"
        apt-get update -qq >"$WORK/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >>"$WORK/apt.log" 2>&1 ||
            log "apt-get install failed (see $WORK/apt.log)"
    else
        log "missing ${need_pkgs[*]} and --no-install given"
    fi
fi

# ---------------------------------------------------------------- backends
# one serve process per kind, each with three listeners = three backends
declare -A BACKENDS   # kind -> "addr addr addr"
for kind in echo sink source; do
    start_bg "$WORK/backend-$kind.log" taskset -c "$CLIENT_CPUS" "$LOAD" serve --mode "$kind" \
        --listen 127.0.0.1:0 --listen 127.0.0.1:0 --listen 127.0.0.1:0
    pid=$BG_PID
    wait_line "$WORK/backend-$kind.log" "listening on" 10 "$pid" || die "backend $kind did not start"
    for _ in $(seq 1 100); do [ "$(listen_addrs "$WORK/backend-$kind.log" | wc -l)" -ge 3 ] && break; sleep 0.05; done
    BACKENDS[$kind]=$(listen_addrs "$WORK/backend-$kind.log" | tr '\n' ' ')
    log "backend $kind (pid $pid, cpus $(cpus_of "$pid")): ${BACKENDS[$kind]}"
done

# ---------------------------------------------------------------- proxies
declare -A TARGET PROXY_PID   # "contender/kind" -> addr / pid
AVAILABLE=()

start_haproxy() {  # kind port [tag]
    local kind=$1 port=$2 tag=${3:-$1} i=0 b
    local cfg="$WORK/haproxy-$tag.cfg"
    {
        echo "global"
        echo "    nbthread $WORKERS"
        echo "    maxconn $MAX_CONNS"
        echo "defaults"
        echo "    mode tcp"
        echo "    timeout connect 3s"
        echo "    timeout client 10m"
        echo "    timeout server 10m"
        echo "    maxconn $MAX_CONNS"
        echo "frontend fe"
        echo "    bind 127.0.0.1:$port"
        echo "    default_backend be"
        echo "backend be"
        echo "    balance source"
        echo "    hash-type consistent"
        for b in ${BACKENDS[$kind]}; do
            i=$((i + 1)); echo "    server b$i $b"
        done
    } >"$cfg"
    start_bg "$WORK/haproxy-$tag.log" taskset -c "$PROXY_CPUS" haproxy -db -f "$cfg"
}

start_nginx() {  # kind port [tag]
    local kind=$1 port=$2 tag=${3:-$1} b
    local dir="$WORK/nginx-$tag"
    mkdir -p "$dir"
    {
        echo "daemon off;"
        echo "master_process on;"
        echo "worker_processes $WORKERS;"
        echo "worker_rlimit_nofile $((HARD_NOFILE - 500));"
        echo "pid $dir/nginx.pid;"
        echo "error_log $dir/error.log warn;"
        echo "load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
        echo "events { worker_connections $((2 * MAX_CONNS + 100)); }"
        echo "stream {"
        echo "    upstream be {"
        echo "        hash \$remote_addr consistent;"
        for b in ${BACKENDS[$kind]}; do echo "        server $b;"; done
        echo "    }"
        echo "    server {"
        echo "        listen 127.0.0.1:$port;"
        echo "        proxy_pass be;"
        echo "        proxy_connect_timeout 3s;"
        echo "        proxy_timeout 10m;"
        echo "    }"
        echo "}"
    } >"$dir/nginx.conf"
    start_bg "$WORK/nginx-$tag.log" taskset -c "$PROXY_CPUS" nginx -e "$dir/stderr.log" -p "$dir" -c "$dir/nginx.conf"
}

start_ringway() {  # kind port [tag]
    local kind=$1 port=$2 tag=${3:-$1} args=() b
    for b in ${BACKENDS[$kind]}; do args+=(--backend "$b"); done
    start_bg "$WORK/ringway-$tag.log" taskset -c "$PROXY_CPUS" "$RINGWAY" --listen "127.0.0.1:$port" \
        "${args[@]}" --workers "$WORKERS" --hash-key src-ip --connect-timeout 3s --idle-timeout 10m \
        --max-conns "$MAX_CONNS"
}

for c in $CONTENDERS; do
    ok=1
    case $c in
        direct)
            for kind in echo sink source; do
                TARGET[$c/$kind]=$(echo "${BACKENDS[$kind]}" | awk '{print $1}')
                PROXY_PID[$c/$kind]=""
            done
            AVAILABLE+=("$c"); continue ;;
        ringway) [ -x "$RINGWAY" ] || { log "ringway: $RINGWAY not built, skipped (pending)"; continue; } ;;
        haproxy) command -v haproxy >/dev/null || { log "haproxy not installed, skipped"; continue; } ;;
        nginx) command -v nginx >/dev/null || { log "nginx not installed, skipped"; continue; } ;;
        *) die "unknown contender $c" ;;
    esac
    for kind in echo sink source; do
        port=$(free_port)
        "start_$c" "$kind" "$port"
        pid=$BG_PID
        if [ "$c" = ringway ]; then
            wait_line "$WORK/ringway-$kind.log" "listening on" 10 "$pid" || ok=0
        fi
        if [ "$ok" = 1 ] && wait_port 127.0.0.1 "$port" 10 && kill -0 "$pid" 2>/dev/null; then
            TARGET[$c/$kind]="127.0.0.1:$port"
            PROXY_PID[$c/$kind]=$pid
            log "$c $kind proxy: pid $pid on 127.0.0.1:$port, cpus $(cpus_of "$pid")"
        else
            ok=0
            log "$c $kind proxy did not start; log:"; tail -5 "$WORK/$c-$kind.log" >&2
        fi
    done
    [ "$ok" = 1 ] && AVAILABLE+=("$c")
done
log "contenders: ${AVAILABLE[*]}; load generator cpus $CLIENT_CPUS, proxies cpus $PROXY_CPUS, $WORKERS worker(s)"

# ---------------------------------------------------------------- workloads
STREAMS=4
wl_kind() { case $1 in rr|rate|connect|idle) echo echo ;; bulk-down) echo source ;; bulk-up) echo sink ;; esac; }
wl_args() {  # workload target
    local d="${DURATION}s"
    case $1 in
        rr) echo "rr --target $2 --duration $d --conns $CONNS --sources $SOURCES" ;;
        rate) echo "rr --target $2 --duration $d --conns $CONNS --sources $SOURCES --rate $RATE" ;;
        connect) echo "connect --target $2 --duration $d --conns 16 --sources $SOURCES" ;;
        bulk-down) echo "bulk --target $2 --duration $d --streams $STREAMS --direction down --sources $SOURCES" ;;
        bulk-up) echo "bulk --target $2 --duration $d --streams $STREAMS --direction up --sources $SOURCES" ;;
    esac
}

record() {  # contender workload rep rc cpu_s extra_json result_json
    local res=$7
    [ -n "$res" ] || res='{}'
    printf '{"contender":"%s","workload":"%s","rep":%s,"rc":%s,"cpu_s":%s%s,"result":%s}\n' \
        "$1" "$2" "$3" "$4" "$5" "$6" "$res" >>"$RAW"
}

run_one() {  # contender workload rep
    local c=$1 w=$2 rep=$3 kind target pid t0=0 t1=0 out rc cpu
    kind=$(wl_kind "$w"); target=${TARGET[$c/$kind]}; pid=${PROXY_PID[$c/$kind]}
    if [ "$w" = idle ]; then run_idle "$c" "$rep"; return; fi
    [ -n "$pid" ] && t0=$(cpu_ticks "$pid")
    # shellcheck disable=SC2046
    out=$(taskset -c "$CLIENT_CPUS" "$LOAD" $(wl_args "$w" "$target") --json 2>>"$WORK/load.err")
    rc=$?
    [ -n "$pid" ] && t1=$(cpu_ticks "$pid")
    if [ -n "$pid" ]; then cpu=$(awk -v a="$t0" -v b="$t1" -v h="$CLK_TCK" 'BEGIN{printf "%.3f", (b-a)/h}'); else cpu=null; fi
    record "$c" "$w" "$rep" "$rc" "$cpu" "" "$out"
    log "$(printf '%-8s %-9s rep %s rc=%s proxy-cpu=%s %s' "$c" "$w" "$rep" "$rc" "${cpu/null/-}" "$(summary "$out")")"
}

summary() {
    python3 - "$1" <<'PY' 2>/dev/null
import json, sys
try:
    r = json.loads(sys.argv[1])
except Exception:
    print("(no result)"); sys.exit()
parts = []
for k in ("rps", "cps", "gbps"):
    if k in r: parts.append(f"{k}={r[k]:.1f}" if k != "gbps" else f"gbit/s={r[k]:.2f}")
if "latency_us" in r and r["latency_us"]["count"]:
    l = r["latency_us"]; parts.append(f"p50={l['p50']}us p99={l['p99']}us")
if "ok" in r and "failed" in r: parts.append(f"ok={r['ok']} failed={r['failed']}")
if "late_sends" in r: parts.append(f"late_sends={r['late_sends']}")
parts.append(f"errors={r.get('errors', '?')}")
if r.get("unfinished"): parts.append(f"unfinished={r['unfinished']}")
print(" ".join(parts))
PY
}

run_idle() {  # contender rep
    local c=$1 rep=$2 target pid rss0 rss1 rc out port
    [ "$c" != direct ] || return 0    # RSS per flow only means something for a proxy
    # A fresh proxy instance for every measurement: an allocator keeps memory after flows
    # close, so a proxy that already carried flows would show too little growth.
    port=$(free_port)
    "start_$c" echo "$port" "idle-$rep"
    pid=$BG_PID
    if [ "$c" = ringway ]; then wait_line "$WORK/ringway-idle-$rep.log" "listening on" 10 "$pid"; fi
    if ! wait_port 127.0.0.1 "$port" 10; then
        log "$c idle instance did not start"; kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
        return 0
    fi
    target="127.0.0.1:$port"
    idle_rss "$pid" "$target" "$IDLE_FLOWS" "$WORK" --sources "$SOURCES"
    rss0=$IDLE_RSS0 rss1=$IDLE_RSS1 rc=$IDLE_RC out=$IDLE_OUT
    kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    record "$c" idle "$rep" "$rc" null ",\"flows\":$IDLE_FLOWS,\"rss_before_kb\":$rss0,\"rss_ready_kb\":$rss1" "$out"
    log "$(printf '%-8s %-9s rep %s rc=%s rss %s kB -> %s kB (%s B/flow) %s' "$c" idle "$rep" "$rc" "$rss0" "$rss1" \
        "$(( (rss1 - rss0) * 1024 / IDLE_FLOWS ))" "$(summary "$out")")"
}

rotate() {  # rep: the available contenders, rotated by rep so no one always goes first
    local rep=$1 n=${#AVAILABLE[@]} i
    for i in $(seq 0 $((n - 1))); do echo "${AVAILABLE[$(( (i + rep) % n ))]}"; done
}

T_START=$(date +%s)
for w in rr connect bulk-down bulk-up idle; do
    for rep in $(seq 1 "$REPEATS"); do
        for c in $(rotate "$rep"); do run_one "$c" "$w" "$rep"; done
    done
done

# fixed rate: a quarter of the slowest proxy's closed-loop rate (requests spread out in time cost
# a proxy far more than the batched closed loop), the same offered load for everyone
if [ -z "$RATE" ]; then
    RATE=$(python3 - "$RAW" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in runs:
    if r["workload"] == "rr" and r["contender"] != "direct" and "rps" in r["result"]:
        by.setdefault(r["contender"], []).append(r["result"]["rps"])
if not by:
    by = {r["contender"]: [r["result"]["rps"]] for r in runs if r["workload"] == "rr" and "rps" in r["result"]}
slowest = min(statistics.median(v) for v in by.values()) if by else 2000
print(max(1000, int(slowest * 0.25 // 1000 * 1000)))
PY
)
fi
log "fixed-rate run at $RATE req/s for every contender"
for rep in $(seq 1 "$REPEATS"); do
    for c in $(rotate "$rep"); do run_one "$c" rate "$rep"; done
done
T_END=$(date +%s)

# ---------------------------------------------------------------- report
cp "$RAW" "$OUT_DIR/$NAME-runs.jsonl"
python3 "$ROOT/scripts/lib/bench_report.py" \
    --runs "$RAW" --out-prefix "$OUT_DIR/$NAME" \
    --meta "workers=$WORKERS" --meta "proxy_cpus=$PROXY_CPUS" --meta "client_cpus=$CLIENT_CPUS" \
    --meta "repeats=$REPEATS" --meta "duration_s=$DURATION" --meta "conns=$CONNS" --meta "rate=$RATE" \
    --meta "idle_flows=$IDLE_FLOWS" --meta "bulk_streams=$STREAMS" --meta "sources=$SOURCES" \
    --meta "contenders=${AVAILABLE[*]}" --meta "wall_s=$((T_END - T_START))" \
    --meta "cpu=$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //')" --meta "ncpu=$NCPU" \
    --meta "kernel=$(uname -r)" \
    --meta "haproxy=$(haproxy -v 2>/dev/null | head -1 | awk '{print $3}')" \
    --meta "nginx=$(nginx -v 2>&1 | sed 's/.*nginx\///')" \
    --meta "ringway_rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)" \
    || die "report failed"
log "wrote $OUT_DIR/$NAME.md, $NAME.json, $NAME.svg"
