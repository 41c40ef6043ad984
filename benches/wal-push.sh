#!/usr/bin/env bash
# WAL archiving rate: how many 16 MiB segments per minute `backupd wal-push` archives into a
# local repository when PostgreSQL calls it once per segment (a new process each time, as
# archive_command does: password KDF, repository open, compress, encrypt, fsync).
#
# usage: benches/wal-push.sh [SEGMENTS]        (default 200; target: >= 200 segments/min)
#
# Real WAL: a throwaway PostgreSQL 15 cluster runs `pgbench -i -s 20` (about 20 segments of
# real WAL), whose segments are then pushed SEGMENTS times under successive segment names
# (the archive checks names and the system identifier, not page addresses). Each push runs
# under /usr/bin/time: (a) gives segments/min, median and worst push, and peak RSS with
# nothing else ready. (b) then lets the same cluster build a backlog of SEGMENTS ready
# segments (archive_command = 'false'), switches archive_command to backupd wal-push and
# times PostgreSQL's archiver draining it (wal-push pushes other ready segments ahead, two
# at a time, so most calls find their segment archived already).
# Environment: BACKUPD_BIN (default target/release/backupd), BENCH_DIR (/var/tmp/backupd-bench).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
N=${1:-200}
B=${BACKUPD_BIN:-$ROOT/target/release/backupd}
PGBIN=/usr/lib/postgresql/15/bin
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
[ -x "$B" ] || (cd "$ROOT" && cargo build --release)
mkdir -p "$BENCH_DIR"
W=$(mktemp -d "$BENCH_DIR/walpush.XXXXXX")
chmod 755 "$W"
trap 'runuser -u postgres -- $PGBIN/pg_ctl -D $W/data -m immediate stop >/dev/null 2>&1 || true; cp "$W/data/log" "$BENCH_DIR/wal-push-server.log" 2>/dev/null; rm -rf "$W"' EXIT
# the data dir is the cluster's; postgres must reach the repository and password in $W
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
mkdir -p "$W/data" "$W/segs" "$W/pgdata/global"
chown postgres: "$W/data"
runuser -u postgres -- $PGBIN/initdb -D "$W/data" -U postgres --auth=trust >/dev/null
cat >> "$W/data/postgresql.conf" <<C
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$W/data'
max_wal_size = 4GB
wal_keep_size = 1GB
C
runuser -u postgres -- $PGBIN/pg_ctl -D "$W/data" -l "$W/data/log" -w start >/dev/null
$PGBIN/pgbench -h 127.0.0.1 -p $PORT -U postgres -i -s 20 -q postgres 2>/dev/null
$PGBIN/psql -X -q -h 127.0.0.1 -p $PORT -U postgres -c 'select pg_switch_wal()' >/dev/null
runuser -u postgres -- $PGBIN/pg_ctl -D "$W/data" -m fast -w stop >/dev/null
cp "$W/data/global/pg_control" "$W/pgdata/global/"
mapfile -t REAL < <(find "$W/data/pg_wal" -maxdepth 1 -name '0000000100000000000000??' | sort)
echo "real WAL segments: ${#REAL[@]} ($(du -sch "${REAL[@]}" | tail -1 | cut -f1))"
echo pw > "$W/pw"; chmod 600 "$W/pw"; chown postgres: "$W/pw"
export BACKUPD_PASSWORD_FILE=$W/pw
mkdir "$W/repo"; chown postgres: "$W/repo"
runuser -u postgres -- env BACKUPD_PASSWORD_FILE=$W/pw "$B" -r "$W/repo" init -q >/dev/null
chown -R postgres: "$W/repo"

# (a) one push per process, nothing else ready: the latency of one archive_command call.
: > "$W/times"
for i in $(seq 0 $((N - 1))); do
  name=$(printf '00000001%08X%08X' $((i / 256 + 16)) $((i % 256)))
  cp "${REAL[$((i % ${#REAL[@]}))]}" "$W/segs/$name"
  ( cd "$W/pgdata" && /usr/bin/time -f '%e %M' -a -o "$W/times" "$B" -r "$W/repo" wal-push --push-ahead 0 "$W/segs/$name" )
  rm "$W/segs/$name"
done

# (b) PostgreSQL's archiver draining a backlog of N segments through archive_command.
chown -R postgres: "$W/repo"
rm -rf "$W/data/pg_wal/archive_status"/* 2>/dev/null || true
cat >> "$W/data/postgresql.conf" <<C
archive_mode = on
archive_command = 'false'
wal_level = replica
C
runuser -u postgres -- $PGBIN/pg_ctl -D "$W/data" -l "$W/data/log" -w start >/dev/null
P="$PGBIN/psql -X -q -At -h 127.0.0.1 -p $PORT -U postgres"
$P -c 'create table filler(i int, t text)'
while [ "$(ls "$W/data/pg_wal/archive_status" | grep -c '\.ready$')" -lt "$N" ]; do
  $P -c "insert into filler select g, md5(g::text) || repeat('x', 200) from generate_series(1, 200000) g; select pg_switch_wal()" >/dev/null
done
READY=$(ls "$W/data/pg_wal/archive_status" | grep -c '\.ready$')
LAST=$(ls "$W/data/pg_wal/archive_status" | grep '\.ready$' | sort | tail -1 | cut -c1-24)
FAILED0=$($P -c 'select failed_count from pg_stat_archiver')
$P -c "alter system set archive_command = 'BACKUPD_PASSWORD_FILE=$W/pw $B -r $W/repo wal-push %p'" -c 'select pg_reload_conf()' >/dev/null
t0=$(date +%s.%N)
until [ "$($P -c 'select coalesce(last_archived_wal, $$$$) from pg_stat_archiver')" \> "$LAST" ] || \
      [ "$($P -c 'select coalesce(last_archived_wal, $$$$) from pg_stat_archiver')" = "$LAST" ]; do sleep 0.1; done
t1=$(date +%s.%N)
FAILED=$(( $($P -c 'select failed_count from pg_stat_archiver') - FAILED0 ))
python3 - "$W/times" "$N" "$READY" "$t0" "$t1" "$FAILED" <<'P'
import sys
rows=[l.split() for l in open(sys.argv[1]) if l.strip() and l[0].isdigit()]
t=sorted(float(r[0]) for r in rows); rss=max(int(r[1]) for r in rows)
n=int(sys.argv[2]); ready=int(sys.argv[3]); wall=float(sys.argv[5])-float(sys.argv[4])
print(f"(a) single pushes: {n} in {sum(t):.1f} s = {n/sum(t)*60:.0f} segments/min; median {t[len(t)//2]*1000:.0f} ms, worst {t[-1]*1000:.0f} ms; peak RSS {rss/1024:.1f} MiB")
rate=ready/wall*60
print(f"(b) archiver backlog: {ready} ready segments archived in {wall:.1f} s = {rate:.0f} segments/min ({sys.argv[6]} failed backupd calls)")
print(f"target >= 200 segments/min: single {'PASS' if n/sum(t)*60 >= 200 else 'FAIL'}, archiver {'PASS' if rate >= 200 else 'FAIL'}")
P
echo "repository: $(du -sh "$W/repo" | cut -f1)"
