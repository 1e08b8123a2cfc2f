#!/usr/bin/env bash
# tether in a real OpenTelemetry backend: starts otelite (OTLP on
# 127.0.0.1:4317), an nginx origin, a controller and a node that exports to
# otelite; publishes a config through the controller, sends a bounded
# burst of requests (some with a client traceparent), then lists the traces
# and metrics otelite received.
#
#   bench/otel.sh [REQUESTS=200]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

REQUESTS=${1:-200}
PORT=19180 CONTROLLER=127.0.0.1:19840
need_apt nginx:nginx-light curl:curl
command -v otelite >/dev/null 2>&1 || cargo install --locked --quiet otelite
build_tether
export OTELITE_ENDPOINT=http://127.0.0.1:19300

start otelite "$LOAD_CPU" otelite serve --addr 127.0.0.1:19300 --storage-path "$WORK/otelite"
wait_port 4317
start_origin origin 19181 19182

cat >"$WORK/node.toml" <<CONF
[node]
id = "otel-demo-node"
[control]
listen = "127.0.0.1:0"
[controller]
url = "http://$CONTROLLER"
labels = { env = "demo" }
state_dir = "$WORK/state"
[telemetry]
otlp_endpoint = "http://127.0.0.1:4317"
metrics_interval = "2s"
CONF
cat >"$WORK/site.toml" <<CONF
[[listener]]
name = "web"
listen = "127.0.0.1:$PORT"
[[listener.route]]
path = "/"
upstream = "app"
[upstream.app]
servers = [{ addr = "127.0.0.1:19181" }, { addr = "127.0.0.1:19182" }]
[upstream.app.health]
type = "http"
interval = "1s"
CONF

OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 start controller "$PROXY_CPU" \
    "$TETHER" controller --listen $CONTROLLER --data "$WORK/controller"
wait_port ${CONTROLLER##*:}
start node "$PROXY_CPU" "$TETHER" node --config "$WORK/node.toml"
sleep 1
"$TETHER" fleet --controller "http://$CONTROLLER" publish "$WORK/site.toml" --selector env=demo --comment "otel demo"
wait_port $PORT

echo "sending $REQUESTS requests"
for i in $(seq 1 "$REQUESTS"); do
    if [ $((i % 50)) = 0 ]; then
        curl -s -o /dev/null -H "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e$(printf %04x "$i")-00f067aa0ba902b7-01" "http://127.0.0.1:$PORT/item/$i"
    else
        curl -s -o /dev/null "http://127.0.0.1:$PORT/item/$i"
    fi
done
curl -s -o /dev/null "http://127.0.0.1:$PORT/missing" || true
sleep 6   # a few metric export intervals and span batches

echo; echo "## traces by root span (otelite traces list)"
otelite traces list --no-pager --limit 100000 --format json >"$WORK/traces.json"
python3 - "$WORK/traces.json" <<'PY'
import collections, json, sys
data = json.load(open(sys.argv[1]))
traces = data if isinstance(data, list) else next(v for v in data.values() if isinstance(v, list))
def root(t):
    for key in ("root_span", "root_span_name", "rootSpan", "name"):
        if isinstance(t.get(key), str):
            return t[key]
        if isinstance(t.get(key), dict):
            return t[key].get("name", "?")
    return "?"
counts = collections.Counter(root(t) for t in traces)
for name, n in counts.most_common():
    print(f"{n:6}  {name}")
client = [t for t in traces if "4bf92f3577b34da6a3ce929d0e0e" in json.dumps(t)]
print(f"{len(client)} traces continue a client's traceparent (trace id 4bf92f3577b34da6a3ce929d0e0e....)")
PY
publish=$(python3 -c '
import json, sys
data = json.load(open(sys.argv[1]))
traces = data if isinstance(data, list) else next(v for v in data.values() if isinstance(v, list))
for t in traces:
    if "publish v1" in json.dumps(t):
        print(t.get("trace_id") or t.get("traceId") or ""); break
' "$WORK/traces.json")
if [ -n "$publish" ]; then
    echo; echo "## the publish trace: controller publish, node apply, ACK"
    otelite traces show --no-pager --no-color "$publish" | head -40
fi
echo; echo "## metrics (otelite metrics list)"
otelite metrics list --no-pager --no-color | grep -E "tether|NAME" | head -30
echo; echo "## tether.requests"
otelite metrics show --no-pager --no-color tether.requests | head -20
