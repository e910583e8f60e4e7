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
# sip:uas@127.0.0.1:DEST_PORT). Runs in the background so the EXIT trap can stop it
# (UAC_PID), and waits for it. Its exit code is not an error here: the stat file says what happened.
run_uac() {
  local dport=$1 rate=$2 calls=$3 timeout=$4 dir=$5
  taskset -c 1 sipp -sf bench/call-uac.xml -i 127.0.0.1 -p "${UAC_PORT:-15070}" \
    -key ruri "${RURI:-sip:uas@127.0.0.1:$dport}" -r "$rate" -m "$calls" -l "${MAX_CALLS:-5000}" -d "${HOLD_MS:-0}" \
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
