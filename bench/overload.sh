#!/usr/bin/env bash
# Overload: goodput and 503s against offered load, from 0.5x to 2x each server's capacity,
# moonroute (overload control on, and off) and Kamailio 5.6 side by side. Loopback only.
#
#   bench/overload.sh [CAPACITY]
#
# UAC SIPp (127.0.0.1:$UAC_PORT, CPU 1) -> server (udp:127.0.0.1:$PORT, CPU 0) -> UAS SIPp
# (127.0.0.1:$UAS_PORT, CPU 1): INVITE 100/180/200 ACK BYE 200 (bench/call-uac.xml: a call
# fails on an unexpected response such as 503, or when its 200 takes more than 5 s).
# Servers (one event loop / one UDP worker, pinned to CPU 0; SIPp alone needs about a core at
# 3,000 calls/s, so it gets the other one):
#   moonroute      scripts/default.lua without authentication (bench/lib.sh's copy), memory
#                  location store, default [limits] (overload_after_ms = 1000);
#   moonroute-off  the same with limits.overload_after_ms = 0: no overload control;
#   kamailio       bench/kamailio/kamailio.cfg + kamailio.lua (the same routing in KEMI Lua;
#                  Kamailio has no overload control in that configuration).
# SIPp cannot offer twice what a server carries with the usual scripts (it runs out of CPU
# first), so each script gets the same busy loop of $WORK Lua iterations per request (an
# expensive script: database lookups, many rules), which makes the server the bottleneck.
#
# Per series: the capacity is measured first (CAPACITY given: used for every series): calls at
# $PROBE_RATE/s for $PROBE_SECS s, capacity = 1 s / (server CPU per call) (the server has its
# CPU to itself; the estimate is low, per-call cost falls with batching at higher rates).
# Then a run per point of $POINTS (multiples of the capacity), $SECS s each, on a fresh
# server: successful calls/s (goodput), 503s received by the UAC, calls timed out, SIPp
# retransmissions, datagrams the kernel dropped on the server's socket, server CPU.
# Writes $OUT/overload.dat (one line per run) and $OUT/overload.svg (gnuplot): goodput and
# 503/s against offered load, both relative to the series' capacity. Prints the table and the
# load average before each run (other work on the machine distorts the figures).
# Bounded: each run offers rate x SECS calls, at most $MAX_CALLS (3000) outstanding, and SIPp
# gives up after SECS + 30 s.
# Environment: WORK (20000), POINTS ("0.5 0.75 1 1.25 1.5 2"), SECS (15), PROBE_RATE (200),
# PROBE_SECS (10), SERIES ("moonroute moonroute-off kamailio"), PORT (15460), UAS_PORT (15480),
# UAC_PORT (15470), OUT (target/bench), MOONROUTE (binary; else cargo build --release),
# KEEP=1 (keep the work directory).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
capacity_given=${1:-}
work_iterations=${WORK:-20000}
points=${POINTS:-0.5 0.75 1 1.25 1.5 2}
secs=${SECS:-15}
probe_rate=${PROBE_RATE:-200}
probe_secs=${PROBE_SECS:-10}
series=${SERIES:-moonroute moonroute-off kamailio}
port=${PORT:-15460}
uas_port=${UAS_PORT:-15480}
export UAC_PORT=${UAC_PORT:-15470} MAX_CALLS=${MAX_CALLS:-3000}
out=${OUT:-target/bench}
need_sipp
need_free_udp_port "$port"
need_free_udp_port "$uas_port"
case " $series " in *" kamailio "*) need_kamailio ;; esac
command -v gnuplot >/dev/null || { echo "gnuplot not found: apt-get install gnuplot-nox" >&2; exit 1; }
bin=$(moonroute_bin)
mkdir -p "$out"
ticks=$(getconf CLK_TCK)

