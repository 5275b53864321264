#!/usr/bin/env bash
# order-saga's benchmark, in one command. See bench/README.md for what it measures and how to
# read it.
#
#   bench/run.sh            the full run (about 5 minutes)
#   bench/run.sh --quick    the same, shorter (about 2 minutes): checks that everything works
#   bench/run.sh --soak     only the memory soak: 5 minutes of the uniform workload, RSS every 10 s
#   bench/run.sh --help     every option
#
# Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust), as CI and the tests use it. It
# creates its own databases there (bench_<pid>_*) and drops them at the end; it never changes the
# server's settings. Prints PASS/FAIL checks and exits non-zero if any fails.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() {
    cat <<'EOF'
Usage: bench/run.sh [options]

  --quick            short runs (2 s warm-up, 5 s measured) to check that it all works
  --soak             only the memory soak: the uniform workload on PostgreSQL for
                     --soak-minutes, sampling the service's RSS every 10 s
  --soak-minutes N   soak length (default 5)
  --seconds N        measured seconds per run (default 20; --quick: 5)
  --warmup N         warm-up seconds before each measured run (default 5; --quick: 2)
  --connections N    requests / pgbench clients in flight (default 64)
  --hot N            products of the contention variant (default 10)
  --rounds N         run the uniform order-saga and 3-tx pair N times, alternating, and print
                     each round's ratio and their median (default 1)
  --no-stmts         skip the statements-per-order pass (a private PostgreSQL instance)
  --service-env K=V  run the service with this setting (repeatable), e.g. DB_MAX_CONNECTIONS=32;
                     without it the service runs with its defaults
  --auth             run the service with authentication on (a random AUTH_JWT_SECRET) and the
                     load generator with an admin token, to measure what verifying tokens costs
  --keep             keep the databases and the work directory (logs, pgbench logs)
  -h, --help         this text

Environment: PGHOST / PGPORT / PGUSER (default 127.0.0.1 / 5432 / postgres) name the server.
EOF
}

AUTH=0 QUICK=0 SOAK=0 SOAK_MINUTES=5 SECONDS_MEASURED="" WARMUP="" CONNS=64 HOT=10 STMTS=1 KEEP=0 ROUNDS=1
SERVICE_ENV=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --quick) QUICK=1 ;;
        --soak) SOAK=1 ;;
        --soak-minutes) SOAK_MINUTES=$2; shift ;;
        --seconds) SECONDS_MEASURED=$2; shift ;;
        --warmup) WARMUP=$2; shift ;;
        --connections) CONNS=$2; shift ;;
        --hot) HOT=$2; shift ;;
        --rounds) [[ $2 =~ ^[1-9][0-9]*$ ]] || { echo "--rounds wants a positive integer" >&2; exit 2; }; ROUNDS=$2; shift ;;
        --no-stmts) STMTS=0 ;;
        --service-env) [[ $2 == *=* ]] || { echo "--service-env wants KEY=VALUE" >&2; exit 2; }; SERVICE_ENV+=("$2"); shift ;;
        --auth) AUTH=1 ;;
        --keep) KEEP=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench/run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ $QUICK == 1 ]]; then
    SECONDS_MEASURED=${SECONDS_MEASURED:-5} WARMUP=${WARMUP:-2} STMT_SECONDS=3
else
    SECONDS_MEASURED=${SECONDS_MEASURED:-20} WARMUP=${WARMUP:-5} STMT_SECONDS=10
fi
PRODUCTS=1000
STOCK=1000000000

PGH=${PGHOST:-127.0.0.1} PGP=${PGPORT:-5432} PGU=${PGUSER:-postgres}
# psql and pgbench talk in clear, as they always have here. The service's default `sslmode=prefer`
# encrypts its connections to a server with ssl = on, so the ratio charges TLS to order-saga
# alone (bench/README.md).
export PGSSLMODE=disable
unset PGDATABASE PGPASSWORD 2>/dev/null || true

# ---------------------------------------------------------------------------------------------
# Output and bookkeeping

FAILS=0
declare -A R # results: R[run.key]
say() { printf '%s\n' "$*"; }
section() { printf '\n== %s ==\n' "$*"; }
die() { printf 'bench/run.sh: %s\n' "$*" >&2; exit 1; }
check() { # check NAME OK(0/1) DETAIL
    if [[ $2 == 1 ]]; then
        printf '  PASS  %-34s %s\n' "$1" "$3"
    else
        printf '  FAIL  %-34s %s\n' "$1" "$3"
        FAILS=$((FAILS + 1))
    fi
}
calc() { awk "BEGIN { printf \"%.${2:-1}f\", ($1) }"; }           # calc EXPR [DECIMALS]
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0 && a != "") printf "%.2fx", a / b; else printf "n/a" }'; }
abs_le() { awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= t) }'; }

WORK=$(mktemp -d /tmp/order-saga-bench.XXXXXX)
chmod 755 "$WORK"
TAG="bench_$$"
DBS=()
SVC_PID=""
PRIV_DATA=""

