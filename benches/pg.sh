#!/usr/bin/env bash
# PostgreSQL benchmark: backupd vs pgBackRest base backups and point-in-time restore, on one
# PostgreSQL 15 cluster in one run.
#
# usage: benches/pg.sh [--keep] [--rebuild]
#
# The cluster: `pgbench -i -s $SCALE` with the hex filler (PG_FILLER=hex of the shared
# make-dataset.sh: pgbench_accounts.filler = 84 hex chars, then VACUUM FULL, VACUUM ANALYZE,
# 5,000 single-client pgbench transactions, CHECKPOINT; loaded with wal_level = minimal). That
# seed cluster is built once into $BENCH_DIR/pg-seed-s$SCALE-hex (kept, like e2e.sh's corpus;
# --rebuild makes it again) and every run works on a copy of it, started with
# wal_level = replica, archive_mode = on and, since a cluster has one archive_command,
#   archive_command = '$RUN/archive-backupd-and-pgbackrest.sh %p'
# (pgBackRest's check and backup insist that the command contains "pgbackrest") which pushes each WAL file with BOTH `backupd wal-push` and `pgbackrest archive-push`, in
# parallel, and fails (PostgreSQL retries) unless both succeeded. Archiving therefore costs
# both tools the same, is not part of any timed step except that each tool's backup waits for
# its own copy of the backup's last segment, and its per-file times are in logs/archive-times.
#
# What it measures (each step under `/usr/bin/time -f '%e %U %S %M'`: wall s, user s, sys s,
# peak RSS KiB; page cache dropped before every timed step when allowed; an untimed CHECKPOINT
# before each backup so neither tool pays for the other's dirty buffers; backupd runs first):
#   full   backupd backup --postgres (first)  vs  pgbackrest --type=full backup
#   -- pgbench -c 1 -t 10000 -n; pg_switch_wal(); wait until archived (untimed) --
#   incr   backupd backup --postgres (second: unchanged files come from the parent)
#          vs  pgbackrest --type=incr backup
#          stored bytes = growth of the repository minus its WAL archive during the step
#          (backupd: REPO minus REPO/wal; pgBackRest: REPO/backup)
#   -- 300 pgbench transactions, T = now() and count(*) of pgbench_history, 300 more,
#      pg_switch_wal(), wait until archived --
#   pitr   point-in-time restore to T into a fresh directory on a free port, until promoted:
#          backupd restore --at T --start --pg-port P --archive-mode off (one command) vs
#          pgbackrest --type=time --target=T --target-action=promote --archive-mode=off
#          restore, then pg_ctl start and wait until promoted (timed as one command by
#          $RUN/pgbackrest-pitr.sh, which waits as `backupd restore --start` does:
#          `pg_ctl -w start`, then until global/pg_control says "in production", polled every
#          50 ms). After either command the script polls `select pg_is_in_recovery()` every
#          10 ms until it is f, and the PITR time is the command's wall time plus that wait
#          (the same end point for both, whatever each command waits for).
#          Each restored server is then checked (count(*) of pgbench_history = the count at
#          T) and stopped.
# "other CPU s" is CPU used on the machine during a step besides the tool itself (from
# /proc/stat): the PostgreSQL server (checkpoints, recovery), archive pushes, and anything
# else running (a cargo build next door). A step where it exceeds 25% of the machine is
# marked NOISY; judge the ratios over several runs.
#
# pgBackRest settings (spec): process-max=2, compress-type=zst, repo1-cipher-type=aes-256-cbc,
# start-fast=y (backupd also asks for an immediate checkpoint), stanza `bench`; its config
# (with the passphrase) is $RUN/pgbackrest.conf, mode 600. backupd's repository password is in
# a mode-600 file passed as BACKUPD_PASSWORD_FILE. No password is on a command line.
#
# Targets (PASS/FAIL; ratio = backupd / pgBackRest):
#   full base backup time              <= 0.7x
#   incremental backup time            <= 0.5x
#   incremental stored bytes           <= 0.5x
#   PITR time (restore + promote until pg_is_in_recovery() = f)   <= 1.0x
# The PITR row counts must match (else the script exits 1 after reporting).
#
# Environment:
#   SCALE        pgbench scale factor                  (default 60)
#   BENCH_DIR    scratch + results dir                 (default /var/tmp/backupd-bench)
#   BACKUPD_BIN  backupd binary (default <repo>/target/release/backupd; never built here).
#                It is copied into the run dir first, so a rebuild during the run changes nothing.
#   PGBIN        PostgreSQL 15 binaries                (default /usr/lib/postgresql/15/bin)
#   WAIT_QUIET   before each timed step, wait up to this many seconds for a quiet machine
#                (a 2 s window with under 10% of the CPUs busy)  (default 0: don't wait)
# Output: a table and the targets on stdout; one JSON line appended to
# $BENCH_DIR/pg-results.jsonl; logs kept in $BENCH_DIR/runs/pg-<timestamp>/logs. The run's
# cluster, repositories and restored clusters are deleted at the end unless --keep. Every
# PostgreSQL server the script started is stopped on exit, also on error.
# Installs pgbackrest (and GNU time) with apt-get if missing. Must run as root.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
SCALE=${SCALE:-60}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
WAIT_QUIET=${WAIT_QUIET:-0}
KEEP=0
REBUILD=0
TXNS_CHANGE=10000     # pgbench transactions between the full and the incremental backups
TXNS_PITR=300         # pgbench transactions before and after the PITR target time

