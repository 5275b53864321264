#!/usr/bin/env bash
# The service's user-space instructions per order, counted by valgrind's callgrind: unlike
# orders/s, the count hardly moves with what else the machine is doing, so it shows what a change
# on the hot path costs where bench/run.sh's ratios are lost in this machine's drift.
#
#   bench/callgrind.sh [SECONDS]     (default 40; about 2 minutes in all)
#
# Builds the release binary and the load generator, runs the service under callgrind on a fresh
# PostgreSQL database (127.0.0.1:5432, user postgres, as bench/run.sh), creates the products,
# warms up for 15 s, zeroes the counters, runs the uniform workload with 16 connections for
# SECONDS, dumps the counters and prints instructions per order (every 201 of the run). The
# profile stays in target/callgrind/ for callgrind_annotate. Needs valgrind (Debian's package).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seconds=${1:-40}
command -v valgrind >/dev/null || { echo "bench/callgrind.sh needs valgrind (apt-get install valgrind)" >&2; exit 2; }
cargo build --release --quiet --bin order-saga --example loadgen
out=$root/target/callgrind
rm -rf "$out"
mkdir -p "$out"
db=callgrind_$$
export PGSSLMODE=disable
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $db" postgres
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url=http://127.0.0.1:$port
(cd "$out" && exec env -i PATH="$PATH" HOME="${HOME:-/root}" BIND_ADDR="127.0.0.1:$port" RUST_LOG=warn \
    DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db" \
    valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out.%p" "$root/target/release/order-saga") \
    >"$out/service.log" 2>&1 &
pid=$!
cleanup() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db" postgres || true
}
trap cleanup EXIT
for _ in $(seq 1 600); do
    curl -sf -o /dev/null "$url/readyz" && break
    kill -0 "$pid" 2>/dev/null || { tail "$out/service.log" >&2; exit 1; }
    sleep 0.5
done
loadgen=$root/target/release/examples/loadgen
"$loadgen" --url "$url" --products 1000 --stock 1000000000 --setup-only 2>/dev/null
"$loadgen" --url "$url" --no-setup --connections 16 --warmup 0 --seconds 15 >"$out/warmup.out" 2>&1
callgrind_control -z "$pid" >/dev/null 2>&1
"$loadgen" --url "$url" --no-setup --connections 16 --warmup 0 --seconds "$seconds" >"$out/run.out" 2>&1
callgrind_control -d "$pid" >/dev/null 2>&1
sleep 1
orders=$(grep -o 'total_201=[0-9]*' "$out/run.out" | cut -d= -f2)
profile=$(ls "$out"/callgrind.out.*.1)
instructions=$(grep -m1 '^summary:' "$profile" | cut -d' ' -f2)
echo "orders: $orders in ${seconds}s under callgrind"
echo "instructions per order (service, user space): $((instructions / orders))"
echo "profile: $profile (callgrind_annotate it)"