work=$(mktemp -d "${TMPDIR:-/tmp}/moonroute-overload.XXXXXX")
UAS_PID= UAC_PID= server=
cleanup() {
  stop_pid "$UAC_PID"; stop_pid "$UAS_PID"; stop_pid "$server"
  if [ -z "${KEEP:-}" ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The busy loop, as Lua lines for the top of each script's request route.
busy_loop="  local busy = 0\n  for i = 1, $work_iterations do busy = busy + i end"
default_script_without_auth \
  | sed "s/^function on_request(req)$/function on_request(req)\n$busy_loop/" >"$work/default-noauth.lua"
grep -q "busy = busy + i" "$work/default-noauth.lua" || { echo "could not add the busy loop to default.lua" >&2; exit 1; }
mkdir -p "$work/kamailio"
sed "s/^function ksr_request_route()$/function ksr_request_route()\n$busy_loop/" \
  bench/kamailio/kamailio.lua >"$work/kamailio/kamailio.lua"
grep -q "busy = busy + i" "$work/kamailio/kamailio.lua" || { echo "could not add the busy loop to kamailio.lua" >&2; exit 1; }

# start_server SERIES DIR: the series' server on udp 127.0.0.1:$port, CPU 0; sets server.
start_server() {
  local name=$1 dir=$2 after
  case $name in
    kamailio)
      sed -e "s|@SCRIPT@|$work/kamailio/kamailio.lua|" -e "s|@CHILDREN@|1|" \
        bench/kamailio/kamailio.cfg >"$dir/kamailio.cfg"
      taskset -c 0 kamailio -f "$dir/kamailio.cfg" -l "udp:127.0.0.1:$port" -DD -E \
        -m "${KAMAILIO_SHM_MB:-512}" -M 16 -Y "$dir" -P "$dir/kamailio.pid" >"$dir/server.log" 2>&1 &
      server=$! ;;
    moonroute|moonroute-off)
      after=$([ "$name" = moonroute-off ] && echo "overload_after_ms = 0" || true)
      cat >"$dir/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$port"]
script = "$work/default-noauth.lua"
data_dir = "$dir/data"
log_level = "${LOG_LEVEL:-warn,moonroute::refused=error}"
workers = 1

[limits]
$after

[lua]
watch = false

[control]
socket = "$dir/ctl"

[location]
store = "memory"
TOML
      taskset -c 0 "$bin" run --config "$dir/moonroute.toml" 2>"$dir/server.log" &
      server=$! ;;
  esac
  if ! wait_udp_port "$port" 200 || ! kill -0 "$server" 2>/dev/null; then
    echo "$name did not start on udp:127.0.0.1:$port:" >&2
    tail -20 "$dir/server.log" >&2
    exit 1
  fi
}

# call_run SERIES RATE CALLS DIR: a fresh server, the callee registered, CALLS calls at RATE/s.
# Sets ok failed rejected timeouts retrans drops cpu_s wall.
call_run() {
  local name=$1 rate=$2 calls=$3 dir=$4 before after d_before d_after start end
  mkdir -p "$dir"
  start_server "$name" "$dir"
  if ! taskset -c 1 sipp -sf bench/register_callee.xml -i 127.0.0.1 -p "$uas_port" -m 1 \
      -timeout 10s -timeout_error -nostdin 127.0.0.1:"$port" >"$dir/register.log" 2>&1; then
    echo "$name: the callee's registration failed; see $dir/register.log" >&2
    exit 1
  fi
  taskset -c 1 sipp -sf bench/call-uas.xml -i 127.0.0.1 -p "$uas_port" -m "$calls" \
    -timeout "$((secs + 30))s" -trace_stat -stf "$dir/uas-stat.csv" -nostdin >"$dir/uas.log" 2>&1 &
  UAS_PID=$!
  wait_udp_port "$uas_port" || { echo "the UAS SIPp did not start" >&2; exit 1; }
  before=$(tree_cpu_ticks "$server")
  d_before=$(socket_drops "$port"); d_before=${d_before:-0}
  start=$(date +%s.%N)
  taskset -c 1 sipp -sf bench/call-uac.xml -i 127.0.0.1 -p "$UAC_PORT" \
    -key ruri "sip:callee@127.0.0.1:$port" -r "$rate" -m "$calls" -l "$MAX_CALLS" \
    -timeout "$((secs + 30))s" -timeout_error -trace_stat -stf "$dir/uac-stat.csv" \
    -trace_err -error_file "$dir/uac-errors.log" 127.0.0.1:"$port" -nostdin >"$dir/uac.log" 2>&1 &
  UAC_PID=$!
  wait "$UAC_PID" || true
  UAC_PID=
  end=$(date +%s.%N)
  need_alive "$server" "$dir/server.log"
  after=$(tree_cpu_ticks "$server")
  d_after=$(socket_drops "$port"); d_after=${d_after:-0}
  stop_pid "$UAS_PID"; UAS_PID=
  stop_pid "$server"; server=
  ok=$(stat_field "$dir/uac-stat.csv" 'SuccessfulCall(C)' || echo 0)
  failed=$(stat_field "$dir/uac-stat.csv" 'FailedCall(C)' || echo 0)
  timeouts=$(stat_field "$dir/uac-stat.csv" 'FailedTimeoutOnRecv(C)' || echo 0)
  retrans=$(stat_field "$dir/uac-stat.csv" 'Retransmissions(C)' || echo 0)
  rejected=$(grep -ac "received 'SIP/2.0 503" "$dir/uac-errors.log" 2>/dev/null || true)
  rejected=${rejected:-0}
  drops=$((d_after - d_before))
  cpu_s=$(echo "($after - $before) / $ticks" | bc -l)
  wall=$(echo "$end - $start" | bc -l)
}

