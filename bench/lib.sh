# Helpers shared by the bench scripts (sourced, not run). Loopback only.

# need_sipp: fail early with an install hint.
need_sipp() {
  command -v sipp >/dev/null || { echo "sipp not found: apt-get install sip-tester" >&2; exit 1; }
}

# wait_udp_port PORT [TRIES]: wait (bounded: TRIES x 50 ms, default 100 = 5 s) until something
# listens on udp 127.0.0.1:PORT. Returns 1 on timeout.
wait_udp_port() {
  local port=$1 tries=${2:-100}
  for _ in $(seq 1 "$tries"); do
    if ss -Huln "sport = :$port" 2>/dev/null | grep -q "127.0.0.1:$port"; then return 0; fi
    sleep 0.05
  done
  return 1
}

# launch_moonroute BIN CPUS LOG UDP_PORT TRIES ARGS...: runs `BIN ARGS...` on CPUS with its
# stderr in LOG and waits for it on UDP_PORT (TRIES as wait_udp_port; empty for its default);
# sets $server, or prints the log and exits when the server did not start.
launch_moonroute() {
  local bin=$1 cpus=$2 log=$3 udp=$4 tries=${5:-100}
  shift 5
  taskset -c "$cpus" "$bin" "$@" 2>"$log" &
  server=$!
  if ! wait_udp_port "$udp" "$tries" || ! kill -0 "$server" 2>/dev/null; then
    echo "moonroute did not start on udp:127.0.0.1:$udp:" >&2
    cat "$log" >&2
    exit 1
  fi
}

# cpu_ticks PID: utime+stime of PID in clock ticks (fields 14 and 15 of /proc/PID/stat).
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# stat_field FILE COLUMN: value of COLUMN in the last line of a SIPp -trace_stat CSV.
stat_field() {
  local file=$1 name=$2 n
  n=$(head -1 "$file" | tr ';' '\n' | grep -nxF -- "$name" | cut -d: -f1)
  [ -n "$n" ] || return 1
  tail -1 "$file" | cut -d';' -f"$n"
}

# stat_columns FILE PREFIX: "name=value" for each column of the last line whose name starts with
# PREFIX (e.g. the response-time repartition of one rtd).
stat_columns() {
  local file=$1 prefix=$2
  paste -d= <(head -1 "$file" | tr ';' '\n') <(tail -1 "$file" | tr ';' '\n') | grep -F -- "$prefix" || true
}

# stop_pid PID: TERM, wait up to 2 s, then KILL. Only for processes the script started.
stop_pid() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.05; done
  kill -9 "$pid" 2>/dev/null || true
}

# start_uas PORT CALLS TIMEOUT DIR: the called-party SIPp (bench/call-uas.xml) on
# udp 127.0.0.1:PORT, CPU 1, in the background; sets UAS_PID. It stops by itself after CALLS
# calls or TIMEOUT (e.g. 120s); callers still stop_pid it in their EXIT trap.
start_uas() {
  local port=$1 calls=$2 timeout=$3 dir=$4
  taskset -c 1 sipp -sf bench/call-uas.xml -i 127.0.0.1 -p "$port" -m "$calls" \
    -timeout "$timeout" -trace_stat -stf "$dir/uas-stat.csv" -trace_err -error_file "$dir/uas-errors.log" \
    -nostdin >"$dir/uas.log" 2>&1 &
  UAS_PID=$!
  if ! wait_udp_port "$port"; then
    echo "the UAS SIPp did not bind udp 127.0.0.1:$port; see $dir/uas.log" >&2
    return 1
  fi
}

