#!/usr/bin/env bash
# The controller's two stores side by side in one run: one controller on
# its file store, and 3 replicas sharing a 3-member etcd (Debian's
# etcd-server, data in a temp dir), N simulated nodes (real Sync streams,
# ACK on receipt) spread over the replicas. For each N, ROUNDS publishes
# on the first replica; ACKs are timed on its WatchFleet, which sees the
# nodes held by the other replicas through etcd. Reports publish answered,
# ACK p50/p99/last, the controllers' CPU (summed over replicas), the
# largest replica's RSS, and etcd's CPU. Controllers and etcd on CPU 0,
# the simulated nodes on CPU 1. Then replica 2 of 3 is SIGKILLed: the time
# until each of its nodes has a stream to another replica again.
#
#   bench/fleet_etcd.sh [NODES="1000 5000"] [ROUNDS=3]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

NODE_COUNTS=${1:-"1000 5000"}
ROUNDS=${2:-3}
need_apt etcd:etcd-server protoc:protobuf-compiler
(cd "$ROOT" && cargo build --release --quiet --features etcd \
    && cargo build --release --quiet --example fleet-load)
TETHER="$ROOT/target/release/tether"
LOAD="$ROOT/target/release/examples/fleet-load"

# Three etcd members on loopback.
cluster=""
for i in 0 1 2; do cluster+="${cluster:+,}e$i=http://127.0.0.1:$((19380 + i))"; done
etcd_pids=()
for i in 0 1 2; do
    start "etcd$i" "$PROXY_CPU" etcd --name "e$i" --data-dir "$WORK/etcd$i" \
        --listen-client-urls "http://127.0.0.1:$((19370 + i))" \
        --advertise-client-urls "http://127.0.0.1:$((19370 + i))" \
        --listen-peer-urls "http://127.0.0.1:$((19380 + i))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((19380 + i))" \
        --initial-cluster "$cluster" --initial-cluster-state new
    etcd_pids+=("$STARTED")
done
for i in 0 1 2; do wait_port $((19370 + i)); done
sleep 2
store_hosts="127.0.0.1:19370,127.0.0.1:19371,127.0.0.1:19372"

summary() {
    python3 - "$1" "$2" <<'PY'
import json, sys
rounds = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds = [r for r in rounds if "last_ms" in r]
rounds.sort(key=lambda r: r["last_ms"])
r = rounds[len(rounds) // 2]
print(f"| {r['nodes']:,} | {sys.argv[2]} | {r['publish_ms']:.1f} ms | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms "
      f"| {r['last_ms']:.0f} ms ({r['acks']:,} ACKs) | {r['controller_cpu_ms']:.0f} ms "
      f"| {r['controller_rss_kib'] / 1024:.0f} MiB | {r['etcd_cpu_ms']:.0f} ms |")
PY
}

printf '| nodes | store | publish answered | ACK p50 | ACK p99 | last ACK | controllers CPU | RSS (largest replica) | etcd CPU |\n|---|---|---|---|---|---|---|---|---|\n'
for nodes in $NODE_COUNTS; do
    rm -rf "$WORK/data"
    start controller "$PROXY_CPU" "$TETHER" controller --listen 127.0.0.1:19850 --data "$WORK/data"
    controller=$STARTED
    wait_port 19850
    taskset -c "$LOAD_CPU" "$LOAD" --controller http://127.0.0.1:19850 --nodes "$nodes" \
        --rounds "$ROUNDS" --pid "$controller" >"$WORK/file.json" 2>"$WORK/load.log" \
        || { cat "$WORK/load.log" >&2; exit 1; }
    stop_pid "$controller"
    summary "$WORK/file.json" "file (1 controller)"

    prefix="/bench-$nodes-$RANDOM"
    urls="" pids="" second=""
    for i in 0 1 2; do
        port=$((19851 + i))
        start "replica$i" "$PROXY_CPU" "$TETHER" controller --listen "127.0.0.1:$port" \
            --store "etcd://$store_hosts$prefix" --replica "r$i"
        pids+="${pids:+,}$STARTED"
        [ "$i" = 1 ] && second=$STARTED
        urls+="${urls:+,}http://127.0.0.1:$port"
        wait_port "$port"
    done
    taskset -c "$LOAD_CPU" "$LOAD" --controller "$urls" --nodes "$nodes" --rounds "$ROUNDS" \
        --pid "$pids" --etcd-pid "$(IFS=,; echo "${etcd_pids[*]}")" --failover "$second" \
        >"$WORK/etcd.json" 2>"$WORK/load.log" || { cat "$WORK/load.log" >&2; exit 1; }
    for pid in ${pids//,/ }; do stop_pid "$pid"; done
    summary "$WORK/etcd.json" "etcd (3 replicas)"
    python3 - "$WORK/etcd.json" >>"$WORK/failover.md" <<'PY'
import json, sys
for r in (json.loads(l) for l in open(sys.argv[1]) if l.strip()):
    if r.get("failover"):
        print(f"| {r['nodes']:,} | {r['streams_lost']:,} | {r['all_back_ms']:.0f} ms | {r['connected']:,} |")
PY
done
printf '\nA replica of 3 SIGKILLed:\n\n| nodes | most streams down at once | all nodes on a stream again after | connected then |\n|---|---|---|---|\n'
cat "$WORK/failover.md"
