#!/usr/bin/env bash
# TLS cost on a release moonroute, loopback only, with examples/tls_load.rs (Debian's SIPp has
# no TLS):
#
#   bench/tls.sh [HANDSHAKES] [CALLS] [IDLE]     defaults: 2000 handshakes, 2000 calls, 1000 idle
#
# (a) HANDSHAKES full TLS handshakes (no resumption), HS_CONCURRENCY (50) at a time;
# (b) CALLS calls with the UAC leg over one TLS connection, CALL_CONCURRENCY (20) in flight;
# (c) the same calls with the UAC leg over UDP (the UAS leg is UDP in both, in tls_load);
# (d) IDLE idle TLS connections (handshake done, nothing sent) on a fresh server: VmRSS before
#     and while they are held => KiB per connection; the same over plain TCP on another fresh
#     server for comparison.
# The server runs one event loop pinned to CPU 0 (SERVER_CPUS), tls_load runs on CPU 1
# (LOAD_CPUS). For each phase: the server's utime+stime from /proc/PID/stat per operation.
# Bounded: counts above, and each tls_load run gives up after TIMEOUT seconds (default 60).
# Environment: UDP_PORT (15260), TLS_PORT (15261), TCP_PORT (15262), UAS_PORT (15280),
# HS_CONCURRENCY, CALL_CONCURRENCY, IDLE_CONCURRENCY (50), TIMEOUT, MOONROUTE=path (skip the
# build), KEEP=1 (keep the temporary directory).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
handshakes=${1:-2000}
calls=${2:-2000}
idle=${3:-1000}
udp_port=${UDP_PORT:-15260}
tls_port=${TLS_PORT:-15261}
tcp_port=${TCP_PORT:-15262}
uas_port=${UAS_PORT:-15280}
timeout=${TIMEOUT:-60}
server_cpus=${SERVER_CPUS:-0}
load_cpus=${LOAD_CPUS:-1}
target=${CARGO_TARGET_DIR:-target}

if [ -n "${MOONROUTE:-}" ]; then
  bin=$MOONROUTE
else
  cargo build --release --quiet
  bin=$target/release/moonroute
fi
cargo build --release --quiet --example tls_load
load=$target/release/examples/tls_load

for p in "$udp_port" "$uas_port"; do need_free_udp_port "$p"; done
for p in "$tls_port" "$tcp_port"; do
  if ss -Htln "sport = :$p" 2>/dev/null | grep -q .; then
    echo "tcp port $p is already in use; set TLS_PORT/TCP_PORT" >&2
    exit 1
  fi
done

work=$(mktemp -d "${TMPDIR:-/tmp}/moonroute-tls.XXXXXX")
server= idle_pid=
cleanup() {
  stop_pid "$idle_pid"
  if [ -n "$server" ]; then stop_server "$server" >/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$load" certs --out "$work/certs" >/dev/null
# The shipped script authenticates; the load's REGISTERs and calls carry no credentials.
default_script_without_auth >"$work/default-noauth.lua"
cat >"$work/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$udp_port", "tls:127.0.0.1:$tls_port", "tcp:127.0.0.1:$tcp_port"]
script = "$work/default-noauth.lua"
data_dir = "$work/data"
log_level = "warn"
workers = 1

[proxy]
static_route = "sip:127.0.0.1:$uas_port"

[lua]
watch = false

[control]
socket = "$work/ctl"

[location]
store = "memory"

TOML
stream_bench_toml "$work" $((idle + 1000)) "$timeout" >>"$work/moonroute.toml"

# start_moonroute LOG: a fresh server on the ports above, CPU $server_cpus; sets $server.
start_moonroute() {
  start_stream_server "$bin" "$work/moonroute.toml" "$1" "$server_cpus" "$udp_port" "$tls_port"
}

ticks=$(getconf CLK_TCK)
declare -A summary

# measured NAME COUNT CMD...: runs tls_load (CPU $load_cpus), prints its output, and the
# server's CPU per operation; records a summary line.
measured() {
  local name=$1 count=$2 before after out cpu_s ok rate
  shift 2
  before=$(cpu_ticks "$server")
  out=$(taskset -c "$load_cpus" "$load" "$@" --timeout "$timeout" 2>&1) || true
  after=$(cpu_ticks "$server")
  need_alive "$server" "$work/moonroute.log"
  echo "$out" | sed 's/^/  /'
  ok=$(echo "$out" | grep -oE '(handshakes|calls) ok: [0-9]+' | grep -oE '[0-9]+$' || echo 0)
  rate=$(echo "$out" | grep -oE 'rate: [0-9.]+' | grep -oE '[0-9.]+$' || echo 0)
  cpu_s=$(echo "($after - $before) / $ticks" | bc -l)
  if [ "${ok:-0}" -gt 0 ]; then
    summary["$name"]=$(printf '%-22s %6s/%-6s ok  %8.1f /s  server CPU %6.2f s = %6.3f ms each (%5.0f /s per core)' \
      "$name" "$ok" "$count" "$rate" "$cpu_s" "$(echo "$cpu_s * 1000 / $ok" | bc -l)" \
      "$(if [ "$(echo "$cpu_s > 0" | bc)" = 1 ]; then echo "$ok / $cpu_s" | bc -l; else echo 0; fi)")
  else
    summary["$name"]=$(printf '%-22s nothing succeeded (server CPU %.2f s)' "$name" "$cpu_s")
  fi
  echo "  ${summary["$name"]}"
}