# run_uac DEST_PORT RATE CALLS TIMEOUT DIR: the calling SIPp (bench/call-uac.xml) on CPU 1,
# sending to udp 127.0.0.1:DEST_PORT from 127.0.0.1:$UAC_PORT (default 15070) at RATE calls/s,
# CALLS calls, hold time $HOLD_MS (default 0), INVITE Request-URI $RURI (default
# sip:uas@127.0.0.1:DEST_PORT), scenario $UAC_SCENARIO (default bench/call-uac.xml), and with
# $UAC_AUTH_URI set SIPp's -auth_uri (the digest uri its [authentication] puts after "sip:";
# SIPp's default is remote_ip:remote_port, which matches no Request-URI with a user). Runs in the
# background so the EXIT trap can stop it (UAC_PID), and waits for it. Its exit code is not an
# error here: the stat file says what happened.
run_uac() {
  local dport=$1 rate=$2 calls=$3 timeout=$4 dir=$5
  taskset -c 1 sipp -sf "${UAC_SCENARIO:-bench/call-uac.xml}" -i 127.0.0.1 -p "${UAC_PORT:-15070}" \
    -key ruri "${RURI:-sip:uas@127.0.0.1:$dport}" ${UAC_AUTH_URI:+-auth_uri "$UAC_AUTH_URI"} -r "$rate" -m "$calls" -l "${MAX_CALLS:-5000}" -d "${HOLD_MS:-0}" \
    -timeout "$timeout" -timeout_error -trace_stat -stf "$dir/uac-stat.csv" \
    -trace_err -error_file "$dir/uac-errors.log" \
    127.0.0.1:"$dport" -nostdin >"$dir/uac.log" 2>&1 &
  UAC_PID=$!
  wait "$UAC_PID" || true
  UAC_PID=
}

# print_call_stats DIR: successful/failed calls from the UAC's stat file (and the UAS's failures),
# plus the INVITE->200 response-time repartition. Sets OK and FAILED.
print_call_stats() {
  local dir=$1 uas_failed
  OK=$(stat_field "$dir/uac-stat.csv" 'SuccessfulCall(C)' || echo 0)
  FAILED=$(stat_field "$dir/uac-stat.csv" 'FailedCall(C)' || echo '?')
  uas_failed=$(stat_field "$dir/uas-stat.csv" 'FailedCall(C)' 2>/dev/null || echo '?')
  printf 'calls ok: %s  failed: %s  (UAS side failed: %s)\n' "$OK" "$FAILED" "$uas_failed"
  printf 'INVITE->200 response time (ms buckets, calls):'
  stat_columns "$dir/uac-stat.csv" 'ResponseTimeRepartitioninvite_' \
    | sed 's/^ResponseTimeRepartitioninvite_//' | tr '\n' ' ' | sed 's/^/ /'
  echo
}

# print_hand_overs BIN CTL CALLS: messages one event loop handed to another (the loop owning
# their dialog or client transaction), in all and per call, from `moonroute ctl stats`; nothing
# for a build without the counter (before issue 16) or with one loop.
print_hand_overs() {
  local bin=$1 ctl=$2 calls=$3 stats handed dropped
  stats=$("$bin" ctl --socket "$ctl" stats moonroute_hand_overs 2>/dev/null) || return 0
  handed=$(awk '$1 == "moonroute_hand_overs_total" { print $2 }' <<<"$stats")
  dropped=$(awk '$1 == "moonroute_hand_overs_dropped_total" { print $2 }' <<<"$stats")
  [ -n "$handed" ] || return 0
  printf 'hand-overs between event loops: %s (%.2f per call), dropped: %s\n' "$handed" \
    "$(if [ "$calls" -gt 0 ]; then echo "$handed / $calls" | bc -l; else echo 0; fi)" "${dropped:-0}"
}

