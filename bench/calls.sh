#!/usr/bin/env bash
# Relay SIPp calls through a release moonroute acting as a stateful proxy, on loopback only.
#
#   bench/calls.sh [RATE] [CALLS]        defaults: 500 calls/s, 20000 calls
#
# UAC SIPp (127.0.0.1:15070) -> moonroute (udp:127.0.0.1:15060) -> UAS SIPp (127.0.0.1:15080).
# Each call is INVITE/100/180/200/ACK/BYE/200 (bench/call-uac.xml, bench/call-uas.xml); ACK and
# BYE follow the Record-Route set back through the proxy. The server runs one event loop pinned
# to CPU 0 and both SIPp instances share CPU 1, so the figure that matters is the server's CPU
# time per 1000 calls (utime+stime from /proc), not the rate SIPp can offer.
# Bounded: CALLS calls, and SIPp gives up after $TIMEOUT (default 120s).
# Environment: MOONROUTE (the binary; default: cargo build --release), HOLD_MS (pause between ACK and BYE, default 0), RURI (INVITE Request-URI, default
# sip:uas@127.0.0.1:$PORT), TIMEOUT, PORT, UAS_PORT, UAC_PORT, LOG_LEVEL (the server's --log-level,
# default warn; info is what a default deployment logs), CONFIG (a configuration file for settings
# without a flag, e.g. [limits]; the flags above override it), WORKERS (event loops, default 1)
# and SERVER_CPUS (the server's taskset CPU list, default 0).
# ROUTER=script routes with a Lua script (bench/relay.lua: record_route + t_relay to the UAS,
# loose_route for in-dialog requests) instead of the built-in --static-route router, to measure
# what the script engine costs per call.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
rate=${1:-500}
calls=${2:-20000}
port=${PORT:-15060}
uas_port=${UAS_PORT:-15080}
timeout=${TIMEOUT:-120s}
need_sipp
bin=$(moonroute_bin)

work=$(mktemp -d /tmp/moonroute-calls.XXXXXX)
UAS_PID= UAC_PID= server=
cleanup() { stop_pid "$UAC_PID"; stop_pid "$UAS_PID"; stop_pid "$server"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start_uas "$uas_port" "$calls" "$timeout" "$work"
# WORKERS=2 (with SERVER_CPUS=0,1) runs two event loops: requests go to their Call-ID's loop and
# responses to their client transaction's, handed over when the kernel delivers them elsewhere.
if [ "${ROUTER:-builtin}" = script ]; then
  sed "s/@UAS_PORT@/$uas_port/" bench/relay.lua >"$work/relay.lua"
  routing=(--script "$work/relay.lua")
else
  routing=(--static-route "sip:127.0.0.1:$uas_port")
fi
launch_moonroute "$bin" "${SERVER_CPUS:-0}" "$work/moonroute.log" "$port" "" \
  run ${CONFIG:+--config "$CONFIG"} --listen "udp:127.0.0.1:$port" --workers "${WORKERS:-1}" \
  "${routing[@]}" --control-socket "$work/ctl" --log-level "${LOG_LEVEL:-warn}"

ticks=$(getconf CLK_TCK)
cpu_before=$(cpu_ticks "$server")
start=$(date +%s.%N)
run_uac "$port" "$rate" "$calls" "$timeout" "$work"
end=$(date +%s.%N)
cpu_after=$(cpu_ticks "$server")
stop_pid "$UAS_PID"; UAS_PID=

print_call_stats "$work"
print_hand_overs "$bin" "$work/ctl" "$OK"
wall=$(echo "$end - $start" | bc -l)
cpu_s=$(echo "($cpu_after - $cpu_before) / $ticks" | bc -l)
printf 'wall: %.2f s  offered: %s calls/s  achieved: %.1f calls/s\n' \
  "$wall" "$rate" "$(echo "$OK / $wall" | bc -l)"
if [ "$OK" -gt 0 ]; then
  printf 'server CPU: %.2f s  => %.3f CPU s per 1000 calls  => %.0f calls/s per core at 100%% CPU\n' \
    "$cpu_s" "$(echo "$cpu_s * 1000 / $OK" | bc -l)" \
    "$(if [ "$(echo "$cpu_s > 0" | bc)" = 1 ]; then echo "$OK / $cpu_s" | bc -l; else echo 0; fi)"
else
  printf 'server CPU: %.2f s  (no successful call)\n' "$cpu_s"
fi
if [ "$FAILED" != 0 ]; then
  echo "some calls failed: SIPp logs and error files kept in $work" >&2
  exit 1
fi
rm -rf "$work"
