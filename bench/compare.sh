#!/usr/bin/env bash
# moonroute and Kamailio 5.6 side by side, in one run, on the same machine, at the same fixed
# rates: server CPU per call and per REGISTER, and their ratio. Loopback only.
#
#   bench/compare.sh [CALL_RATE] [CALLS] [REG_RATE] [REGS]
#       defaults: 1000 calls/s x 20000 calls, 8000 REGISTER/s x 40000 REGISTERs
#
# Both servers do the same work (what bench/calls_default.sh calls `noauth`):
#   moonroute  scripts/default.lua with AUTHENTICATE = false (bench/lib.sh's copy, which keeps
#              the bench exemption from flood checks), durable location store (sled): a 200 to
#              a REGISTER is sent once the binding is on disk;
#   Kamailio   bench/kamailio/kamailio.cfg + kamailio.lua (KEMI Lua): Max-Forwards and sanity
#              checks, retransmission absorption, loose_route in dialog, Route removal, registrar
#              save (in memory: Kamailio's usrloc db_mode 0, nothing durable), location lookup,
#              record_route, t_relay.
# Calls: the callee registers once from the UAS port (bench/register_callee.xml), then
# bench/call-uac.xml -> server -> bench/call-uas.xml: INVITE 100/180/200 ACK BYE 200 through
# the proxy, Record-Route honoured. REGISTERs: bench/register_uac.xml, a new AOR each.
#
# MODE=pinned (default): one event loop / one Kamailio UDP worker, the server pinned to CPU 0,
#   SIPp on CPU 1 (compare CPU per call: SIPp alone limits the rates one machine can offer).
# MODE=defaults: each server as shipped: moonroute's default event loops (one per core),
#   Kamailio children=2; nothing pinned (SIPp shares both cores).
# ROUNDS=N (default 1): alternate the servers N times (moonroute, kamailio, moonroute, ...).
# SKIP=calls|registers: leave one half out.
#
# A server's CPU is utime+stime of all its processes from /proc over the SIPp run. Each run
# starts a fresh server. Bounded: every SIPp run has a call count and a -timeout.
# Environment: PORT (15260), UAS_PORT (15280), UAC_PORT (15270), SIPP_PORT (15370), TIMEOUT
# (SIPp, default 120s), MOONROUTE (binary; else cargo build --release), KEEP=1 (keep logs),
# SYSCALLS=1 (count the server's system calls per call / REGISTER with `perf stat`; it adds
# to their cost, so compare CPU from runs without it).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
call_rate=${1:-1000}
calls=${2:-20000}
reg_rate=${3:-8000}
regs=${4:-40000}
mode=${MODE:-pinned}
rounds=${ROUNDS:-1}
port=${PORT:-15260}
uas_port=${UAS_PORT:-15280}
export UAC_PORT=${UAC_PORT:-15270} SIPP_PORT=${SIPP_PORT:-15370}
timeout=${TIMEOUT:-120s}
need_sipp
need_kamailio
need_free_udp_port "$port"
need_free_udp_port "$uas_port"
bin=$(moonroute_bin)
case $mode in
  pinned) server_cpus=0 sipp_cpus=1 loops=1 ;;
  defaults) server_cpus=0,1 sipp_cpus=0,1 loops=0 ;;
  *) echo "MODE is pinned or defaults" >&2; exit 2 ;;
esac
kamailio_children=$([ "$loops" = 0 ] && echo 2 || echo "$loops")

work=$(mktemp -d "${TMPDIR:-/tmp}/moonroute-compare.XXXXXX")
UAS_PID= UAC_PID= server= PERF_PID=
failed_runs=0
cleanup() {
  stop_pid "$UAC_PID"; stop_pid "$UAS_PID"; stop_pid "$PERF_PID"
  stop_pid "$server"
  if [ -z "${KEEP:-}" ] && [ "$failed_runs" = 0 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ticks=$(getconf CLK_TCK)

# start_moonroute DIR: the release build on udp 127.0.0.1:$port with default.lua without auth.
start_moonroute() {
  local dir=$1
  default_script_without_auth >"$dir/default-noauth.lua"
  cat >"$dir/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$port"]
script = "$dir/default-noauth.lua"
data_dir = "$dir/data"
log_level = "warn"
workers = $loops

[lua]
watch = false

[control]
socket = "$dir/ctl"
TOML
  launch_moonroute "$bin" "$server_cpus" "$dir/moonroute.log" "$port" 200 run --config "$dir/moonroute.toml"
}

start_named() {
  case $1 in
    moonroute) start_moonroute "$2" ;;
    kamailio) start_kamailio "$2" "$port" "$kamailio_children" "$server_cpus" ;;
  esac
}

