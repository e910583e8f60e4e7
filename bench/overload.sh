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
# $PROBE_RATE/s for $PROBE_SECS s give an estimate, 1 s / (server CPU per call); then a
# zero-failure search ($SEARCH_STEPS bisections between 0 and 1.5x the estimate, $SEARCH_SECS
# s each, on a fresh server) finds the highest rate with every call successful: that is the
# capacity (SEARCH_STEPS=0: the estimate). Then a run per point of $POINTS (multiples of the
# capacity), $SECS s each, on a fresh server: successful calls/s (goodput), 503s received by
# the UAC, calls timed out, SIPp retransmissions, datagrams the kernel dropped on the server's
# socket, server CPU, and the share of the server's runnable time it waited for CPU 0 (other
# processes held it). Writes $OUT/overload.dat (one line per run), $OUT/overload.svg
# (gnuplot): goodput and 503/s against offered load, both relative to the series' capacity,
# and for moonroute $OUT/overload-share.dat / overload-share.svg: the refused share of each
# 100 ms sample while shedding, per point (from the server's debug log). Prints the table and
# the load average before each run (other work on the machine distorts the figures).
# Bounded: each run offers rate x SECS calls, at most $MAX_CALLS (3000) outstanding, and SIPp
# gives up after SECS + 30 s.
# Environment: WORK (20000), POINTS ("0.5 0.75 1 1.25 1.5 2"), SECS (15), PROBE_RATE (200),
# PROBE_SECS (10), SEARCH_STEPS (5), SEARCH_SECS (10), SERIES ("moonroute moonroute-off kamailio"), PORT (15460), UAS_PORT (15480),
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
search_steps=${SEARCH_STEPS:-5}
search_secs=${SEARCH_SECS:-10}
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
log_level = "${LOG_LEVEL:-warn,moonroute::refused=error,moonroute::server::overload=debug}"
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
# Sets ok failed rejected timeouts retrans drops cpu_s wall wait_pct.
call_run() {
  local name=$1 rate=$2 calls=$3 dir=$4 before after d_before d_after start end w_before w_after
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
  w_before=$(tree_sched_wait_ms "$server")
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
  w_after=$(tree_sched_wait_ms "$server")
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
  # Of the time the server was runnable (on CPU 0 or waiting for it), the share it waited.
  wait_pct=$(echo "100 * ($w_after - $w_before) / ($w_after - $w_before + 1000 * $cpu_s + 0.001)" | bc -l)
}

# tree_sched_wait_ms PID: sched_wait_ms over PID and its children (Kamailio's processes).
tree_sched_wait_ms() {
  local p s=0
  for p in $(kamailio_pids "$1"); do s=$((s + $(sched_wait_ms "$p" 2>/dev/null || echo 0))); done
  echo "$s"
}

# search_capacity SERIES ESTIMATE: the highest rate at which every call of a $search_secs s run
# succeeds, bisecting $search_steps times between 0 and 1.5x ESTIMATE (the first try is 0.75x);
# sets capacity. When no rate tried succeeded (the machine too busy), says so and keeps
# ESTIMATE.
search_capacity() {
  local name=$1 estimate=$2 lo=0 hi mid step
  hi=$(echo "$estimate * 3 / 2" | bc)
  for step in $(seq 1 "$search_steps"); do
    mid=$(((lo + hi) / 2))
    call_run "$name" "$mid" "$((mid * search_secs))" "$work/$name-search-$step"
    printf '%s: search %s: %s calls/s: %s ok, %s failed (load %s)\n' "$name" "$step" "$mid" "$ok" "$failed" \
      "$(cut -d' ' -f1 /proc/loadavg)"
    if [ "$failed" = 0 ] && [ "$ok" -gt 0 ]; then lo=$mid; else hi=$mid; fi
  done
  if [ "$lo" -gt 0 ]; then
    capacity=$lo
  else
    echo "$name: no rate tried ran without a failed call (is the machine busy?): using the estimate" >&2
    capacity=$estimate
  fi
}

