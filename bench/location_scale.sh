#!/usr/bin/env bash
# Memory per binding and restart time of the durable location store, on loopback only.
#
#   bench/location_scale.sh [N]        default: 100000 bindings
#
# 1. Starts a release moonroute (scripts/default.lua, location.store = sled on a fresh
#    temporary data_dir, max_bindings well above N, one worker on CPU 0), records its RSS, has
#    SIPp (CPU 1) register N distinct AORs (bench/register_uac.xml: sip:u<i>@127.0.0.1:PORT, one
#    binding each, Expires 3600) at $RATE REGISTER/s and records the RSS again (a REGISTER's
#    server transaction ends with its answer, so this is bindings plus what the burst left in
#    the allocator); with SETTLE=S it is taken a third time S s later (default 0: skipped).
#    Each difference over the successful REGISTERs is reported as bytes per binding (the
#    in-memory index, sled's page cache up to cache_mb, what the allocator keeps).
# 2. Stops it with SIGTERM (timed) and restarts it on the same data_dir: the restart time is
#    from launching the process until it answers an OPTIONS (bench/options-probe.py, one every
#    5 ms); the server's own "location database loaded" log line gives the load time (ms=) and
#    what it found (aors=, bindings=, expired=, corrupt=), checked against the acknowledged
#    REGISTERs. Then the RSS with the N bindings loaded from disk and no traffic (the cleanest
#    per-binding figure), and a last SIGTERM.
# Bounded: N REGISTERs at most $MAX_CALLS outstanding, SIPp gives up after $TIMEOUT, the probe
# after 120 s.
#
# Environment: RATE (default 5000; lower it if REGISTERs fail), MAX_CALLS (SIPp -l, default
# 5000), TRANSACTION_MEMORY_MB (limits.transaction_memory_mb), MAX_TRANSACTIONS (limits.max_transactions, deprecated; default: the server's), TIMEOUT (SIPp -timeout, default 3 x N/RATE +
# 30 s), SETTLE, STORE (default sled; memory measures the in-memory store alone and skips the
# restart), WORKERS (default 1), CACHE_MB (default 16), PORT (default 15160), SIPP_PORT
# (default 15170), MOONROUTE (binary; default: build and run target/release/moonroute),
# KEEP=1 keeps the temporary directory.
# Exits 1 when any REGISTER failed or the restarted server did not answer.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
n=${1:-100000}
rate=${RATE:-5000}
PORT=${PORT:-15160}
need_free_udp_port "$PORT"
need_free_udp_port "${SIPP_PORT:-15170}"
STORE=${STORE:-sled}
WORKERS=${WORKERS:-1}
# The registrar at warn, the location store at info for its "location database loaded" line.
LOG_LEVEL=${LOG_LEVEL:-warn,moonroute::location=info}
CACHE_MB=${CACHE_MB:-16}
MAX_BINDINGS=${MAX_BINDINGS:-$(( 4 * n > 1000000 ? 4 * n : 1000000 ))}
settle=${SETTLE:-0}
timeout=${TIMEOUT:-$(( 3 * n / rate + 30 ))s}
need_sipp
bin=$(moonroute_bin)

bench_workdir location-scale
write_location_config "$work/moonroute.toml"
status=0

# start_server LOG: launches the server on CPU 0 (sets server), waits up to 120 s for the port.
start_server() {
  launch_moonroute "$bin" "${SERVER_CPUS:-0}" "$1" "$PORT" 2400 run --config "$work/moonroute.toml"
}
ul_count() { # what the store holds, where the binary has `ctl ul count`
  local counts
  if counts=$("$bin" ctl --socket "$CTL" ul count 2>/dev/null) && [[ $counts == *bindings* ]]; then
    echo "  location (ctl ul count): $(echo "$counts" | tr '\n' ' ')"
  fi
}
loaded_line() { # the fields of the server's "location database loaded" log line
  grep -a 'location database loaded' "$1" | tail -1 | grep -oE '(aors|bindings|expired|corrupt|ms)=[0-9]+' \
    | tr '\n' ' ' || true
}

echo "moonroute $bin: store=$STORE workers=$WORKERS (CPU ${SERVER_CPUS:-0}), SIPp on CPU 1;" \
  "$n AORs at $rate REGISTER/s; max_bindings=$MAX_BINDINGS cache_mb=$CACHE_MB"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

