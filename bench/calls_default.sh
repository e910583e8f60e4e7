#!/usr/bin/env bash
# What a call costs through the shipped scripts/default.lua (flood checks, sanity, NAT
# detection, digest auth, location lookup, record-route, on_reply), against the same script
# without authentication and against the minimal bench/relay.lua. Loopback only.
#
#   bench/calls_default.sh [RATE] [CALLS]      defaults: 1000 calls/s, 20000 calls
#
# UAC SIPp 127.0.0.1:15070 --> moonroute udp:127.0.0.1:15060 --> UAS SIPp 127.0.0.1:15080
#      (CPU 1)                   (1 worker, CPU 0)                 (CPU 1)
#
# Runs (MODES, default "auth noauth relay"), each on a fresh server and data_dir:
#   auth    scripts/default.lua as shipped (but for TRUSTED, below), [auth] algorithms = ["MD5"] (SIPp's digest is MD5
#           only). Users caller@127.0.0.1 and callee@127.0.0.1 (password bench-pw) are
#           provisioned with `moonroute ctl user add`; the callee registers with digest auth
#           (bench/register_callee.xml: REGISTER -> 401 -> REGISTER -> 200) from the UAS port,
#           then the UAS starts there. Each call (bench/call-auth-uac.xml): INVITE -> 407 -> ACK
#           -> INVITE with Proxy-Authorization -> 100/180/200 -> ACK -> BYE -> 200.
#   noauth  the same script with `local AUTHENTICATE = false` (a sed copy, as bench/lib.sh
#           does); the callee registers without a challenge; calls are bench/call-uac.xml to
#           sip:callee@127.0.0.1:PORT (INVITE -> 100/180/200 -> ACK -> BYE -> 200).
#   nodlg   noauth without dialog tracking (default.lua's req:dlg_manage() commented out: no
#           dialog table entry, profile, `ctl dlg` summary or CDR line per call): noauth / nodlg
#           is what tracking a call costs.
#   relay   bench/relay.lua (record_route + t_relay to the UAS, loose_route in dialog: what
#           bench/calls.sh ROUTER=script runs), no registration, bench/call-uac.xml.
# The caller is on 127.0.0.1, which every mode's copy of default.lua puts in TRUSTED (no pike
# check; bench_default_script in bench/lib.sh): a benchmark shortcut. The shipped script
# trusts nobody.
#
# Per run: calls ok/failed, achieved calls/s, the server's CPU (utime+stime from /proc) in ms per
# call, its run-queue wait (time another task held CPU 0), how busy both CPUs were, and the
# load average before it (other builds on the machine distort the figures: look at it).
# Then a summary with the ratios. Bounded: CALLS calls per run, SIPp gives up after $TIMEOUT.
# Environment: MODES, PORT (15060), UAS_PORT (15080), UAC_PORT (15070), TIMEOUT (120s),
# HOLD_MS (0), MAX_CALLS (SIPp -l, 5000), MOONROUTE=path (else cargo build --release),
# WORKERS (event loops, default 1) and SERVER_CPUS (the server's taskset CPU list, default 0;
# WORKERS=2 SERVER_CPUS=0,1 is the default deployment's two loops, unpinned),
# KEEP=1 (keep the work directory), PERF=1 (perf record of the server's stacks during each run, at
# PERF_FREQ Hz, default 999, stacks by PERF_CALLGRAPH, default dwarf: the release build has no
# frame pointers; implies keeping the work directory).
# LOCATION=redis: the location store on a redis-server started for the whole run
# (127.0.0.1:$REDIS_PORT, default 15379, on $REDIS_CPUS, default 1; bench/lib.sh
# start_bench_redis): every call's lookup is a round trip to Redis. Its CPU over each run is
# printed too.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
rate=${1:-1000}
calls=${2:-20000}
port=${PORT:-15060}
uas_port=${UAS_PORT:-15080}
timeout=${TIMEOUT:-120s}
modes=${MODES:-auth noauth relay}
need_sipp
need_free_udp_port "$port"
need_free_udp_port "$uas_port"
bin=$(moonroute_bin)

