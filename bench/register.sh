#!/usr/bin/env bash
# Load the registrar of a release moonroute with SIPp REGISTERs, on loopback only.
#
#   bench/register.sh [RATE] [COUNT]        defaults: 2000 REGISTER/s, 20000 REGISTERs
#
# SIPp (127.0.0.1:15170, CPU 1) -> moonroute (udp:127.0.0.1:15160, scripts/default.lua, CPU 0).
# Each REGISTER adds a new AOR sip:u<N>@127.0.0.1:15160 with one binding (bench/register_uac.xml);
# with USERS=U the same U AORs are registered round-robin (bench/register_refresh_uac.xml), so
# after the first U every REGISTER refreshes a binding. The server starts on a fresh temporary
# data_dir with its own temporary config (location.store = $STORE, no script watcher, control
# socket in the temporary directory, log_level warn) and is stopped with SIGTERM at the end.
# With the durable store (sled, the default) the 200 OK waits for the group-commit flush that
# covers the write, so the response time includes that wait.
#
# Prints: achieved REGISTER/s, successful/failed REGISTERs (and SIPp's failure kinds and
# retransmissions), the REGISTER->200 response-time repartition, the server's CPU time over the
# run (utime+stime from /proc/PID/stat) and per 1000 REGISTERs, how long it waited for its CPU
# (run-queue time: another process or one of its own threads held CPU 0) and the busy share of
# CPU 0 and CPU 1 (other processes included: check the machine is not loaded), UDP datagrams
# dropped on full socket buffers (each one costs SIPp a retransmission, 500 ms), its RSS at
# the end, the store size on disk, and how long the SIGTERM shutdown took.
# Bounded: COUNT REGISTERs at most $MAX_CALLS outstanding, and SIPp gives up after $TIMEOUT.
#
# AUTH=1 (needs USERS=U): the shipped default.lua authenticates every REGISTER ([auth]
# algorithms = ["MD5"], SIPp's only one); users r1..rU are provisioned with `ctl user add`
# before the run and bench/register_auth_uac.xml answers each 401 (two REGISTERs per
# registration). Without AUTH the script is default.lua with AUTHENTICATE = false.
# STORE=redis: the location store on a redis-server the script starts (127.0.0.1:$REDIS_PORT,
# default 15379, pinned to $REDIS_CPUS, default 1, append-only file with appendfsync
# $APPENDFSYNC, default everysec); its CPU time is printed too (a REGISTER costs both).
# Environment: STORE (sled|memory|redis, default sled), WORKERS (event loops, default 1),
# SERVER_CPUS (taskset list for the server, default 0), USERS (refresh mode, see above),
# MAX_CALLS (SIPp -l, default 5000), TIMEOUT (SIPp -timeout, default 3 x COUNT/RATE + 30 s),
# CACHE_MB (sled page cache, default 16), MAX_BINDINGS (default 1000000 or 2 x COUNT),
# TRANSACTION_MEMORY_MB (limits.transaction_memory_mb), MAX_TRANSACTIONS (limits.max_transactions, deprecated; default: the server's. A REGISTER's transaction
# ends with its answer, so registrations alone do not approach it),
# PORT (default 15160), SIPP_PORT (default 15170), MOONROUTE (binary to run; default: build and
# run target/release/moonroute), KEEP=1 keeps the temporary directory.
# Exits 1 when any REGISTER failed (the SIPp logs and the server log are then kept).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
rate=${1:-2000}
count=${2:-20000}
PORT=${PORT:-15160}
need_free_udp_port "$PORT"
need_free_udp_port "${SIPP_PORT:-15170}"
STORE=${STORE:-sled}
WORKERS=${WORKERS:-1}
LOG_LEVEL=${LOG_LEVEL:-warn}
CACHE_MB=${CACHE_MB:-16}
MAX_BINDINGS=${MAX_BINDINGS:-$(( 2 * count > 1000000 ? 2 * count : 1000000 ))}
timeout=${TIMEOUT:-$(( 3 * count / rate + 30 ))s}
need_sipp
bin=$(moonroute_bin)

bench_workdir register

redis_pid=
if [ "$STORE" = redis ]; then
  start_bench_redis "$work" "${REDIS_PORT:-15379}" "${REDIS_CPUS:-1}"
fi
write_location_config "$work/moonroute.toml"
launch_moonroute "$bin" "${SERVER_CPUS:-0}" "$work/moonroute.log" "$PORT" 200 run --config "$work/moonroute.toml"

