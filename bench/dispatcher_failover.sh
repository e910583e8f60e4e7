#!/usr/bin/env bash
# Pull the plug on a gateway during a SIPp run through the shipped balancer (issue 20's proof),
# on loopback only.
#
#   bench/dispatcher_failover.sh [RATE] [SECONDS] [KILL_AT]   defaults: 100 calls/s, 30 s, 10 s
#
# UAC SIPp (127.0.0.1:$UAC_PORT) -> moonroute with scripts/balancer.lua (udp:127.0.0.1:$PORT)
# -> three UAS SIPp gateways (127.0.0.1:$UAS_PORT, +1, +2), dispatcher set 1, round robin.
# KILL_AT seconds into the run the third gateway's SIPp gets SIGKILL: its port goes silent.
# Calls the balancer sends it then hear nothing and fail over after the script's failure timer
# (req:t_set_fr(0, 2000)); the failed failover (408, [dispatcher] mark_on) or a failed probe
# takes it down. Each call is INVITE/100/180/200/ACK/BYE/200 (bench/call-uac.xml, whose 200 must
# come within 5 s of the INVITE).
#
# Prints: calls ok/failed at the caller, INVITE->200 times, how long after the kill `moonroute
# ctl ds list` showed the gateway inactive (polled every 50 ms), the dispatcher metrics and the
# server's state-change log lines. A call the dead gateway had already answered (its ACK/BYE
# window, about a millisecond with -d 0) or was ringing (180 sent, 200 not yet) dies with it:
# nothing can move an answered call to another gateway.
# Bounded: RATE*SECONDS calls, SIPp gives up after $TIMEOUT (default 120s).
# Environment: MOONROUTE (the binary; default: cargo build --release), PORT (default 15060),
# UAS_PORT (first gateway, default 15080), UAC_PORT (default 15070), TIMEOUT, LOG_LEVEL
# (default warn), WORKERS (default 1), SERVER_CPUS (default 0), ALGORITHM (default
# round_robin), PROBE_MS (probe interval, default 1000; 0: no probing, the failure timer alone).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
rate=${1:-100}
seconds=${2:-30}
kill_at=${3:-10}
calls=$((rate * seconds))
port=${PORT:-15060}
uas_port=${UAS_PORT:-15080}
timeout=${TIMEOUT:-120s}
probe_ms=${PROBE_MS:-1000}
need_sipp
need_free_udp_port "$port"
bin=$(moonroute_bin)