work=$(mktemp -d "${TMPDIR:-/tmp}/moonroute-calls-default.XXXXXX")
UAS_PID= UAC_PID= server= redis_pid=
cleanup() {
  stop_pid "$UAC_PID"; stop_pid "$UAS_PID"; stop_pid "$redis_pid"
  if [ -n "$server" ]; then stop_server "$server" >/dev/null || true; fi
  if [ -z "${KEEP:-}${PERF:-}" ] && [ "${failed_runs:-1}" = 0 ]; then rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
ticks=$(getconf CLK_TCK)
failed_runs=0
if [ "${LOCATION:-sled}" = redis ]; then
  start_bench_redis "$work" "${REDIS_PORT:-15379}" "${REDIS_CPUS:-1}"
fi

# write_config DIR SCRIPT: the server's configuration for one run.
write_config() {
  cat >"$1/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$port"]
script = "$2"
data_dir = "$1/data"
log_level = "warn"
workers = ${WORKERS:-1}

[lua]
watch = false

[control]
socket = "$1/ctl"

[auth]
# SIPp's [authentication] computes MD5 only.
algorithms = ["MD5"]
TOML
  if [ -n "$redis_pid" ]; then
    printf '\n[location]\nstore = "redis"\nredis_url = "%s"\n' "$REDIS_URL" >>"$1/moonroute.toml"
  fi
}

# start_server DIR: moonroute on $SERVER_CPUS (CPU 0) with DIR/moonroute.toml; sets server.
start_server() {
  launch_moonroute "$bin" "${SERVER_CPUS:-0}" "$1/moonroute.log" "$port" "" run --config "$1/moonroute.toml"
}

# register_callee DIR: one registration of callee@127.0.0.1 from the UAS port (SIPp, CPU 1,
# bounded by -m 1 and a 10 s timeout); exits when it fails.
register_callee() {
  if ! taskset -c 1 sipp -sf bench/register_callee.xml -i 127.0.0.1 -p "$uas_port" -m 1 \
      -timeout 10s -timeout_error -trace_err -error_file "$1/register-errors.log" \
      127.0.0.1:"$port" -nostdin >"$1/register.log" 2>&1; then
    echo "the callee's registration failed; see $1/register.log and $1/register-errors.log" >&2
    exit 1
  fi
}