while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1; shift ;;
    --rebuild) REBUILD=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (usage: $0 [--keep] [--rebuild])" >&2; exit 2 ;;
  esac
done

log() { printf '[pg %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"

[ "$(id -u)" = 0 ] || die "run as root (PostgreSQL servers run as the postgres user via runuser)"
[[ "$SCALE" =~ ^[1-9][0-9]*$ ]] || die "SCALE must be a positive integer"
id postgres >/dev/null 2>&1 || die "no postgres user (install postgresql-15)"
[ -x "$PGBIN/initdb" ] && [ -x "$PGBIN/pgbench" ] || die "PostgreSQL binaries not found in $PGBIN"

# ---------------------------------------------------------------- prerequisites
[ -x /usr/bin/time ] || { log "installing GNU time"; apt_install time; }
if ! command -v pgbackrest >/dev/null; then
  log "installing pgbackrest"; apt_install pgbackrest
fi
PGBR_VERSION=$(pgbackrest version 2>/dev/null | head -1)
case "$PGBR_VERSION" in *2.45*) ;; *) log "WARNING: expected pgBackRest 2.45, found '$PGBR_VERSION'" ;; esac

BACKUPD_SRC=${BACKUPD_BIN:-$ROOT/target/release/backupd}
[ -x "$BACKUPD_SRC" ] || die "backupd binary not found: $BACKUPD_SRC (build it, or set BACKUPD_BIN)"

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
chmod 755 "$BENCH_DIR"

# ---------------------------------------------------------------- helpers
asp() { runuser -u postgres -- "$@"; }
freeport() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
sql() {  # sql PORT QUERY: one query as root over TCP, unaligned output, '|' between fields
  "$PGBIN/psql" -X -qAt -F'|' -h 127.0.0.1 -p "$1" -U postgres -d postgres -v ON_ERROR_STOP=1 -c "$2"
}

STARTED=()       # data directories of servers this script started
pg_start() {     # pg_start DATADIR LOGFILE [pg_ctl -o options]
  local opts=${3:-}
  STARTED+=("$1")
  asp "$PGBIN/pg_ctl" -D "$1" -l "$2" -w -t 120 ${opts:+-o "$opts"} start >/dev/null \
    || { tail -20 "$2" >&2; die "could not start the server in $1 (log $2)"; }
}
pg_stop() {      # pg_stop DATADIR: fast shutdown if it is running
  [ -f "$1/postmaster.pid" ] || return 0
  asp "$PGBIN/pg_ctl" -D "$1" -m fast -w -t 60 stop >/dev/null 2>&1 \
    || asp "$PGBIN/pg_ctl" -D "$1" -m immediate -w stop >/dev/null 2>&1 || true
}

