#!/usr/bin/env bash
# What active health checks and connect retries buy when a server dies:
# wrk keeps 32 connections busy through tether to three nginx origins, one
# origin is killed partway through, and the failed requests are counted.
# Four node configs run side by side: checks off/on × retries 0/1.
#
#   bench/health.sh [SECONDS=8]
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECONDS_PER_RUN=${1:-8}
KILL_AFTER=2
need_apt wrk:wrk nginx:nginx-light
build_tether


node_conf() {
    local checks=$1 retries=$2
    cat <<CONF
[control]
listen = "127.0.0.1:0"
[[listener]]
name = "bench"
listen = "127.0.0.1:19600"
[[listener.route]]
upstream = "u"
[upstream.u]
servers = [{ addr = "127.0.0.1:19501" }, { addr = "127.0.0.1:19502" }, { addr = "127.0.0.1:19503" }]
retries = $retries
CONF
    if [ "$checks" = on ]; then
        printf '[upstream.u.health]\ntype = "http"\ninterval = "1s"\ntimeout = "500ms"\nfall = 2\nrise = 2\n'
    fi
}

printf '\n| active checks | retries | requests | failed | failed share |\n|---|---|---|---|---|\n'
for checks in off on; do
    for retries in 0 1; do
        node_conf $checks $retries >"$WORK/node.toml"
        for i in 1 2 3; do start_origin "origin$i" $((19500 + i)); done
        start tether "$PROXY_CPU" "$TETHER" node --config "$WORK/node.toml"; node=$STARTED
        wait_port 19600
        sleep 2.5 # first health results
        (sleep $KILL_AFTER; kill -9 "$(cat "$WORK/origin3.pid")" || true) &
        killer=$!
        out=$(taskset -c "$LOAD_CPU" wrk -t1 -c32 -d"${SECONDS_PER_RUN}s" http://127.0.0.1:19600/ 2>&1) || true
        wait "$killer" || true
        echo "$out" >>"$WORK/wrk.log"; [ -n "${BENCH_DEBUG:-}" ] && echo "$out" >&2
        total=$(echo "$out" | awk '/requests in/ {print $1}')
        non2xx=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
        sockerr=$(echo "$out" | awk -F'[ ,]+' '/Socket errors/ {print $4+$6+$8+$10}')
        failed=$(( ${non2xx:-0} + ${sockerr:-0} ))
        share=$(awk -v f=$failed -v t=$total 'BEGIN { printf "%.3f%%", 100 * f / t }')
        printf '| %s | %s | %s | %s | %s |\n' $checks $retries "$total" "$failed" "$share"
        stop_pid "$node"
        for i in 1 2 3; do
            [ -f "$WORK/origin$i.pid" ] && { kill -9 "$(cat "$WORK/origin$i.pid")"; rm -f "$WORK/origin$i.pid"; } 2>/dev/null || true
        done
        wait 2>/dev/null || true
        sleep 0.5
    done
done
echo
echo "one of three origins killed ${KILL_AFTER}s into a ${SECONDS_PER_RUN}s run; checks every 1s, fall 2, timeout 500ms"
