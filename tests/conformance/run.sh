#!/usr/bin/env bash
# Conformance: Schemathesis against the real binary and the committed openapi.yaml, with every
# phase (examples, coverage, fuzzing, stateful through the spec's links) and every check. Fails on
# any 5xx, any answer the spec does not declare, a request the service takes that the spec
# forbids, or a panic in the service's log.
#
# The service runs on a fresh SQLite file in a temporary directory, on a free loopback port, with
# authentication ON (a random AUTH_JWT_SECRET) and an admin token minted for the run: that way the
# 401s the spec declares are real, and Schemathesis's ignored_auth check can prove that every
# operation declaring `security` refuses a request without a token or with a bad one. With
# authentication off every such request would succeed and that check would rightly fail. Before
# the run, seed.py leaves a few sagas stuck after their pivot (a SQLite trigger jams one product's
# stock), so that the operator controls' answers to unfinished sagas are checked too.
#
# Installs schemathesis (pinned in requirements.txt) into target/conformance-venv. Needs python3
# with venv, and cargo. CONFORMANCE_MAX_TIME (seconds, default 240) is the time budget of the
# Schemathesis run; fuzzing and stateful testing repeat until it is spent. The JUnit report and
# the service's log are left in target/conformance/. Arguments are passed on to `schemathesis run`
# (`--seed N` to repeat a run, `--include-operation-id placeOrder` to test one operation).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
target="${CARGO_TARGET_DIR:-$root/target}"
max_time="${CONFORMANCE_MAX_TIME:-240}"

# shellcheck source=../common/stage.sh
. "$root/tests/common/stage.sh"
venv="$target/conformance-venv"
python_venv "$venv" "$here/requirements.txt"
"$venv/bin/schemathesis" --version

cargo build --quiet --bin order-saga --example mint_token
bin="$target/debug/order-saga"
mint="$target/debug/examples/mint_token"

# In this repository's target/ whatever CARGO_TARGET_DIR says: schemathesis.toml finds the
# seeded sagas' dictionary there.
out="$root/target/conformance"
rm -rf "$out"
mkdir -p "$out"
service_workdir

port="$(free_port)"
base="http://127.0.0.1:$port"
# Random per run and never printed; the service and mint_token read it from the environment.
secret="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
# Nothing from the caller's environment configures the service but what is set here.
# (Assignments before `env`, not arguments to it, so that the secret is in no command line.)
# ORDER_WAIT_MS=1000: an order of the jammed product (seed.py), which Schemathesis reuses once it
# has seen its id, answers 202 after a second instead of five. RUST_LOG=error: the jammed sagas
# log a warning at every attempt.
AUTH_JWT_SECRET="$secret" DATABASE_URL="$work/conformance.db" BIND_ADDR="127.0.0.1:$port" \
    ORDER_WAIT_MS=1000 RUST_LOG=error \
    env -u INVENTORY_DATABASE_URL -u AUTH_JWT_PUBLIC_KEY -u AUTH_JWT_JWKS -u AUTH_JWT_ISSUER -u AUTH_JWT_AUDIENCE \
    -u TLS_CERT_FILE -u TLS_KEY_FILE -u METRICS_TOKEN -u OTEL_EXPORTER_OTLP_ENDPOINT -u AUTH_DISABLED -u LOG_FORMAT \
    "$bin" >"$out/service.log" 2>&1 &
pid=$!
ready=""
for _ in $(seq 1 100); do
    if python3 -c "import urllib.request; urllib.request.urlopen('$base/readyz', timeout=1)" 2>/dev/null; then
        ready=yes
        break
    fi
    kill -0 "$pid" 2>/dev/null || { cat "$out/service.log" >&2; echo "FATAL: the service exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$ready" ] || { cat "$out/service.log" >&2; echo "FATAL: /readyz never answered 200" >&2; exit 1; }

token="$(AUTH_JWT_SECRET="$secret" env -u AUTH_JWT_ISSUER -u AUTH_JWT_AUDIENCE "$mint" --sub conformance --scope admin --minutes 60)"
CONFORMANCE_ADMIN_TOKEN="$token" python3 "$here/seed.py" "$base" "$work/conformance.db" "$out/stuck-sagas.dict" ||
    { tail -n 30 "$out/service.log" >&2; echo "FATAL: seeding stuck sagas failed" >&2; exit 1; }

# One worker: with two, Hypothesis's concurrent ast.parse calls trip a CPython 3.11 bug
# ("SystemError: AST constructor recursion depth mismatch", python/cpython#106905), and one worker
# makes `--seed` repeat a run. The time budget, not the worker count, sets how long it takes.
status=0
# Hypothesis keeps its caches in ./.hypothesis unless told otherwise: keep the work tree clean.
HYPOTHESIS_STORAGE_DIRECTORY="$out/hypothesis" CONFORMANCE_ADMIN_TOKEN="$token" "$venv/bin/schemathesis" --config-file "$here/schemathesis.toml" \
    run "$root/openapi.yaml" --url "$base" \
    --phases examples,coverage,fuzzing,stateful --checks all \
    --max-time "$max_time" --max-examples 100 --workers 1 \
    --request-timeout 20 --generation-database none --no-color \
    --report junit --report-junit-path "$out/junit.xml" "$@" || status=$?

if ! kill -0 "$pid" 2>/dev/null; then
    echo "FATAL: the service died during the run" >&2
    status=1
fi
if grep -q "panicked" "$out/service.log"; then
    grep -n -A5 "panicked" "$out/service.log" >&2
    echo "FATAL: the service panicked" >&2
    status=1
fi
if [ "$status" -ne 0 ]; then
    echo "--- the service's log, last lines ($out/service.log) ---" >&2
    tail -n 30 "$out/service.log" >&2
    echo "FATAL: the conformance run failed" >&2
fi
exit "$status"