# measure NAME KIND RUN...: runs RUN... (a SIPp run) and appends
# "NAME KIND ok failed cpu_ms_per_item" to $work/summary, from the stat file $dir/uac-stat.csv.
measure() {
  local name=$1 kind=$2 dir=$3; shift 3
  local before after ok failed cpu_s per switches_before switches_after
  before=$(tree_cpu_ticks "$server")
  switches_before=$(tree_context_switches "$server")
  [ -z "${SYSCALLS:-}" ] || start_syscall_count "$dir"
  "$@"
  [ -z "${SYSCALLS:-}" ] || stop_syscall_count
  after=$(tree_cpu_ticks "$server")
  switches_after=$(tree_context_switches "$server")
  ok=$(stat_field "$dir/uac-stat.csv" 'SuccessfulCall(C)' || echo 0)
  failed=$(stat_field "$dir/uac-stat.csv" 'FailedCall(C)' || echo '?')
  cpu_s=$(echo "($after - $before) / $ticks" | bc -l)
  per=$(if [ "$ok" -gt 0 ]; then echo "$cpu_s * 1000 / $ok" | bc -l; else echo 0; fi)
  printf '%s %s: ok %s failed %s, server CPU %.2f s = %.3f ms per %s, %.1f context switches per %s\n' \
    "$name" "$kind" "$ok" "$failed" "$cpu_s" "$per" "${kind%s}" \
    "$(if [ "$ok" -gt 0 ]; then echo "($switches_after - $switches_before) / $ok" | bc -l; else echo 0; fi)" "${kind%s}"
  printf '%s %s %s %s %.4f\n' "$name" "$kind" "$ok" "$failed" "$per" >>"$work/summary"
  if [ -n "${SYSCALLS:-}" ] && [ "$ok" -gt 0 ]; then
    printf '%s %s: %.1f system calls per %s\n' "$name" "$kind" \
      "$(echo "$(syscall_count "$dir") / $ok" | bc -l)" "${kind%s}"
  fi
  [ "$failed" = 0 ] || failed_runs=$((failed_runs + 1))
}

# SYSCALLS=1: the server's system calls over the run, counted by `perf stat` on the
# raw_syscalls:sys_enter tracepoint (every process of the server).
start_syscall_count() {
  perf stat -x, -e raw_syscalls:sys_enter -p "$(kamailio_pids "$server" | tr ' ' ,)" \
    -o "$1/syscalls.csv" >/dev/null 2>&1 &
  PERF_PID=$!
}
stop_syscall_count() {
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
  PERF_PID=
}
syscall_count() { awk -F, '$3 == "raw_syscalls:sys_enter" { print $1 }' "$1/syscalls.csv"; }

calls_run() {
  local name=$1 dir=$work/$1-calls-$2
  mkdir -p "$dir"
  start_named "$name" "$dir"
  if ! taskset -c "$sipp_cpus" sipp -sf bench/register_callee.xml -i 127.0.0.1 -p "$uas_port" -m 1 \
      -timeout 10s -timeout_error -nostdin 127.0.0.1:"$port" >"$dir/register.log" 2>&1; then
    echo "$name: the callee's registration failed; see $dir/register.log" >&2
    exit 1
  fi
  taskset -c "$sipp_cpus" sipp -sf bench/call-uas.xml -i 127.0.0.1 -p "$uas_port" -m "$calls" \
    -timeout "$timeout" -trace_stat -stf "$dir/uas-stat.csv" -nostdin >"$dir/uas.log" 2>&1 &
  UAS_PID=$!
  wait_udp_port "$uas_port" || { echo "the UAS SIPp did not start" >&2; exit 1; }
  measure "$name" calls "$dir" run_uac_on "$port" "$call_rate" "$calls" "$timeout" "$dir"
  if [ "$name" = moonroute ]; then
    print_udp_batches "$bin" "$dir/ctl"
    print_hand_overs "$bin" "$dir/ctl" "$(stat_field "$dir/uac-stat.csv" 'SuccessfulCall(C)' || echo 0)"
  fi
  stop_pid "$UAS_PID"; UAS_PID=
  stop_pid "$server"; server=
}

