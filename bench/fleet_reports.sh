#!/usr/bin/env bash
# What nodes' answer-count reports (the rollout error-rate gate's input)
# cost the controller: N simulated nodes hold their Sync streams for
# SECONDS without publishing, sending a TrafficReport every 1 s, every 5 s
# (the default), or never; the controller's CPU over that time and its RSS.
# Controller on CPU 0, simulated nodes on CPU 1.
#
#   bench/fleet_reports.sh [NODES="1000 5000"] [SECONDS=20]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

NODE_COUNTS=${1:-"1000 5000"}
IDLE=${2:-20}
PORT=19841
build_tether
(cd "$ROOT" && cargo build --release --quiet --example fleet-load)
LOAD="$ROOT/target/release/examples/fleet-load"

printf '| nodes | reports | controller CPU over %s s | share of one core | controller RSS |\n|---|---|---:|---:|---:|\n' "$IDLE"
for nodes in $NODE_COUNTS; do
  for every in 0 5000 1000; do
    rm -rf "$WORK/data"
    start controller "$PROXY_CPU" "$TETHER" controller --listen 127.0.0.1:$PORT --data "$WORK/data"
    controller=$STARTED
    wait_port $PORT
    taskset -c "$LOAD_CPU" "$LOAD" --controller http://127.0.0.1:$PORT --nodes "$nodes" \
        --rounds 0 --delay "$IDLE" --report-every "$every" --pid "$controller" \
        >"$WORK/idle.json" 2>"$WORK/load.log" || {
        cat "$WORK/load.log" >&2
        exit 1
    }
    python3 - "$WORK/idle.json" "$every" <<'PY'
import json, sys
r = json.loads(open(sys.argv[1]).read())
every = int(sys.argv[2])
label = "none" if every == 0 else f"every {every / 1000:g} s"
cpu = r["controller_cpu_ms"]
print(f"| {r['nodes']:,} | {label} | {cpu} ms | {cpu / (r['idle_seconds'] * 10):.1f}% "
      f"| {r['controller_rss_kib'] / 1024:.0f} MiB |")
PY
    stop_pid "$controller"
  done
done
