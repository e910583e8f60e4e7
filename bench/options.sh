#!/usr/bin/env bash
# Load the stateless OPTIONS path of a release moonroute with SIPp, on loopback only.
#
#   bench/options.sh [RATE] [COUNT]        defaults: 20000 requests/s, 200000 requests
#
# The server runs one event loop pinned to CPU 0 and SIPp runs on CPU 1, so the figure that
# matters is the server's CPU time per request (utime+stime from /proc), not the rate SIPp can
# offer. Bounded: COUNT requests, and SIPp gives up after 120 s.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-20000}
count=${2:-200000}
port=${PORT:-15060}
source bench/lib.sh
need_sipp
cargo build --release --quiet
log=$(mktemp)
taskset -c 0 target/release/moonroute run --listen "udp:127.0.0.1:$port" --workers 1 --log-level warn 2>"$log" &
server=$!
trap 'kill $server 2>/dev/null || true; rm -f "$log"' EXIT
# Wait for the port by probing it, not by sleeping a fixed time.
for _ in $(seq 1 100); do
  if cargo run --quiet --release --example options -- "udp:127.0.0.1:$port" >/dev/null 2>&1; then break; fi
done
ticks=$(getconf CLK_TCK)
cpu_before=$(cpu_ticks $server)
start=$(date +%s.%N)
taskset -c 1 sipp -sf bench/options-uac.xml -i 127.0.0.1 -p 0 -r "$rate" -m "$count" -l 5000 \
  -timeout 120s -timeout_error -trace_stat -stf /tmp/moonroute-options-stat.csv \
  127.0.0.1:"$port" -nostdin >/tmp/moonroute-options-sipp.log 2>&1 || true
end=$(date +%s.%N)
cpu_after=$(cpu_ticks $server)
stat=/tmp/moonroute-options-stat.csv
successful=$(stat_field "$stat" 'SuccessfulCall(C)')
failed=$(stat_field "$stat" 'FailedCall(C)')
cpu_s=$(echo "($cpu_after - $cpu_before) / $ticks" | bc -l)
wall=$(echo "$end - $start" | bc -l)
printf 'requests ok: %s  failed: %s  wall: %.2f s  offered rate: %s/s\n' "$successful" "$failed" "$wall" "$rate"
printf 'server CPU: %.2f s  => %.2f us CPU per request  => %.0f requests/s per core at 100%% CPU\n' \
  "$cpu_s" "$(echo "$cpu_s * 1000000 / $successful" | bc -l)" "$(echo "$successful / $cpu_s" | bc -l)"