# print_udp_batches BIN CTL: UDP datagrams per system call (moonroute_udp_batch_size from
# `moonroute ctl stats`), received and sent: calls, datagrams, mean, and how many calls moved
# 1, 2, 3-4, 5-8, 9-16, 17-32 datagrams; nothing for a build without the histogram.
print_udp_batches() {
  local stats
  stats=$("$1" ctl --socket "$2" stats moonroute_udp_batch_size 2>/dev/null) || return 0
  awk '
    match($0, /direction="[a-z]+"/) {
      dir = substr($0, RSTART + 11, RLENGTH - 12)
      if ($1 ~ /_bucket/ && match($1, /le="[^"]+"/)) { le = substr($1, RSTART + 4, RLENGTH - 5); cum[dir, le] = $2 }
      if ($1 ~ /_sum/) sum[dir] = $2
      if ($1 ~ /_count/) { count[dir] = $2; dirs[dir] = 1 }
    }
    END {
      for (d in dirs) {
        if (count[d] == 0) continue
        printf "UDP %s: %d system calls, %d datagrams, %.2f per call; calls with 1/2/3-4/5-8/9-16/17-32:", \
          (d == "in" ? "received" : "sent"), count[d], sum[d], sum[d] / count[d]
        prev = 0; n = split("1 2 4 8 16 32", les, " ")
        for (i = 1; i <= n; i++) { printf " %d", cum[d, les[i]] - prev; prev = cum[d, les[i]] }
        print ""
      }
    }' <<<"$stats"
}

# log_noise LOG: how many lines the server logged (log_level warn), and the commonest ones.
log_noise() {
  local n
  n=$(wc -l <"$1")
  if [ "$n" -gt 0 ]; then
    echo "  server log: $n lines; commonest (timestamps stripped):"
    sed -E 's/^[^ ]+ +//' "$1" | cut -c1-160 | sort | uniq -c | sort -rn | head -5 | sed 's/^/    /'
  fi
}

# --- registrar and location benches (register.sh, location_scale.sh) ---

# moonroute_bin: the binary to run. MOONROUTE=path uses that one as is; otherwise builds the
# release binary (cargo build --release) and uses it from ${CARGO_TARGET_DIR:-target}.
moonroute_bin() {
  if [ -n "${MOONROUTE:-}" ]; then
    [ -x "$MOONROUTE" ] || { echo "MOONROUTE=$MOONROUTE is not an executable" >&2; return 1; }
    echo "$MOONROUTE"
  else
    cargo build --release --quiet >&2
    echo "${CARGO_TARGET_DIR:-target}/release/moonroute"
  fi
}

# need_free_udp_port PORT: fail when something already listens on udp PORT. The server binds
# with SO_REUSEPORT, so a second server on the same port would start and share the load.
need_free_udp_port() {
  if ss -Hulnp "sport = :$1" 2>/dev/null | grep -q .; then
    echo "udp port $1 is already in use (another server or bench?); set PORT/SIPP_PORT:" >&2
    ss -Hulnp "sport = :$1" >&2
    exit 1
  fi
}

# need_alive PID LOG: exit 1, showing the end of LOG, when the server PID is gone.
need_alive() {
  if ! kill -0 "$1" 2>/dev/null; then
    echo "moonroute exited during the run; the end of its log:" >&2
    tail -20 "$2" >&2
    exit 1
  fi
}

# du_kb DIR: disk usage of DIR in kB (0 when it does not exist).
du_kb() { if [ -e "$1" ]; then du -sk "$1" | cut -f1; else echo 0; fi; }

# rss_kb PID / hwm_kb PID: VmRSS / VmHWM (peak RSS) of PID in kB.
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status"; }

# cpu_snapshot: "busy total" jiffies of cpu0 and cpu1 from /proc/stat, one line
# ("b0 t0 b1 t1"); busy excludes idle and iowait. cpu_busy_pct BEFORE AFTER prints the busy
# percentage of each CPU in between: what the whole machine (not only the bench) did there.
# Busy time is sampled at the timer tick while idle time is exact (tickless kernels), so work
# in short bursts (a server answering datagrams) is undercounted; a compiler hogging a CPU
# shows. sched_wait_ms PID below is the exact measure of contention for the server.
cpu_snapshot() {
  awk '$1 == "cpu0" || $1 == "cpu1" { busy = $2+$3+$4+$7+$8+$9; printf "%d %d ", busy, busy+$5+$6 }
       END { print "" }' /proc/stat
}
cpu_busy_pct() {
  local -a b=($1) a=($2)
  awk -v b0="${b[0]}" -v t0="${b[1]}" -v b1="${b[2]}" -v t1="${b[3]}" \
      -v a0="${a[0]}" -v u0="${a[1]}" -v a1="${a[2]}" -v u1="${a[3]}" 'BEGIN {
    printf "cpu0 %.0f%% busy, cpu1 %.0f%% busy", \
      (u0 > t0 ? 100 * (a0 - b0) / (u0 - t0) : 0), (u1 > t1 ? 100 * (a1 - b1) / (u1 - t1) : 0) }'
}

