#!/usr/bin/env bash
# The dashboard's browser test: builds the real binary and runs dashboard.mjs (headless Chromium
# through playwright-core) twice, each time against a fresh service on a fresh SQLite file with
# one product's stock commits jammed: once with authentication off (the default), once with
# AUTH_JWT_SECRET set to a random secret, where the script mints its own tokens. DASHBOARD_AUTH=off
# or =on runs only one of them. Needs node, npm, sqlite3 and Chromium (/usr/bin/chromium, or
# CHROMIUM=path); .ci/run installs them. Screenshots go to target/ui-screenshots/ (the run with
# authentication in its auth/ folder); pass --update-docs to also refresh docs/dashboard.png, the
# README's picture, from the run without.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

cargo build --quiet --bin order-saga
bin="${CARGO_TARGET_DIR:-$root/target}/debug/order-saga"
[ -d "$here/node_modules/playwright-core" ] || (cd "$here" && npm ci --no-audit --no-fund --silent)

work=""
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    pid=""
    if [ -n "$work" ]; then rm -rf "$work"; fi
    work=""
}
trap cleanup EXIT

# run_once LABEL SECRET [ARGS...]: a fresh service (with AUTH_JWT_SECRET=SECRET unless SECRET is
# empty) and dashboard.mjs against it.
run_once() {
    local label="$1" secret="$2"
    shift 2
    echo "== the dashboard with authentication $label"
    work="$(mktemp -d)"
    local port db base
    port="$(node -e "const s=require('net').createServer().listen(0,'127.0.0.1',()=>{console.log(s.address().port);s.close()})")"
    db="$work/dashboard.db"
    # One database for orders, the saga log and inventory, so that the jam below can see the log.
    # STUCK_AFTER_ATTEMPTS=2 flags the jammed saga stuck at once. A secret in the caller's
    # environment must not turn authentication on in the run without it.
    if [ -n "$secret" ]; then
        env AUTH_JWT_SECRET="$secret" DATABASE_URL="$db" BIND_ADDR="127.0.0.1:$port" STUCK_AFTER_ATTEMPTS=2 \
            RUST_LOG=error "$bin" >"$work/service.log" 2>&1 &
    else
        env -u AUTH_JWT_SECRET DATABASE_URL="$db" BIND_ADDR="127.0.0.1:$port" STUCK_AFTER_ATTEMPTS=2 \
            RUST_LOG=error "$bin" >"$work/service.log" 2>&1 &
    fi
    pid=$!
    base="http://127.0.0.1:$port"
    for _ in $(seq 1 100); do
        node -e "fetch('$base/readyz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))" 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || { cat "$work/service.log" >&2; echo "FATAL: the service exited" >&2; exit 1; }
        sleep 0.1
    done

    # "Make a saga stuck" without fault injection in the binary: committing the stock of product
    # `jammed` fails (a transient database error, so the engine retries it) until the saga's
    # history holds an operator retry. Such a saga is stuck after its pivot (its order is
    # confirmed), where only a retry can finish it, and nothing but the dashboard's Retry button
    # records one.
    sqlite3 -cmd ".timeout 5000" "$db" "CREATE TRIGGER browser_test_jam BEFORE UPDATE OF status ON reservations
        WHEN NEW.status = 'committed' AND NEW.product_id = 'jammed'
         AND NOT EXISTS (SELECT 1 FROM saga_events WHERE saga_id = NEW.saga_id AND event = 'operator_retry')
        BEGIN SELECT RAISE(ABORT, 'browser test: commits of jammed wait for an operator retry'); END;"

    if ! env -u AUTH_JWT_SECRET ${secret:+AUTH_JWT_SECRET="$secret"} node "$here/dashboard.mjs" "$base" "$@"; then
        echo "--- service log ($label) ---" >&2
        tail -n 50 "$work/service.log" >&2
        exit 1
    fi
    cleanup
}

which="${DASHBOARD_AUTH:-both}"
case "$which" in
    off | on | both) ;;
    *) echo "DASHBOARD_AUTH is off, on or both, not '$which'" >&2; exit 2 ;;
esac
if [ "$which" != on ]; then run_once off "" "$@"; fi
if [ "$which" != off ]; then
    run_once on "$(node -e "console.log(require('crypto').randomBytes(32).toString('hex'))")"
fi
