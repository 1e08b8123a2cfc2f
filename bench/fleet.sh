#!/usr/bin/env bash
# Controller fan-out benchmark: N simulated nodes (real Sync streams, one
# HTTP/2 connection each, ACK on receipt) against one controller; for each
# N, ROUNDS publishes. Reports time from PublishConfig to each node's ACK
# (p50/p99/last), controller CPU during the round, and controller RSS.
# The controller is pinned to CPU 0, the simulated nodes to CPU 1.
#
# With WAVES (e.g. WAVES=1,10%,50%,100%), each N is also run as staged
# rollouts through those waves with bake 0: the cost of staging.
#
#   [WAVES=...] bench/fleet.sh [NODES="100 1000 5000"] [ROUNDS=3]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

NODE_COUNTS=${1:-"100 1000 5000"}
ROUNDS=${2:-3}
PORT=19840
build_tether
(cd "$ROOT" && cargo build --release --quiet --example fleet-load)
LOAD="$ROOT/target/release/examples/fleet-load"

printf '| nodes | staging | publish answered | ACK p50 | ACK p99 | last ACK | controller CPU | controller RSS |\n|---|---|---|---|---|---|---|---|\n'
for nodes in $NODE_COUNTS; do
  # All at once, then (with WAVES) the same publishes staged, bake 0.
  for staging in "all at once" ${WAVES:+"$WAVES"}; do
    rm -rf "$WORK/data"
    start controller "$PROXY_CPU" "$TETHER" controller --listen 127.0.0.1:$PORT --data "$WORK/data"
    controller=$STARTED
    wait_port $PORT
    waves_arg=()
    [ "$staging" != "all at once" ] && waves_arg=(--waves "$staging")
    taskset -c "$LOAD_CPU" "$LOAD" --controller http://127.0.0.1:$PORT --nodes "$nodes" \
        --rounds "$ROUNDS" --pid "$controller" "${waves_arg[@]}" >"$WORK/rounds.json" 2>"$WORK/load.log" || {
        cat "$WORK/load.log" >&2
        exit 1
    }
    # The median round by last-ACK time.
    python3 - "$WORK/rounds.json" "$staging" <<'PY'
import json, sys
rounds = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
rounds.sort(key=lambda r: r["last_ms"])
r = rounds[len(rounds) // 2]
print(f"| {r['nodes']:,} | {sys.argv[2]} | {r['publish_ms']:.1f} ms | {r['p50_ms']:.0f} ms | {r['p99_ms']:.0f} ms "
      f"| {r['last_ms']:.0f} ms ({r['acks']:,} ACKs) | {r['controller_cpu_ms']:.0f} ms "
      f"| {r['controller_rss_kib'] / 1024:.0f} MiB (peak {r['controller_peak_rss_kib'] / 1024:.0f}) |")
PY
    stop_pid "$controller"
  done
done
