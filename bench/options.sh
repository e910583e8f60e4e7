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
command -v sipp >/dev/null || { echo "sipp not found: apt-get install sip-tester" >&2; exit 1; }
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
cpu_before=$(awk '{print $14+$15}' /proc/$server/stat)
start=$(date +%s.%N)
taskset -c 1 sipp -sf bench/options-uac.xml -i 127.0.0.1 -p 0 -r "$rate" -m "$count" -l 5000 \
  -timeout 120s -timeout_error -trace_stat -stf /tmp/moonroute-options-stat.csv \
  127.0.0.1:"$port" -nostdin >/tmp/moonroute-options-sipp.log 2>&1 || true
end=$(date +%s.%N)
cpu_after=$(awk '{print $14+$15}' /proc/$server/stat)
stat=/tmp/moonroute-options-stat.csv
last=$(tail -1 "$stat")
col() { head -1 "$stat" | tr ';' '\n' | grep -nx "$1" | cut -d: -f1; }
successful=$(echo "$last" | cut -d';' -f"$(col SuccessfulCall\(C\))")
failed=$(echo "$last" | cut -d';' -f"$(col FailedCall\(C\))")
cpu_s=$(echo "($cpu_after - $cpu_before) / $ticks" | bc -l)
wall=$(echo "$end - $start" | bc -l)
printf 'requests ok: %s  failed: %s  wall: %.2f s  offered rate: %s/s\n' "$successful" "$failed" "$wall" "$rate"
printf 'server CPU: %.2f s  => %.2f us CPU per request  => %.0f requests/s per core at 100%% CPU\n' \
  "$cpu_s" "$(echo "$cpu_s * 1000000 / $successful" | bc -l)" "$(echo "$successful / $cpu_s" | bc -l)"
