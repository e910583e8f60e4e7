#!/usr/bin/env bash
# bench/callgrind.sh KIND [N] [RATE]: user-space instructions per call (KIND=calls) or per
# durable REGISTER of a new AOR (KIND=registers) through default.lua without auth, counted by
# callgrind over every thread of the server: the method of bench/README.md's cost tables.
# Instruction counts barely move with the machine's load, unlike CPU time, so two builds can
# be compared on a busy box. MOONROUTE=path picks the binary (default: the release build);
# OUT=dir keeps the callgrind files there (default: a temporary directory, kept). Defaults:
# 300 calls at 20/s, 1000 REGISTERs at 100/s. Under valgrind the server runs ~50 times slower,
# so T1 is 4 s, the scenarios' retransmissions are raised to 10 s (a retransmission would be
# counted as work; the line printed says how many happened: keep runs that say 0) and overload
# shedding is off.
# Ports: PORT (server), UAS_PORT, UAC_PORT, SIPP_PORT as bench/lib.sh. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
kind=${1:?usage: bench/callgrind.sh calls|registers [N] [RATE]}
case $kind in
  calls) n=${2:-300} rate=${3:-20} ;;
  registers) n=${2:-1000} rate=${3:-100} ;;
  *) echo "KIND is calls or registers" >&2; exit 2 ;;
esac
port=${PORT:-15460} uas_port=${UAS_PORT:-15480} uac_port=${UAC_PORT:-15470} sipp_port=${SIPP_PORT:-15570}
need_sipp
command -v valgrind >/dev/null || { echo "valgrind not found: apt-get install valgrind" >&2; exit 1; }
need_free_udp_port "$port"
bin=$(moonroute_bin)
out=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/moonroute-callgrind.XXXXXX")}
mkdir -p "$out"
rm -rf "$out"/cg.* "$out"/data "$out"/*.csv
vpid= UAS_PID= UAC_PID=
cleanup() { stop_pid "$UAC_PID"; stop_pid "$UAS_PID"; stop_pid "$vpid"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

default_script_without_auth >"$out/default-noauth.lua"
cat >"$out/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$port"]
script = "$out/default-noauth.lua"
data_dir = "$out/data"
log_level = "warn"
workers = 1

[timers]
t1_ms = 4000

[limits]
# Off: a loop slowed 50 times by valgrind on a busy machine would shed work with 503s.
overload_after_ms = 0

[lua]
watch = false

[control]
socket = "$out/ctl"
TOML
for f in call-uac call-uas register_callee register_uac; do
  sed 's/retrans="500"/retrans="10000"/; s/timeout="5000"/timeout="60000"/' "bench/$f.xml" >"$out/$f.xml"
done

valgrind --tool=callgrind --callgrind-out-file="$out/cg.%p" \
  "$bin" run --config "$out/moonroute.toml" 2>"$out/server.log" &
vpid=$!
wait_udp_port "$port" 1200 || { echo "the server did not start; see $out/server.log" >&2; exit 1; }

if [ "$kind" = calls ]; then
  sipp -sf "$out/register_callee.xml" -i 127.0.0.1 -p "$uas_port" -m 1 -timeout 60s \
    -timeout_error -nostdin 127.0.0.1:"$port" >"$out/register.log" 2>&1 \
    || { echo "the callee's registration failed; see $out/register.log" >&2; exit 1; }
  sipp -sf "$out/call-uas.xml" -i 127.0.0.1 -p "$uas_port" -m "$n" -timeout 600s \
    -trace_stat -stf "$out/uas-stat.csv" -nostdin >"$out/uas.log" 2>&1 &
  UAS_PID=$!
  wait_udp_port "$uas_port" || { echo "the UAS SIPp did not start" >&2; exit 1; }
  callgrind_control -z "$vpid" >/dev/null 2>&1
  sipp -sf "$out/call-uac.xml" -i 127.0.0.1 -p "$uac_port" -key ruri "sip:callee@127.0.0.1:$port" \
    -r "$rate" -m "$n" -l 5000 -timeout 600s -timeout_error -trace_stat -stf "$out/uac-stat.csv" \
    -trace_err -error_file "$out/uac-errors.log" 127.0.0.1:"$port" -nostdin >"$out/uac.log" 2>&1 &
else
  callgrind_control -z "$vpid" >/dev/null 2>&1
  sipp -sf "$out/register_uac.xml" -i 127.0.0.1 -p "$sipp_port" -r "$rate" -m "$n" -l 5000 \
    -default_behaviors all,-bye -timeout 600s -timeout_error -trace_stat -stf "$out/uac-stat.csv" \
    -trace_err -error_file "$out/uac-errors.log" 127.0.0.1:"$port" -nostdin >"$out/uac.log" 2>&1 &
fi
UAC_PID=$!
wait "$UAC_PID" || true
UAC_PID=
callgrind_control -d "$vpid" >/dev/null 2>&1
stop_pid "$UAS_PID"; UAS_PID=
kill -TERM "$vpid"; wait "$vpid" || true; vpid=

ok=$(stat_field "$out/uac-stat.csv" 'SuccessfulCall(C)' || echo 0)
failed=$(stat_field "$out/uac-stat.csv" 'FailedCall(C)' || echo '?')
retrans=$(stat_field "$out/uac-stat.csv" 'Retransmissions(C)' || echo '?')
# The dump taken when the UAC ended (cg.PID.1): every thread's instructions since the zeroing.
total=$(awk '/^(summary|totals):/ { print $2; exit }' "$out"/cg.*.1)
# The event loop's handling of received messages (Core::on_input, inclusive): repeats to within
# ~0.5 % between runs of one build, where the whole process (sled's threads, how often the loop
# wakes) moves by a few per cent.
# (Annotated away from the sources, which callgrind_annotate would otherwise attribute apart.)
on_input=$(cd "$out" && callgrind_annotate --inclusive=yes --threshold=100 cg.*.1 2>/dev/null \
  | awk '/Core as moonroute::transport::Worker>::on_input \[/ && !n++ { gsub(",", "", $1); print $1 }')
per() { if [ "$ok" -gt 0 ] && [ -n "$1" ]; then echo "$1 / $ok / 1000" | bc -l; else echo 0; fi; }
printf '%s: ok %s failed %s retransmissions %s, %s instructions, %.1fk per %s, Core::on_input %.1fk (%s)\n' \
  "$kind" "$ok" "$failed" "$retrans" "$total" "$(per "$total")" "${kind%s}" "$(per "$on_input")" "$out"