# share_trace SERIES X DIR: the refused share of each 100 ms sample of the run in DIR (the
# server's "overload sample" debug lines), appended to $share_dat as "series x t_s pct busy".
share_trace() {
  local name=$1 x=$2 dir=$3
  grep -a 'overload sample' "$dir/server.log" 2>/dev/null | sed 's/\x1b\[[0-9;]*m//g' | awk -v s="$name" -v x="$x" '
    { split($1, t, "T"); split(t[2], hms, ":"); sec = hms[1] * 3600 + hms[2] * 60 + hms[3]
      if (t0 == "") t0 = sec
      pct = ""; busy = ""
      for (i = 2; i <= NF; i++) {
        if ($i ~ /^refused_pct=/) { sub(/^refused_pct=/, "", $i); pct = $i }
        if ($i ~ /^busy_pct=/) { sub(/^busy_pct=/, "", $i); busy = $i }
      }
      if (pct != "") printf "%s %s %.1f %s %s\n", s, x, sec - t0, pct, busy }' >>"$share_dat" || true
}

dat=$out/overload.dat
share_dat=$out/overload-share.dat
printf '# series x capacity offered_per_s ok failed rejected_503 timeouts retransmissions drops cpu_s wall_s goodput_per_s loadavg1 cpu_wait_pct\n' >"$dat"
printf '# series x seconds_from_first_shedding_sample refused_pct busy_pct\n' >"$share_dat"
echo "moonroute $bin, Kamailio $(kamailio -v 2>/dev/null | head -1 | cut -d' ' -f2-3); WORK=$work_iterations; server on CPU 0, SIPp on CPU 1"
printf '%-14s %5s %8s %8s %7s %7s %6s %8s %8s %7s %6s %9s %8s %6s\n' series x offered ok failed 503 timeout retrans drops cpu_s util goodput/s loadavg waitcpu
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
    echo "$name: capacity estimate $capacity calls/s (CPU $(printf '%.3f' "$(echo "$cpu_s * 1000 / $ok" | bc -l)") ms per call at $probe_rate calls/s)"
    if [ "$search_steps" -gt 0 ]; then
      search_capacity "$name" "$capacity"
      echo "$name: capacity $capacity calls/s (the highest rate without a failed call)"
    fi
  fi
  for x in $points; do
    rate=$(printf '%.0f' "$(echo "$capacity * $x" | bc -l)")
    load=$(cut -d' ' -f1 /proc/loadavg)
    call_run "$name" "$rate" "$((rate * secs))" "$work/$name-$x"
    goodput=$(echo "$ok / $secs" | bc -l)
    printf '%-14s %5s %8s %8s %7s %7s %6s %8s %8s %7.2f %5.0f%% %9.0f %8s %5.0f%%\n' "$name" "$x" "$rate" "$ok" "$failed" \
      "$rejected" "$timeouts" "$retrans" "$drops" "$cpu_s" "$(echo "100 * $cpu_s / $wall" | bc -l)" "$goodput" "$load" "$wait_pct"
    printf '%s %s %s %s %s %s %s %s %s %s %.3f %.3f %.1f %s %.0f\n' "$name" "$x" "$capacity" "$rate" "$ok" "$failed" \
      "$rejected" "$timeouts" "$retrans" "$drops" "$cpu_s" "$wall" "$goodput" "$load" "$wait_pct" >>"$dat"
    share_trace "$name" "$x" "$work/$name-$x"
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
if grep -q '^moonroute ' "$share_dat"; then
  gnuplot <<GNUPLOT
set terminal svg size 900,420 font "sans,12" background "white"
set output "$out/overload-share.svg"
set title "moonroute: refused share of new requests per 100 ms sample while shedding"
set xlabel "seconds from the first shedding sample of the run"
set ylabel "refused %"
set key top right
set grid
set yrange [0:100]
plot for [pt in "$points"] "$share_dat" using (strcol(1) eq "moonroute" && strcol(2) eq pt ? \$3 : 1/0):4 with linespoints title pt."x"
GNUPLOT
fi
echo "wrote $dat, $share_dat, $out/overload.svg and $out/overload-share.svg"
