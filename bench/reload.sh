#!/usr/bin/env bash
# Reload benchmark:
#  1. apply latency (validate → new generation accepting) for configs of
#     10, 1,000 and 10,000 routes, as the node reports it;
#  2. RSS before and after 1,000 reloads;
#  3. reloads under load: wrk against tether while the config is reloaded
#     every 100 ms, against the same run without reloads, and the same for
#     nginx with `nginx -s reload`. Failed requests and p99 for each.
#
#   bench/reload.sh [SECONDS=10]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECONDS_PER_RUN=${1:-10}
CONTROL=127.0.0.1:19837
PORT=19700 NGINX_PORT=19800
need_apt wrk:wrk nginx:nginx-light
build_tether
ctl() { "$TETHER" ctl --addr $CONTROL "$@"; }

mkdir -p "$WORK/nginx"
start_origin origin 19701 19702

# tether_conf ROUTES BALANCE → a config with ROUTES path routes plus "/".
tether_conf() {
    local routes=$1 balance=$2
    printf '[control]\nlisten = "%s"\n[[listener]]\nname = "bench"\nlisten = "127.0.0.1:%s"\n' $CONTROL $PORT
    awk -v n="$routes" 'BEGIN { for (i = 1; i < n; i++) printf "[[listener.route]]\npath = \"/svc/%d/\"\nupstream = \"u\"\n", i }'
    printf '[[listener.route]]\npath = "/"\nupstream = "u"\n'
    printf '[upstream.u]\nservers = [{ addr = "127.0.0.1:19701" }, { addr = "127.0.0.1:19702" }]\nbalance = "%s"\n' "$balance"
}

tether_conf 10 round_robin >"$WORK/a.toml"
tether_conf 12 least_conn >"$WORK/b.toml"
start tether "$PROXY_CPU" "$TETHER" node --config "$WORK/a.toml"; node=$STARTED
wait_port $PORT

echo "## apply latency (as reported by Reload), median of 5"
printf '\n| routes | apply latency |\n|---|---|\n'
for routes in 10 1000 10000; do
    tether_conf $routes round_robin >"$WORK/r$routes.toml"
    for _ in 1 2 3 4 5; do ctl reload --file "$WORK/r$routes.toml" | sed -n 's/.* in \(.*\)$/\1/p'; done >"$WORK/lat$routes"
    printf '| %s | %s |\n' $routes "$(sort -g "$WORK/lat$routes" | sed -n 3p)"
done

rss() { awk '/^VmRSS:/ {print $2}' "/proc/$node/status"; }
fds() { ls "/proc/$node/fd" | wc -l; }
ctl reload --file "$WORK/a.toml" >/dev/null
taskset -c "$LOAD_CPU" wrk -t1 -c32 -d2s "http://127.0.0.1:$PORT/" >/dev/null
sleep 1
rss_before=$(rss) fds_before=$(fds)
for i in $(seq 1 500); do
    ctl reload --file "$WORK/b.toml" >/dev/null
    ctl reload --file "$WORK/a.toml" >/dev/null
done
sleep 1
printf '\n## 1,000 reloads\n\n| | before | after |\n|---|---|---|\n| RSS | %s MiB | %s MiB |\n| open fds | %s | %s |\n' \
    $((rss_before / 1024)) $(($(rss) / 1024)) "$fds_before" "$(fds)"

# reload_loop CMD...: runs CMD every 100 ms until killed.
reload_loop() { while true; do "$@" >/dev/null 2>&1 || true; sleep 0.1; done; }
# under_load NAME URL [RELOAD CMD...] → table row
under_load() {
    local name=$1 url=$2
    shift 2
    local looper=""
    if [ $# -gt 0 ]; then
        reload_loop "$@" &
        looper=$!
    fi
    local out
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c32 -d"${SECONDS_PER_RUN}s" --latency "$url" 2>&1)
    [ -n "$looper" ] && kill "$looper" && wait "$looper" 2>/dev/null || true
    local total non2xx sockerr p99
    total=$(echo "$out" | awk '/requests in/ {print $1}')
    non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
    sockerr=$(echo "$out" | awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}')
    p99=$(echo "$out" | awk '$1=="99%" {print $2}')
    printf '| %s | %s | %s | %s |\n' "$name" "$total" $(( ${non2xx:-0} + ${sockerr:-0} )) "$p99"
}

cat >"$WORK/nginx-a.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 4096; }
http {
    access_log off;
    upstream origin { server 127.0.0.1:19701; server 127.0.0.1:19702; keepalive 256; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
    }
}
CONF

printf '\n## reloads every 100 ms under load (wrk, 32 connections, %ss)\n\n| run | requests | failed | p99 |\n|---|---|---|---|\n' "$SECONDS_PER_RUN"
under_load "tether, no reloads" "http://127.0.0.1:$PORT/"
under_load "tether, reloading" "http://127.0.0.1:$PORT/" bash -c "$TETHER ctl --addr $CONTROL reload --file $WORK/b.toml && $TETHER ctl --addr $CONTROL reload --file $WORK/a.toml"
stop_pid "$node"

taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx-a.conf" -p "$WORK/nginx"
wait_port $NGINX_PORT
under_load "nginx, no reloads" "http://127.0.0.1:$NGINX_PORT/"
under_load "nginx -s reload" "http://127.0.0.1:$NGINX_PORT/" nginx -c "$WORK/nginx-a.conf" -p "$WORK/nginx" -s reload
nginx -c "$WORK/nginx-a.conf" -p "$WORK/nginx" -s quit || true
echo
echo "$(date -u +%Y-%m-%d), $(nproc) cores; proxy on CPU $PROXY_CPU, wrk and origins on CPU $LOAD_CPU"
