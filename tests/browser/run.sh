#!/usr/bin/env bash
# The dashboard's browser test: builds and starts the real binary on a fresh SQLite file, jams
# one product's stock commits, and runs dashboard.mjs (headless Chromium through playwright-core)
# against it. Needs node, npm, sqlite3 and Chromium (/usr/bin/chromium, or CHROMIUM=path);
# .ci/run installs them. Screenshots go to target/ui-screenshots/; pass --update-docs to also
# refresh docs/dashboard.png, the README's picture.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

cargo build --quiet --bin order-saga
bin="${CARGO_TARGET_DIR:-$root/target}/debug/order-saga"
[ -d "$here/node_modules/playwright-core" ] || (cd "$here" && npm ci --no-audit --no-fund --silent)

work="$(mktemp -d)"
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

port="$(node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")"
db="$work/dashboard.db"
# One database for orders, the saga log and inventory, so that the jam below can see the log.
# STUCK_AFTER_ATTEMPTS=2 flags the jammed saga stuck at once.
DATABASE_URL="$db" BIND_ADDR="127.0.0.1:$port" STUCK_AFTER_ATTEMPTS=2 RUST_LOG=error \
    "$bin" >"$work/service.log" 2>&1 &
pid=$!
base="http://127.0.0.1:$port"
for _ in $(seq 1 100); do
    node -e "fetch('$base/readyz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))" 2>/dev/null && break
    kill -0 "$pid" 2>/dev/null || { cat "$work/service.log" >&2; echo "FATAL: the service exited" >&2; exit 1; }
    sleep 0.1
done

# "Make a saga stuck" without fault injection in the binary: committing the stock of product
# `jammed` fails (a transient database error, so the engine retries it) until the saga's history
# holds an operator retry. Such a saga is stuck after its pivot (its order is confirmed), where
# only a retry can finish it, and nothing but the dashboard's Retry button records one.
sqlite3 -cmd ".timeout 5000" "$db" "CREATE TRIGGER browser_test_jam BEFORE UPDATE OF status ON reservations
    WHEN NEW.status = 'committed' AND NEW.product_id = 'jammed'
     AND NOT EXISTS (SELECT 1 FROM saga_events WHERE saga_id = NEW.saga_id AND event = 'operator_retry')
    BEGIN SELECT RAISE(ABORT, 'browser test: commits of jammed wait for an operator retry'); END;"

if ! node "$here/dashboard.mjs" "$base" "$@"; then
    echo "--- service log ---" >&2
    tail -n 50 "$work/service.log" >&2
    exit 1
fi