# idle_rss NAME TRANSPORT: a fresh server, VmRSS before, with $idle connections held, and
# after they closed.
idle_rss() {
  local name=$1 transport=$2 port=$3 rss0 rss1 rss2 opened
  start_moonroute "$work/moonroute-$name.log"
  sleep 0.3
  rss0=$(rss_kb "$server")
  rm -f "$work/idle.in"; mkfifo "$work/idle.in"
  taskset -c "$load_cpus" "$load" idle --server "127.0.0.1:$port" --ca "$work/certs/ca.pem" \
    --transport "$transport" --connections "$idle" --concurrency "${IDLE_CONCURRENCY:-50}" \
    --hold-secs "$timeout" --timeout "$((timeout + 10))" <"$work/idle.in" >"$work/idle.out" 2>&1 &
  idle_pid=$!
  exec 3>"$work/idle.in"
  for _ in $(seq 1 $((timeout * 10))); do
    grep -q '^holding' "$work/idle.out" && break
    kill -0 "$idle_pid" 2>/dev/null || break
    sleep 0.1
  done
  sleep 1  # the server's side of the last handshakes
  rss1=$(rss_kb "$server")
  opened=$(grep -oE '^holding [0-9]+' "$work/idle.out" | grep -oE '[0-9]+$' || echo 0)
  echo >&3 || true
  exec 3>&-
  wait "$idle_pid" || true
  idle_pid=
  sleep 0.5
  need_alive "$server" "$work/moonroute-$name.log"
  rss2=$(rss_kb "$server")
  sed 's/^/  /' "$work/idle.out"
  if [ "${opened:-0}" -gt 0 ]; then
    summary["$name"]=$(printf '%-22s %6s idle: VmRSS %s -> %s kB (%s kB after close) = %.1f KiB per connection' \
      "$name" "$opened" "$rss0" "$rss1" "$rss2" "$(echo "($rss1 - $rss0) / $opened" | bc -l)")
  else
    summary["$name"]=$(printf '%-22s no connection opened' "$name")
  fi
  echo "  ${summary["$name"]}"
  log_noise "$work/moonroute-$name.log"
  stop_server "$server" >/dev/null || true
  server=
}

echo "moonroute: $bin (1 worker, CPU $server_cpus); tls_load on CPU $load_cpus; work dir $work"
start_moonroute "$work/moonroute.log"

echo "(a) $handshakes TLS handshakes, concurrency ${HS_CONCURRENCY:-50}"
measured "handshakes (TLS)" "$handshakes" handshakes --server "127.0.0.1:$tls_port" \
  --ca "$work/certs/ca.pem" --count "$handshakes" --concurrency "${HS_CONCURRENCY:-50}"
echo "(b) $calls calls, UAC over TLS, concurrency ${CALL_CONCURRENCY:-20}"
measured "calls (UAC over TLS)" "$calls" calls --transport tls --server "127.0.0.1:$tls_port" \
  --ca "$work/certs/ca.pem" --uas "127.0.0.1:$uas_port" --calls "$calls" \
  --concurrency "${CALL_CONCURRENCY:-20}"
echo "(c) $calls calls, UAC over UDP, concurrency ${CALL_CONCURRENCY:-20}"
measured "calls (UAC over UDP)" "$calls" calls --transport udp --server "127.0.0.1:$udp_port" \
  --uas "127.0.0.1:$uas_port" --calls "$calls" --concurrency "${CALL_CONCURRENCY:-20}"
echo "  server VmRSS $(rss_kb "$server") kB, peak $(hwm_kb "$server") kB"
log_noise "$work/moonroute.log"
stop_server "$server" >/dev/null || true
server=

echo "(d) $idle idle connections, each on a fresh server"
idle_rss "idle TLS" tls "$tls_port"
idle_rss "idle TCP" tcp "$tcp_port"

echo
echo "summary (server: 1 event loop on CPU $server_cpus; CPU = utime+stime from /proc)"
for name in "handshakes (TLS)" "calls (UAC over TLS)" "calls (UAC over UDP)" "idle TLS" "idle TCP"; do
  echo "  ${summary["$name"]:-$name: not run}"
done
