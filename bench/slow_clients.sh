#!/usr/bin/env bash
# Slow TCP clients (issue 17, item 3) against a release moonroute, loopback only:
#
#   bench/slow_clients.sh [ATTACKERS] [SECONDS]     defaults: 20 attackers, 30 s
#
# The server has max_connections = 20 (MAX_CONNECTIONS) and the other [limits] at their
# defaults. ATTACKERS connections from 127.0.0.2 each send one byte of an endless header block
# every 2 s (EVERY) and reconnect whenever the server closes theirs; a probe on 127.0.0.1 opens
# a fresh connection every second and times the 200 to an OPTIONS (bench/slow-clients.py).
# Before the stream limits the attackers held every slot and the probe was refused; now it
# must be answered every time. Prints the probe's times, what the attackers saw, the server's
# refused lines by reason and its CPU. Bounded by SECONDS. PORT (15460), MOONROUTE=path.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
attackers=${1:-20}
seconds=${2:-30}
port=${PORT:-15460}
bin=$(moonroute_bin)
need_free_udp_port "$port"
bench_workdir slow-clients
cat >"$work/moonroute.toml" <<TOML
listen = ["udp:127.0.0.1:$port", "tcp:127.0.0.1:$port"]
data_dir = "$DATA_DIR"
workers = 1
log_level = "warn"
[control]
socket = "$CTL"
[lua]
watch = false
[location]
store = "memory"
[limits]
max_connections = ${MAX_CONNECTIONS:-20}
TOML
taskset -c 0 "$bin" run --config "$work/moonroute.toml" 2>"$work/moonroute.log" &
server=$!
wait_udp_port "$port"
need_alive "$server" "$work/moonroute.log"
ticks=$(getconf CLK_TCK)
cpu_before=$(cpu_ticks "$server")
status=0
taskset -c 1 python3 bench/slow-clients.py "$port" --attackers "$attackers" \
  --every "${EVERY:-2}" --duration "$seconds" || status=$?
cpu_after=$(cpu_ticks "$server")
need_alive "$server" "$work/moonroute.log"
printf 'server CPU: %.2f s over %s s\n' "$(echo "($cpu_after - $cpu_before) / $ticks" | bc -l)" "$seconds"
echo "server's moonroute::refused lines, by reason:"
grep 'moonroute::refused' "$work/moonroute.log" | grep -oE 'reason=[^(;]*(\([^)]*\))?' |
  sed -E 's/[0-9]+ bytes/N bytes/' | sort | uniq -c | sort -rn | head -5 | sed 's/^/  /'
exit "$status"
