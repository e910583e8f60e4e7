#!/usr/bin/env bash
# Hot reload under load, on loopback only: SIPp calls run through moonroute (bench/relay.lua) at
# a fixed rate while the script file is rewritten 10 times the way editors save (write a temp
# file, rename it over the script); saves 4 and 8 are broken scripts.
#
#   bench/reload.sh [RATE] [CALLS]        defaults: 200 calls/s, 8000 calls (~40 s)
#
# Checks: no failed call; after each valid save the new VERSION answers within 1 s (measured by
# bench/version-probe.py from the moment of the rename); after a broken save the old version
# keeps answering. Prints the per-loop switch pause the server logged ("pause_us").
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
rate=${1:-200}
calls=${2:-8000}
port=${PORT:-15060}
uas_port=${UAS_PORT:-15080}
timeout=${TIMEOUT:-120s}
need_sipp
cargo build --release --quiet
bin=target/release/moonroute

work=$(mktemp -d /tmp/moonroute-reload.XXXXXX)
UAS_PID= UAC_PID= server= uac_wait=
cleanup() { stop_pid "$UAC_PID"; stop_pid "$UAS_PID"; stop_pid "$server"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

script=$work/relay.lua
write_version() { # write_version N [broken]: save-by-rename of VERSION vN
  local tmp=$work/.relay.lua.tmp
  sed -e "s/@UAS_PORT@/$uas_port/" -e "s/^VERSION = .*/VERSION = \"v$1\"/" bench/relay.lua >"$tmp"
  if [ "${2:-}" = broken ]; then echo "function on_request(req) return req:reply(500 end" >>"$tmp"; fi
  mv "$tmp" "$script"
}
write_version 0

start_uas "$uas_port" "$calls" "$timeout" "$work"
launch_moonroute "$bin" "${SERVER_CPUS:-0}" "$work/moonroute.log" "$port" "" \
  run --listen "udp:127.0.0.1:$port" --workers "${WORKERS:-1}" \
  --script "$script" --control-socket "$work/ctl" --log-level info

run_uac "$port" "$rate" "$calls" "$timeout" "$work" &
uac_wait=$!
sleep 2
current=0
for i in $(seq 1 10); do
  if [ "$i" = 4 ] || [ "$i" = 8 ]; then
    write_version "$i" broken
    if python3 bench/version-probe.py "$port" "v$current" --hold --timeout 1.5 >"$work/probe.txt"; then
      echo "save $i (broken): refused, v$current kept serving ($(cat "$work/probe.txt"))"
    else
      echo "save $i (broken): FAILED: $(cat "$work/probe.txt")"; exit 1
    fi
  else
    saved=$(date +%s.%N)
    write_version "$i"
    if took=$(python3 bench/version-probe.py "$port" "v$i" --timeout 5 --since "$saved"); then
      echo "save $i: v$i answering $took s after the save"
      current=$i
    else
      echo "save $i: v$i not live after 5 s"; exit 1
    fi
  fi
  sleep 1.5
done
wait "$uac_wait" || true
stop_pid "$UAS_PID"; UAS_PID=
print_call_stats "$work"
echo "server log: $(grep -c 'script reloaded' "$work/moonroute.log") reloads accepted, $(grep -c 'script refused' "$work/moonroute.log") refused"
grep -o 'pause_us=[0-9]*' "$work/moonroute.log" | cut -d= -f2 | sort -n | awk '{a[NR]=$1} END {if (NR) printf "event loop pause per switch: min %d us, median %d us, max %d us (%d switches)\n", a[1], a[int((NR+1)/2)], a[NR], NR}'
if [ "$FAILED" != 0 ]; then echo "calls failed: logs kept in $work" >&2; exit 1; fi
rm -rf "$work"