# udp_counters: "RcvbufErrors SndbufErrors" of the network namespace (/proc/net/snmp): UDP
# datagrams dropped because a socket's buffer was full, by every socket of the machine (on an
# otherwise quiet loopback: the bench's). udp_drops BEFORE AFTER prints the difference.
udp_counters() {
  awk '$1 == "Udp:" { if (!h) { for (i = 2; i <= NF; i++) col[$i] = i; h = 1 }
                      else { print $col["RcvbufErrors"], $col["SndbufErrors"] } }' /proc/net/snmp
}
udp_drops() {
  local -a b=($1) a=($2)
  echo "receive-buffer drops $((a[0] - b[0])), send-buffer drops $((a[1] - b[1]))"
}

# socket_drops PORT: datagrams the kernel dropped on the UDP socket(s) bound to 127.0.0.1:PORT
# (ss skmem d), summed; empty when nothing listens.
socket_drops() {
  ss -Huanm "sport = :$1" 2>/dev/null | grep -oE 'skmem:\([^)]*\)' | grep -oE ',d[0-9]+' | tr -d ',d' \
    | awk '{ s += $1; n++ } END { if (n) print s }'
}

# sched_wait_ms PID: milliseconds the threads of PID (those alive now) have spent runnable but
# waiting for a CPU (field 2 of /proc/PID/task/*/schedstat, exact): with the server pinned to
# one CPU, time another task (another process, or one of its own threads) held that CPU.
sched_wait_ms() {
  cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $2 } END { printf "%d", s / 1e6 }'
}

# thread_times PID: one line per thread of PID: "TID NAME RUN_NS WAIT_NS WAKES" (schedstat: time
# on a CPU, time runnable but waiting; status: voluntary context switches, i.e. how often the
# thread slept and was woken). thread_times_diff BEFORE_FILE AFTER_FILE prints, per thread name
# (threads of one name summed, a thread started in between counted from zero), the CPU and
# run-queue milliseconds and the wake-ups in between: "name CPU/RUNQ/WAKES".
thread_times() {
  local t
  for t in /proc/"$1"/task/*; do
    [ -r "$t/schedstat" ] || continue
    echo "${t##*/} $(tr ' ' '_' <"$t/comm") $(cut -d' ' -f1,2 "$t/schedstat")" \
      "$(awk '/^voluntary_ctxt_switches:/ {print $2}' "$t/status")"
  done 2>/dev/null
}
thread_times_diff() {
  awk 'NR == FNR { run[$1] = $3; wait[$1] = $4; wakes[$1] = $5; next }
       { r[$2] += ($3 - run[$1]) / 1e6; w[$2] += ($4 - wait[$1]) / 1e6; k[$2] += $5 - wakes[$1] }
       END { for (n in r) if (r[n] >= 1 || w[n] >= 1 || k[n] >= 1)
               printf " %s %.0f/%.0f/%d", n, r[n], w[n], k[n] }' "$1" "$2"
}

