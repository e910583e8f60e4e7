#!/usr/bin/env bash
# Memory over time under a steady load: DURATION seconds of calls and registrations through
# scripts/default.lua (digest auth off) at about 70 % of what one event loop carries, the
# server's RSS sampled every SAMPLE seconds with its transaction gauges, then IDLE seconds
# without traffic (does the memory come back?). Prints the samples as a table and a text
# curve, writes them to soak-rss.dat and draws soak-rss.svg with gnuplot (apt-get install
# gnuplot-nox; without it the SVG is skipped). Loopback only.
#
#   bench/soak.sh [DURATION] [CALL_RATE] [REG_RATE]
#   defaults: 1800 s, 0.7 x CAPACITY calls/s, CALL_RATE / 5 REGISTERs/s
#
# UAC SIPp 127.0.0.1:15070 ----calls----> moonroute udp:127.0.0.1:15060 --> UAS SIPp 127.0.0.1:15080
# REG SIPp 127.0.0.1:15170 --REGISTERs-->   (1 worker, CPU 0)                 (registered as callee)
#          (SIPp on CPU 1)
#
# Calls: bench/call-uac.xml to sip:callee@127.0.0.1:PORT (INVITE -> 100/180/200 -> ACK -> BYE
# -> 200, hold HOLD_MS), the callee registered from the UAS port first (as calls_default.sh
# noauth). Registrations: bench/register_refresh_uac.xml over USERS AORs round-robin, so every
# one after the first USERS refreshes a binding in the sled store (the re-registration case).
#
# Verdict: after WARMUP seconds (default: a third of DURATION, at most 300), every RSS sample
# of the load must stay within +-TOLERANCE % (default 10) of their mean; the script exits 1
# otherwise, or when calls or registrations failed beyond FAIL_PCT % (default 1; a shared
# machine drops a few).
#
# Environment: CAPACITY (calls/s this bench setup carries without failures: the server, and
# SIPp on one core, which is the limit; default 2000, what calls_default.sh noauth ran without a
# failure on a quiet machine, bench/README.md), SAMPLE (10 s), IDLE (90 s),
# WARMUP, TOLERANCE, FAIL_PCT, USERS (2000), HOLD_MS (0), PORT (15060), UAS_PORT (15080),
# UAC_PORT (15070), SIPP_PORT (15170), METRICS_PORT (19060), MAX_CALLS (SIPp -l, 5000),
# MOONROUTE=path (else cargo build --release), OUT=dir (where soak-rss.dat/.svg go; default
# the work directory, which is kept and named at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
duration=${1:-1800}
capacity=${CAPACITY:-2000}
call_rate=${2:-$((capacity * 7 / 10))}
reg_rate=${3:-$((call_rate / 5))}
sample=${SAMPLE:-10}
idle=${IDLE:-90}
warmup=${WARMUP:-$((duration / 3 < 300 ? duration / 3 : 300))}
tolerance=${TOLERANCE:-10}
fail_pct=${FAIL_PCT:-1}
users=${USERS:-2000}
port=${PORT:-15060}
uas_port=${UAS_PORT:-15080}
metrics_port=${METRICS_PORT:-19060}
[ "$duration" -ge $((2 * sample)) ] || { echo "DURATION must be at least 2 x SAMPLE ($sample s)" >&2; exit 1; }
need_sipp
need_free_udp_port "$port"
need_free_udp_port "$uas_port"
need_free_udp_port "${SIPP_PORT:-15170}"
bin=$(moonroute_bin)

work=$(mktemp -d "${TMPDIR:-/tmp}/moonroute-soak.XXXXXX")
out=${OUT:-$work}
mkdir -p "$out"
UAS_PID= UAC_PID= REG_PID= SAMPLER_PID= server=
cleanup() {
  local child
  # The registrations' SIPp runs under a subshell of this script: stop it by its id too.
  if [ -n "$REG_PID" ]; then for child in $(pgrep -P "$REG_PID" || true); do stop_pid "$child"; done; fi
  stop_pid "$SAMPLER_PID"; stop_pid "$UAC_PID"; stop_pid "$REG_PID"; stop_pid "$UAS_PID"
  if [ -n "$server" ]; then stop_server "$server" >/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The calls and the registrations each get SIPp's whole run; both are bounded by count and
# by -timeout (the load's length plus a minute).
calls=$((call_rate * duration))
registers=$((reg_rate * duration))
timeout=$((duration + 60))s

script=$work/default-noauth.lua
default_script_without_auth >"$script"
cat >"$work/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$port"]
script = "$script"
data_dir = "$work/data"
log_level = "warn"
workers = 1

[lua]
watch = false

[control]
socket = "$work/ctl"

[metrics]
listen = "127.0.0.1:$metrics_port"
TOML

launch_moonroute "$bin" 0 "$work/moonroute.log" "$port" "" run --config "$work/moonroute.toml"
if ! taskset -c 1 sipp -sf bench/register_callee.xml -i 127.0.0.1 -p "$uas_port" -m 1 \
    -timeout 10s -timeout_error -trace_err -error_file "$work/register-errors.log" \
    127.0.0.1:"$port" -nostdin >"$work/register.log" 2>&1; then
  echo "the callee's registration failed; see $work/register.log" >&2
  exit 1
fi
start_uas "$uas_port" "$calls" "$timeout" "$work"

# metric NAME: the value of an unlabelled sample of the server's /metrics, 0 when absent.
metric() {
  curl -s --max-time 2 "http://127.0.0.1:$metrics_port/metrics" 2>/dev/null \
    | awk -v n="$1" '$1 == n { printf "%d", $2; found = 1 } END { if (!found) printf "0" }'
}