work=$(mktemp -d /tmp/moonroute-dsfail.XXXXXX)
UAS_PID= UAC_PID= server= watcher=
gateways=()
cleanup() {
  stop_pid "$UAC_PID"
  stop_pid "$watcher"
  for pid in "${gateways[@]}"; do stop_pid "$pid"; done
  stop_pid "$server"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A gateway: bench/call-uas.xml, and -aa so that it answers the OPTIONS probes 200.
for i in 0 1 2; do
  mkdir -p "$work/gw$i"
  taskset -c 1 sipp -sf bench/call-uas.xml -i 127.0.0.1 -p $((uas_port + i)) -m "$calls" -aa \
    -timeout "$timeout" -trace_stat -stf "$work/gw$i/uas-stat.csv" -trace_err \
    -error_file "$work/gw$i/uas-errors.log" -nostdin >"$work/gw$i/uas.log" 2>&1 &
  gateways+=("$!")
  wait_udp_port $((uas_port + i)) || { echo "gateway $i did not bind udp 127.0.0.1:$((uas_port + i))" >&2; exit 1; }
done
dead_uri="sip:127.0.0.1:$((uas_port + 2))"

grep -q '^local CALLERS = {}$' scripts/balancer.lua || { echo "balancer.lua has no 'local CALLERS = {}'" >&2; exit 1; }
sed -e 's/^local CALLERS = {}$/local CALLERS = { ["127.0.0.1"] = true }/' \
  -e "s/^local ALGORITHM = \"call_id\"$/local ALGORITHM = \"${ALGORITHM:-round_robin}\"/" \
  scripts/balancer.lua >"$work/balancer.lua"
if [ "$probe_ms" = 0 ]; then probing="probe_interval_secs = 0"; else
  probing="probe_interval_ms = $probe_ms
probe_timeout_ms = $((probe_ms / 2))
down_after = 1
up_after = 2"
fi
cat >"$work/balancer.toml" <<TOML
listen = ["udp:127.0.0.1:$port"]
script = "$work/balancer.lua"
data_dir = "$work/var"
log_level = "${LOG_LEVEL:-warn}"
workers = ${WORKERS:-1}

[lua]
watch = false

[control]
socket = "$work/ctl"

[location]
store = "memory"

[dialog]
cdr = false

[dispatcher]
$probing

[[dispatcher.set]]
id = 1
destinations = [
  { uri = "sip:127.0.0.1:$uas_port" },
  { uri = "sip:127.0.0.1:$((uas_port + 1))" },
  { uri = "$dead_uri" },
]
TOML

launch_moonroute "$bin" "${SERVER_CPUS:-0}" "$work/moonroute.log" "$port" "" run --config "$work/balancer.toml"
# Every gateway active before the first call (probes answered; at once without probing).
for try in $(seq 1 101); do
  [ "$("$bin" ctl --socket "$work/ctl" ds list 1 | grep -c 'state=active')" = 3 ] && break
  if [ "$try" = 101 ]; then
    echo "the gateways are not all active after 5 s:" >&2
    "$bin" ctl --socket "$work/ctl" ds list 1 >&2
    exit 1
  fi
  sleep 0.05
done
"$bin" ctl --socket "$work/ctl" ds list 1

# The plug, pulled KILL_AT s into the run; then `ctl ds list` polled until the gateway is
# inactive (bounded: 30 s).
(
  sleep "$kill_at"
  killed=$(date +%s.%N)
  kill -9 "${gateways[2]}"
  for _ in $(seq 1 600); do
    if "$bin" ctl --socket "$work/ctl" ds list 1 | grep -F "$dead_uri " | grep -q 'state=inactive'; then
      printf '%.3f\n' "$(echo "$(date +%s.%N) - $killed" | bc -l)" >"$work/inactive-after"
      break
    fi
    sleep 0.05
  done
) &
watcher=$!

start=$(date +%s.%N)
RURI="sip:+15551234@127.0.0.1:$port" run_uac "$port" "$rate" "$calls" "$timeout" "$work"
end=$(date +%s.%N)
wait "$watcher" || true
watcher=

OK=$(stat_field "$work/uac-stat.csv" 'SuccessfulCall(C)' || echo 0)
FAILED=$(stat_field "$work/uac-stat.csv" 'FailedCall(C)' || echo '?')
printf 'calls: %s offered at %s calls/s, ok: %s, failed at the caller: %s, wall %.1f s\n' \
  "$calls" "$rate" "$OK" "$FAILED" "$(echo "$end - $start" | bc -l)"
printf 'INVITE->200 response time (ms buckets, calls):'
stat_columns "$work/uac-stat.csv" 'ResponseTimeRepartitioninvite_' \
  | sed 's/^ResponseTimeRepartitioninvite_//' | tr '\n' ' ' | sed 's/^/ /'
echo
# (The gateways' own SIPp stat files are written once a minute: the listing's sent= counts
# say where the calls went.)
printf 'calls that waited for the failure timer (failovers of the killed gateway): %s\n' \
  "$("$bin" ctl --socket "$work/ctl" ds list 1 | grep -F "$dead_uri " | grep -oE 'failovers=[0-9]+' | cut -d= -f2)"
printf 'ctl ds list showed %s inactive %s s after the kill\n' "$dead_uri" \
  "$(cat "$work/inactive-after" 2>/dev/null || echo 'never (30 s)')"
"$bin" ctl --socket "$work/ctl" ds list 1
"$bin" ctl --socket "$work/ctl" stats moonroute_dispatcher | grep -vE '^#|state="(probing|disabled)"'
echo "state changes in the server's log:"
grep -E 'dispatcher destination' "$work/moonroute.log" | sed 's/^/  /' || true
if [ "$FAILED" != 0 ]; then
  echo "some calls failed: SIPp logs and error files kept in $work" >&2
  exit 1
fi
rm -rf "$work"
