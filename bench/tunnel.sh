#!/usr/bin/env bash
# Reverse tunnels, tether against rathole doing the same job: a node
# behind NAT dials a public server; clients reach a service behind it.
#  - HTTP requests/s and p99 (wrk, 64 keep-alive connections) through the
#    tunnel, to the same nginx origin; direct to the origin for reference;
#  - TCP bulk throughput (iperf3, one stream) through the tunnel;
#  - memory per tunneled connection: RSS of both ends with IDLE idle
#    client connections open, each after one GET.
# tether: both nodes pinned to CPU 0, one worker each, mTLS (it has no
# plaintext tunnel); rathole (cargo install rathole) server and client
# pinned to CPU 0, over plain TCP and over TLS. Load and origins on CPU 1.
# ROUNDS interleaved rounds; medians.
#
#   bench/tunnel.sh [SECONDS=10] [ROUNDS=3] [IDLE=2000]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECONDS_PER_RUN=${1:-10}
ROUNDS=${2:-3}
IDLE=${3:-2000}
need_apt wrk:wrk nginx:nginx-light iperf3:iperf3 openssl:openssl python3:python3
command -v rathole >/dev/null 2>&1 || cargo install rathole >&2
build_tether

# Services behind the tunnel, on the load core.
start_origin origin 19901
start iperf "$LOAD_CPU" iperf3 -s -p 19902
wait_port 19902

# Certificates: a CA, the public server's certificate, the node's.
"$TETHER" certs --dir "$WORK/pki" ca >/dev/null
"$TETHER" certs --dir "$WORK/pki" controller --name public.test >/dev/null
"$TETHER" certs --dir "$WORK/pki" node nas >/dev/null
openssl pkcs12 -export -passout pass:bench -inkey "$WORK/pki/controller-key.pem" \
    -in "$WORK/pki/controller.pem" -out "$WORK/pki/public.pfx" 2>/dev/null

cat >"$WORK/public.toml" <<CONF
[node]
id = "public"
workers = 1
[control]
listen = "127.0.0.1:0"
[[listener]]
name = "tunnels"
listen = "127.0.0.1:19930"
protocol = "tunnel"
[[listener.tls.certificate]]
cert = "$WORK/pki/controller.pem"
key = "$WORK/pki/controller-key.pem"
[listener.tunnel]
client_ca = "$WORK/pki/ca.pem"
[[listener.tunnel.peer]]
node = "nas"
services = ["web", "iperf"]
[[listener]]
name = "web-l7"
listen = "127.0.0.1:19931"
[[listener.route]]
upstream = "web"
[[listener]]
name = "web-l4"
listen = "127.0.0.1:19932"
protocol = "tcp"
upstream = "web"
[[listener]]
name = "iperf"
listen = "127.0.0.1:19933"
protocol = "tcp"
upstream = "iperf"
[upstream.web]
servers = [{ addr = "tunnel:nas/web" }]
[upstream.iperf]
servers = [{ addr = "tunnel:nas/iperf" }]
CONF

cat >"$WORK/inner.toml" <<CONF
[node]
id = "nas"
workers = 1
[control]
listen = "127.0.0.1:0"
[[tunnel]]
name = "home"
connect = "127.0.0.1:19930"
server_name = "public.test"
[tunnel.tls]
ca = "$WORK/pki/ca.pem"
cert = "$WORK/pki/node-nas.pem"
key = "$WORK/pki/node-nas-key.pem"
[[tunnel.service]]
name = "web"
addr = "127.0.0.1:19901"
[[tunnel.service]]
name = "iperf"
addr = "127.0.0.1:19902"
CONF

# rathole: the same two services; $1 = tcp or tls.
rathole_conf() {
    local transport=$1 base=$2
    cat >"$WORK/rathole-server-$transport.toml" <<CONF
[server]
bind_addr = "127.0.0.1:$base"
default_token = "bench"
[server.transport]
type = "$transport"
$( [ "$transport" = tls ] && printf '[server.transport.tls]\npkcs12 = "%s"\npkcs12_password = "bench"\n' "$WORK/pki/public.pfx" )
[server.services.web]
bind_addr = "127.0.0.1:$((base + 2))"
[server.services.iperf]
bind_addr = "127.0.0.1:$((base + 3))"
CONF
    cat >"$WORK/rathole-client-$transport.toml" <<CONF
[client]
remote_addr = "127.0.0.1:$base"
default_token = "bench"
[client.transport]
type = "$transport"
$( [ "$transport" = tls ] && printf '[client.transport.tls]\ntrusted_root = "%s"\nhostname = "public.test"\n' "$WORK/pki/ca.pem" )
[client.services.web]
local_addr = "127.0.0.1:19901"
[client.services.iperf]
local_addr = "127.0.0.1:19902"
CONF
}
rathole_conf tcp 19940
rathole_conf tls 19950

