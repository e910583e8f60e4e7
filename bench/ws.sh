#!/usr/bin/env bash
# SIP over secure WebSocket against SIP over TLS on a release moonroute, loopback only, with
# one client for both (examples/ws_load.rs; SIPp has no WebSocket):
#
#   bench/ws.sh [COUNT] [RATE] [IDLE]      defaults: 20000 requests at 2000/s, 2000 idle
#
# For each transport (wss, then tls), each phase on a fresh server:
#   REGISTER  CONNECTIONS (100) connections, user wl<i> on connection i; COUNT REGISTERs at
#             RATE/s round-robin (each a refresh of its connection's binding, Expires 3600);
#   MESSAGE   CONNECTIONS connections register once (not measured), then COUNT MESSAGEs at
#             RATE/s from one connection of a pair to the other's AOR: lookup, relay on the
#             receiver's connection, its 200 back;
#   idle      IDLE connections opened (TLS handshake, and the HTTP Upgrade for wss), nothing
#             sent: VmRSS before and while held => KiB per connection (also ws and tcp).
# Printed: ok/s, failures, latency percentiles, the server's CPU (utime+stime from /proc,
# sampled by ws_load around the paced phase only) per 1000 requests, and the ratio wss/tls.
# The server runs one event loop pinned to CPU 0 (SERVER_CPUS), ws_load on CPU 1 (LOAD_CPUS).
# Bounded: counts above; every ws_load run gives up after TIMEOUT seconds (default 90).
# Environment: CONNECTIONS, UDP_PORT (44060), WSS_PORT (44061), TLS_PORT (44062), WS_PORT (44063),
# TCP_PORT (44064), IDLE_CONCURRENCY (50), TIMEOUT, MOONROUTE=path (skip the server build),
# WS_LOAD=path and TLS_LOAD=path (both: skip building the examples), KEEP=1 (keep the
# temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
count=${1:-20000}
rate=${2:-2000}
idle=${3:-2000}
connections=${CONNECTIONS:-100}
udp_port=${UDP_PORT:-44060}
wss_port=${WSS_PORT:-44061}
tls_port=${TLS_PORT:-44062}
ws_port=${WS_PORT:-44063}
tcp_port=${TCP_PORT:-44064}
timeout=${TIMEOUT:-90}
domain=bench.moonroute.test
server_cpus=${SERVER_CPUS:-0}
load_cpus=${LOAD_CPUS:-1}
target=${CARGO_TARGET_DIR:-target}

bin=$(moonroute_bin)
if [ -n "${WS_LOAD:-}" ] && [ -n "${TLS_LOAD:-}" ]; then
  load=$WS_LOAD certs=$TLS_LOAD
else
  cargo build --release --quiet --example ws_load --example tls_load
  load=$target/release/examples/ws_load certs=$target/release/examples/tls_load
fi

need_free_udp_port "$udp_port"
for p in "$wss_port" "$tls_port" "$ws_port" "$tcp_port"; do need_free_tcp_port "$p"; done

work=$(mktemp -d "${TMPDIR:-/tmp}/moonroute-ws.XXXXXX")
server= idle_pid=
cleanup() {
  stop_pid "$idle_pid"
  if [ -n "$server" ]; then stop_server "$server" >/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$certs" certs --out "$work/certs" >/dev/null
# The shipped script authenticates; the load's REGISTERs and MESSAGEs carry no credentials.
default_script_without_auth >"$work/default-noauth.lua"
max=$((idle + connections + 1000))
cat >"$work/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$udp_port", "wss:127.0.0.1:$wss_port", "tls:127.0.0.1:$tls_port",
          "ws:127.0.0.1:$ws_port", "tcp:127.0.0.1:$tcp_port"]
domains = ["$domain"]
script = "$work/default-noauth.lua"
data_dir = "$work/data"
log_level = "warn"
workers = 1

[lua]
watch = false

[control]
socket = "$work/ctl"

[location]
store = "memory"

TOML
stream_bench_toml "$work" "$max" "$timeout" >>"$work/moonroute.toml"

# start_moonroute LOG: a fresh server, CPU $server_cpus; sets $server once every listener is up.
start_moonroute() {
  start_stream_server "$bin" "$work/moonroute.toml" "$1" "$server_cpus" "$udp_port" \
    "$wss_port" "$tls_port" "$ws_port" "$tcp_port"
}

stop_moonroute() {
  log_noise "$1"
  stop_server "$server" >/dev/null || true
  server=
}

port_of() {
  case $1 in wss) echo "$wss_port" ;; tls) echo "$tls_port" ;; ws) echo "$ws_port" ;; tcp) echo "$tcp_port" ;; esac
}

declare -A rate_of cpu_of summary