# write_location_config FILE: a moonroute config for the registrar benches, from the variables
# PORT, DATA_DIR, CTL, STORE (sled|memory|redis; redis at REDIS_URL), WORKERS, LOG_LEVEL, MAX_BINDINGS, CACHE_MB, and
# TRANSACTION_MEMORY_MB when set (limits.transaction_memory_mb; the server's default otherwise),
# and MAX_TRANSACTIONS when set (limits.max_transactions, deprecated: the server warns).
# default.lua (bench_default_script: 127.0.0.1 trusted) registers AORs of the listen address;
# no script watcher.
write_location_config() {
  : >"$1.limits"
  if [ -n "${TRANSACTION_MEMORY_MB:-}${MAX_TRANSACTIONS:-}" ]; then
    echo '[limits]' >>"$1.limits"
    [ -z "${TRANSACTION_MEMORY_MB:-}" ] || echo "transaction_memory_mb = $TRANSACTION_MEMORY_MB" >>"$1.limits"
    [ -z "${MAX_TRANSACTIONS:-}" ] || echo "max_transactions = $MAX_TRANSACTIONS" >>"$1.limits"
    echo >>"$1.limits"
  fi
  local script
  if [ -z "${AUTH:-}" ]; then
    # The shipped script authenticates; SIPp's plain REGISTERs carry no credentials.
    script="$(dirname "$1")/default-noauth.lua"
    default_script_without_auth >"$script"
  else
    script="$(dirname "$1")/default.lua"
    bench_default_script >"$script"
  fi
  cat >"$1" <<TOML
listen = ["udp:127.0.0.1:$PORT"]
script = "$script"
data_dir = "$DATA_DIR"
log_level = "$LOG_LEVEL"
workers = $WORKERS

[lua]
watch = false

[control]
socket = "$CTL"

[location]
store = "$STORE"
redis_url = "${REDIS_URL:-redis://127.0.0.1:6379/0}"
max_bindings = $MAX_BINDINGS
cache_mb = $CACHE_MB

TOML
  cat "$1.limits" >>"$1" && rm -f "$1.limits"
  if [ -n "${AUTH:-}" ]; then
    # SIPp's [authentication] does MD5 only.
    printf '[auth]\nalgorithms = ["MD5"]\n' >>"$1"
  fi
}

# bench_default_script: scripts/default.lua for a benchmark, on stdout: the same script with
# 127.0.0.1 and ::1 in TRUSTED. Every bench sends from 127.0.0.1, far over [pike]'s limit,
# and the shipped script trusts nobody: the copy keeps the benches' exemption (pike is not
# consulted for them), never the shipped script.
bench_default_script() {
  grep -q '^local TRUSTED = {}$' scripts/default.lua || {
    echo "scripts/default.lua has no 'local TRUSTED = {}' line" >&2
    return 1
  }
  sed 's/^local TRUSTED = {}$/local TRUSTED = { ["127.0.0.1"] = true, ["::1"] = true }/' \
    scripts/default.lua
}

# default_script_without_auth: bench_default_script with `local AUTHENTICATE = true` flipped to
# false, on stdout (for benches whose clients send no credentials).
default_script_without_auth() {
  grep -q '^local AUTHENTICATE = true' scripts/default.lua || {
    echo "scripts/default.lua has no 'local AUTHENTICATE = true' line" >&2
    return 1
  }
  bench_default_script | sed 's/^local AUTHENTICATE = true/local AUTHENTICATE = false/'
}

# default_script_without_dialogs: default_script_without_auth that tracks no call (its
# track_call's req:dlg_manage() commented out): what a call costs without dialog tracking and
# CDRs (calls_default.sh MODES=nodlg, dialog_memory.sh).
default_script_without_dialogs() {
  grep -q '^    return req:dlg_manage()$' scripts/default.lua || {
    echo "scripts/default.lua has no '    return req:dlg_manage()' line" >&2
    return 1
  }
  default_script_without_auth | sed 's/^    return req:dlg_manage()$/    return false -- req:dlg_manage() (not tracked: bench)/'
}

# provision_users BIN CTL USERS: `ctl user add rN@127.0.0.1 bench-pw` for N in 1..USERS (the
# users of bench/register_auth_uac.xml; realm = the To host of their REGISTERs).
provision_users() {
  local n
  for n in $(seq 1 "$3"); do
    "$1" ctl --socket "$2" user add "r$n@127.0.0.1" bench-pw >/dev/null
  done
}

