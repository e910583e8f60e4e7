#!/usr/bin/env bash
# The cost of digest authentication on registrations: bench/register.sh twice on the same
# users, without authentication (default.lua with AUTHENTICATE = false, one REGISTER -> 200
# per registration) and with it (the shipped default.lua, [auth] algorithms = ["MD5"]:
# REGISTER -> 401 -> REGISTER with MD5 credentials -> 200, bench/register_auth_uac.xml).
#
#   bench/register_auth.sh [RATE] [COUNT]     defaults: 1000 registrations/s, 10000
#
# USERS (default 1000) users rN@127.0.0.1 are registered round-robin (refreshes after the
# first USERS); with authentication they are provisioned with `ctl user add` first. Server on
# CPU 0, SIPp on CPU 1 (as bench/register.sh). Prints each run's figures, then the server CPU
# ms per 1000 registrations both ways and their ratio. Other environment as bench/register.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
rate=${1:-1000}
count=${2:-10000}
export USERS=${USERS:-1000}
out=$(mktemp -d "${TMPDIR:-/tmp}/moonroute-register-auth.XXXXXX")
trap 'rm -rf "$out"' EXIT

echo "== without authentication"
env -u AUTH bench/register.sh "$rate" "$count" | tee "$out/plain.txt"
echo
echo "== with digest authentication (MD5)"
AUTH=1 bench/register.sh "$rate" "$count" | tee "$out/auth.txt"

cpu_per_1000() { sed -n 's/.*=> \([0-9.]*\) CPU ms per 1000 REGISTERs.*/\1/p' "$1"; }
achieved() { sed -n 's/.*achieved: \([0-9.]*\) REGISTER\/s.*/\1/p' "$1"; }
plain=$(cpu_per_1000 "$out/plain.txt")
auth=$(cpu_per_1000 "$out/auth.txt")
echo
echo "== summary ($count registrations over $USERS users, offered $rate/s)"
printf 'without auth: %s registrations/s achieved, %s CPU ms per 1000 registrations\n' \
  "$(achieved "$out/plain.txt")" "$plain"
printf 'with auth:    %s registrations/s achieved, %s CPU ms per 1000 registrations (2 REGISTERs each)\n' \
  "$(achieved "$out/auth.txt")" "$auth"
if [ -n "$plain" ] && [ -n "$auth" ]; then
  printf 'ratio (auth / no auth): %.2f\n' "$(echo "$auth / $plain" | bc -l)"
fi