# run_uac_on: bench/lib.sh's run_uac with SIPp on $sipp_cpus.
run_uac_on() {
  local dport=$1 rate=$2 n=$3 t=$4 dir=$5
  taskset -c "$sipp_cpus" sipp -sf bench/call-uac.xml -i 127.0.0.1 -p "$UAC_PORT" \
    -key ruri "sip:callee@127.0.0.1:$dport" -r "$rate" -m "$n" -l "${MAX_CALLS:-5000}" \
    -timeout "$t" -timeout_error -trace_stat -stf "$dir/uac-stat.csv" \
    -trace_err -error_file "$dir/uac-errors.log" 127.0.0.1:"$dport" -nostdin >"$dir/uac.log" 2>&1 &
  UAC_PID=$!
  wait "$UAC_PID" || true
  UAC_PID=
}

registers_run() {
  local name=$1 dir=$work/$1-registers-$2
  mkdir -p "$dir"
  start_named "$name" "$dir"
  measure "$name" registers "$dir" run_register_on "$port" "$reg_rate" "$regs" "$timeout" "$dir"
  stop_pid "$server"; server=
}

run_register_on() {
  local dport=$1 rate=$2 n=$3 t=$4 dir=$5
  taskset -c "$sipp_cpus" sipp -sf bench/register_uac.xml -i 127.0.0.1 -p "$SIPP_PORT" \
    -r "$rate" -m "$n" -l "${MAX_CALLS:-5000}" -default_behaviors all,-bye \
    -timeout "$t" -timeout_error -trace_stat -stf "$dir/uac-stat.csv" \
    -trace_err -error_file "$dir/uac-errors.log" 127.0.0.1:"$dport" -nostdin >"$dir/uac.log" 2>&1 &
  UAC_PID=$!
  wait "$UAC_PID" || true
  UAC_PID=
}

echo "MODE=$mode: moonroute $bin (loops: $([ "$loops" = 0 ] && echo default || echo "$loops")), Kamailio $(kamailio -v | head -1 | cut -d' ' -f2-3) children=$kamailio_children;" \
  "server CPUs $server_cpus, SIPp CPUs $sipp_cpus; load average $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$rounds"); do
  for name in moonroute kamailio; do
    [ "${SKIP:-}" = calls ] || calls_run "$name" "$round"
    [ "${SKIP:-}" = registers ] || registers_run "$name" "$round"
  done
done

echo
echo "== summary (MODE=$mode, $rounds round(s); calls at $call_rate/s x $calls, REGISTERs at $reg_rate/s x $regs)"
awk '{ k = $1 " " $2; ok[k] += $3; failed[k] += $4; ms[k] += $5; n[k]++ }
     END {
       printf "%-10s %-10s %8s %7s %10s\n", "server", "what", "ok", "failed", "CPU ms"
       for (k in n) { split(k, p, " "); printf "%-10s %-10s %8d %7d %10.3f\n", p[1], p[2], ok[k], failed[k], ms[k] / n[k] }
       split("calls registers", kinds, " ")
       for (i in kinds) {
         m = "moonroute " kinds[i]; c = "kamailio " kinds[i]
         if (n[m] && n[c] && ms[c] > 0) printf "moonroute / kamailio CPU per %s: %.2f\n", kinds[i], (ms[m] / n[m]) / (ms[c] / n[c])
       }
     }' "$work/summary"
if [ "$failed_runs" != 0 ]; then
  echo "some runs had failures: logs kept in $work" >&2
  exit 1
fi
