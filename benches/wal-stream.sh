#!/usr/bin/env bash
# WAL streaming (issue 15): how soon a commit is durable in the repository, what the
# streamer costs, and what an idle server costs the repository, against archive_timeout.
#
# usage: benches/wal-stream.sh [--s3]
#
# 1. latency  A throwaway PostgreSQL 15 (fsync on, archive_command = /bin/true: the stream
#             alone fills the repository) under `pgbench -c 4 -T 15`, while a
#             probe session commits 1,000 single-row transactions one after another, each
#             followed by `pg_current_wal_insert_lsn()` and `clock_timestamp()` (an LSN at
#             or past its commit record, a time just after it committed). The streamer logs
#             every store with the position the repository then holds (JSON, microsecond
#             timestamps); a commit's latency is the first store at or past its LSN minus
#             its time. Reported: median, 99th percentile and worst of the 1,000; the
#             streamer's CPU (user+sys), peak RSS and the WAL it stored.
# 2. idle     A new cluster, one commit every 10 s for IDLE_SECONDS (a quiet server with a
#             heartbeat), once with `wal-stream` (archive_command /bin/true) and once with
#             `archive_timeout = 60` and `archive_command = backupd wal-push` (no stream,
#             and `pg_switch_wal()` every 60 s, which is what archive_timeout does: this
#             machine's PostgreSQL made no timed switch on its own): the repository's
#             growth, scaled to a day.
#
# Environment: IDLE_SECONDS (300), BENCH_DIR (/var/tmp/backupd-bench), BACKUPD_BIN, PGBIN.
# Output: a table on stdout, one JSON line appended to $BENCH_DIR/wal-stream-results.jsonl.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
IDLE_SECONDS=${IDLE_SECONDS:-300}
S3=0
[ "${1:-}" = "--s3" ] && S3=1
log() { printf '[wal-stream %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"
[ -x /usr/bin/time ] || apt_install time
[ -x "$PGBIN/initdb" ] || apt_install postgresql-15 postgresql-client-15
backupd_binary
mkdir -p "$BENCH_DIR"
W=$(mktemp -d "$BENCH_DIR/walstream.XXXXXX"); chmod 755 "$W"
S3PID=""
cleanup() {
  for d in "$W"/pg*; do
    [ -d "$d/data" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d/data" -m immediate stop >/dev/null 2>&1 || true
  done
  [ -n "$S3PID" ] && kill "$S3PID" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
freeport() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
echo pw > "$W/pw"; chmod 600 "$W/pw"; chown postgres "$W/pw"
export BACKUPD_PASSWORD_FILE=$W/pw
if [ "$S3" = 1 ]; then
  S3FS=$(command -v s3s-fs || echo "$HOME/.local/bin/s3s-fs")
  [ -x "$S3FS" ] || die "s3s-fs not installed (cargo install s3s-fs@0.14.1 --features binary)"
  mkdir -p "$W/s3/bench"; SPORT=$(freeport)
  "$S3FS" --host 127.0.0.1 --port "$SPORT" --access-key bench --secret-key benchsecret "$W/s3" >/dev/null 2>&1 & S3PID=$!
  sleep 1
  export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret
  repo_url() { echo "s3:http://127.0.0.1:$SPORT/bench/$1"; }
  repo_bytes() { du -sb "$W/s3/bench/$1" | cut -f1; }
else
  repo_url() { echo "$W/$1"; }
  repo_bytes() { du -sb "$W/$1" | cut -f1; }
fi

cluster() {  # cluster NAME ARCHIVE_COMMAND EXTRA: initdb + start; prints the port
  local d=$W/$1 port; port=$(freeport)
  mkdir -p "$d"; chown postgres "$d"
  runuser -u postgres -- "$PGBIN/initdb" -D "$d/data" -U postgres --auth=trust >/dev/null
  cat >> "$d/data/postgresql.conf" <<C
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$d'
archive_mode = on
archive_command = '$2'
$3
C
  runuser -u postgres -- "$PGBIN/pg_ctl" -D "$d/data" -l "$d/log" -w start >/dev/null
  echo "$port"
}
psql_() { "$PGBIN/psql" -X -q -At -h 127.0.0.1 -U postgres -p "$@"; }

# ---- 1. latency under pgbench
log "latency: cluster, pgbench -i, streamer"
P=$(cluster pg1 /bin/true "")
"$BACKUPD" -r "$(repo_url repo1)" init -q >/dev/null
"$PGBIN/pgbench" -h 127.0.0.1 -p "$P" -U postgres -i -s 10 -q postgres >/dev/null 2>&1
psql_ "$P" -c "create table probe(i int)"
BACKUPD_LOG=backupd::postgres::walstream=debug BACKUPD_LOG_FORMAT=json \
  /usr/bin/time -f '%e %U %S %M' -o "$W/stream.time" \
  "$BACKUPD" -r "$(repo_url repo1)" wal-stream --pg-host 127.0.0.1 --pg-port "$P" --pg-user postgres --create-slot \
  2> "$W/stream.log" & SPID=$!
until grep -q "streaming WAL" "$W/stream.log" 2>/dev/null; do sleep 0.1; done
"$PGBIN/pgbench" -h 127.0.0.1 -p "$P" -U postgres -c 4 -j 2 -T 15 -n postgres > "$W/pgbench.out" 2>&1 & BPID=$!
sleep 2
log "latency: 1,000 probe commits under pgbench -c 4"
python3 - "$W/probe.sql" <<'PY'
import sys
with open(sys.argv[1], "w") as f:
    for k in range(1000):
        f.write(f"insert into probe values ({k});\nselect pg_current_wal_insert_lsn(), extract(epoch from clock_timestamp());\n")
PY
psql_ "$P" -f "$W/probe.sql" > "$W/probe.out"
wait "$BPID" || die "pgbench ended before the probe (see $W/pgbench.out)"
sleep 2
pkill -TERM -P "$SPID"; wait "$SPID" || true   # the streamer, under /usr/bin/time
read -r LAT_MEDIAN LAT_P99 LAT_MAX STORED < <(python3 - "$W/probe.out" "$W/stream.log" <<'PY'
import sys, json, bisect, datetime
def lsn(s):
    hi, lo = s.split("/"); return (int(hi, 16) << 32) | int(lo, 16)
probes = []
for line in open(sys.argv[1]):
    line = line.strip()
    if "|" in line:
        l, t = line.split("|"); probes.append((lsn(l), float(t)))
stores = []
for line in open(sys.argv[2]):
    try: e = json.loads(line)
    except ValueError: continue
    d = e.get("fields", {}).get("durable")
    if not d: continue
    t = datetime.datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
    stores.append((t, lsn(d)))
stores.sort()
lat = []
for l, t in probes:
    # the first store at or past l (stores' positions only grow)
    best = next((st for st, d in stores if d >= l and st >= t - 1), None)
    if best is None: print("nan nan nan 0"); sys.exit()
    lat.append(max(0.0, best - t))
lat.sort()
n = len(lat)
print(f"{lat[n//2]*1000:.1f} {lat[int(n*0.99)-1]*1000:.1f} {lat[-1]*1000:.1f} {stores[-1][1] - stores[0][1] if stores else 0}")
PY
)
read -r S_WALL S_USER S_SYS S_RSS < "$W/stream.time"
TPS=$(grep -o 'tps = [0-9.]*' "$W/pgbench.out" | head -1 | cut -d' ' -f3 || echo "?")
log "latency: median ${LAT_MEDIAN} ms, p99 ${LAT_P99} ms, worst ${LAT_MAX} ms"
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$W/pg1/data" -m immediate stop >/dev/null 2>&1 || true

# ---- 2. idle day: one commit every 10 s
idle_run() {  # idle_run NAME MODE(stream|timeout): prints the repository growth in bytes
  local name=$1 mode=$2 port spid=""
  "$BACKUPD" -r "$(repo_url "$name")" init -q >/dev/null
  [ "$S3" = 1 ] || chown -R postgres "$W/$name"   # wal-push runs as postgres
  if [ "$mode" = stream ]; then
    port=$(cluster "pg-$name" /bin/true "")
  else
    port=$(cluster "pg-$name" "BACKUPD_PASSWORD_FILE=$W/pw ${AWS_ACCESS_KEY_ID:+AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY }$BACKUPD -r $(repo_url "$name") wal-push %p" "archive_timeout = 60")
  fi
  psql_ "$port" -c "create table beat(at timestamptz)"
  if [ "$mode" = stream ]; then
    "$BACKUPD" -r "$(repo_url "$name")" wal-stream --pg-host 127.0.0.1 --pg-port "$port" --pg-user postgres --create-slot 2>/dev/null & spid=$!
    sleep 3
  fi
  psql_ "$port" -c "select pg_switch_wal()" >/dev/null; sleep 5
  local before; before=$(repo_bytes "$name")
  local end=$((SECONDS + IDLE_SECONDS))
  local beats=0
  while [ $SECONDS -lt $end ]; do
    psql_ "$port" -c "insert into beat values (now())"
    beats=$((beats + 1))
    # What archive_timeout = 60 does: a segment switch a minute when anything was written.
    # Done here by hand: PostgreSQL 15.18 on this machine made no timed switch at all in
    # five minutes of commits (pg_current_wal_lsn() stayed in one segment).
    if [ "$mode" = timeout ] && [ $((beats % 6)) = 0 ]; then psql_ "$port" -c "select pg_switch_wal()" >/dev/null; fi
    sleep 10
  done
  sleep 5
  [ -n "$spid" ] && { kill -TERM "$spid"; wait "$spid" || true; }
  echo $(( $(repo_bytes "$name") - before ))
}
log "idle: ${IDLE_SECONDS} s with wal-stream"
G_STREAM=$(idle_run idle-stream stream)
log "idle: ${IDLE_SECONDS} s with archive_timeout = 60"
G_TIMEOUT=$(idle_run idle-timeout timeout)
PER_DAY() { python3 -c "print(round($1 * 86400 / $IDLE_SECONDS / 1e6, 2))"; }

printf '\nWAL streaming (%s repository)\n' "$([ "$S3" = 1 ] && echo S3 || echo local)"
printf '  commit -> durable, 1,000 commits under pgbench -c 4 (%s tps): median %s ms, p99 %s ms, worst %s ms\n' "$TPS" "$LAT_MEDIAN" "$LAT_P99" "$LAT_MAX"
printf '  streamer: %s s user + %s s sys over %s s, peak RSS %s MiB, %s MB of WAL stored\n' "$S_USER" "$S_SYS" "$S_WALL" "$((S_RSS / 1024))" "$(python3 -c "print(round($STORED/1e6,1))")"
printf '  idle day (a commit every 10 s): wal-stream %s MB/day, archive_timeout = 60 %s MB/day\n' "$(PER_DAY "$G_STREAM")" "$(PER_DAY "$G_TIMEOUT")"
printf '{"time":"%s","s3":%s,"lat_median_ms":%s,"lat_p99_ms":%s,"lat_max_ms":%s,"tps":"%s","cpu_user_s":%s,"cpu_sys_s":%s,"wall_s":%s,"rss_kib":%s,"wal_bytes":%s,"idle_seconds":%s,"idle_stream_bytes":%s,"idle_timeout_bytes":%s}\n' \
  "$(date -u +%FT%TZ)" "$S3" "$LAT_MEDIAN" "$LAT_P99" "$LAT_MAX" "$TPS" "$S_USER" "$S_SYS" "$S_WALL" "$S_RSS" "$STORED" "$IDLE_SECONDS" "$G_STREAM" "$G_TIMEOUT" >> "$BENCH_DIR/wal-stream-results.jsonl"
