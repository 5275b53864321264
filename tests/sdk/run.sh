#!/usr/bin/env bash
# The generated SDKs against the real service (a .ci/run stage). From the committed openapi.yaml:
#   - a Python client by openapi-python-client (pinned in requirements.txt, in the venv
#     target/sdk/venv), generated into target/sdk/python with every generator warning an error,
#     installed in the venv, then scenario.py;
#   - TypeScript types by openapi-typescript into target/sdk/ts/openapi.d.ts, used by
#     ts/scenario.ts through openapi-fetch (ts/package-lock.json), type-checked with
#     `tsc --noEmit`, compiled to ts/dist/ and run on Node.js.
# Both run against one service on a fresh SQLite file and a free port, with authentication on:
# a random AUTH_JWT_SECRET and tokens from `examples/mint_token.rs`, an admin one and a
# customer's. Secrets and tokens pass through the environment and are never printed.
# The venv and node_modules are kept between runs and rebuilt when their lock files change.
# Needs python3 (with venv), node and npm; .ci/run installs them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"
sdk="$root/target/sdk"
mkdir -p "$sdk"

step() { printf -- '-- %s\n' "$*"; }

step "build the service and mint_token"
cargo build --quiet --bin order-saga --example mint_token
build="${CARGO_TARGET_DIR:-$root/target}/debug"

# The digest of a lock file, kept beside what was installed from it.
digest() { sha256sum "$1" | cut -d' ' -f1; }

step "the Python venv ($sdk/venv)"
# shellcheck source=../common/stage.sh
. "$root/tests/common/stage.sh"
venv="$sdk/venv"
python_venv "$venv" "$here/requirements.txt"
# openapi-python-client formats what it writes with the venv's ruff, which it finds on PATH.
export PATH="$venv/bin:$PATH"

step "generate the Python client into $sdk/python"
rm -rf "$sdk/python"
openapi-python-client generate --path openapi.yaml --config "$here/openapi-python-client.yaml" \
    --meta setup --output-path "$sdk/python" --fail-on-warning
# Its dependencies are pinned in requirements.txt, so none is resolved here.
pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --force-reinstall "$sdk/python"

step "the TypeScript tools (tests/sdk/ts/node_modules)"
ts="$here/ts"
if [ "$(cat "$ts/node_modules/.lock-digest" 2>/dev/null)" != "$(digest "$ts/package-lock.json")" ]; then
    (cd "$ts" && npm ci --no-audit --no-fund --silent)
    digest "$ts/package-lock.json" >"$ts/node_modules/.lock-digest"
fi

step "generate the TypeScript types into $sdk/ts/openapi.d.ts, type-check and compile scenario.ts"
mkdir -p "$sdk/ts"
(
    cd "$ts"
    node_modules/.bin/openapi-typescript "$root/openapi.yaml" --output "$sdk/ts/openapi.d.ts"
    rm -rf dist
    node_modules/.bin/tsc --noEmit -p .
    # Checked just above; this pass only writes the JavaScript.
    node_modules/.bin/tsc --noCheck -p .
)

service_workdir

step "start the service (SQLite in a temporary directory, authentication on)"
port="$(free_port)"
secret="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
# Nothing from the caller's environment configures the service or the tokens but what is set
# here. Secrets go in the environment (bash's VAR=value prefix), never on a command line, which
# other users of the machine can read.
clean_env=(env -u INVENTORY_DATABASE_URL -u TLS_CERT_FILE -u TLS_KEY_FILE -u AUTH_JWT_PUBLIC_KEY
    -u AUTH_JWT_JWKS -u AUTH_JWT_ISSUER -u AUTH_JWT_AUDIENCE -u AUTH_DISABLED -u METRICS_TOKEN
    -u OTEL_EXPORTER_OTLP_ENDPOINT -u LOG_FORMAT -u REQUEST_TIMEOUT_MS -u SAGA_DEADLINE_MS)
# The scenarios expect a placed order's 201 (and handle a cancel's 202): a saga takes
# milliseconds, and the 20 s wait only keeps a busy CI machine from turning that into a 202.
AUTH_JWT_SECRET="$secret" DATABASE_URL="$work/sdk.db" BIND_ADDR="127.0.0.1:$port" ORDER_WAIT_MS=20000 \
    RUST_LOG=warn "${clean_env[@]}" "$build/order-saga" >"$work/service.log" 2>&1 &
pid=$!
base="http://127.0.0.1:$port"
ready=""
for _ in $(seq 1 200); do
    if python3 -c "import urllib.request; urllib.request.urlopen('$base/readyz', timeout=1)" 2>/dev/null; then
        ready=1
        break
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
if [ -z "$ready" ]; then
    cat "$work/service.log" >&2
    echo "FATAL: the service did not become ready at $base" >&2
    exit 1
fi
mint() { AUTH_JWT_SECRET="$secret" "${clean_env[@]}" "$build/examples/mint_token" --sub "$1" --scope "$2" --minutes 30; }
export ORDER_SAGA_URL="$base" CUSTOMER="sdk-customer"
ADMIN_TOKEN="$(mint sdk-operator admin)"
CUSTOMER_TOKEN="$(mint "$CUSTOMER" orders)"
export ADMIN_TOKEN CUSTOMER_TOKEN

failed=()
step "the Python scenario"
"$venv/bin/python" "$here/scenario.py" || failed+=(python)
step "the TypeScript scenario"
node "$ts/dist/scenario.js" || failed+=(typescript)

if [ "${#failed[@]}" -gt 0 ]; then
    echo "--- service log ---" >&2
    tail -n 50 "$work/service.log" >&2
    echo "FATAL: the SDK scenario failed: ${failed[*]}" >&2
    exit 1
fi