echo "== 1. registering $n AORs"
start_server "$work/moonroute-1.log"
sleep 0.5
rss0=$(rss_kb "$server")
ticks=$(getconf CLK_TCK)
measured_register_run "$PORT" "$rate" "$n" "$timeout" "$work" "$work/moonroute-1.log"
sleep 0.5
rss1=$(rss_kb "$server")
hwm1=$(hwm_kb "$server")
du_live=$(du_kb "$DATA_DIR")
print_register_stats "$work" >"$work/stats.txt"
sed 's/^/  /' "$work/stats.txt"
wall=$(echo "$end - $start" | bc -l)
cpu_s=$(echo "($cpu_after - $cpu_before) / $ticks" | bc -l)
printf '  wall: %.2f s  achieved: %.1f REGISTER/s  server CPU: %.2f s (%.1f ms per 1000)\n' \
  "$wall" "$(echo "$OK / $wall" | bc -l)" "$cpu_s" \
  "$(if [ "$OK" -gt 0 ]; then echo "$cpu_s * 1000000 / $OK" | bc -l; else echo 0; fi)"
echo "  server waited for its CPU (run queue) $((wait_after - wait_before)) ms over the run;" \
  "machine (tick-sampled): $(cpu_busy_pct "$snap_before" "$snap_after")"
echo "  server threads over the run (name CPU ms/run-queue ms/wake-ups):$(thread_times_diff "$work/threads-before" "$work/threads-after")"
echo "  UDP over the run (all sockets): $(udp_drops "$udp_before" "$udp_after");" \
  "dropped on the server's socket: ${drops:-?}"
printf '  server RSS: %s kB before, %s kB after (peak %s kB) => %.0f bytes per binding (%s bindings)\n' \
  "$rss0" "$rss1" "$hwm1" \
  "$(if [ "$OK" -gt 0 ]; then echo "($rss1 - $rss0) * 1024 / $OK" | bc -l; else echo 0; fi)" "$OK"
ul_count
if [ "$settle" -gt 0 ]; then
  sleep "$settle"
  rss_settled=$(rss_kb "$server")
  printf '  server RSS %s s later (the allocator may keep what the burst used): %s kB => %.0f bytes per binding\n' \
    "$settle" "$rss_settled" \
    "$(if [ "$OK" -gt 0 ]; then echo "($rss_settled - $rss0) * 1024 / $OK" | bc -l; else echo 0; fi)"
fi
printf '  server stop (SIGTERM): '
stop_server "$server" 60 || status=1
server=
du_stopped=$(du_kb "$DATA_DIR")
echo "  first start: $(loaded_line "$work/moonroute-1.log")"
printf '  store on disk: %s kB while running, %s kB after the stop => %.0f bytes per binding\n' \
  "$du_live" "$du_stopped" \
  "$(if [ "$OK" -gt 0 ]; then echo "$du_stopped * 1024 / $OK" | bc -l; else echo 0; fi)"
[ "$FAILED" = 0 ] && [ "$OK" -gt 0 ] || status=1

if [ "$STORE" = sled ]; then
  echo "== 2. restart on the same data_dir"
  launched=$(date +%s.%N)
  taskset -c "${SERVER_CPUS:-0}" "$bin" run --config "$work/moonroute.toml" 2>"$work/moonroute-2.log" &
  server=$!
  if answered=$(python3 bench/options-probe.py "$PORT" --since "$launched" --timeout 120); then
    echo "  launch -> first 200 to OPTIONS: $answered"
  else
    echo "  restart: $answered"; status=1
  fi
  loaded=$(loaded_line "$work/moonroute-2.log")
  echo "  server log: $loaded"
  # Every acknowledged REGISTER must be back, and nothing else (another client on the port?).
  if [[ $loaded != *"aors=$OK bindings=$OK "* ]]; then
    echo "  MISMATCH: $OK REGISTERs were acknowledged, the restart loaded: $loaded"; status=1
  fi
  sleep 0.5
  if kill -0 "$server" 2>/dev/null; then
    rss2=$(rss_kb "$server")
    printf '  server RSS after loading: %s kB (peak %s kB) => %.0f bytes per binding over the fresh start\n' \
      "$rss2" "$(hwm_kb "$server")" \
      "$(if [ "$OK" -gt 0 ]; then echo "($rss2 - $rss0) * 1024 / $OK" | bc -l; else echo 0; fi)"
    ul_count
  fi
  printf '  server stop (SIGTERM): '
  stop_server "$server" 60 || status=1
  server=
fi
echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
warnings=$(cat "$work"/moonroute-*.log | grep -av 'location database loaded' | grep -c . || true)
if [ "$warnings" != 0 ]; then
  echo "server logs: $warnings other lines at warn or above, first ones:"
  cat "$work"/moonroute-*.log | grep -av 'location database loaded' | head -5 | cut -c1-300
fi
if [ "$status" != 0 ]; then
  echo "something failed: SIPp logs, error file and server logs kept in $work" >&2
  exit 1
fi
if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
