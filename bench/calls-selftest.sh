#!/usr/bin/env bash
# Check the call scenarios without moonroute: the UAC SIPp calls the UAS SIPp directly, so no
# Record-Route is involved and [routes] / [last_Record-Route:] expand to nothing.
#
#   bench/calls-selftest.sh [RATE] [CALLS]        defaults: 200 calls/s, 2000 calls
#
# Loopback only (UAS on udp 127.0.0.1:15080, UAC on 127.0.0.1:15070), both SIPp on CPU 1.
# Bounded: CALLS calls and a 60 s SIPp timeout. Exits 0 only if every call succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
rate=${1:-200}
calls=${2:-2000}
uas_port=${UAS_PORT:-15080}
timeout=${TIMEOUT:-60s}
need_sipp
work=$(mktemp -d /tmp/moonroute-calls-selftest.XXXXXX)
UAS_PID= UAC_PID=
cleanup() { stop_pid "$UAC_PID"; stop_pid "$UAS_PID"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

start_uas "$uas_port" "$calls" "$timeout" "$work"
start=$(date +%s.%N)
run_uac "$uas_port" "$rate" "$calls" "$timeout" "$work"
end=$(date +%s.%N)
stop_pid "$UAS_PID"; UAS_PID=
print_call_stats "$work"
printf 'wall: %.2f s  offered: %s calls/s  achieved: %.1f calls/s\n' \
  "$(echo "$end - $start" | bc -l)" "$rate" "$(echo "$OK / ($end - $start)" | bc -l)"
if [ "$OK" = "$calls" ] && [ "$FAILED" = 0 ]; then
  echo "self-test passed"
  rm -rf "$work"
else
  echo "self-test FAILED (logs and SIPp error files: $work)" >&2
  exit 1
fi
