#!/usr/bin/env bash
# HTTPS and TCP benchmark, tether against nginx doing the same job:
#  - HTTPS termination, HTTP/1.1 (wrk) and HTTP/2 (h2load), small requests;
#  - TCP (L4) bulk throughput with iperf3: direct, tether `protocol = "tcp"`,
#    nginx `stream`.
# Each proxy pinned to one core; load and origins on the other.
#
#   bench/protocols.sh [SECONDS=10]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECONDS_PER_RUN=${1:-10}
need_apt wrk:wrk nginx:nginx-light h2load:nghttp2-client iperf3:iperf3 openssl:openssl
if [ ! -f /usr/lib/nginx/modules/ngx_stream_module.so ]; then
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libnginx-mod-stream >/dev/null
fi
build_tether

# A self-signed certificate for the HTTPS runs.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=bench.test" \
    -addext "subjectAltName=DNS:bench.test" -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null

mkdir -p "$WORK/nginx"
start_origin origin 19901
start iperf "$LOAD_CPU" iperf3 -s -p 19902
wait_port 19902

cat >"$WORK/tether.toml" <<CONF
[control]
listen = "127.0.0.1:0"
[[listener]]
name = "https"
listen = "127.0.0.1:19911"
protocol = "https"
[listener.tls]
[[listener.tls.certificate]]
cert = "$WORK/cert.pem"
key = "$WORK/key.pem"
[[listener.route]]
upstream = "origin"
[[listener]]
name = "tcp"
listen = "127.0.0.1:19912"
protocol = "tcp"
upstream = "iperf"
[upstream.origin]
servers = [{ addr = "127.0.0.1:19901" }]
[upstream.iperf]
servers = [{ addr = "127.0.0.1:19902" }]
CONF

cat >"$WORK/nginx.conf" <<CONF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 1;
daemon off;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream origin { server 127.0.0.1:19901; keepalive 256; }
    server {
        listen 127.0.0.1:19921 ssl http2;
        ssl_certificate $WORK/cert.pem;
        ssl_certificate_key $WORK/key.pem;
        location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
stream {
    server { listen 127.0.0.1:19922; proxy_pass 127.0.0.1:19902; }
}
CONF

https_row() {
    local name=$1 port=$2
    local h1 h2
    h1=$(wrk_run "https://127.0.0.1:$port/" "$SECONDS_PER_RUN" 32 | awk '{print $1, $3}')
    h2=$(taskset -c "$LOAD_CPU" h2load -D "$SECONDS_PER_RUN" -c 32 -m 10 "https://127.0.0.1:$port/" 2>/dev/null |
        awk '/^finished in/ {gsub(",", ""); print int($4)}')
    printf '| %s | %s | %s µs | %s |\n' "$name" "${h1% *}" "${h1#* }" "${h2:-?}"
}

tcp_row() {
    local name=$1 port=$2
    local bps
    bps=$(iperf_gbps "$port" "$SECONDS_PER_RUN")
    printf '| %s | %s Gbit/s |\n' "$name" "$bps"
}

start tether "$PROXY_CPU" "$TETHER" node --config "$WORK/tether.toml"; node=$STARTED
wait_port 19911; wait_port 19912
start nginx "$PROXY_CPU" nginx -c "$WORK/nginx.conf" -p "$WORK/nginx"
wait_port 19921; wait_port 19922

printf '\n## HTTPS (TLS 1.3, self-signed RSA 2048), 32 connections, %ss\n\n| proxy | HTTP/1.1 requests/s (wrk) | p99 | HTTP/2 requests/s (h2load, 10 streams each) |\n|---|---|---|---|\n' "$SECONDS_PER_RUN"
https_row tether 19911
https_row nginx 19921
printf '\n## TCP bulk throughput (iperf3, one stream, %ss)\n\n| path | throughput |\n|---|---|\n' "$SECONDS_PER_RUN"
tcp_row direct 19902
tcp_row tether 19912
tcp_row "nginx stream" 19922
echo
echo "$(date -u +%Y-%m-%d), $(nproc) cores; proxies on CPU $PROXY_CPU, clients and origins on CPU $LOAD_CPU"
