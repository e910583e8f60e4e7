#!/usr/bin/env bash
# Memory per tracked call (issue 22): CALLS calls held HOLD_MS through scripts/default.lua
# without auth, once with dialog tracking (as shipped: req:dlg_manage() on every call it
# record-routes) and once without (MODES "dlg nodlg"), each on a fresh server. Loopback only.
#
#   bench/dialog_memory.sh [CALLS] [RATE]     defaults: 10000 calls at 500 calls/s, held 28 s (bench/call-uas.xml waits 30 s for the BYE)
#
# UAC SIPp 127.0.0.1:$UAC_PORT --> moonroute udp:127.0.0.1:$PORT --> UAS SIPp 127.0.0.1:$UAS_PORT
#      (CPU 1)                      (1 worker, CPU 0)                     (CPU 1)
#
# Per run: the server's RSS after the callee registered, then once every call is up (CALLS/RATE
# seconds after the first INVITE plus SETTLE_S, default 4 s, while HOLD_MS is longer: no call
# has ended yet), the difference per call; with tracking also `ctl dlg count`, the first lines
# of `ctl dlg list`, the dialogs' memory gauge and, after the run, the CDR lines. Then the
# difference between the two runs per call: what tracking a held call costs in RSS (the
# transactions and everything else are the same in both). Bounded: CALLS calls per run, SIPp
# gives up after $TIMEOUT.
# Environment: MODES ("dlg nodlg"), HOLD_MS (28000), SETTLE_S (4), PORT (24060), UAS_PORT
# (24080), UAC_PORT (24070), TIMEOUT (180s), MOONROUTE=path (else cargo build --release),
# KEEP=1 (keep the work directory).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
calls=${1:-10000}
rate=${2:-500}
hold_ms=${HOLD_MS:-28000}
settle_s=${SETTLE_S:-4}
port=${PORT:-24060}
uas_port=${UAS_PORT:-24080}
export UAC_PORT=${UAC_PORT:-24070}
timeout=${TIMEOUT:-180s}
modes=${MODES:-dlg nodlg}
up_s=$(echo "$calls / $rate + $settle_s" | bc -l)
if [ "$(echo "$up_s * 1000 >= $hold_ms" | bc)" = 1 ]; then
  echo "HOLD_MS=$hold_ms is shorter than the ramp (CALLS/RATE + SETTLE_S = ${up_s%.*} s): calls would end before the sample" >&2
  exit 1
fi
need_sipp
need_free_udp_port "$port"
need_free_udp_port "$uas_port"
bin=$(moonroute_bin)

work=$(mktemp -d "${TMPDIR:-/tmp}/moonroute-dialog-memory.XXXXXX")
UAS_PID= UAC_PID= server=
cleanup() {
  stop_pid "$UAC_PID"; stop_pid "$UAS_PID"
  if [ -n "$server" ]; then stop_server "$server" >/dev/null || true; fi
  if [ -z "${KEEP:-}" ] && [ "${failed_runs:-1}" = 0 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
failed_runs=0

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

run_mode() {
  local mode=$1 dir=$work/$1 script
  mkdir -p "$dir"
  script=$dir/default.lua
  case $mode in
    dlg) default_script_without_auth >"$script" ;;
    nodlg) default_script_without_dialogs >"$script" ;;
    *) echo "unknown mode $mode (dlg, nodlg)" >&2; exit 1 ;;
  esac
  cat >"$dir/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$port"]
script = "$script"
data_dir = "$dir/data"
log_level = "warn"
workers = 1

[lua]
watch = false

[control]
socket = "$dir/ctl"
TOML
  launch_moonroute "$bin" 0 "$dir/moonroute.log" "$port" "" run --config "$dir/moonroute.toml"
  if ! taskset -c 1 sipp -sf bench/register_callee.xml -i 127.0.0.1 -p "$uas_port" -m 1 \
      -timeout 10s -timeout_error 127.0.0.1:"$port" -nostdin >"$dir/register.log" 2>&1; then
    echo "the callee's registration failed; see $dir/register.log" >&2; exit 1
  fi
  start_uas "$uas_port" "$calls" "$timeout" "$dir"
  local before up
  before=$(rss_kib "$server")
  echo "== $mode: $(uptime | sed 's/.*load average/load average/'); RSS before the calls: $before KiB"
  (HOLD_MS=$hold_ms MAX_CALLS=$((calls + 100)) RURI="sip:callee@127.0.0.1:$port" \
    run_uac "$port" "$rate" "$calls" "$timeout" "$dir") &
  local uac_job=$!
  sleep "$up_s"
  need_alive "$server" "$dir/moonroute.log"
  up=$(rss_kib "$server")
  printf 'RSS with the calls up: %s KiB: +%s KiB, %.0f bytes per call\n' "$up" "$((up - before))" \
    "$(echo "($up - $before) * 1024 / $calls" | bc -l)"
  if [ "$mode" = dlg ]; then
    "$bin" ctl --socket "$dir/ctl" dlg count | tr '\n' ' '; echo
    "$bin" ctl --socket "$dir/ctl" dlg list | head -4
    "$bin" ctl --socket "$dir/ctl" stats moonroute_dialogs | grep -v '^#' || true
  fi
  wait "$uac_job" || true
  print_call_stats "$dir"
  if [ "$mode" = dlg ]; then
    echo "CDR lines: $(wc -l <"$dir/data/cdr.jsonl" 2>/dev/null || echo 0)"
  fi
  printf '%s %s %s %s %s\n' "$mode" "$OK" "$FAILED" "$before" "$up" >>"$work/summary"
  [ "$FAILED" = 0 ] || failed_runs=$((failed_runs + 1))
  stop_pid "$UAS_PID"; UAS_PID=
  stop_server "$server" >/dev/null || true
  server=
  echo
}

for mode in $modes; do
  run_mode "$mode"
done

echo "== summary ($calls calls held $hold_ms ms, offered $rate calls/s, 1 event loop)"
awk -v n="$calls" '{ printf "%-6s ok %6s failed %4s  RSS %7d -> %7d KiB  %6.0f bytes per call\n", $1, $2, $3, $4, $5, ($5 - $4) * 1024 / n }' "$work/summary"
delta() { awk -v m="$1" '$1 == m { print $5 - $4 }' "$work/summary"; }
a=$(delta dlg) b=$(delta nodlg)
if [ -n "$a" ] && [ -n "$b" ]; then
  printf 'tracking a call: %.0f bytes of RSS (dlg - nodlg, per call)\n' "$(echo "($a - $b) * 1024 / $calls" | bc -l)"
fi
if [ "$failed_runs" != 0 ]; then
  echo "some calls failed: SIPp logs and error files kept in $work" >&2
  exit 1
fi