RUN=""
cleanup() {
  local rc=$? d
  for d in "${STARTED[@]}"; do pg_stop "$d"; done
  [ -n "${SLEEP_FD:-}" ] && exec {SLEEP_FD}>&- 2>/dev/null
  if [ -n "$RUN" ] && [ -d "$RUN" ]; then
    if [ "$KEEP" = 1 ]; then
      log "kept run data in $RUN"
    else
      rm -rf "${RUN:?}/pg" "$RUN"/repo-* "$RUN"/restore-* "${RUN:?}/bin" "$RUN"/pgbackrest-lock "$RUN"/pgbackrest-spool "$RUN/.sleep" \
        "$RUN/secrets" "$RUN/pgbackrest.conf"   # the passphrases are of no use without the repositories
    fi
  fi
  [ -n "${SEED_TMP:-}" ] && rm -rf "$SEED_TMP"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- the seed cluster (built once)
SEED=$BENCH_DIR/pg-seed-s$SCALE-hex
[ "$REBUILD" = 1 ] && rm -rf "$SEED"
if [ ! -f "$SEED/READY" ]; then
  rm -rf "$SEED"
  SEED_TMP=$SEED.tmp.$$
  log "building the seed cluster (pgbench -s $SCALE, hex filler) in $SEED (once; a few minutes)"
  mkdir -p "$SEED_TMP/sock"; chown -R postgres: "$SEED_TMP"; chmod 755 "$SEED_TMP"
  asp "$PGBIN/initdb" -D "$SEED_TMP/data" -U postgres --auth=trust -E UTF8 --locale=C --no-instructions >/dev/null
  # as make-dataset.sh: load with minimal WAL (no archiving while loading)
  cat >> "$SEED_TMP/data/postgresql.conf" <<CONF
# benchmark dataset settings (as shared/bench/make-dataset.sh)
wal_level = minimal
max_wal_senders = 0
max_wal_size = 256MB
min_wal_size = 64MB
CONF
  SP=$(freeport)
  pg_start "$SEED_TMP/data" "$SEED_TMP/load.log" \
    "-c fsync=off -c listen_addresses=127.0.0.1 -c port=$SP -c unix_socket_directories=$SEED_TMP/sock"
  "$PGBIN/pgbench" -h 127.0.0.1 -p "$SP" -U postgres -i -s "$SCALE" -q postgres 2>&1 | tail -1 >&2
  "$PGBIN/psql" -X -qAt -h 127.0.0.1 -p "$SP" -U postgres -d postgres -v ON_ERROR_STOP=1 <<'SQL'
UPDATE pgbench_accounts SET filler = substr(md5(aid::text) || md5((aid * 7)::text) || md5((aid * 13)::text), 1, 84);
VACUUM FULL pgbench_accounts;
VACUUM ANALYZE;
SQL
  "$PGBIN/pgbench" -h 127.0.0.1 -p "$SP" -U postgres -c 1 -t 5000 --random-seed=42 -n postgres >/dev/null 2>&1
  sql "$SP" "CHECKPOINT" >/dev/null
  pg_stop "$SEED_TMP/data"
  rm -rf "$SEED_TMP/sock" "$SEED_TMP/load.log"
  touch "$SEED_TMP/READY"
  mv "$SEED_TMP" "$SEED"
  SEED_TMP=""
fi

# ---------------------------------------------------------------- run layout
TS=$(date -u +%Y%m%dT%H%M%SZ)
RUN=$BENCH_DIR/runs/pg-$TS
LOGS=$RUN/logs
RESULTS=$RUN/results.tsv     # tool step wall user sys rss_kib repo_bytes wal_bytes busy_cpu_s
KV=$RUN/figures.tsv          # key value: the other figures
JSONL=$BENCH_DIR/pg-results.jsonl
DATA=$RUN/pg/data
SOCK=$RUN/pg/sock
REPO_B=$RUN/repo-backupd
REPO_P=$RUN/repo-pgbackrest
mkdir -p "$RUN/pg" "$SOCK" "$LOGS/pgbackrest" "$RUN/secrets" "$RUN/bin" "$REPO_B" "$REPO_P" \
  "$RUN/pgbackrest-lock" "$RUN/pgbackrest-spool"
chmod 755 "$RUN" "$RUN/pg" "$RUN/bin"
chmod 700 "$RUN/secrets"
chown postgres: "$SOCK" "$LOGS" "$LOGS/pgbackrest" "$RUN/secrets" "$REPO_B" "$REPO_P" \
  "$RUN/pgbackrest-lock" "$RUN/pgbackrest-spool"
: > "$RESULTS"; : > "$KV"
kv() { printf '%s\t%s\n' "$1" "$2" >> "$KV"; }

BACKUPD=$RUN/bin/backupd
cp "$BACKUPD_SRC" "$BACKUPD"; chmod 755 "$BACKUPD"
BACKUPD_VERSION="$("$BACKUPD" --version), built $(date -u -r "$BACKUPD_SRC" +%FT%TZ), sha256 $(sha256sum "$BACKUPD" | cut -c1-12)"
mkfifo "$RUN/.sleep"; exec {SLEEP_FD}<>"$RUN/.sleep"   # `read -t` on it = sleep without a fork

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
busy_procs=$(ps -eo comm= | grep -cxE 'rustc|cargo|cc1|cc1plus|ld' || true)
[ "${busy_procs:-0}" = 0 ] || log "WARNING: $busy_procs compiler processes (rustc/cargo/cc) are running: the figures will be noisy"
log "run dir $RUN; copying the seed cluster"
cp -a "$SEED/data" "$DATA"
PORT=$(freeport)

# secrets: random, in mode-600 files owned by postgres (the archive_command runs as postgres)
PW=$RUN/secrets/backupd.pw
head -c 32 /dev/urandom | base64 | tr -d '\n' > "$PW"
PGBR_CONF=$RUN/pgbackrest.conf
cat > "$PGBR_CONF" <<CONF
[global]
repo1-path=$REPO_P
repo1-retention-full=99
repo1-cipher-type=aes-256-cbc
repo1-cipher-pass=$(head -c 32 /dev/urandom | base64 | tr -d '\n')
compress-type=zst
process-max=2
start-fast=y
log-path=$LOGS/pgbackrest
log-level-console=warn
log-level-file=info
lock-path=$RUN/pgbackrest-lock
spool-path=$RUN/pgbackrest-spool

[bench]
pg1-path=$DATA
pg1-port=$PORT
pg1-socket-path=$SOCK
pg1-user=postgres
CONF
chown postgres: "$PW" "$PGBR_CONF"; chmod 600 "$PW" "$PGBR_CONF"

# the archive_command: both tools, in parallel; exit 0 only if both stored the file
ARCH=$RUN/archive-backupd-and-pgbackrest.sh
cat > "$ARCH" <<SH
#!/bin/bash
# archive_command = '$ARCH %p' (run by PostgreSQL as postgres in the data directory)
p=\$1; f=\$(basename "\$p"); t0=\$(date +%s.%N)
( BACKUPD_PASSWORD_FILE=$PW "$BACKUPD" -r "$REPO_B" -q wal-push "\$p" 2>>"$LOGS/archive-backupd.log"; rc=\$?
  echo "\$rc \$(date +%s.%N)" > "$LOGS/.push-\$f" ) &
pgbackrest --config="$PGBR_CONF" --stanza=bench archive-push "\$p" >/dev/null 2>>"$LOGS/archive-pgbackrest.log"
rp=\$?; tp=\$(date +%s.%N)
wait
read -r rb tb < "$LOGS/.push-\$f"; rm -f "$LOGS/.push-\$f"
echo "\$f \$(awk -v a=\$t0 -v b=\$tb -v c=\$tp 'BEGIN{printf "backupd=%.3f pgbackrest=%.3f", b-a, c-a}') rc_backupd=\$rb rc_pgbackrest=\$rp" >> "$LOGS/archive-times"
[ "\$rb" = 0 ] && [ "\$rp" = 0 ]
SH
chmod 755 "$ARCH"
touch "$LOGS/archive-times" "$LOGS/archive-backupd.log" "$LOGS/archive-pgbackrest.log"
chown postgres: "$LOGS/archive-times" "$LOGS/archive-backupd.log" "$LOGS/archive-pgbackrest.log"

cat >> "$DATA/postgresql.conf" <<CONF
# pg.sh benchmark run
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$SOCK'
wal_level = replica
max_wal_senders = 10
archive_mode = on
archive_command = '$ARCH %p'
CONF

# ---------------------------------------------------------------- repositories + server
log "backupd init; starting the cluster on port $PORT"
asp env BACKUPD_PASSWORD_FILE="$PW" "$BACKUPD" -r "$REPO_B" init > "$LOGS/backupd.init.out" 2>&1 \
  || { cat "$LOGS/backupd.init.out" >&2; die "backupd init failed"; }
pg_start "$DATA" "$LOGS/pg-main.log"
pgbr() { asp pgbackrest --config="$PGBR_CONF" --stanza=bench "$@"; }
log "pgbackrest stanza-create + check"
pgbr stanza-create > "$LOGS/pgbackrest.stanza-create.out" 2>&1 \
  || { cat "$LOGS/pgbackrest.stanza-create.out" >&2; die "pgbackrest stanza-create failed"; }
pgbr check > "$LOGS/pgbackrest.check.out" 2>&1 \
  || { cat "$LOGS/pgbackrest.check.out" >&2; die "pgbackrest check failed"; }

DB_BYTES=$(sql "$PORT" "select sum(pg_database_size(oid)) from pg_database")
DATA_BYTES=$(du -sb "$DATA" | cut -f1)
kv db_bytes "$DB_BYTES"; kv pgdata_bytes "$DATA_BYTES"
log "cluster: databases $((DB_BYTES >> 20)) MiB, data directory $((DATA_BYTES >> 20)) MiB"

wait_archived() {  # wait_archived SEGMENT: until the archiver (= both tools) has it
  local r
  for _ in $(seq 2400); do
    r=$(sql "$PORT" "select coalesce(last_archived_wal, '') collate \"C\" >= '$1', failed_count, coalesce(last_failed_wal, '') from pg_stat_archiver")
    [ "${r%%|*}" = t ] && return 0
    read -rt 0.05 -u "$SLEEP_FD" || true
  done
  tail -5 "$LOGS/archive-backupd.log" "$LOGS/archive-pgbackrest.log" >&2
  die "WAL segment $1 not archived after 120 s (archiver: $r)"
}
switch_and_wait() {
  local seg
  seg=$(sql "$PORT" "select pg_walfile_name(pg_switch_wal())")
  wait_archived "$seg"
}
repo_sizes() {  # repo_sizes TOOL: "<repository bytes> <of which WAL archive bytes>"
  local total wal
  case "$1" in
    backupd)    total=$(du -sb "$REPO_B" | cut -f1); wal=$( { du -sb "$REPO_B/wal" 2>/dev/null || echo 0; } | cut -f1) ;;
    pgbackrest) total=$(du -sb "$REPO_P" | cut -f1); wal=$( { du -sb "$REPO_P/archive" 2>/dev/null || echo 0; } | cut -f1) ;;
  esac
  echo "$total $wal"
}

