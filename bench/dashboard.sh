#!/usr/bin/env bash
# Dashboard with a large fleet: N simulated nodes (bench/fleet_load.rs, real
# Sync streams) on one controller with --dashboard, then one publish to all
# of them. Reports the snapshot's size and time, the Server-Sent Events one
# client receives per second during the publish, and, in headless Chromium
# (Playwright), the time to render the whole table, a render during the
# publish, and a filter.
# The controller is pinned to CPU 0; the simulated nodes, curl and the
# browser to CPU 1.
#
#   bench/dashboard.sh [NODES=5000]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

NODES=${1:-5000}
PORT=19850
DASHBOARD=19851
need_apt chromium:chromium curl:curl
build_tether
(cd "$ROOT" && cargo build --release --quiet --example fleet-load)
LOAD="$ROOT/target/release/examples/fleet-load"
# Playwright's library only; it drives Debian's chromium, downloads no browser.
(cd "$WORK" && npm install --silent --no-audit --no-fund playwright-core@1 >/dev/null)
cp "$ROOT/bench/dashboard_page.mjs" "$WORK/"

start controller "$PROXY_CPU" "$TETHER" controller --listen 127.0.0.1:$PORT --data "$WORK/data" \
    --dashboard 127.0.0.1:$DASHBOARD
controller=$STARTED
wait_port $PORT
wait_port $DASHBOARD

# The fleet connects, waits until the browser has the page open, publishes
# once, then stays connected while the page is measured.
start fleet "$LOAD_CPU" "$LOAD" --controller http://127.0.0.1:$PORT --nodes "$NODES" \
    --rounds 1 --delay 20 --hold 30 --pid "$controller"
fleet=$STARTED
for _ in $(seq 1 600); do
    connected=$(curl -s "http://127.0.0.1:$DASHBOARD/api/fleet" |
        python3 -c 'import json,sys; print(sum(n["connected"] for n in json.load(sys.stdin)["nodes"]))')
    [ "$connected" -ge "$NODES" ] && break
    sleep 0.1
done
echo "$connected of $NODES nodes connected" >&2

# Snapshot: median of 5.
for _ in 1 2 3 4 5; do
    taskset -c "$LOAD_CPU" curl -s -o /dev/null -w '%{size_download} %{time_total}\n' \
        "http://127.0.0.1:$DASHBOARD/api/fleet"
done | sort -k2 -n | sed -n 3p >"$WORK/snapshot"
read -r snapshot_bytes snapshot_s <"$WORK/snapshot"

# One SSE client counting the publish's events (bounded: 60 s).
taskset -c "$LOAD_CPU" timeout 60 python3 - "http://127.0.0.1:$DASHBOARD/api/events" "$NODES" \
    >"$WORK/sse.json" <<'PY' &
import json, sys, time, urllib.request
url, nodes = sys.argv[1], int(sys.argv[2])
first = last = None
count = acks = 0
with urllib.request.urlopen(url) as stream:
    for line in stream:
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        now = time.monotonic()
        if event.get("event") == "published":
            first = now
        if first is None:
            continue
        count += 1
        last = now
        if event.get("event") == "ack":
            acks += 1
            if acks == nodes:
                break
print(json.dumps({"events": count, "seconds": last - first}))
PY
sse=$!

taskset -c "$LOAD_CPU" node "$WORK/dashboard_page.mjs" "http://127.0.0.1:$DASHBOARD/" "$NODES" \
    >"$WORK/page.json"
wait "$sse" || true
wait "$fleet" || true
python3 - "$snapshot_bytes" "$snapshot_s" "$WORK/sse.json" "$WORK/page.json" "$WORK/fleet.log" <<'PY'
import json, sys
size, seconds = int(sys.argv[1]), float(sys.argv[2])
sse = json.load(open(sys.argv[3]))
page = json.load(open(sys.argv[4]))
rounds = [json.loads(l) for l in open(sys.argv[5]) if l.startswith("{")]
fleet = rounds[0] if rounds else {}
print(f"| nodes | {page['nodes']:,} |")
print("|---|---|")
print(f"| snapshot `/api/fleet` | {size / 1024:,.0f} KiB in {seconds * 1000:.0f} ms |")
print(f"| publish → last ACK (controller, WatchFleet) | {fleet.get('last_ms', float('nan')):,.0f} ms |")
print(f"| SSE events to one client during the publish | {sse['events']:,} in {sse['seconds'] * 1000:,.0f} ms "
      f"({sse['events'] / sse['seconds']:,.0f}/s) |")
print(f"| browser: page opened → table of {page['nodes']:,} nodes shown | {page['first_render_ms']:,.0f} ms |")
print(f"| browser: one render ({page['rows_shown']} rows drawn, worst first) | {page['render_ms']:.0f} ms |")
print(f"| browser: \"Show all\" ({page['nodes']:,} rows drawn) / re-sort them | {page['all_rows_ms']:.0f} ms / {page['resort_all_ms']:.0f} ms |")
print(f"| browser: during the publish | {page['publish_renders']} renders, p50 {page['publish_render_p50_ms']:.0f} ms, "
      f"max {page['publish_render_max_ms']:.0f} ms; all ACKs shown {page['publish_shown_ms']:,.0f} ms after the publish showed |")
print(f"| browser: filter to one node | {page['filter_ms']:.0f} ms |")
PY
stop_pid "$controller"