# stop_server PID [SECONDS]: SIGTERM, then wait (bounded, default 30 s) for it to exit; KILL
# if it does not. Prints "exited in X s (status N)" or "KILLED after X s". Only for processes
# the script started.
stop_server() {
  local pid=$1 limit=${2:-30} t0 status=0
  [ -n "$pid" ] || return 0
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || status=$?; echo "already exited (status $status)"; return 0; }
  t0=$(date +%s.%N)
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 $((limit * 20))); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    printf 'KILLED after %.1f s (SIGTERM ignored)\n' "$(echo "$(date +%s.%N) - $t0" | bc -l)"
    return 1
  fi
  wait "$pid" 2>/dev/null || status=$?
  printf 'exited in %.2f s (status %s)\n' "$(echo "$(date +%s.%N) - $t0" | bc -l)" "$status"
}

# run_register_uac DEST_PORT RATE COUNT TIMEOUT DIR: SIPp on CPU 1 (127.0.0.1:$SIPP_PORT,
# default 15170) sending COUNT REGISTERs at RATE/s to udp 127.0.0.1:DEST_PORT, at most
# $MAX_CALLS (default 5000) outstanding. bench/register_uac.xml (a new AOR u<call_number> per
# call), or with $USERS set bench/register_refresh_uac.xml over USERS users reused round-robin.
# SIPp's default BYE for an aborted call is off: a REGISTER has no dialog to end.
# Background + wait, so an EXIT trap can stop it (UAC_PID).
run_register_uac() {
  local dport=$1 rate=$2 count=$3 timeout=$4 dir=$5 scenario=(-sf bench/register_uac.xml)
  if [ -n "${USERS:-}" ]; then
    { echo SEQUENTIAL; seq -f 'r%g' 1 "$USERS"; } >"$dir/users.csv"
    scenario=(-sf bench/register_refresh_uac.xml -inf "$dir/users.csv")
    if [ -n "${AUTH:-}" ]; then
      # field1: SIPp's [authentication] keyword per user (see bench/register_auth_uac.xml).
      { echo SEQUENTIAL
        seq -f 'r%g' 1 "$USERS" | awk '{ printf "%s;[authentication username=%s password=bench-pw]\n", $1, $1 }'
      } >"$dir/users.csv"
      scenario=(-sf bench/register_auth_uac.xml -inf "$dir/users.csv")
    fi
  fi
  taskset -c 1 sipp "${scenario[@]}" -i 127.0.0.1 -p "${SIPP_PORT:-15170}" \
    -r "$rate" -m "$count" -l "${MAX_CALLS:-5000}" -default_behaviors all,-bye \
    -timeout "$timeout" -timeout_error -trace_stat -fd 1 -stf "$dir/uac-stat.csv" \
    -trace_err -error_file "$dir/uac-errors.log" \
    127.0.0.1:"$dport" -nostdin >"$dir/uac.log" 2>&1 &
  UAC_PID=$!
  wait "$UAC_PID" || true
  UAC_PID=
}

# bench_workdir NAME: a fresh temporary directory $work (with $DATA_DIR and the control socket
# path $CTL in it) and traps that stop SIPp ($UAC_PID) and the server ($server) on exit.
bench_workdir() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/moonroute-$1.XXXXXX")
  DATA_DIR=$work/data
  CTL=$work/ctl
  UAC_PID= server=
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
}

# start_bench_redis DIR PORT CPUS: a redis-server for STORE=redis on 127.0.0.1:PORT (data in
# DIR, append-only file with appendfsync $APPENDFSYNC, default everysec), pinned to CPUS; sets
# redis_pid and REDIS_URL, and waits until it answers.
start_bench_redis() {
  command -v redis-server >/dev/null || { echo "STORE=redis needs redis-server (apt-get install redis-server)" >&2; exit 2; }
  need_free_tcp_port "$2"
  taskset -c "$3" redis-server --bind 127.0.0.1 --port "$2" --dir "$1" --save "" \
    --appendonly yes --appendfsync "${APPENDFSYNC:-everysec}" --protected-mode no \
    --logfile "$1/redis.log" &
  redis_pid=$!
  REDIS_URL="redis://127.0.0.1:$2/0"
  local i
  for i in $(seq 1 100); do
    grep -q "Ready to accept connections" "$1/redis.log" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "redis-server did not start:" >&2; cat "$1/redis.log" >&2; exit 1
}