wait_quiet() {  # wait up to WAIT_QUIET s for a 2 s window with < 10% of the CPUs busy
  [ "$WAIT_QUIET" -gt 0 ] || return 0
  local t0=$SECONDS b0 b1
  while [ $((SECONDS - t0)) -lt "$WAIT_QUIET" ]; do
    b0=$(busy_cpu_s); read -rt 2 -u "$SLEEP_FD" || true; b1=$(busy_cpu_s)
    awk -v a="$b0" -v b="$b1" -v n="$(nproc)" 'BEGIN{exit !((b - a) < 0.1 * 2 * n)}' && return 0
  done
  log "machine still busy after waiting ${WAIT_QUIET}s; measuring anyway"
}
now_s() { local t=$EPOCHREALTIME; echo "${t/,/.}"; }
# run_step TOOL STEP CMD...: drop caches, run CMD under GNU time, record one results row.
# If POST_CMD is set, it runs right after CMD (before anything else is measured).
POST_CMD=""
run_step() {
  local tool=$1 step=$2 tf=$LOGS/$1.$2.time rc=0 busy0 busy sizes
  shift 2
  wait_quiet
  drop_caches
  log "$tool: $step"
  busy0=$(busy_cpu_s)
  /usr/bin/time -f '%e %U %S %M' -o "$tf" "$@" > "$LOGS/$tool.$step.out" 2> "$LOGS/$tool.$step.err" || rc=$?
  [ "$rc" = 0 ] && [ -n "$POST_CMD" ] && eval "$POST_CMD"
  busy=$(awk -v a="$busy0" -v b="$(busy_cpu_s)" 'BEGIN{printf "%.2f", b-a}')
  if [ "$rc" != 0 ]; then
    printf 'command:' >&2; printf ' %q' "$@" >&2; echo >&2
    tail -25 "$LOGS/$tool.$step.err" >&2
    die "$tool $step failed (exit $rc); logs in $LOGS"
  fi
  sizes=$(repo_sizes "$tool")
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$step" "$(tail -1 "$tf" | tr ' ' '\t')" \
    "${sizes% *}" "${sizes#* }" "$busy" >> "$RESULTS"
}
bd() { env BACKUPD_PASSWORD_FILE="$PW" "$BACKUPD" -r "$REPO_B" "$@"; }
BD_BACKUP=(env BACKUPD_PASSWORD_FILE="$PW" "$BACKUPD" -r "$REPO_B" backup --postgres
           --pg-host 127.0.0.1 --pg-port "$PORT" --pg-user postgres --json)
PGBR=(runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench)
json_field() { python3 -c 'import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); v=d.get(sys.argv[1]); print("" if v is None else v)' "$1"; }

# ---------------------------------------------------------------- 1. full base backups
for tool in backupd pgbackrest; do
  sql "$PORT" "CHECKPOINT" >/dev/null
  case $tool in
    backupd)    run_step backupd full "${BD_BACKUP[@]}" ;;
    pgbackrest) run_step pgbackrest full "${PGBR[@]}" --type=full backup ;;
  esac