# run_mode MODE: one measured run; appends "MODE ok failed achieved cpu_ms_per_call" to
# $work/summary.
run_mode() {
  local mode=$1 dir=$work/$1 script
  mkdir -p "$dir"
  case $mode in
    auth) script=$dir/default.lua; bench_default_script >"$script" ;;
    noauth) script=$dir/default-noauth.lua; default_script_without_auth >"$script" ;;
    nodlg) script=$dir/default-nodlg.lua; default_script_without_dialogs >"$script" ;;
    relay) script=$dir/relay.lua; sed "s/@UAS_PORT@/$uas_port/" bench/relay.lua >"$script" ;;
    *) echo "unknown mode $mode (auth, noauth, nodlg, relay)" >&2; exit 1 ;;
  esac
  write_config "$dir" "$script"
  start_server "$dir"
  local scenario=bench/call-uac.xml ruri="sip:callee@127.0.0.1:$port" auth_uri=
  case $mode in
    auth)
      "$bin" ctl --socket "$dir/ctl" user add "caller@127.0.0.1" bench-pw >/dev/null
      "$bin" ctl --socket "$dir/ctl" user add "callee@127.0.0.1" bench-pw >/dev/null
      register_callee "$dir"
      scenario=bench/call-auth-uac.xml
      # The digest uri must be the INVITE's Request-URI (RFC 3261 §22.4; the server checks it).
      auth_uri="callee@127.0.0.1:$port"
      ;;
    noauth | nodlg) register_callee "$dir" ;;
    relay) ruri="sip:uas@127.0.0.1:$port" ;;
  esac
  start_uas "$uas_port" "$calls" "$timeout" "$dir"

  echo "== $mode: $(uptime | sed 's/.*load average/load average/') before the run"
  local cpu_before wait_before snap_before start end cpu_after wait_after snap_after
  cpu_before=$(cpu_ticks "$server")
  local redis_before=0 redis_after=0
  [ -z "$redis_pid" ] || redis_before=$(cpu_ticks "$redis_pid")
  wait_before=$(sched_wait_ms "$server")
  snap_before=$(cpu_snapshot)
  start=$(date +%s.%N)
  local perf_pid=
  if [ -n "${PERF:-}" ]; then
    # Samples the server's call stacks during the UAC run (perf on CPU 1 with SIPp; stopped
    # with SIGINT right after the run). Read with: perf report -i DIR/perf.data --no-children
    taskset -c 1 perf record -F "${PERF_FREQ:-999}" --call-graph "${PERF_CALLGRAPH:-dwarf}" -p "$server" -o "$dir/perf.data" \
      >"$dir/perf.log" 2>&1 &
    perf_pid=$!
  fi
  UAC_SCENARIO=$scenario RURI=$ruri UAC_AUTH_URI=$auth_uri run_uac "$port" "$rate" "$calls" "$timeout" "$dir"
  if [ -n "$perf_pid" ]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
    echo "perf samples: $dir/perf.data"
  fi
  end=$(date +%s.%N)
  need_alive "$server" "$dir/moonroute.log"
  cpu_after=$(cpu_ticks "$server")
  [ -z "$redis_pid" ] || redis_after=$(cpu_ticks "$redis_pid")
  wait_after=$(sched_wait_ms "$server")
  snap_after=$(cpu_snapshot)
  stop_pid "$UAS_PID"; UAS_PID=

  print_call_stats "$dir"
  local wall cpu_s achieved per_call
  wall=$(echo "$end - $start" | bc -l)
  cpu_s=$(echo "($cpu_after - $cpu_before) / $ticks" | bc -l)
  achieved=$(echo "$OK / $wall" | bc -l)
  per_call=$(if [ "$OK" -gt 0 ]; then echo "$cpu_s * 1000 / $OK" | bc -l; else echo 0; fi)
  printf 'wall: %.2f s  offered: %s calls/s  achieved: %.1f calls/s\n' "$wall" "$rate" "$achieved"
  printf 'server CPU: %.2f s => %.3f CPU ms per call => %.0f calls/s per core at 100%% CPU\n' \
    "$cpu_s" "$per_call" "$(if [ "$(echo "$per_call > 0" | bc)" = 1 ]; then echo "1000 / $per_call" | bc -l; else echo 0; fi)"
  if [ -n "$redis_pid" ] && [ "$OK" -gt 0 ]; then
    printf 'redis-server CPU: %.3f CPU ms per call\n' \
      "$(echo "($redis_after - $redis_before) / $ticks * 1000 / $OK" | bc -l)"
  fi
  printf 'server run-queue wait: %s ms; %s\n' "$((wait_after - wait_before))" \
    "$(cpu_busy_pct "$snap_before" "$snap_after")"
  print_hand_overs "$bin" "$dir/ctl" "$OK"
  local warnings
  warnings=$(grep -c . "$dir/moonroute.log" || true)
  [ "$warnings" = 0 ] || echo "server log: $warnings lines (warn and above), in $dir/moonroute.log"
  echo
  printf '%s %s %s %.1f %.4f\n' "$mode" "$OK" "$FAILED" "$achieved" "$per_call" >>"$work/summary"
  [ "$FAILED" = 0 ] || failed_runs=$((failed_runs + 1))

  stop_server "$server" >/dev/null || true
  server=
}

for mode in $modes; do
  run_mode "$mode"
done

echo "== summary ($calls calls per run, offered $rate calls/s; Kamailio 5.6 bar: 0.5-0.85 CPU ms per call)"
printf '%-7s %8s %7s %10s %12s\n' run ok failed calls/s 'CPU ms/call'
awk '{ printf "%-7s %8s %7s %10s %12.3f\n", $1, $2, $3, $4, $5 }' "$work/summary"
ms() { awk -v m="$1" '$1 == m { print $5 }' "$work/summary"; }
ratio() {
  local a b
  a=$(ms "$1") b=$(ms "$2")
  if [ -n "$a" ] && [ -n "$b" ] && [ "$(echo "$b > 0" | bc)" = 1 ]; then
    printf '%s / %s: %.2f\n' "$1" "$2" "$(echo "$a / $b" | bc -l)"
  fi
}
ratio auth noauth
ratio auth relay
ratio noauth relay
ratio noauth nodlg
if [ "$failed_runs" != 0 ]; then
  echo "some calls failed: SIPp logs and error files kept in $work" >&2
  exit 1
fi