# need_free_tcp_port PORT: exits when something listens on 127.0.0.1:PORT/tcp.
need_free_tcp_port() {
  if ss -Htln "sport = :$1" | grep -q .; then
    echo "tcp port $1 is in use" >&2; exit 1
  fi
}

bench_cleanup() {
  [ -z "${redis_pid:-}" ] || stop_pid "$redis_pid"
  stop_pid "$UAC_PID"
  if [ -n "$server" ]; then stop_server "$server" >/dev/null || true; fi
}

# measured_register_run PORT RATE COUNT TIMEOUT DIR SERVER_LOG: run_register_uac against the
# server $server with snapshots around it: sets cpu_before/cpu_after (CPU ticks),
# snap_before/snap_after (machine CPU), wait_before/wait_after (run-queue ms), udp_before/
# udp_after, drops (on the server's socket), start/end (wall clock); writes DIR/threads-before
# and DIR/threads-after; exits when the server died during the run.
measured_register_run() {
  local port=$1 rate=$2 count=$3 timeout=$4 dir=$5 log=$6
  cpu_before=$(cpu_ticks "$server")
  snap_before=$(cpu_snapshot)
  wait_before=$(sched_wait_ms "$server")
  thread_times "$server" >"$dir/threads-before"
  udp_before=$(udp_counters)
  start=$(date +%s.%N)
  run_register_uac "$port" "$rate" "$count" "$timeout" "$dir"
  end=$(date +%s.%N)
  need_alive "$server" "$log"
  snap_after=$(cpu_snapshot)
  wait_after=$(sched_wait_ms "$server")
  thread_times "$server" >"$dir/threads-after"
  udp_after=$(udp_counters)
  drops=$(socket_drops "$port")
  cpu_after=$(cpu_ticks "$server")
}

# print_register_stats DIR: counts from the SIPp stat file (sets OK and FAILED), the kinds of
# failure, retransmissions, the REGISTER->200 response-time repartition, and the status lines
# of unexpected responses found in the SIPp error file.
print_register_stats() {
  local dir=$1 f col v extra=
  OK=$(stat_field "$dir/uac-stat.csv" 'SuccessfulCall(C)' || echo 0)
  FAILED=$(stat_field "$dir/uac-stat.csv" 'FailedCall(C)' || echo '?')
  for col in 'Retransmissions(C)' 'FailedMaxUDPRetrans(C)' 'FailedUnexpectedMessage(C)' \
             'FailedCallRejected(C)' 'FailedCmdNotSent(C)' 'FailedRegexpDoesntMatch(C)' \
             'FailedOutboundCongestion(C)' 'FailedTimeoutOnRecv(C)' 'FailedTimeoutOnSend(C)' \
             'OutOfCallMsgs(C)' 'DeadCallMsgs(C)' 'AutoAnswered(C)'; do
    v=$(stat_field "$dir/uac-stat.csv" "$col" 2>/dev/null || true)
    if [ -n "$v" ] && [ "$v" != 0 ]; then extra+=" ${col%(C)}=$v"; fi
  done
  printf 'REGISTER ok: %s  failed: %s%s\n' "$OK" "$FAILED" "${extra:+  (}${extra# }${extra:+)}"
  printf 'REGISTER->200 response time (ms buckets: count):'
  stat_columns "$dir/uac-stat.csv" 'ResponseTimeRepartitionregister_' \
    | sed 's/^ResponseTimeRepartitionregister_//' | tr '\n' ' ' | sed 's/^/ /'
  echo
  f=$dir/uac-errors.log
  if [ -s "$f" ]; then
    echo "unexpected responses in the SIPp error file (status: occurrences):" \
      "$(grep -aoE "received 'SIP/2\.0 [0-9]{3}" "$f" | sort | uniq -c | awk '{printf " %s: %s", $4, $1}')"
  fi
}

# --- Kamailio side by side (bench/compare.sh, bench/overload.sh) ---