done
kv backupd_full_json "$(tail -1 "$LOGS/backupd.full.out")"

# ---------------------------------------------------------------- 2. change
log "pgbench -c 1 -t $TXNS_CHANGE -n"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c 1 -t "$TXNS_CHANGE" --random-seed=7 -n postgres \
  > "$LOGS/pgbench-change.out" 2>&1 || { tail "$LOGS/pgbench-change.out" >&2; die "pgbench failed"; }
kv change_tps "$(awk '/^tps/{print $3; exit}' "$LOGS/pgbench-change.out")"
switch_and_wait

# ---------------------------------------------------------------- 3. incremental base backups
for tool in backupd pgbackrest; do
  sql "$PORT" "CHECKPOINT" >/dev/null
  before=$(repo_sizes "$tool")
  kv "${tool}_incr_before" "$before"
  case $tool in
    backupd)    run_step backupd incr "${BD_BACKUP[@]}" ;;
    pgbackrest) run_step pgbackrest incr "${PGBR[@]}" --type=incr backup ;;
  esac
done
kv backupd_incr_json "$(tail -1 "$LOGS/backupd.incr.out")"
INCR_SET=$(ls -d "$REPO_P"/backup/bench/*I 2>/dev/null | tail -1)
[ -n "$INCR_SET" ] && kv pgbackrest_incr_set_bytes "$(du -sb "$INCR_SET" | cut -f1)"
asp pgbackrest --config="$PGBR_CONF" --stanza=bench info > "$LOGS/pgbackrest.info.out" 2>&1 || true
bd snapshots > "$LOGS/backupd.snapshots.out" 2>&1 || true

# ---------------------------------------------------------------- 4. PITR target
log "target time: $TXNS_PITR transactions, T, $TXNS_PITR more"
pgb_small() { "$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c 1 -t "$TXNS_PITR" -n postgres >> "$LOGS/pgbench-pitr.out" 2>&1; }
pgb_small
read -rt 0.3 -u "$SLEEP_FD" || true
IFS='|' read -r TARGET COUNT_T <<< "$(sql "$PORT" "select to_char(now() at time zone 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00', count(*) from pgbench_history")"
read -rt 0.3 -u "$SLEEP_FD" || true
pgb_small
COUNT_END=$(sql "$PORT" "select count(*) from pgbench_history")
switch_and_wait
kv target_time "$TARGET"; kv count_at_target "$COUNT_T"; kv count_at_end "$COUNT_END"
log "T = $TARGET: pgbench_history has $COUNT_T rows then ($COUNT_END at the end)"

# pgBackRest's PITR as one timed command: restore, start, wait until promoted.
PITR_P=$RUN/pgbackrest-pitr.sh
cat > "$PITR_P" <<'SH'
#!/bin/bash
# usage: pgbackrest-pitr.sh CONF PGBIN DIR PORT TARGET: restore to TARGET in DIR, start the
# server on PORT, wait until it has promoted; prints "restore_s promote_s".
set -euo pipefail
conf=$1 pgbin=$2 dir=$3 port=$4 target=$5
now() { local t=$EPOCHREALTIME; echo "${t/,/.}"; }
t0=$(now)
runuser -u postgres -- pgbackrest --config="$conf" --stanza=bench --type=time --target="$target" \
  --target-action=promote --archive-mode=off --pg1-path="$dir" --recovery-option=port="$port" restore
t1=$(now)
runuser -u postgres -- "$pgbin/pg_ctl" -D "$dir" -l "$dir/pitr-server.log" -w -t 86400 start >/dev/null \
  || { tail -15 "$dir/pitr-server.log" >&2; echo "pg_ctl start failed" >&2; exit 1; }
# promoted once pg_control's state (u32 at offset 16) is DB_IN_PRODUCTION (6), as pg_ctl promote -w decides
exec {z}<> <(:)
while [ "$(od -An -j16 -N4 -tu4 "$dir/global/pg_control" | tr -d ' ')" != 6 ]; do
  [ -e "$dir/postmaster.pid" ] || { tail -15 "$dir/pitr-server.log" >&2; echo "server stopped during recovery" >&2; exit 1; }
  read -rt 0.05 -u "$z" || true
done
t2=$(now)
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN{printf "%.3f %.3f\n", b-a, c-b}'
SH
chmod 755 "$PITR_P"

# ---------------------------------------------------------------- 5. PITR
wait_writable() {  # wait_writable PORT: seconds until pg_is_in_recovery() = f (10 ms polls, 60 s max)
  local t0 r
  t0=$(now_s)
  for _ in $(seq 6000); do
    r=$(sql "$1" "select pg_is_in_recovery()" 2>/dev/null || true)
    [ "$r" = f ] && break
    read -rt 0.01 -u "$SLEEP_FD" || true
  done
  awk -v a="$t0" -v b="$(now_s)" 'BEGIN{printf "%.3f", b-a}'
}
check_restored() {  # check_restored TOOL DIR PORT: verify, record, stop
  local tool=$1 dir=$2 port=$3 rec cnt tl
  rec=$(sql "$port" "select pg_is_in_recovery()")
  cnt=$(sql "$port" "select count(*) from pgbench_history")
  tl=$(sql "$port" "select timeline_id from pg_control_checkpoint()")
  kv "${tool}_pitr_in_recovery" "$rec"; kv "${tool}_pitr_count" "$cnt"; kv "${tool}_pitr_timeline" "$tl"
  log "$tool: restored server: in recovery $rec, pgbench_history $cnt rows (expected $COUNT_T)"
  pg_stop "$dir"
}
for tool in backupd pgbackrest; do
  dir=$RUN/restore-$tool; port=$(freeport)
  mkdir -p "$dir"; chown postgres: "$dir"; chmod 700 "$dir"
  STARTED+=("$dir")
  POST_CMD='kv ${tool}_pitr_writable_wait_s "$(wait_writable "$port")"'
  case $tool in
    backupd)
      run_step backupd pitr env BACKUPD_PASSWORD_FILE="$PW" "$BACKUPD" -r "$REPO_B" restore --at "$TARGET" \
        --target "$dir" --start --pg-port "$port" --archive-mode off --json
      kv backupd_pitr_json "$(tail -1 "$LOGS/backupd.pitr.out")"
      kv backupd_pitr_restore_s "$(json_field duration_secs < "$LOGS/backupd.pitr.out")"
      kv backupd_pitr_promote_s "$(json_field promoted_after_secs < "$LOGS/backupd.pitr.out")"
      ;;
    pgbackrest)
      run_step pgbackrest pitr "$PITR_P" "$PGBR_CONF" "$PGBIN" "$dir" "$port" "$TARGET"
      read -r a b < <(tail -1 "$LOGS/pgbackrest.pitr.out")
      kv pgbackrest_pitr_restore_s "$a"; kv pgbackrest_pitr_promote_s "$b"
      ;;
  esac
  POST_CMD=""
  check_restored "$tool" "$dir" "$port"
done
for tool in backupd pgbackrest; do kv "${tool}_repo_final" "$(repo_sizes "$tool")"; done

# ---------------------------------------------------------------- report + JSON line
export RESULTS KV JSONL TS SCALE BACKUPD_VERSION PGBR_VERSION LOAD_START RUN LOGS
export LOAD_END; LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)
export NCPU; NCPU=$(nproc)
export PG_VERSION; PG_VERSION=$("$PGBIN/postgres" --version)
export BACKUPD_SRC
rc=0
python3 - <<'PY' || rc=$?
import json, os, socket, time
E = os.environ
rows = {}
for line in open(E["RESULTS"]):
    tool, step, wall, usr, sys_, rss, repo, wal, busy = line.rstrip("\n").split("\t")
    rows[tool, step] = dict(wall_s=float(wall), user_s=float(usr), sys_s=float(sys_), max_rss_kib=int(rss),
                            repo_bytes=int(repo), wal_bytes=int(wal), busy_cpu_s=float(busy))
kv = {}
for line in open(E["KV"]):
    k, _, v = line.rstrip("\n").partition("\t")
    kv[k] = v
def jl(k):
    try: return json.loads(kv.get(k) or "null")
    except ValueError: return None
ncpu = int(E["NCPU"])
T = ("backupd", "pgbackrest")
# stored bytes: the repository minus its WAL archive; for the incremental, its growth
for t in T:
    r = rows[t, "full"]; r["stored_bytes"] = r["repo_bytes"] - r["wal_bytes"]
    tot, wal = map(int, kv[t + "_incr_before"].split())
    r = rows[t, "incr"]; r["stored_bytes"] = (r["repo_bytes"] - r["wal_bytes"]) - (tot - wal)
    rows[t, "pitr"]["stored_bytes"] = None
    r = rows[t, "pitr"]
    r["restore_s"] = float(kv[t + "_pitr_restore_s"])
    r["promote_s"] = float(kv[t + "_pitr_promote_s"])
    r["writable_wait_s"] = float(kv[t + "_pitr_writable_wait_s"])
    r["command_wall_s"] = r["wall_s"]
    r["wall_s"] = round(r["wall_s"] + r["writable_wait_s"], 3)   # the PITR time
noisy = False
for r in rows.values():
    r["cpu_s"] = round(r["user_s"] + r["sys_s"], 2)
    r["other_cpu_s"] = round(max(0.0, r["busy_cpu_s"] - r["cpu_s"]), 2)
    r["noisy"] = r["other_cpu_s"] > 0.25 * r["wall_s"] * ncpu
    noisy |= r["noisy"]
MiB = 1 << 20
print()
print(f"backupd PostgreSQL benchmark  {E['TS']}  host={socket.gethostname()}  cpus={ncpu}  loadavg start: {E['LOAD_START']}  end: {E['LOAD_END']}")
print(f"cluster: pgbench -s {E['SCALE']} (hex filler), databases {int(kv['db_bytes'])/MiB:.1f} MiB, data directory {int(kv['pgdata_bytes'])/MiB:.1f} MiB; {E['PG_VERSION']}")
print(f"backupd: {E['BACKUPD_SRC']} ({E['BACKUPD_VERSION']})   pgBackRest: {E['PGBR_VERSION']} (process-max=2, zst, aes-256-cbc)")
print(f"change between full and incremental: pgbench -c 1 -t 10000 ({float(kv.get('change_tps') or 0):.0f} tps)")
print()
names = {"full": "full backup", "incr": "incremental", "pitr": "PITR"}
hdr = ("step", "tool", "wall s", "CPU s", "peak RSS MiB", "stored MiB", "other CPU s", "")
fmt = "%-12s %-10s %8s %8s %13s %11s %12s  %s"
print(fmt % hdr)
print(fmt % tuple("-" * len(h) if h else "" for h in hdr))
for step in ("full", "incr", "pitr"):
    for t in T:
        r = rows[t, step]
        note = ""
        if step == "pitr":
            note = (f"= command {r['command_wall_s']:.2f} s (restore {r['restore_s']:.2f} + start to promoted "
                    f"{r['promote_s']:.2f}) + {r['writable_wait_s']:.2f} s until pg_is_in_recovery() = f")
        if r["noisy"]: note = (note + "  NOISY").strip()
        st = "-" if r["stored_bytes"] is None else f"{r['stored_bytes']/MiB:.1f}"
        print(fmt % (names[step], t, f"{r['wall_s']:.2f}", f"{r['cpu_s']:.2f}", f"{r['max_rss_kib']/1024:.1f}", st, f"{r['other_cpu_s']:.2f}", note))
if noisy:
    print("NOISY: other processes used over 25% of the machine during that step (beyond the server and archiving); run again on a quiet machine")
bi, pi = jl("backupd_incr_json") or {}, kv.get("pgbackrest_incr_set_bytes")
print()
print("stored = repository growth without the WAL archive (backupd: repo minus wal/; pgBackRest: repo/backup).")
if bi: print(f"  backupd incremental (--json): bytes_read {bi.get('bytes_read')}, bytes_added {bi.get('bytes_added')}, bytes_stored {bi.get('bytes_stored')}")
if pi: print(f"  pgBackRest incremental backup set dir: {pi} bytes")
for t in T:
    tot, wal = map(int, kv[t + "_repo_final"].split())
    print(f"  {t:<10} repository at the end: {tot/MiB:.1f} MiB, of which WAL archive {wal/MiB:.1f} MiB")
pushes = [l.split() for l in open(os.path.join(E["LOGS"], "archive-times")) if l.strip()]
def push_sum(tool):
    return sum(float(f.split("=")[1]) for p in pushes for f in p if f.startswith(tool + "="))
print(f"  archive_command: {len(pushes)} WAL files pushed; wall s per tool (in parallel, untimed): backupd {push_sum('backupd'):.2f}, pgBackRest {push_sum('pgbackrest'):.2f}")

# PITR check
ct = int(kv["count_at_target"]); cb = int(kv["backupd_pitr_count"]); cp = int(kv["pgbackrest_pitr_count"])
pitr_ok = (cb == ct == cp and kv["backupd_pitr_in_recovery"] == "f" and kv["pgbackrest_pitr_in_recovery"] == "f")
print()
print(f"PITR to T = {kv['target_time']}: pgbench_history count at T {ct} (at the end {kv['count_at_end']}); "
      f"restored backupd {cb} (timeline {kv['backupd_pitr_timeline']}), pgBackRest {cp} (timeline {kv['pgbackrest_pitr_timeline']})  "
      + ("OK" if pitr_ok else "MISMATCH"))

def ratio(a, b): return a / b if b else float("inf")
targets = [
    ("full base backup time", ratio(rows["backupd", "full"]["wall_s"], rows["pgbackrest", "full"]["wall_s"]), 0.7),
    ("incremental time", ratio(rows["backupd", "incr"]["wall_s"], rows["pgbackrest", "incr"]["wall_s"]), 0.5),
    ("incremental stored bytes", ratio(rows["backupd", "incr"]["stored_bytes"], rows["pgbackrest", "incr"]["stored_bytes"]), 0.5),
    ("PITR time (to read-write)", ratio(rows["backupd", "pitr"]["wall_s"], rows["pgbackrest", "pitr"]["wall_s"]), 1.0),
]
print()
print("ratios backupd / pgBackRest (target in brackets):")
verdicts = {}
for name, x, lim in targets:
    v = "PASS" if x <= lim else "FAIL"
    verdicts[name] = v
    print(f"  {name:<26} {x:7.3f}x  [<= {lim}x]  {v}")
for step in ("full", "incr", "pitr"):
    a, b = rows["backupd", step]["max_rss_kib"], rows["pgbackrest", step]["max_rss_kib"]
    print(f"  peak RSS {names[step]:<17} {ratio(a, b):7.3f}x  ({a/1024:.1f} vs {b/1024:.1f} MiB)")
a, b = rows["backupd", "full"]["stored_bytes"], rows["pgbackrest", "full"]["stored_bytes"]
print(f"  full backup stored bytes   {ratio(a, b):7.3f}x  ({a/MiB:.1f} vs {b/MiB:.1f} MiB)")
print(f"  PITR check                 {'PASS' if pitr_ok else 'FAIL'}")

rec = {
    "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run": E["TS"], "host": socket.gethostname(),
    "cpus": ncpu, "loadavg_start": E["LOAD_START"], "loadavg_end": E["LOAD_END"],
    "scale": int(E["SCALE"]), "filler": "hex", "db_bytes": int(kv["db_bytes"]), "pgdata_bytes": int(kv["pgdata_bytes"]),
    "postgres": E["PG_VERSION"], "backupd": E["BACKUPD_VERSION"], "backupd_bin": E["BACKUPD_SRC"], "pgbackrest": E["PGBR_VERSION"],
    "change_txns": 10000, "change_tps": float(kv.get("change_tps") or 0),
    "steps": {step: {t: rows[t, step] for t in T} for step in ("full", "incr", "pitr")},
    "backupd_json": {"full": jl("backupd_full_json"), "incr": jl("backupd_incr_json"), "pitr": jl("backupd_pitr_json")},
    "pgbackrest_incr_set_bytes": int(pi) if pi else None,
    "repo_final": {t: dict(zip(("repo_bytes", "wal_bytes"), map(int, kv[t + "_repo_final"].split()))) for t in T},
    "pitr": {"target_time": kv["target_time"], "count_at_target": ct, "count_at_end": int(kv["count_at_end"]),
             "count_backupd": cb, "count_pgbackrest": cp, "ok": pitr_ok},
    "ratios": {name: round(x, 4) for name, x, _ in targets},
    "verdicts": verdicts, "noisy": noisy, "archive_pushes": len(pushes),
}
with open(E["JSONL"], "a") as f:
    f.write(json.dumps(rec, separators=(",", ":")) + "\n")
print()
print(f"results appended to {E['JSONL']}; logs in {E['LOGS']}")
raise SystemExit(0 if pitr_ok else 1)
PY
exit "$rc"