cleanup() {
    local rc=$?
    if [[ -n $SVC_PID ]] && kill -0 "$SVC_PID" 2>/dev/null; then
        kill -TERM "$SVC_PID" 2>/dev/null || true
        sleep 1
        kill -KILL "$SVC_PID" 2>/dev/null || true
    fi
    [[ -n $PRIV_DATA ]] && priv_stop
    if [[ $KEEP == 0 ]]; then
        for db in "${DBS[@]}"; do
            psql -X -q -h "$PGH" -p "$PGP" -U "$PGU" -d postgres -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" \
                >/dev/null 2>&1 || true
        done
        rm -rf "$WORK"
    else
        say "" "kept: $WORK and databases: ${DBS[*]:-none}"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Prerequisites

need_apt() { # need_apt COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    say "$1 is missing: apt-get install -y $2"
    if [[ $(id -u) == 0 ]]; then
        apt-get install -y "$2" >/dev/null 2>&1 || { apt-get update >/dev/null 2>&1 && apt-get install -y "$2" >/dev/null; }
    else
        sudo apt-get install -y "$2" >/dev/null
    fi
    command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}
if ! command -v pgbench >/dev/null 2>&1; then
    # Debian keeps it beside the server binaries; otherwise postgresql-contrib brings it.
    PGBIN_GUESS=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    if [[ -n $PGBIN_GUESS && -x $PGBIN_GUESS/pgbench ]]; then
        export PATH="$PATH:$PGBIN_GUESS"
    else
        need_apt pgbench postgresql-contrib
    fi
fi
need_apt psql postgresql-client
need_apt sqlite3 sqlite3
need_apt curl curl

PSQL=(psql -X -q -v ON_ERROR_STOP=1 -h "$PGH" -p "$PGP" -U "$PGU")
pgq() { "${PSQL[@]}" -d "$1" -At -F '|' -c "$2"; } # pgq DB SQL
pg_isready -q -h "$PGH" -p "$PGP" 2>/dev/null || pgq postgres "SELECT 1" >/dev/null 2>&1 ||
    die "PostgreSQL at $PGH:$PGP is not reachable (start it: pg_ctlcluster <version> main start)"

create_db() { # create_db NAME: a fresh database, dropped at exit
    "${PSQL[@]}" -d postgres -c "SET client_min_messages = warning" -c "DROP DATABASE IF EXISTS \"$1\" WITH (FORCE)" \
        -c "CREATE DATABASE \"$1\"" >/dev/null
    DBS+=("$1")
}

free_port() { # the first port from $1 on that nothing listens on
    local p=$1
    while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
    echo "$p"
}

# ---------------------------------------------------------------------------------------------
# The service and the load generator

SVC_BIN=$ROOT/target/release/order-saga
LOADGEN=$ROOT/target/release/examples/loadgen

start_service() { # start_service NAME DIR [DATABASE_URL]: the service with its defaults (SQLite if no URL)
    local name=$1 dir=$2 url=${3:-}
    PORT=$(free_port 18080)
    mkdir -p "$dir"
    local envs=(PATH="$PATH" HOME="${HOME:-/root}" BIND_ADDR="127.0.0.1:$PORT")
    [[ -n $url ]] && envs+=(DATABASE_URL="$url")
    envs+=("${SERVICE_ENV[@]}")
    # A clean environment, so that the defaults are the service's own.
    (cd "$dir" && exec env -i "${envs[@]}" "$SVC_BIN") >"$WORK/$name.service.log" 2>&1 &
    SVC_PID=$!
    URL="http://127.0.0.1:$PORT"
    for _ in $(seq 1 300); do
        curl -sf -o /dev/null "$URL/readyz" && return 0
        kill -0 "$SVC_PID" 2>/dev/null || break
        sleep 0.2
    done
    tail -n 20 "$WORK/$name.service.log" >&2
    die "the service did not become ready ($name)"
}

service_alive() { # service_alive RUN: a check that the service is still up; shows its log's end if not
    if kill -0 "$SVC_PID" 2>/dev/null; then
        check "service stayed up" 1 "pid $SVC_PID"
    else
        check "service stayed up" 0 "pid $SVC_PID is gone; the end of its log:"
        tail -n 15 "$WORK/$1.service.log" | sed 's/^/        /'
    fi
}

stop_service() { # SIGTERM, as an operator would; it releases its leases and exits
    [[ -z $SVC_PID ]] && return 0
    kill -TERM "$SVC_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$SVC_PID" 2>/dev/null || break
        sleep 0.2
    done
    kill -KILL "$SVC_PID" 2>/dev/null || true
    wait "$SVC_PID" 2>/dev/null || true
    SVC_PID=""
}

CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; } # user + system CPU of a process
machine_ticks() { awk '$1 == "cpu" { print $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9, $5 + $6 }' /proc/stat; } # total idle
# CPU of the whole PostgreSQL server: its processes, and the children it has reaped (cutime). Only
# readable where its postmaster.pid is (root, or the postgres user); otherwise left out.
PG_POSTMASTER=""
pg_cpu_ticks() {
    [[ -n $PG_POSTMASTER ]] || { echo ""; return; }
    { cat "/proc/$PG_POSTMASTER/stat"; for c in $(pgrep -P "$PG_POSTMASTER" || true); do cat "/proc/$c/stat" 2>/dev/null || true; done; } |
        awk -v pm="$PG_POSTMASTER" '{ t += $14 + $15; if ($1 == pm) t += $16 + $17 } END { print t }'
}
# cpu_line RUN ORDERS MACHINE0 MACHINE1 SERVICE_TICKS PG0 PG1 CLIENT_SECONDS CLIENT_NAME: CPU per order
cpu_line() {
    local run=$1 orders=$2 t0 i0 t1 i1 line
    read -r t0 i0 <<<"$3"
    read -r t1 i1 <<<"$4"
    [[ $orders -gt 0 ]] || return 0
    R[$run.busy_pct]=$(calc "100 * (($t1 - $t0) - ($i1 - $i0)) / ($t1 - $t0)" 0)
    line="  CPU: machine ${R[$run.busy_pct]}% busy (all processes, other users' too); per order:"
    if [[ -n $5 ]]; then
        R[$run.cpu_service]=$(calc "1000 * $5 / $CLK_TCK / $orders" 2)
        line+=" service ${R[$run.cpu_service]} ms,"
    fi
    if [[ -n $6 && -n $7 ]]; then
        R[$run.cpu_pg]=$(calc "1000 * ($7 - $6) / $CLK_TCK / $orders" 2)
        line+=" postgres ${R[$run.cpu_pg]} ms (the whole server),"
    fi
    R[$run.cpu_client]=$(calc "1000 * $8 / $orders" 2)
    say "$line $9 ${R[$run.cpu_client]} ms"
}