if [ -n "${AUTH:-}" ]; then
  [ -n "${USERS:-}" ] || { echo "AUTH=1 needs USERS=U (the provisioned users)" >&2; exit 2; }
  t0=$(date +%s.%N)
  provision_users "$bin" "$CTL" "$USERS"
  printf 'provisioned %s users with ctl user add in %.1f s\n' "$USERS" "$(echo "$(date +%s.%N) - $t0" | bc -l)"
fi
echo "moonroute $bin: store=$STORE workers=$WORKERS (CPU ${SERVER_CPUS:-0}), SIPp on CPU 1;" \
  "offered $rate REGISTER/s x $count${USERS:+ over $USERS users (refresh)}"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
rss_start=$(rss_kb "$server")
ticks=$(getconf CLK_TCK)
redis_cpu_before=$([ -z "$redis_pid" ] || cpu_ticks "$redis_pid")
measured_register_run "$PORT" "$rate" "$count" "$timeout" "$work" "$work/moonroute.log"
redis_cpu_after=$([ -z "$redis_pid" ] || cpu_ticks "$redis_pid")
rss_end=$(rss_kb "$server")
hwm_end=$(hwm_kb "$server")
du_live=$(du_kb "$DATA_DIR")

print_register_stats "$work"
wall=$(echo "$end - $start" | bc -l)
cpu_s=$(echo "($cpu_after - $cpu_before) / $ticks" | bc -l)
printf 'wall: %.2f s  offered: %s REGISTER/s  achieved: %.1f REGISTER/s (successful / wall)\n' \
  "$wall" "$rate" "$(echo "$OK / $wall" | bc -l)"
if [ "$OK" -gt 0 ]; then
  printf 'server CPU: %.2f s  => %.1f CPU ms per 1000 REGISTERs  => %.0f REGISTER/s per core at 100%% CPU\n' \
    "$cpu_s" "$(echo "$cpu_s * 1000000 / $OK" | bc -l)" \
    "$(if [ "$(echo "$cpu_s > 0" | bc)" = 1 ]; then echo "$OK / $cpu_s" | bc -l; else echo 0; fi)"
else
  printf 'server CPU: %.2f s  (no successful REGISTER)\n' "$cpu_s"
fi
if [ -n "$redis_pid" ] && [ "$OK" -gt 0 ]; then
  redis_s=$(echo "($redis_cpu_after - $redis_cpu_before) / $ticks" | bc -l)
  printf 'redis-server CPU: %.2f s  => %.1f CPU ms per 1000 REGISTERs; server + redis: %.1f\n' \
    "$redis_s" "$(echo "$redis_s * 1000000 / $OK" | bc -l)" \
    "$(echo "($cpu_s + $redis_s) * 1000000 / $OK" | bc -l)"
fi
echo "server waited for its CPU (run queue) $((wait_after - wait_before)) ms over the run;" \
  "machine (tick-sampled): $(cpu_busy_pct "$snap_before" "$snap_after");" \
  "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "server threads over the run (name CPU ms/run-queue ms/wake-ups):$(thread_times_diff "$work/threads-before" "$work/threads-after")"
echo "UDP over the run (all sockets): $(udp_drops "$udp_before" "$udp_after");" \
  "dropped on the server's socket: ${drops:-?}"
echo "server RSS: ${rss_start} kB at start, ${rss_end} kB at the end (peak ${hwm_end} kB)"
# `ctl ul count` where the binary has it: what the store holds (unexpired bindings).
if counts=$("$bin" ctl --socket "$CTL" ul count 2>/dev/null) && [[ $counts == *bindings* ]]; then
  echo "location (ctl ul count): $(echo "$counts" | tr '\n' ' ')"
fi
printf 'server stop (SIGTERM): '
stop_server "$server" 30 || true
server=
du_stopped=$(du_kb "$DATA_DIR")
echo "store on disk (du -sk data_dir): ${du_live} kB while running, ${du_stopped} kB after the stop"
warnings=$(grep -c . "$work/moonroute.log" || true)
if [ "$warnings" != 0 ]; then
  echo "server log: $warnings lines at $LOG_LEVEL or above, first ones:"
  head -5 "$work/moonroute.log" | cut -c1-300
fi
if [ "$FAILED" != 0 ] || [ "$OK" = 0 ]; then
  echo "some REGISTERs failed: SIPp logs, error file and server log kept in $work" >&2
  exit 1
fi
if [ -n "${KEEP:-}" ]; then echo "kept $work"; else rm -rf "$work"; fi