# need_kamailio: fail early with an install hint.
need_kamailio() {
  command -v kamailio >/dev/null && [ -e /usr/lib/x86_64-linux-gnu/kamailio/modules/app_lua.so ] || {
    echo "kamailio with app_lua not found: apt-get install kamailio kamailio-lua-modules" >&2
    exit 1
  }
}

# start_kamailio DIR PORT CHILDREN CPUS: Kamailio 5.6 (bench/kamailio/kamailio.cfg +
# kamailio.lua: registrar in memory, record-route, location lookup, t_relay) on udp
# 127.0.0.1:PORT with CHILDREN UDP workers, in the foreground of a background job pinned to
# the taskset list CPUS; log in DIR/kamailio.log. Sets server (the main process; its children
# are found by kamailio_pids).
start_kamailio() {
  local dir=$1 port=$2 children=$3 cpus=$4
  sed -e "s|@SCRIPT@|$PWD/bench/kamailio/kamailio.lua|" -e "s|@CHILDREN@|$children|" \
    bench/kamailio/kamailio.cfg >"$dir/kamailio.cfg"
  taskset -c "$cpus" kamailio -f "$dir/kamailio.cfg" -l "udp:127.0.0.1:$port" -DD -E \
    -m "${KAMAILIO_SHM_MB:-512}" -M 16 -Y "$dir" -P "$dir/kamailio.pid" >"$dir/kamailio.log" 2>&1 &
  server=$!
  if ! wait_udp_port "$port" 200 || ! kill -0 "$server" 2>/dev/null; then
    echo "kamailio did not start on udp:127.0.0.1:$port:" >&2
    tail -20 "$dir/kamailio.log" >&2
    return 1
  fi
}

# kamailio_pids PID: PID and its child processes (Kamailio's workers, timers, attendant).
kamailio_pids() { echo "$1" $(ps -o pid= --ppid "$1"); }

# tree_cpu_ticks PID: utime+stime of PID and its children (one process for moonroute).
tree_cpu_ticks() {
  local p s=0
  for p in $(kamailio_pids "$1"); do s=$((s + $(cpu_ticks "$p" 2>/dev/null || echo 0))); done
  echo "$s"
}

# tree_context_switches PID: voluntary and involuntary context switches of every thread of PID
# and of its children, summed (a voluntary one is a thread going to sleep: each costs a
# wake-up later).
tree_context_switches() {
  local p
  for p in $(kamailio_pids "$1"); do cat /proc/"$p"/task/*/status 2>/dev/null; done \
    | awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { printf "%d", s }'
}

# stream_bench_toml WORK MAX TIMEOUT: the [limits] and [tls] sections of a connection benchmark
# (tls.sh, ws.sh): room for MAX connections from 127.0.0.1, idle ones kept past the run's
# TIMEOUT, the certificates `tls_load certs` wrote under WORK/certs.
stream_bench_toml() {
  local work=$1 max=$2 timeout=$3
  cat <<TOML
[limits]
max_connections = $max
# Every connection here comes from 127.0.0.1, and the idle ones never send a message: the
# per-address limits and the first-message deadline are lifted for the measurement.
max_inbound_connections = $max
max_connections_per_ip = $max
max_pending_connections_per_ip = $max
tcp_header_timeout_ms = $(((timeout + 30) * 1000))
tcp_message_timeout_ms = $(((timeout + 30) * 1000))

[tls]
certificate = "$work/certs/server.pem"
private_key = "$work/certs/server.key"
ca_file = "$work/certs/ca.pem"
TOML
}

# start_stream_server BIN CONFIG LOG CPUS UDP_PORT STREAM_PORT...: starts moonroute on CPUS and
# waits for its UDP port and every stream listener; sets $server (exits if it did not start).
start_stream_server() {
  local bin=$1 config=$2 log=$3 cpus=$4 udp=$5 p
  shift 5
  launch_moonroute "$bin" "$cpus" "$log" "$udp" "" run --config "$config"
  for p in "$@"; do
    for _ in $(seq 1 100); do
      ss -Htln "sport = :$p" 2>/dev/null | grep -q . && break
      sleep 0.05
    done
  done
}
