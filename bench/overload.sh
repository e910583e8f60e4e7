#!/usr/bin/env bash
# Overload: SIPp calls offered faster than a release moonroute can route them, with the
# receive-lag limit on and off, on loopback only.
#
#   bench/overload.sh [RATE] [CALLS]        defaults: 1500 calls/s, 30000 calls
#
# UAC SIPp (127.0.0.1:15070, CPU 1) -> moonroute (udp:127.0.0.1:15060, one event loop on CPU 0)
# -> UAS SIPp (127.0.0.1:15080, CPU 1), INVITE/100/180/200/ACK/BYE/200 per call (bench/calls.sh's
# scenario). SIPp cannot offer more than the server carries with the usual script, so the
# routing script is bench/relay.lua plus a busy loop of $WORK Lua iterations per request (an
# expensive script: database lookups, many rules), which makes the server the bottleneck.
# The run is made once with limits.max_receive_lag_ms = $LAG_MS (default 500) and once with
# it off (0; the server's default is 500). With the limit, a loop that has not caught up with its UDP queue for that long
# answers new INVITEs 503 (SIPp counts those calls as failed, it does not retry) and keeps
# serving the calls it accepted; without it, every INVITE is accepted and the queue, the
# response times and the retransmissions grow until calls time out.
# Prints, for each run: calls ok/failed, the goodput (successful calls per second of the run),
# SIPp's failure kinds, the INVITE->200 response-time repartition, the server CPU time and the
# datagrams the kernel dropped on the server's socket.
# Bounded: CALLS calls per run, at most $MAX_CALLS (default 3000) outstanding, SIPp gives up
# after $TIMEOUT (default CALLS/RATE + 60 s).
# Environment: WORK (default 20000), LAG_MS, PORT, UAS_PORT, UAC_PORT, MOONROUTE.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
rate=${1:-1500}
calls=${2:-30000}
port=${PORT:-15060}
uas_port=${UAS_PORT:-15080}
timeout=${TIMEOUT:-$(( calls / rate + 60 ))s}
export MAX_CALLS=${MAX_CALLS:-3000}
need_sipp
need_free_udp_port "$port"
need_free_udp_port "$uas_port"
bin=$(moonroute_bin)

work=$(mktemp -d /tmp/moonroute-overload.XXXXXX)
UAS_PID= UAC_PID= server=
cleanup() { stop_pid "$UAC_PID"; stop_pid "$UAS_PID"; stop_pid "$server"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# relay.lua with a busy loop at the top of on_request.
sed -e "s/@UAS_PORT@/$uas_port/" \
    -e "s/^function on_request(req)$/function on_request(req)\n  local x = 0\n  for i = 1, ${WORK:-20000} do x = x + i end/" \
    bench/relay.lua >"$work/relay.lua"
grep -q "for i = 1" "$work/relay.lua" || { echo "could not add the busy loop" >&2; exit 1; }

run_once() {
  local lag=$1 dir=$work/lag-$1
  mkdir -p "$dir"
  cat >"$dir/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$port"]
script = "$work/relay.lua"
data_dir = "$dir/data"
log_level = "warn"
workers = 1

[limits]
max_receive_lag_ms = $lag

[lua]
watch = false

[control]
socket = "$dir/ctl"

[location]
store = "memory"
TOML
  start_uas "$uas_port" "$calls" "$timeout" "$dir"
  taskset -c 0 "$bin" run --config "$dir/moonroute.toml" 2>"$dir/moonroute.log" &
  server=$!
  if ! wait_udp_port "$port" || ! kill -0 "$server" 2>/dev/null; then
    echo "moonroute did not start on udp:127.0.0.1:$port:" >&2
    cat "$dir/moonroute.log" >&2
    exit 1
  fi
  local ticks cpu_before cpu_after start end wall drops_before drops_after
  ticks=$(getconf CLK_TCK)
  cpu_before=$(cpu_ticks "$server")
  drops_before=$(socket_drops "$port"); drops_before=${drops_before:-0}
  start=$(date +%s.%N)
  run_uac "$port" "$rate" "$calls" "$timeout" "$dir"
  end=$(date +%s.%N)
  cpu_after=$(cpu_ticks "$server")
  drops_after=$(socket_drops "$port"); drops_after=${drops_after:-0}
  stop_pid "$UAS_PID"; UAS_PID=
  stop_pid "$server"; server=
  echo "--- limits.max_receive_lag_ms = $lag ($( [ "$lag" = 0 ] && echo off || echo on))"
  print_call_stats "$dir"
  wall=$(echo "$end - $start" | bc -l)
  printf 'wall: %.2f s  offered: %s calls/s  goodput: %.1f successful calls/s\n' \
    "$wall" "$rate" "$(echo "$OK / $wall" | bc -l)"
  printf 'failure kinds:'
  { stat_columns "$dir/uac-stat.csv" 'Failed' | grep -v '=0$' | grep -v '^FailedCall(P)' || true; } \
    | tr '\n' ' ' | sed 's/^/ /'
  echo
  printf 'server CPU: %.2f s  kernel drops on the server socket: %s  overload log lines: %s\n' \
    "$(echo "($cpu_after - $cpu_before) / $ticks" | bc -l)" "$((drops_after - drops_before))" \
    "$(grep -c 'answering new requests 503' "$dir/moonroute.log" || true)"
}

run_once "${LAG_MS:-500}"
run_once 0
echo "logs and SIPp statistics kept in $work"