dat=$out/overload.dat
printf '# series x capacity offered_per_s ok failed rejected_503 timeouts retransmissions drops cpu_s wall_s goodput_per_s loadavg1\n' >"$dat"
echo "moonroute $bin, Kamailio $(kamailio -v 2>/dev/null | head -1 | cut -d' ' -f2-3); WORK=$work_iterations; server on CPU 0, SIPp on CPU 1"
printf '%-14s %5s %8s %8s %7s %7s %6s %8s %8s %7s %6s %9s %8s\n' series x offered ok failed 503 timeout retrans drops cpu_s util goodput/s loadavg
for name in $series; do
  if [ -n "$capacity_given" ]; then
    capacity=$capacity_given
  else
    call_run "$name" "$probe_rate" "$((probe_rate * probe_secs))" "$work/$name-probe"
    if [ "$ok" -le 0 ] || [ "$failed" != 0 ]; then
      echo "$name: the capacity probe at $probe_rate calls/s failed ($ok ok, $failed failed); see $work/$name-probe" >&2
      KEEP=1; exit 1
    fi
    capacity=$(echo "$ok / $cpu_s" | bc)
    echo "$name: capacity $capacity calls/s (CPU $(printf '%.3f' "$(echo "$cpu_s * 1000 / $ok" | bc -l)") ms per call at $probe_rate calls/s)"
  fi
  for x in $points; do
    rate=$(printf '%.0f' "$(echo "$capacity * $x" | bc -l)")
    load=$(cut -d' ' -f1 /proc/loadavg)
    call_run "$name" "$rate" "$((rate * secs))" "$work/$name-$x"
    goodput=$(echo "$ok / $secs" | bc -l)
    printf '%-14s %5s %8s %8s %7s %7s %6s %8s %8s %7.2f %5.0f%% %9.0f %8s\n' "$name" "$x" "$rate" "$ok" "$failed" \
      "$rejected" "$timeouts" "$retrans" "$drops" "$cpu_s" "$(echo "100 * $cpu_s / $wall" | bc -l)" "$goodput" "$load"
    printf '%s %s %s %s %s %s %s %s %s %s %.3f %.3f %.1f %s\n' "$name" "$x" "$capacity" "$rate" "$ok" "$failed" \
      "$rejected" "$timeouts" "$retrans" "$drops" "$cpu_s" "$wall" "$goodput" "$load" >>"$dat"
  done
done

gnuplot <<GNUPLOT
set terminal svg size 900,520 font "sans,12" background "white"
set output "$out/overload.svg"
set title "Calls through one pinned event loop / worker (WORK=$work_iterations): goodput and 503s vs offered load"
set xlabel "offered load (x the series' measured capacity)"
set ylabel "calls/s (x capacity)"
set key top left
set grid
set xrange [0.4:2.1]
set yrange [0:2.1]
plot x title "offered" with lines dashtype 2 linecolor "gray", \
  for [s in "$series"] "$dat" using (strcol(1) eq s ? \$2 : 1/0):(\$13 / \$3) with linespoints linewidth 2 title s." goodput", \
  for [s in "$series"] "$dat" using (strcol(1) eq s ? \$2 : 1/0):(\$7 / \$12 / \$3) with points pointtype 6 title s." 503/s"
GNUPLOT
echo "wrote $dat and $out/overload.svg"