# paced MODE TRANSPORT: one ws_load register/message run on a fresh server; records ok/s and
# server CPU ms per 1000 for the ratio.
paced() {
  local mode=$1 transport=$2 out ok failed r cpu
  start_moonroute "$work/moonroute-$mode-$transport.log"
  out=$(taskset -c "$load_cpus" "$load" "$mode" --server "127.0.0.1:$(port_of "$transport")" \
    --transport "$transport" --ca "$work/certs/ca.pem" --connections "$connections" \
    --count "$count" --rate "$rate" --domain "$domain" --server-pid "$server" --timeout "$timeout" 2>&1) || true
  need_alive "$server" "$work/moonroute-$mode-$transport.log"
  echo "$out" | sed 's/^/  /'
  ok=$(echo "$out" | grep -oE "^$mode ok: [0-9]+" | grep -oE '[0-9]+$' || echo 0)
  failed=$(echo "$out" | grep -oE "^$mode ok: [0-9]+ failed: [0-9]+" | grep -oE '[0-9]+$' || echo '?')
  r=$(echo "$out" | grep -oE 'rate: [0-9.]+' | grep -oE '[0-9.]+$' || echo 0)
  cpu=$(echo "$out" | sed -nE 's/.*= ([0-9.]+) ms per 1000 ok.*/\1/p')
  cpu=${cpu:-0}
  [ "${ok:-0}" -gt 0 ] || cpu=0
  rate_of["$mode $transport"]=$r
  cpu_of["$mode $transport"]=$cpu
  summary["$mode $transport"]=$(printf '%-9s over %-3s %6s/%-6s ok (%s failed) %8.1f /s  server CPU %6.1f ms per 1000' \
    "$mode" "$transport" "$ok" "$count" "$failed" "$r" "$cpu")
  echo "  ${summary["$mode $transport"]}"
  stop_moonroute "$work/moonroute-$mode-$transport.log"
}

# idle_rss TRANSPORT: a fresh server, VmRSS before and while $idle connections are held.
idle_rss() {
  local transport=$1 rss0 rss1 opened
  start_moonroute "$work/moonroute-idle-$transport.log"
  sleep 0.3
  rss0=$(rss_kb "$server")
  rm -f "$work/idle.in"; mkfifo "$work/idle.in"
  taskset -c "$load_cpus" "$load" idle --server "127.0.0.1:$(port_of "$transport")" \
    --transport "$transport" --ca "$work/certs/ca.pem" --connections "$idle" \
    --concurrency "${IDLE_CONCURRENCY:-50}" --hold-secs "$timeout" --timeout "$((timeout + 10))" \
    <"$work/idle.in" >"$work/idle.out" 2>&1 &
  idle_pid=$!
  exec 3>"$work/idle.in"
  for _ in $(seq 1 $((timeout * 10))); do
    grep -q '^holding' "$work/idle.out" && break
    kill -0 "$idle_pid" 2>/dev/null || break
    sleep 0.1
  done
  sleep 1  # the server's side of the last handshakes
  rss1=$(rss_kb "$server")
  opened=$(grep -oE '^holding [0-9]+' "$work/idle.out" | grep -oE '[0-9]+$' || echo 0)
  echo >&3 || true
  exec 3>&-
  wait "$idle_pid" || true
  idle_pid=
  need_alive "$server" "$work/moonroute-idle-$transport.log"
  sed 's/^/  /' "$work/idle.out"
  if [ "${opened:-0}" -gt 0 ]; then
    summary["idle $transport"]=$(printf 'idle over %-3s %6s connections: VmRSS %s -> %s kB = %.1f KiB per connection' \
      "$transport" "$opened" "$rss0" "$rss1" "$(echo "($rss1 - $rss0) / $opened" | bc -l)")
  else
    summary["idle $transport"]="idle over $transport: no connection opened"
  fi
  echo "  ${summary["idle $transport"]}"
  stop_moonroute "$work/moonroute-idle-$transport.log"
}

echo "moonroute: $bin (1 worker, CPU $server_cpus); ws_load on CPU $load_cpus; work dir $work"
for mode in register message; do
  for transport in wss tls; do
    echo "($mode over $transport) $count at $rate/s over $connections connections"
    paced "$mode" "$transport"
  done
done
for transport in wss tls ws tcp; do
  echo "(idle over $transport) $idle connections"
  idle_rss "$transport"
done

ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'
}
echo
echo "summary (server: 1 event loop on CPU $server_cpus; CPU = utime+stime from /proc, 10 ms ticks)"
for key in "register wss" "register tls" "message wss" "message tls" "idle wss" "idle tls" "idle ws" "idle tcp"; do
  echo "  ${summary["$key"]:-$key: not run}"
done
for mode in register message; do
  echo "  $mode wss/tls: rate $(ratio "${rate_of["$mode wss"]:-0}" "${rate_of["$mode tls"]:-0}")," \
    "server CPU per request $(ratio "${cpu_of["$mode wss"]:-0}" "${cpu_of["$mode tls"]:-0}")"
done