# One line per sample: seconds since the start, RSS kB, live transactions, bytes charged to
# them (limits.transaction_memory_mb), and "load" or "idle".
t0=$(date +%s)
sampler() {
  local phase=load now
  while :; do
    now=$(date +%s)
    [ -e "$work/load-done" ] && phase=idle
    printf '%d %d %d %d %s\n' $((now - t0)) "$(rss_kb "$server")" \
      "$(metric moonroute_transactions_live)" "$(metric moonroute_transactions_memory_bytes)" \
      "$phase" >>"$work/samples"
    sleep "$sample"
  done
}
sampler &
SAMPLER_PID=$!

echo "== soak: ${duration} s at $call_rate calls/s and $reg_rate REGISTERs/s over $users AORs," \
  "then ${idle} s idle; RSS every ${sample} s; $(uptime | sed 's/.*load average/load average/')"
USERS=$users run_register_uac "$port" "$reg_rate" "$registers" "$timeout" "$work" &
REG_PID=$!
mkdir -p "$work/calls"
RURI="sip:callee@127.0.0.1:$port" run_uac "$port" "$call_rate" "$calls" "$timeout" "$work/calls"
wait "$REG_PID" || true
REG_PID=
touch "$work/load-done"
load_end=$(($(date +%s) - t0))
need_alive "$server" "$work/moonroute.log"
sleep "$idle"
stop_pid "$SAMPLER_PID"; SAMPLER_PID=
need_alive "$server" "$work/moonroute.log"
echo "after the idle period: $(uptime | sed 's/.*load average/load average/')"

# ----- results ---------------------------------------------------------------------------
cp "$work/uas-stat.csv" "$work/calls/uas-stat.csv" 2>/dev/null || true
print_call_stats "$work/calls"
calls_ok=$OK calls_failed=$FAILED
print_register_stats "$work"
regs_ok=$OK regs_failed=$FAILED

awk '{ printf "%d %.1f %d %.1f %s\n", $1, $2 / 1024, $3, $4 / 1048576, $5 }' "$work/samples" \
  >"$out/soak-rss.dat"
echo
echo "t (s)  RSS (MB)  live transactions  charged (MB)  phase"
awk '{ printf "%5d  %8.1f  %17d  %12.1f  %s\n", $1, $2, $3, $4, $5 }' "$out/soak-rss.dat"

echo
echo "RSS curve (one row per sample, # = RSS, scaled to the peak):"
awk '{ rss[NR] = $2; t[NR] = $1; ph[NR] = $5; if ($2 > max) max = $2 }
     END { for (i = 1; i <= NR; i++) {
             n = (max > 0) ? int(60 * rss[i] / max + 0.5) : 0; bar = ""
             for (j = 0; j < n; j++) bar = bar "#"
             printf "%5d s %7.1f MB %s%s\n", t[i], rss[i], bar, (ph[i] == "idle") ? "  (idle)" : "" } }' \
  "$out/soak-rss.dat"

if command -v gnuplot >/dev/null; then
  gnuplot <<GNUPLOT
set terminal svg size 900,500 dynamic font "sans,11"
set output "$out/soak-rss.svg"
set title "moonroute RSS: ${call_rate} calls/s + ${reg_rate} REGISTERs/s through default.lua, then idle"
set xlabel "seconds"
set ylabel "MB"
set yrange [0:*]
set key top left
set arrow from $load_end, graph 0 to $load_end, graph 1 nohead dashtype 2
set label "load ends" at $load_end, graph 0.95 offset 1,0
plot "$out/soak-rss.dat" using 1:2 with linespoints title "RSS", \
     "$out/soak-rss.dat" using 1:4 with lines title "charged to transactions"
GNUPLOT
  echo "SVG: $out/soak-rss.svg"
else
  echo "gnuplot not found (apt-get install gnuplot-nox): no SVG drawn"
fi
echo "samples: $out/soak-rss.dat; logs: $work"

# ----- verdict ---------------------------------------------------------------------------
verdict=$(awk -v w="$warmup" -v tol="$tolerance" '
  $5 == "load" && $1 >= w { n++; s += $2; if (min == "" || $2 < min) min = $2; if ($2 > max) max = $2 }
  END {
    if (n < 2) { print "none"; exit }
    mean = s / n; lo = 100 * (min - mean) / mean; hi = 100 * (max - mean) / mean
    ok = (lo >= -tol && hi <= tol) ? "stable" : "unstable"
    printf "%s %d %.1f %.1f %.1f %+.1f %+.1f", ok, n, mean, min, max, lo, hi }' "$out/soak-rss.dat")
read -r state n mean min max lo hi <<<"$verdict"
peak_idle=$(awk '$5 == "idle" { last = $2 } END { printf "%.1f", last }' "$out/soak-rss.dat")
status=0
if [ "$state" = none ]; then
  echo "too few samples after the ${warmup} s warm-up to judge (DURATION $duration, SAMPLE $sample)" >&2
  status=1
else
  printf 'RSS after the %d s warm-up (%d samples): mean %.1f MB, min %.1f (%s%%), max %.1f (%s%%): %s (tolerance +-%d%%); %s MB at the end of the idle period\n' \
    "$warmup" "$n" "$mean" "$min" "$lo" "$max" "$hi" "$state" "$tolerance" "$peak_idle"
  [ "$state" = stable ] || status=1
fi
for pair in "calls $calls_ok $calls_failed" "registrations $regs_ok $regs_failed"; do
  read -r what ok failed <<<"$pair"
  if [ "$failed" != '?' ] && [ $((failed * 100)) -gt $(((ok + failed) * fail_pct)) ]; then
    echo "$what: $failed failed of $((ok + failed)), more than ${fail_pct} %" >&2
    status=1
  fi
done
exit "$status"
