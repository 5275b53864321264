#!/usr/bin/env bash
# A PostgreSQL server that accepts only TLS, for tests/postgres_tls.rs (a .ci/run stage).
#
# Makes, in DIR (default target/pg-tls), a test CA, a server certificate it signs for localhost
# and 127.0.0.1, an unrelated second CA, a client certificate the test CA signs and one the
# other CA signs; then creates the cluster 'tls' on port 5434 with those files. Its pg_hba has
# only hostssl lines (a plaintext connection is refused) and makes the role order_saga_cert log
# in by client certificate. It listens on 127.0.0.2 too: a loopback address the certificate does
# not name, for the host name check. Running it again reuses what exists, so a second run works.
#
# Usage: tests/tls/setup-postgres-tls.sh [DIR]; the test's environment is printed at the end.
set -euo pipefail
# Only the environment goes to stdout (the caller reads it line by line); everything the tools
# print, such as pg_ctlcluster's "Removed stale pid file.", goes to stderr. The server is
# started with fd 3 closed: a daemon holding it would keep the caller's pipe open for ever.
exec 3>&1 1>&2
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${1:-$root/target/pg-tls}"
port=5434
cluster=tls
cert_user=order_saga_cert
pg_version="$(ls /etc/postgresql | sort -V | tail -n1)"
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
cd "$dir"

# A certificate is made again when missing or expiring within a day, and with it everything it
# signs, so that the files always agree.
fresh() { [ -s "$1" ] && openssl x509 -in "$1" -noout -checkend 86400 >/dev/null 2>&1; }

new_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 0600 "$1"; }

# new_ca NAME "SUBJECT": a self-signed CA certificate NAME.crt with its key NAME.key.
new_ca() {
    new_key "$1.key"
    openssl req -x509 -new -key "$1.key" -sha256 -days 3650 -subj "$2" -out "$1.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}

# new_leaf NAME "SUBJECT" CA EXTENSIONS: NAME.crt signed by CA.crt/CA.key.
new_leaf() {
    new_key "$1.key"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    printf '%s\n' "$4" >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA "$3.crt" -CAkey "$3.key" -CAcreateserial -sha256 -days 825 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

renewed=0
if ! fresh ca.crt; then
    new_ca ca "/CN=order-saga test CA"
    renewed=1
fi
if [ "$renewed" = 1 ] || ! fresh server.crt; then
    new_leaf server "/CN=localhost" ca "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1"
fi
if [ "$renewed" = 1 ] || ! fresh client.crt; then
    # PostgreSQL's cert authentication maps the certificate's CN to the role.
    new_leaf client "/CN=$cert_user" ca "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
fi
other_renewed=0
if ! fresh other-ca.crt; then
    new_ca other-ca "/CN=order-saga unrelated CA"
    other_renewed=1
fi
if [ "$other_renewed" = 1 ] || ! fresh other-client.crt; then
    new_leaf other-client "/CN=$cert_user" other-ca "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
fi

# The cluster. The server reads its copies, owned by postgres with the key at 0600 as it demands,
# so that DIR may stay root's.
if ! pg_lsclusters -h | awk '{print $2}' | grep -qx "$cluster"; then
    pg_createcluster "$pg_version" "$cluster" -p "$port" -- --auth=trust >/dev/null 3>&-
fi
etc="/etc/postgresql/$pg_version/$cluster"
changed=0
# put SOURCE DEST MODE: installs SOURCE as DEST for postgres, noting whether it changed.
put() {
    if ! cmp -s "$1" "$2"; then
        install -o postgres -g postgres -m "$3" "$1" "$2"
        changed=1
    fi
}
put server.crt "$etc/server.crt" 0644
put server.key "$etc/server.key" 0600
put ca.crt "$etc/ca.crt" 0644
conf="$(mktemp)"
hba="$(mktemp)"
trap 'rm -f "$conf" "$hba"' EXIT
cat >"$conf" <<EOF
# Written by tests/tls/setup-postgres-tls.sh.
listen_addresses = '127.0.0.1,127.0.0.2'
ssl = on
ssl_cert_file = '$etc/server.crt'
ssl_key_file = '$etc/server.key'
# Client certificates are checked against the test CA.
ssl_ca_file = '$etc/ca.crt'
EOF
cat >"$hba" <<EOF
# Written by tests/tls/setup-postgres-tls.sh: over TCP, TLS only (no host or hostnossl line).
local   all  all                          trust
hostssl all  $cert_user     127.0.0.0/8   cert
hostssl all  all            127.0.0.0/8   trust
EOF
put "$conf" "$etc/conf.d/90-tls.conf" 0644
put "$hba" "$etc/pg_hba.conf" 0640

if pg_lsclusters -h | awk -v c="$cluster" '$2 == c {print $4}' | grep -qx online; then
    # listen_addresses needs a restart, not a reload.
    if [ "$changed" = 1 ]; then
        pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$cluster" restart 3>&-
    fi
else
    pg_ctlcluster --skip-systemctl-redirect "$pg_version" "$cluster" start 3>&-
fi
for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p "$port" && break
    sleep 1
done
pg_isready -h 127.0.0.1 -p "$port" >&2 ||
    { echo "FATAL: the TLS PostgreSQL at 127.0.0.1:$port is not reachable" >&2; exit 1; }

socket="$(pg_conftool -s "$pg_version" "$cluster" show unix_socket_directories | cut -d, -f1)"
psql -h "${socket:-/var/run/postgresql}" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAt <<EOF >/dev/null
SELECT 'CREATE ROLE $cert_user LOGIN CREATEDB'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$cert_user') \gexec
EOF

cat >&3 <<EOF
TEST_TLS_DATABASE_URL=postgres://postgres@localhost:$port/postgres
TEST_TLS_CA=$dir/ca.crt
TEST_TLS_OTHER_CA=$dir/other-ca.crt
TEST_TLS_CLIENT_CERT=$dir/client.crt
TEST_TLS_CLIENT_KEY=$dir/client.key
TEST_TLS_OTHER_CLIENT_CERT=$dir/other-client.crt
TEST_TLS_OTHER_CLIENT_KEY=$dir/other-client.key
EOF