proc_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; } # proc_kb PID VmHWM

read_result() { # read_result RUN FILE: the loadgen's RESULT line into R[RUN.key]
    local kv
    for kv in $(grep '^RESULT ' "$2" | head -n1 | cut -d' ' -f2-); do
        R[$1.${kv%%=*}]=${kv#*=}
    done
}

# The invariants, on either backend. sql BACKEND TARGET QUERY prints rows as a|b|c.
sql() {
    if [[ $1 == pg ]]; then pgq "$2" "$3"; else sqlite3 -batch -noheader -separator '|' "$2" "$3"; fi
}
stock_checks() { # stock_checks BACKEND TARGET
    local row
    row=$(sql "$1" "$2" "SELECT count(*),
            count(*) FILTER (WHERE available + reserved + sold <> $STOCK),
            count(*) FILTER (WHERE reserved <> 0),
            count(*) FILTER (WHERE available < 0 OR reserved < 0 OR sold < 0),
            coalesce(sum(sold), 0), coalesce(sum(reserved), 0) FROM products")
    IFS='|' read -r n bad_sum bad_res neg sold reserved <<<"$row"
    check "stock conserved" "$([[ $n == "$PRODUCTS" && $bad_sum == 0 && $neg == 0 ]] && echo 1 || echo 0)" \
        "$n products; $bad_sum with available+reserved+sold != $STOCK; $neg negative; $sold units sold"
    check "nothing left reserved" "$([[ $bad_res == 0 ]] && echo 1 || echo 0)" \
        "$bad_res products with reserved != 0 ($reserved units)"
    row=$(sql "$1" "$2" "SELECT count(*) FROM products p LEFT JOIN (SELECT product_id, sum(quantity) AS q
            FROM reservations WHERE status = 'committed' GROUP BY product_id) r ON r.product_id = p.id
            WHERE p.sold <> coalesce(r.q, 0)")
    check "sold = committed reservations" "$([[ $row == 0 ]] && echo 1 || echo 0)" "$row products differ"
}
unfinished() { sql "$1" "$2" "SELECT count(*) FROM sagas WHERE state IN ('running', 'compensating')"; }

# PostgreSQL counters of one database: commits, rollbacks, rows inserted + updated + deleted.
# A backend reports them when it exits, or when idle only every few seconds; so they are read
# only once no client is connected to the database (wait_no_clients).
pg_counters() { pgq "$1" "SELECT xact_commit, xact_rollback, tup_inserted + tup_updated + tup_deleted
                          FROM pg_stat_database WHERE datname = current_database()"; }
wait_no_clients() { # wait_no_clients QUERY-FUNCTION DB: until the database has no other client (10 s at most)
    local n
    for _ in $(seq 1 50); do
        n=$("$1" "$2" "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                       AND backend_type = 'client backend' AND pid <> pg_backend_pid()")
        [[ $n == 0 ]] && return 0
        sleep 0.2
    done
}
per_order() { # per_order RUN BEFORE AFTER ORDERS: R[RUN.commits_per_order] ...
    local c0 r0 w0 c1 r1 w1
    IFS='|' read -r c0 r0 w0 <<<"$2"
    IFS='|' read -r c1 r1 w1 <<<"$3"
    if [[ $4 -gt 0 ]]; then
        R[$1.commits_per_order]=$(calc "($c1 - $c0) / $4" 2)
        R[$1.rollbacks]=$((r1 - r0))
        R[$1.rows_per_order]=$(calc "($w1 - $w0) / $4" 1)
        say "  server: $(calc "($c1 - $c0) / $4" 2) commits/order, $(calc "($w1 - $w0) / $4" 1) rows written/order," \
            "$((r1 - r0)) rollbacks (pg_stat_database of this database, over the whole run)"
    fi
}

# One run of the service under the load generator, then the checks.
# run_service RUN TITLE BACKEND HOT
run_service() {
    local run=$1 title=$2 backend=$3 hot=$4 db="" target dir="$WORK/$1" before="" after
    section "$title"
    if [[ $backend == pg ]]; then
        db="${TAG}_$run"
        create_db "$db"
        start_service "$run" "$dir" "postgres://$PGU@$PGH:$PGP/$db"
        target=$db
    else
        start_service "$run" "$dir" # default configuration: order-saga.db in the working directory
        target="$dir/order-saga.db"
    fi
    "$LOADGEN" --url "$URL" --products "$PRODUCTS" --stock "$STOCK" --setup-only 2>"$WORK/$run.setup.log" ||
        { cat "$WORK/$run.setup.log" >&2; die "product setup failed ($run)"; }
    # Restart, so that the server's counters of the run start clean of the setup's.
    stop_service
    if [[ $backend == pg ]]; then
        wait_no_clients pgq "$db"
        before=$(pg_counters "$db")
        start_service "$run" "$dir" "postgres://$PGU@$PGH:$PGP/$db"
    else
        start_service "$run" "$dir"
    fi
    say "  $CONNS connections, ${WARMUP}s warm-up + ${SECONDS_MEASURED}s measured, orders from" \
        "$([[ $hot -gt 0 ]] && echo "the $hot hot products p-1..p-$hot" || echo "all $PRODUCTS products")"
    local rc=0 m0 m1 svc0 svc1 pg0="" pg1="" TIMEFORMAT='%U %S'
    m0=$(machine_ticks)
    svc0=$(cpu_ticks "$SVC_PID")
    [[ $backend == pg ]] && pg0=$(pg_cpu_ticks)
    { time "$LOADGEN" --url "$URL" --no-setup --products "$PRODUCTS" --hot "$hot" --connections "$CONNS" \
        --warmup "$WARMUP" --seconds "$SECONDS_MEASURED" >"$WORK/$run.loadgen.out" 2>"$WORK/$run.loadgen.err"; } \
        2>"$WORK/$run.loadgen.time" || rc=$?
    [[ $rc == 0 ]] || { cat "$WORK/$run.loadgen.err" >&2; die "the load generator failed ($run)"; }
    m1=$(machine_ticks)
    svc1=$(cpu_ticks "$SVC_PID")
    [[ $backend == pg ]] && pg1=$(pg_cpu_ticks)
    say "  loadgen: $(head -n1 "$WORK/$run.loadgen.out")"
    read_result "$run" "$WORK/$run.loadgen.out"
    cpu_line "$run" "${R[$run.total_201]}" "$m0" "$m1" "$((svc1 - svc0))" "$pg0" "$pg1" \
        "$(awk '{ print $1 + $2 }' "$WORK/$run.loadgen.time")" "loadgen"
    local alive
    alive=$(service_alive "$run")
    R[$run.hwm_kb]=$(proc_kb "$SVC_PID" VmHWM)
    R[$run.rss_kb]=$(proc_kb "$SVC_PID" VmRSS)
    say "  service memory: peak RSS (VmHWM) $(calc "${R[$run.hwm_kb]} / 1024") MiB, RSS now $(calc "${R[$run.rss_kb]} / 1024") MiB"
    # Give the service a moment to settle what is still running (202s, if any), then look.
    local left waited=0
    left=$(unfinished "$backend" "$target")
    while [[ $left != 0 && $waited -lt 30 ]]; do
        sleep 0.5
        waited=$((waited + 1))
        left=$(unfinished "$backend" "$target")
    done
    stop_service
    if [[ $backend == pg ]]; then
        wait_no_clients pgq "$db"
        after=$(pg_counters "$db")
    fi
    local confirmed pending total201=${R[$run.total_201]}
    confirmed=$(sql "$backend" "$target" "SELECT count(*) FROM orders WHERE status = 'confirmed'")
    pending=$(sql "$backend" "$target" "SELECT count(*) FROM orders WHERE status = 'pending'")
    R[$run.confirmed]=$confirmed
    [[ $backend == pg ]] && per_order "$run" "$before" "$after" "$confirmed"
    say "  checks:"
    say "$alive"
    [[ $alive == *FAIL* ]] && FAILS=$((FAILS + 1))
    stock_checks "$backend" "$target"
    check "no saga unfinished" "$([[ $left == 0 ]] && echo 1 || echo 0)" \
        "$left sagas running or compensating (after $(calc "$waited / 2" 1)s settling)"
    check "no order pending" "$([[ $pending == 0 ]] && echo 1 || echo 0)" "$pending pending"
    check "confirmed orders = 201 answers" "$(abs_le "$confirmed" "$total201" "$CONNS" && echo 1 || echo 0)" \
        "$confirmed confirmed, $total201 answered 201 (all of the run; tolerance $CONNS)"
    if [[ ${R[$run.total_5xx]} != 0 || ${R[$run.total_transport_errors]} != 0 || ${R[$run.total_202]} != 0 ]]; then
        say "  note: ${R[$run.total_5xx]} 5xx, ${R[$run.total_transport_errors]} transport errors," \
            "${R[$run.total_202]} 202s over the whole run"
    fi
}

# ---------------------------------------------------------------------------------------------
# The baselines: the same business writes without the saga log, through pgbench.

PGBENCH_DIR=$ROOT/bench/pgbench

baseline_db() { # baseline_db DB: fresh, the service's schema, the same products
    create_db "$1"
    for migration in "$ROOT"/migrations/postgres/*.sql; do "${PSQL[@]}" -d "$1" -f "$migration" >/dev/null; done
    "${PSQL[@]}" -d "$1" -v nprod="$PRODUCTS" -v stock="$STOCK" -f "$PGBENCH_DIR/setup.sql" >/dev/null
}

pgbench_field() { # pgbench_field FILE PATTERN: the number after PATTERN
    sed -n "s/^$2[^0-9]*\([0-9.]*\).*/\1/p" "$1" | head -n1
}

# run_baseline RUN TITLE SCRIPT NPROD
run_baseline() {
    local run=$1 title=$2 script=$PGBENCH_DIR/$3 nprod=$4 db="${TAG}_$1" before after rc
    section "$title"
    baseline_db "$db"
    local common=(-h "$PGH" -p "$PGP" -U "$PGU" -n -M prepared -c "$CONNS" -j 2 -D nprod="$nprod" -D seq=0 -f "$script")
    before=$(pg_counters "$db")
    say "  pgbench -n -M prepared -c $CONNS -j 2 -T $SECONDS_MEASURED -f bench/pgbench/$3 -D nprod=$nprod" \
        "(after a ${WARMUP}s warm-up run)"
    local warm=0
    if [[ $WARMUP -gt 0 ]]; then
        rc=0
        pgbench "${common[@]}" -T "$WARMUP" -D run=1 "$db" >"$WORK/$run.warm.out" 2>&1 || rc=$?
        [[ $rc == 0 ]] || { tail -n 20 "$WORK/$run.warm.out" >&2; die "pgbench failed ($run warm-up)"; }
        warm=$(pgbench_field "$WORK/$run.warm.out" "number of transactions actually processed")
    fi
    rc=0
    local m0 m1 pg0 pg1 TIMEFORMAT='%U %S'
    m0=$(machine_ticks)
    pg0=$(pg_cpu_ticks)
    { time pgbench "${common[@]}" -T "$SECONDS_MEASURED" -D run=2 --log --log-prefix="$WORK/$run.txlog" "$db" \
        >"$WORK/$run.out" 2>&1; } 2>"$WORK/$run.time" || rc=$?
    [[ $rc == 0 ]] || { tail -n 20 "$WORK/$run.out" >&2; die "pgbench failed ($run)"; }
    m1=$(machine_ticks)
    pg1=$(pg_cpu_ticks)
    wait_no_clients pgq "$db"
    after=$(pg_counters "$db")
    local processed failed
    processed=$(pgbench_field "$WORK/$run.out" "number of transactions actually processed")
    failed=$(pgbench_field "$WORK/$run.out" "number of failed transactions")
    R[$run.orders_per_s]=$(calc "$(pgbench_field "$WORK/$run.out" "tps =")" 1)
    R[$run.mean_ms]=$(pgbench_field "$WORK/$run.out" "latency average =")
    R[$run.window_201]=$processed
    R[$run.window_non201]=${failed:-0}
    # Per-order latencies from the per-transaction log (column 3, microseconds).
    local lat
    lat=$(cat "$WORK/$run.txlog".* | awk '$3 ~ /^[0-9]+$/ { print $3 }' | sort -n |
        awk '{ v[NR] = $1 } END { if (NR == 0) { print "0 0 0"; exit }
             i50 = int((NR - 1) * 0.5 + 0.5) + 1; i99 = int((NR - 1) * 0.99 + 0.5) + 1
             printf "%.2f %.2f %.2f", v[i50] / 1000, v[i99] / 1000, v[NR] / 1000 }')
    local p50 p99 max
    read -r p50 p99 max <<<"$lat"
    R[$run.p50_ms]=$p50 R[$run.p99_ms]=$p99 R[$run.max_ms]=$max
    say "  pgbench: orders/s ${R[$run.orders_per_s]}  ($processed orders in ${SECONDS_MEASURED}s)" \
        " latency avg ${R[$run.mean_ms]} ms  p50 ${R[$run.p50_ms]} ms  p99 ${R[$run.p99_ms]} ms  max ${R[$run.max_ms]} ms" \
        " failed: ${failed:-0}"
    local confirmed=$(( $(pgq "$db" "SELECT count(*) FROM orders WHERE status = 'confirmed'") ))
    R[$run.confirmed]=$confirmed
    cpu_line "$run" "$processed" "$m0" "$m1" "" "$pg0" "$pg1" "$(awk '{ print $1 + $2 }' "$WORK/$run.time")" "pgbench"
    per_order "$run" "$before" "$after" "$confirmed"
    say "  checks:"
    stock_checks pg "$db"
    check "confirmed orders = transactions" "$([[ $confirmed == $((warm + processed)) ]] && echo 1 || echo 0)" \
        "$confirmed confirmed, pgbench ran $((warm + processed)) (warm-up $warm + measured $processed)"
    check "no failed transaction" "$([[ ${failed:-0} == 0 ]] && echo 1 || echo 0)" "${failed:-0} failed"
}

# ---------------------------------------------------------------------------------------------
# Statements per order: a private, throwaway PostgreSQL instance with pg_stat_statements (the
# shared server does not preload it, and its settings are not ours to change). Same durable
# defaults (fsync, synchronous_commit on). Counts, not speed: the runs are short.

PRIV_PORT="" PRIV_SOCK=""
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
priv_start() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1 || true)
    [[ -n $bin && -x $bin/initdb && -x $bin/pg_ctl && -f $bin/../lib/pg_stat_statements.so ]] || return 1
    PRIV_BIN=$bin
    PRIV_SOCK=$WORK/pgpriv
    mkdir -p "$PRIV_SOCK"
    [[ $(id -u) == 0 ]] && chown postgres "$PRIV_SOCK"
    PRIV_DATA=$PRIV_SOCK/data
    PRIV_PORT=$(free_port 55432)
    as_pg "$bin/initdb" -D "$PRIV_DATA" -U postgres -A trust -E UTF8 --no-sync >"$WORK/pgpriv.initdb.log" 2>&1 || return 1
    as_pg "$bin/pg_ctl" -D "$PRIV_DATA" -l "$PRIV_SOCK/server.log" -w -t 60 \
        -o "-p $PRIV_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$PRIV_SOCK -c ssl=off \
            -c max_connections=200 -c shared_preload_libraries=pg_stat_statements \
            -c pg_stat_statements.track=all -c pg_stat_statements.max=10000" start >/dev/null 2>&1 || return 1
    ppq postgres "CREATE EXTENSION pg_stat_statements" >/dev/null
}
priv_stop() {
    [[ -n $PRIV_DATA && -d $PRIV_DATA ]] && as_pg "$PRIV_BIN/pg_ctl" -D "$PRIV_DATA" -m fast -w stop >/dev/null 2>&1 || true
    PRIV_DATA=""
}
ppq() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PRIV_PORT" -U postgres -d "$1" -At -F '|' -c "$2"; }

stmt_reset() { ppq postgres "SELECT pg_stat_statements_reset(), pg_stat_reset_shared('wal')" >/dev/null; }
# stmt_read RUN DB ORDERS BEFORE: per-order statement, commit, WAL figures into R[stmt.RUN.*]
stmt_read() {
    local run=$1 db=$2 orders=$3 c0=$4 c1 row
    c1=$(ppq "$db" "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    row=$(ppq postgres "SELECT sum(s.calls) FILTER (WHERE s.toplevel),
            coalesce(sum(s.calls) FILTER (WHERE s.toplevel AND s.query ~* '^\\s*(BEGIN|COMMIT|ROLLBACK)'), 0),
            coalesce(sum(s.calls) FILTER (WHERE NOT s.toplevel), 0),
            (SELECT wal_sync FROM pg_stat_wal), (SELECT wal_bytes FROM pg_stat_wal)
            FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = '$db'")
    IFS='|' read -r calls txctl nested syncs walbytes <<<"$row"
    R[stmt.$run.orders]=$orders
    R[stmt.$run.statements]=$(calc "$calls / $orders" 1)
    R[stmt.$run.txctl]=$(calc "$txctl / $orders" 1)
    R[stmt.$run.nested]=$(calc "$nested / $orders" 1)
    R[stmt.$run.commits]=$(calc "($c1 - $c0) / $orders" 2)
    R[stmt.$run.fsyncs]=$(calc "$syncs / $orders" 2)
    R[stmt.$run.wal_kb]=$(calc "$walbytes / $orders / 1024" 1)
    ppq postgres "SELECT to_char(s.calls::numeric / $orders, 'FM990.00'), to_char(s.total_exec_time / s.calls, 'FM990.000'),
            CASE WHEN s.toplevel THEN '' ELSE '(nested) ' END || regexp_replace(left(s.query, 400), '\\s+', ' ', 'g')
            FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
            WHERE d.datname = '$db' AND s.calls >= $orders / 20 ORDER BY s.toplevel DESC, s.calls DESC, s.query" \
        >"$WORK/stmt.$run.top"
}

run_stmts() {
    section "Statements per order (private PostgreSQL instance with pg_stat_statements, ${STMT_SECONDS}s each)"
    if ! priv_start; then
        say "  skipped: could not start a private PostgreSQL with pg_stat_statements (see $WORK/pgpriv.initdb.log)"
        return 0
    fi
    local c0 orders
    # order-saga
    ppq postgres "CREATE DATABASE saga" >/dev/null
    start_service stmt_saga "$WORK/stmt_saga" "postgres://postgres@127.0.0.1:$PRIV_PORT/saga"
    "$LOADGEN" --url "$URL" --products "$PRODUCTS" --stock "$STOCK" --setup-only 2>/dev/null
    stop_service
    wait_no_clients ppq saga
    stmt_reset
    start_service stmt_saga "$WORK/stmt_saga" "postgres://postgres@127.0.0.1:$PRIV_PORT/saga"
    c0=$(ppq saga "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
    "$LOADGEN" --url "$URL" --no-setup --connections "$CONNS" --warmup 0 --seconds "$STMT_SECONDS" >"$WORK/stmt_saga.out" 2>&1
    sleep 1
    stop_service
    wait_no_clients ppq saga
    orders=$(ppq saga "SELECT count(*) FROM orders WHERE status = 'confirmed'")
    stmt_read saga saga "$orders" "$c0"
    # the baselines
    local b
    for b in one_tx three_tx; do
        ppq postgres "CREATE DATABASE $b" >/dev/null
        for migration in "$ROOT"/migrations/postgres/*.sql; do
            psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PRIV_PORT" -U postgres -d "$b" -f "$migration" >/dev/null
        done
        psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$PRIV_PORT" -U postgres -d "$b" -v nprod="$PRODUCTS" \
            -v stock="$STOCK" -f "$PGBENCH_DIR/setup.sql" >/dev/null
        stmt_reset
        c0=$(ppq "$b" "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        # Simple protocol here: pg_stat_statements does not see BEGIN/COMMIT prepared by pgbench.
        pgbench -h 127.0.0.1 -p "$PRIV_PORT" -U postgres -n -M simple -c "$CONNS" -j 2 -T "$STMT_SECONDS" \
            -D nprod="$PRODUCTS" -D seq=0 -D run=1 -f "$PGBENCH_DIR/$b.sql" "$b" >"$WORK/stmt_$b.out" 2>&1 ||
            { tail "$WORK/stmt_$b.out" >&2; die "pgbench failed (statement pass, $b)"; }
        wait_no_clients ppq "$b"
        orders=$(ppq "$b" "SELECT count(*) FROM orders WHERE status = 'confirmed'")
        stmt_read "$b" "$b" "$orders" "$c0"
    done
    priv_stop
    printf '  %-36s %12s %12s %12s\n' "per order" "order-saga" "1-tx" "3-tx"
    local k label
    for k in statements txctl nested commits fsyncs wal_kb; do
        case $k in
            statements) label="statements sent" ;;
            txctl) label="  of which BEGIN/COMMIT" ;;
            nested) label="nested statements (FK checks)" ;;
            commits) label="transactions committed" ;;
            fsyncs) label="WAL fsyncs (pg_stat_wal.wal_sync)" ;;
            wal_kb) label="WAL KiB" ;;
        esac
        printf '  %-36s %12s %12s %12s\n' "$label" "${R[stmt.saga.$k]}" "${R[stmt.one_tx.$k]}" "${R[stmt.three_tx.$k]}"
    done
    say "  (orders counted: order-saga ${R[stmt.saga.orders]}, 1-tx ${R[stmt.one_tx.orders]}, 3-tx ${R[stmt.three_tx.orders]};" \
        "order-saga's include its recovery loop and lease heartbeat)"
    say "  order-saga's statements, calls per order and mean execution ms (the server's time only):"
    awk -F'|' '{ q = $3; if (length(q) > 110) q = substr(q, 1, 107) "..."; printf "    %6s  %7s  %s\n", $1, $2, q }' \
        "$WORK/stmt.saga.top"
}

# ---------------------------------------------------------------------------------------------
# Soak: the uniform workload for minutes; does the service's memory grow?

run_soak() {
    local run=soak db="${TAG}_soak" secs=$((SOAK_MINUTES * 60))
    section "Soak: uniform workload on PostgreSQL for ${SOAK_MINUTES} min, RSS every 10 s"
    create_db "$db"
    start_service "$run" "$WORK/$run" "postgres://$PGU@$PGH:$PGP/$db"
    "$LOADGEN" --url "$URL" --products "$PRODUCTS" --stock "$STOCK" --setup-only 2>/dev/null
    "$LOADGEN" --url "$URL" --no-setup --connections "$CONNS" --warmup 0 --seconds "$secs" --report-every 10 \
        >"$WORK/$run.loadgen.out" 2>"$WORK/$run.loadgen.err" &
    local lg=$! t=0 samples=()
    while kill -0 "$lg" 2>/dev/null && kill -0 "$SVC_PID" 2>/dev/null; do
        samples+=("$(proc_kb "$SVC_PID" VmRSS)")
        printf '  t=%4ss  RSS %6.1f MiB  %s\n' "$t" "$(calc "${samples[-1]} / 1024")" \
            "$(tail -n1 "$WORK/$run.loadgen.err" 2>/dev/null | sed -n 's/^loadgen: t=[0-9]*s //p')"
        for _ in 1 2 3 4 5 6 7 8 9 10; do
            kill -0 "$lg" 2>/dev/null || break
            sleep 1
        done
        t=$((t + 10))
    done
    if kill -0 "$lg" 2>/dev/null; then # the service died: stop the load too
        kill "$lg" 2>/dev/null || true
        wait "$lg" 2>/dev/null || true
    else
        wait "$lg" || die "the load generator failed (soak)"
    fi
    say "  loadgen: $(head -n1 "$WORK/$run.loadgen.out")"
    read_result "$run" "$WORK/$run.loadgen.out"
    local hwm alive
    alive=$(service_alive "$run")
    hwm=$(proc_kb "$SVC_PID" VmHWM)
    sleep 2
    stop_service
    # Growth: after the first fifth (allocator and pools warming up), the mean of the second half
    # of the samples against the first half's.
    local verdict
    verdict=$(printf '%s\n' "${samples[@]}" | awk '{ v[NR] = $1 } END {
        s = int(NR / 5) + 1; n = NR - s + 1; if (n < 4) { print "1 too few samples"; exit }
        h = int(n / 2); a = 0; b = 0
        for (i = s; i < s + h; i++) a += v[i]; for (i = NR - h + 1; i <= NR; i++) b += v[i]
        a /= h; b /= h; g = b - a; lim = (a * 0.05 > 2048) ? a * 0.05 : 2048
        printf "%d first half %.1f MiB, second half %.1f MiB: %+.1f MiB (limit %.1f MiB)",
            (g <= lim), a / 1024, b / 1024, g / 1024, lim / 1024 }')
    say "  peak RSS (VmHWM) $(calc "$hwm / 1024") MiB"
    say "  checks:"
    say "$alive"
    [[ $alive == *FAIL* ]] && FAILS=$((FAILS + 1))
    check "RSS does not grow" "${verdict%% *}" "${verdict#* }"
    stock_checks pg "$db"
    local left confirmed
    left=$(unfinished pg "$db")
    confirmed=$(pgq "$db" "SELECT count(*) FROM orders WHERE status = 'confirmed'")
    check "no saga unfinished" "$([[ $left == 0 ]] && echo 1 || echo 0)" "$left running or compensating"
    check "confirmed orders = 201 answers" "$(abs_le "$confirmed" "${R[$run.total_201]:-0}" "$CONNS" && echo 1 || echo 0)" \
        "$confirmed confirmed, ${R[$run.total_201]:-?} answered 201"
}

# ---------------------------------------------------------------------------------------------
# The run

section "order-saga benchmark"
say "  $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo ' (src modified)')," \
    "$(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
say "  PostgreSQL $PGH:$PGP: $(pgq postgres "SELECT current_setting('server_version') || ', synchronous_commit=' ||
    current_setting('synchronous_commit') || ', fsync=' || current_setting('fsync') || ', shared_buffers=' ||
    current_setting('shared_buffers')")"
say "  the load generator, the service and PostgreSQL share this machine's cores"
PG_POSTMASTER=$(head -n1 "$(pgq postgres "SHOW data_directory" 2>/dev/null)/postmaster.pid" 2>/dev/null || true)
[[ -n $PG_POSTMASTER && -r /proc/$PG_POSTMASTER/stat ]] || PG_POSTMASTER=""
[[ ${#SERVICE_ENV[@]} -gt 0 ]] && say "  service settings: $(printf '%s ' "${SERVICE_ENV[@]}" | sed -E 's/((SECRET|TOKEN)[A-Z_]*=)[^ ]*/\1***/g')(otherwise its defaults)"

say "  building: cargo build --release --bin order-saga --example loadgen --example mint_token"
cargo build --release --bin order-saga --example loadgen --example mint_token >"$WORK/build.log" 2>&1 ||
    { tail -n 30 "$WORK/build.log" >&2; die "the build failed"; }
if [[ $AUTH == 1 ]]; then
    # A secret of this run's own; the token reaches the load generator through its environment.
    AUTH_SECRET=$(head -c 32 /dev/urandom | base64)
    SERVICE_ENV+=("AUTH_JWT_SECRET=$AUTH_SECRET")
    LOADGEN_TOKEN=$(AUTH_JWT_SECRET=$AUTH_SECRET "$ROOT/target/release/examples/mint_token" --sub bench --scope admin --minutes 600)
    export LOADGEN_TOKEN
    say "  authentication on: every request carries an HS256 admin token"
fi

if [[ $SOAK == 1 ]]; then
    run_soak
    section "Result"
    [[ $FAILS == 0 ]] && say "  all checks passed" || say "  $FAILS check(s) FAILED"
    [[ $FAILS == 0 ]]
    exit
fi

run_service saga_uniform "order-saga on PostgreSQL, uniform: $PRODUCTS products" pg 0
run_service saga_hot "order-saga on PostgreSQL, contention: $HOT hot products" pg "$HOT"
run_baseline one_uniform "Baseline 1-tx on PostgreSQL, uniform (no saga log, one transaction per order)" one_tx.sql "$PRODUCTS"
run_baseline three_uniform "Baseline 3-tx on PostgreSQL, uniform (no saga log, three transactions per order)" three_tx.sql "$PRODUCTS"
run_baseline one_hot "Baseline 1-tx on PostgreSQL, contention: $HOT hot products" one_tx.sql "$HOT"
run_baseline three_hot "Baseline 3-tx on PostgreSQL, contention: $HOT hot products" three_tx.sql "$HOT"
for ((round = 2; round <= ROUNDS; round++)); do
    run_service "saga_uniform_r$round" "order-saga on PostgreSQL, uniform, round $round of $ROUNDS" pg 0
    run_baseline "three_uniform_r$round" "Baseline 3-tx on PostgreSQL, uniform, round $round of $ROUNDS" three_tx.sql "$PRODUCTS"
done
run_service saga_sqlite "order-saga on SQLite (default configuration), uniform: $PRODUCTS products" sqlite 0
[[ $STMTS == 1 ]] && run_stmts

section "Summary: $CONNS connections, ${WARMUP}s warm-up + ${SECONDS_MEASURED}s measured; load average now $(cut -d' ' -f1-3 /proc/loadavg)"
printf '  %-10s %-22s %9s %8s %8s %8s %8s %9s %9s %9s\n' workload system "orders/s" "mean ms" "p50 ms" "p99 ms" "max ms" \
    "non-201" "5xx" "peak RSS"
row() { # row WORKLOAD SYSTEM RUN
    local r=$3 rss="-" fivexx="-"
    [[ -n ${R[$r.hwm_kb]:-} ]] && rss="$(calc "${R[$r.hwm_kb]} / 1024") MiB"
    [[ -n ${R[$r.window_5xx]:-} ]] && fivexx=${R[$r.window_5xx]}
    printf '  %-10s %-22s %9s %8s %8s %8s %8s %9s %9s %9s\n' "$1" "$2" "${R[$r.orders_per_s]}" "${R[$r.mean_ms]}" \
        "${R[$r.p50_ms]}" "${R[$r.p99_ms]}" "${R[$r.max_ms]}" "${R[$r.window_non201]}" "$fivexx" "$rss"
}
row uniform "order-saga (pg)" saga_uniform
row uniform "baseline 1-tx" one_uniform
row uniform "baseline 3-tx" three_uniform
row "hot-$HOT" "order-saga (pg)" saga_hot
row "hot-$HOT" "baseline 1-tx" one_hot
row "hot-$HOT" "baseline 3-tx" three_hot
row uniform "order-saga (sqlite)" saga_sqlite
say "  (non-201 and 5xx: answers in the measured window; for pgbench, failed transactions)"
say ""
say "  CPU per order, ms (all share $(nproc) cores; postgres = the whole server, other users' queries too):"
printf '    %-10s %-22s %9s %9s %9s %9s %15s\n' workload system service postgres client total "commits/order"
cpu_row() {
    local r=$3 svc=${R[$3.cpu_service]:-} total
    total=$(awk -v a="${svc:-0}" -v b="${R[$r.cpu_pg]:-0}" -v c="${R[$r.cpu_client]:-0}" 'BEGIN { printf "%.2f", a + b + c }')
    [[ -z ${R[$r.cpu_pg]:-} && $r != saga_sqlite ]] && total="?"
    printf '    %-10s %-22s %9s %9s %9s %9s %15s\n' "$1" "$2" "${svc:--}" "${R[$r.cpu_pg]:--}" "${R[$r.cpu_client]:-?}" \
        "$total" "${R[$r.commits_per_order]:--}"
}
cpu_row uniform "order-saga (pg)" saga_uniform
cpu_row uniform "baseline 1-tx" one_uniform
cpu_row uniform "baseline 3-tx" three_uniform
cpu_row "hot-$HOT" "order-saga (pg)" saga_hot
cpu_row "hot-$HOT" "baseline 1-tx" one_hot
cpu_row "hot-$HOT" "baseline 3-tx" three_hot
cpu_row uniform "order-saga (sqlite)" saga_sqlite
say ""
say "  order-saga against the baselines (orders/s ratio: higher is better; p99 ratio: lower is better):"
for w in uniform hot; do
    for b in three one; do
        printf '    %-8s vs %s: orders/s %s, p99 %s   (commits/order %s vs %s)\n' "$w" \
            "$([[ $b == one ]] && echo 1-tx || echo 3-tx)" \
            "$(ratio "${R[saga_$w.orders_per_s]}" "${R[${b}_$w.orders_per_s]}")" \
            "$(ratio "${R[saga_$w.p99_ms]}" "${R[${b}_$w.p99_ms]}")" \
            "${R[saga_$w.commits_per_order]:-?}" "${R[${b}_$w.commits_per_order]:-?}"
    done
done
say "    sqlite   vs pg order-saga: orders/s $(ratio "${R[saga_sqlite.orders_per_s]}" "${R[saga_uniform.orders_per_s]}")"
if ((ROUNDS > 1)); then
    # Both runs of a round share the machine's state of the moment as well as the first pair
    # does; the median of the rounds says more on a noisy machine than any one.
    say ""
    say "  uniform vs 3-tx, round by round (order-saga orders/s / 3-tx orders/s):"
    ratios=()
    for ((round = 1; round <= ROUNDS; round++)); do
        suffix=$([[ $round == 1 ]] || echo "_r$round")
        a=${R[saga_uniform$suffix.orders_per_s]:-} b=${R[three_uniform$suffix.orders_per_s]:-}
        r=$(ratio "$a" "$b")
        [[ $r == n/a ]] || ratios+=("${r%x}")
        say "    round $round: $a / $b = $r   p99 $(ratio "${R[saga_uniform$suffix.p99_ms]:-}" "${R[three_uniform$suffix.p99_ms]:-}")"
    done
    say "    median: $(printf '%s\n' "${ratios[@]}" | sort -g | awk 'NF { v[++n] = $1 } END {
        if (n == 0) printf "n/a"; else if (n % 2) printf "%.2fx", v[(n + 1) / 2]; else printf "%.2fx", (v[n / 2] + v[n / 2 + 1]) / 2 }')"
fi

section "Result"
if [[ $FAILS == 0 ]]; then
    say "  all checks passed"
else
    say "  $FAILS check(s) FAILED"
    exit 1
fi