# up NAME: starts both ends of a tunnel on the proxy core; their pids in
# ENDS, the client-facing ports in WEB (HTTP, L4) and BULK (iperf3).
up() {
    case $1 in
        tether)
            start public "$PROXY_CPU" "$TETHER" node --config "$WORK/public.toml"; ENDS="$STARTED"
            wait_port 19930
            start inner "$PROXY_CPU" "$TETHER" node --config "$WORK/inner.toml"; ENDS="$ENDS $STARTED"
            WEB=19932; BULK=19933 ;;
        tether-http)
            up tether; WEB=19931 ;;
        rathole-tcp | rathole-tls)
            local transport=${1#rathole-} base
            base=$([ "$transport" = tcp ] && echo 19940 || echo 19950)
            start rathole-server "$PROXY_CPU" rathole -s "$WORK/rathole-server-$transport.toml"; ENDS="$STARTED"
            start rathole-client "$PROXY_CPU" rathole -c "$WORK/rathole-client-$transport.toml"; ENDS="$ENDS $STARTED"
            WEB=$((base + 2)); BULK=$((base + 3)) ;;
    esac
    wait_port "$WEB"
    # The service answers through the tunnel (the dial may take a moment).
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$WEB/" >/dev/null && return 0
        sleep 0.1
    done
    echo "$1: no answer through the tunnel" >&2
    return 1
}

down() {
    for pid in $ENDS; do stop_pid "$pid"; done
    sleep 0.5
}

rss_kib() {
    local total=0 pid
    for pid in "$@"; do
        total=$(( total + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status") ))
    done
    echo "$total"
}

median() { sort -n | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }

SYSTEMS="tether tether-http rathole-tcp rathole-tls"
declare -A RPS P99 GBPS
for round in $(seq 1 "$ROUNDS"); do
    read -r rps _ p99 _ < <(wrk_run "http://127.0.0.1:19901/" "$SECONDS_PER_RUN" 64)
    RPS[direct]+="$rps "; P99[direct]+="$p99 "
    for system in $SYSTEMS; do
        up "$system"
        read -r rps _ p99 _ < <(wrk_run "http://127.0.0.1:$WEB/" "$SECONDS_PER_RUN" 64)
        RPS[$system]+="$rps "; P99[$system]+="$p99 "
        if [ "$system" != tether-http ]; then
            gbps=$(iperf_gbps "$BULK" "$SECONDS_PER_RUN")
            GBPS[$system]+="$gbps "
        fi
        down
    done
    echo "round $round done" >&2
done
gbps=$(iperf_gbps 19902 "$SECONDS_PER_RUN")
GBPS[direct]=$gbps

printf '\n## Through the tunnel: HTTP (wrk, 64 connections) and TCP (iperf3), median of %s × %ss\n\n' "$ROUNDS" "$SECONDS_PER_RUN"
printf '| path | HTTP requests/s | p99 µs | TCP Gbit/s |\n|---|---:|---:|---:|\n'
for system in direct $SYSTEMS; do
    label=$system
    case $system in
        tether) label="tether (mTLS, TCP listener)" ;;
        tether-http) label="tether (mTLS, HTTP listener)" ;;
        rathole-tcp) label="rathole (plain TCP)" ;;
        rathole-tls) label="rathole (TLS)" ;;
        direct) label="direct to the origin" ;;
    esac
    rps=$(echo "${RPS[$system]}" | tr ' ' '\n' | grep . | median)
    p99=$(echo "${P99[$system]}" | tr ' ' '\n' | grep . | median)
    bulk=$(echo "${GBPS[$system]:-}" | tr ' ' '\n' | grep . | median || true)
    printf '| %s | %s | %s | %s |\n' "$label" "$rps" "$p99" "${bulk:-–}"
done

if [ "$IDLE" -gt 0 ]; then
    printf '\n## %s idle tunneled connections (one GET each): RSS of both ends\n\n' "$IDLE"
    printf '| tunnel | RSS before | with them open | KiB per connection |\n|---|---:|---:|---:|\n'
    for system in tether rathole-tcp rathole-tls; do
        up "$system"
        sleep 0.5
        before=$(rss_kib $ENDS)
        coproc IDLE_CLIENTS { taskset -c "$LOAD_CPU" python3 "$ROOT/bench/idle_clients.py" "$WEB" "$IDLE" 60; }
        read -r _ opened _ failed <&"${IDLE_CLIENTS[0]}"
        sleep 1
        with=$(rss_kib $ENDS)
        exec {IDLE_CLIENTS[1]}>&-
        wait "$IDLE_CLIENTS_PID" 2>/dev/null || true
        printf '| %s | %s MiB | %s MiB | %s |\n' "$system" "$(( before / 1024 ))" "$(( with / 1024 ))" \
            "$(awk -v a="$with" -v b="$before" -v n="$opened" 'BEGIN { printf "%.1f", (a - b) / n }')"
        [ "$failed" = 0 ] || echo "  ($system: $failed of $IDLE connections failed)"
        down
    done
fi
echo
echo "$(date -u +%Y-%m-%d), $(nproc) cores; both ends of each tunnel on CPU $PROXY_CPU, clients and origins on CPU $LOAD_CPU"
