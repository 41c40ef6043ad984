#!/usr/bin/env bash
# InfluxDB benchmark: backupd against `influxd backup -portable` alone and against
# `influxd backup -portable` into a directory followed by restic of that directory (what
# the financial-pipeline runbook's operators would do), on one influxd and one dataset in
# one run.
#
# usage: benches/influx.sh [--keep]
#
# The server: a throwaway influxd 1.x (Debian's 1.6.7) on free loopback ports in the run
# dir. The dataset: database `bench`, measurements cpu, mem and trades (tags host/region or
# symbol; float, integer, boolean and string fields), $POINTS points over 6 weeks (7 shards
# of 1 week), written over HTTP in batches; then the script waits until no file of the data
# directory has changed for 5 s (compactions done) before every timed step, and has the
# server write its in-memory caches out first (an untimed portable backup), so that the
# tool that runs first does not pay for that write.
#
# Steps (each under `/usr/bin/time -f '%e %M'`: wall s, peak RSS KiB):
#   full     backupd backup --influxdb           vs  influxd backup -portable DIR1
#            and the pair: influxd backup -portable DIR1, then restic backup DIR1
#   7 days   each day: a day of points appended ($POINTS/42), settle; then
#            backupd backup --influxdb (unchanged shards taken from the parent)
#            vs the pair: influxd backup -portable -start <the day> DIR, then restic
#            backup DIR (the runbook's incremental, into its own restic repository)
#            Reported: day 1 (the first after the full, whose flush and the compactions
#            after it touched every shard) and the median of days 2-7 (steady state).
#            stored: backupd repository growth over the 7, vs the 7 daily full portable
#            backups' bytes (the runbook's daily full, untimed), vs restic's growth
#            backing those up
#   restore  the newest backup into a new database: backupd restore --rename bench=r1
#            vs influxd restore -portable -db bench -newdb r2 DIR (the last full portable
#            backup, already on disk) and the pair: restic restore, then that
#            Each restored database's count(*) must equal the source's.
#
# Targets (PASS/FAIL):
#   full backup time       <= 1.0x influxd backup -portable, <= 0.5x the pair
#   incremental time       <= 0.3x the pair
#   7 daily backups stored <= 0.3x what influxd backup -portable writes
#   peak RSS               <= 128 MiB (every backupd step)
#
# Environment:
#   POINTS       points in the dataset                 (default 2000000)
#   BENCH_DIR    scratch + results dir                 (default /var/tmp/backupd-bench)
#   BACKUPD_BIN  backupd binary (default: cargo build --release)
# Output: a table on stdout; one JSON line appended to $BENCH_DIR/influx-results.jsonl; the
# run dir (server, repositories, backups) is removed at the end unless --keep. Installs
# influxdb, restic and GNU time with apt-get if missing.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
POINTS=${POINTS:-2000000}
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (usage: $0 [--keep])" >&2; exit 2 ;;
  esac
done
log() { printf '[influx %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"

[ -x /usr/bin/time ] || { log "installing GNU time"; apt_install time; }
command -v influxd >/dev/null || { log "installing influxdb"; apt_install influxdb influxdb-client; }
command -v restic >/dev/null || { log "installing restic"; apt_install restic; }
command -v curl >/dev/null || apt_install curl
backupd_binary

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
RUN="$BENCH_DIR/runs/influx-$(date +%Y%m%dT%H%M%S)"
mkdir -p "$RUN/logs"
cp "$BACKUPD" "$RUN/backupd"
BACKUPD="$RUN/backupd"
PID=""
cleanup() {
  local rc=$?
  [ -n "$PID" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  [ "$KEEP" = 1 ] || rm -rf "$RUN"
  exit $rc
}
trap cleanup EXIT

freeport() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
HTTP=$(freeport); RPC=$(freeport)
while [ "$RPC" = "$HTTP" ]; do RPC=$(freeport); done
T="$RUN/influx"
mkdir -p "$T"
cat > "$T/influxdb.conf" <<C
reporting-disabled = true
bind-address = "127.0.0.1:$RPC"
[meta]
  dir = "$T/meta"
[data]
  dir = "$T/data"
  wal-dir = "$T/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.1:$HTTP"
  log-enabled = false
  max-body-size = 0
[monitor]
  store-enabled = false
C
influxd run -config "$T/influxdb.conf" > "$RUN/logs/influxd.log" 2>&1 & PID=$!
until curl -sf -o /dev/null "http://127.0.0.1:$HTTP/ping"; do sleep 0.05; done
URL="http://127.0.0.1:$HTTP"
q() { curl -sS -XPOST "$URL/query" --data-urlencode "q=$1" ${2:+--data-urlencode "db=$2"} >/dev/null; }
count() { curl -sS -G "$URL/query" --data-urlencode "db=$1" --data-urlencode "q=SELECT count(*) FROM /.*/" \
  | python3 -c 'import json,sys; r=json.load(sys.stdin)["results"][0]; print(sum(sum(v for v in s["values"][0][1:] if v) for s in r.get("series",[])))'; }
q "CREATE DATABASE bench"

START=1700006400   # 2023-11-15 00:00 UTC
gen() {  # gen FIRST_POINT N SPAN_START SPAN_SECONDS: line protocol on stdout
  python3 - "$@" <<'PY'
import sys, random
first, n, start, span = map(int, sys.argv[1:])
r = random.Random(first)
step = max(1, span * 10**9 // max(n, 1))
for i in range(n):
    t = start * 10**9 + i * step
    k = first + i
    m = k % 3
    if m == 0:
        print(f"cpu,host=h{k%50},region=r{k%5} usage={r.random()*100:.3f},iowait={r.random():.4f},cores={k%64}i,ok={'true' if k%7 else 'false'} {t}")
    elif m == 1:
        print(f"mem,host=h{k%50},region=r{k%5} used={r.randrange(1<<34)}i,free={r.randrange(1<<34)}i,note=\"g{k%17}\" {t}")
    else:
        print(f"trades,symbol=S{k%500} price={100+r.random()*50:.4f},size={r.randrange(1,10000)}i,side=\"{'b' if k%2 else 's'}\" {t}")
PY
}
write() {  # write FIRST N START SPAN: in batches of 100k lines
  local first=$1 n=$2 start=$3 span=$4 done=0 chunk
  while [ "$done" -lt "$n" ]; do
    chunk=$(( n - done < 100000 ? n - done : 100000 ))
    gen $((first + done)) "$chunk" $((start + span * done / n)) $((span * chunk / n)) > "$RUN/batch.lp"
    curl -sS -o /dev/null -w '%{http_code}' -XPOST "$URL/write?db=bench" --data-binary @"$RUN/batch.lp" | grep -q 204 \
      || die "write failed"
    done=$((done + chunk))
  done
}
settle() {  # until no file of the data dir changed for 5 s
  local a b
  a=$(find "$T/data" -type f -printf '%p %s %T@\n' | sort | md5sum)
  while :; do
    sleep 5
    b=$(find "$T/data" -type f -printf '%p %s %T@\n' | sort | md5sum)
    [ "$a" = "$b" ] && return 0
    a=$b
  done
}
timed() {  # timed NAME CMD...: runs it, records "wall rss_kib" in $RUN/t.NAME
  /usr/bin/time -f '%e %M' -o "$RUN/t.$1" "${@:2}" > "$RUN/logs/$1.out" 2> "$RUN/logs/$1.err" \
    || { tail -5 "$RUN/logs/$1.err" >&2; die "step $1 failed"; }
}
# Whoever asks for a shard first makes the server write its in-memory cache out (both
# tools' protocol does: CreateSnapshot); every timed step starts with the caches already
# written, by an untimed portable backup into a scratch directory, so that no tool pays
# for another's writes.
flush() {
  influxd backup -portable -host "127.0.0.1:$RPC" "$RUN/flush" >/dev/null 2>&1 || die "flush failed"
  rm -rf "$RUN/flush"
  settle
}
wall() { awk '{print $1}' "$RUN/t.$1"; }
rss() { awk '{print $2}' "$RUN/t.$1"; }
dirsize() { du -sb "$1" | awk '{print $1}'; }

log "writing $POINTS points over 6 weeks"
write 0 "$POINTS" "$START" $((42 * 86400))
settle
SOURCE_COUNT=$(count bench)
log "dataset: $SOURCE_COUNT values, $(dirsize "$T/data") bytes of data files"

export BACKUPD_PASSWORD_FILE="$RUN/pw" RESTIC_PASSWORD_FILE="$RUN/pw"
echo "bench-password" > "$RUN/pw"; chmod 600 "$RUN/pw"
"$BACKUPD" --repo "$RUN/repo" init >/dev/null
restic -q -r "$RUN/restic" init >/dev/null
restic -q -r "$RUN/restic-incr" init >/dev/null
BK=(--repo "$RUN/repo" backup --influxdb --influx-host "127.0.0.1:$RPC" --influx-http "$URL" --json)

# ---- full
flush
drop_caches
timed full_backupd "$BACKUPD" "${BK[@]}"
flush
drop_caches
timed full_portable influxd backup -portable -host "127.0.0.1:$RPC" "$RUN/p-full"
drop_caches
timed full_restic restic -q -r "$RUN/restic" backup "$RUN/p-full"
settle

# ---- 7 days: each day a day of points appended, then each tool's daily run
DAY=$((POINTS / 42))
NEXT=$POINTS
DAY_START=$((START + 42 * 86400))
REPO0=$(dirsize "$RUN/repo"); RESTIC0=$(dirsize "$RUN/restic")
PORTABLE_TOTAL=0
MAX_RSS=$(rss full_backupd)
for d in 1 2 3 4 5 6 7; do
  ds=$((DAY_START + (d - 1) * 86400))
  write "$NEXT" "$DAY" "$ds" 86400; NEXT=$((NEXT + DAY))
  flush
  drop_caches
  timed "day${d}_backupd" "$BACKUPD" "${BK[@]}"
  r=$(rss "day${d}_backupd"); [ "$r" -gt "$MAX_RSS" ] && MAX_RSS=$r
  flush
  # The runbook's incremental: influxd backup -portable -start <the day>, then restic.
  drop_caches
  timed "day${d}_incr" influxd backup -portable -host "127.0.0.1:$RPC" -start "$(date -u -d "@$ds" +%Y-%m-%dT%H:%M:%SZ)" "$RUN/p-incr$d"
  drop_caches
  timed "day${d}_incr_restic" restic -q -r "$RUN/restic-incr" backup "$RUN/p-incr$d"
  rm -rf "$RUN/p-incr$d"
  # And its daily full backup, for what it stores (untimed), kept in restic too.
  influxd backup -portable -host "127.0.0.1:$RPC" "$RUN/p-day$d" >/dev/null 2>&1
  PORTABLE_TOTAL=$((PORTABLE_TOTAL + $(dirsize "$RUN/p-day$d")))
  restic -q -r "$RUN/restic" backup "$RUN/p-day$d" >/dev/null
  [ "$d" -gt 1 ] && rm -rf "$RUN/p-day$((d - 1))"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
INCR1_BACKUPD=$(wall day1_backupd)
INCR1_PAIR=$(python3 -c "print(round($(wall day1_incr)+$(wall day1_incr_restic), 2))")
INCR_BACKUPD=$(median $(for d in 2 3 4 5 6 7; do wall "day${d}_backupd"; done))
INCR_PORTABLE=$(median $(for d in 2 3 4 5 6 7; do wall "day${d}_incr"; done))
INCR_PAIR=$(median $(for d in 2 3 4 5 6 7; do python3 -c "print(round($(wall "day${d}_incr")+$(wall "day${d}_incr_restic"), 2))"; done))
REPO_GROWTH=$(( $(dirsize "$RUN/repo") - REPO0 ))
RESTIC_GROWTH=$(( $(dirsize "$RUN/restic") - RESTIC0 ))
settle
FINAL_COUNT=$(count bench)

# ---- restore the newest into a new database
drop_caches
timed restore_backupd "$BACKUPD" --repo "$RUN/repo" restore latest --influx-host "127.0.0.1:$RPC" \
  --influx-http "$URL" --influx-database bench --rename bench=r1
drop_caches
timed restore_portable influxd restore -portable -host "127.0.0.1:$RPC" -db bench -newdb r2 "$RUN/p-day7"
drop_caches
timed restore_restic restic -q -r "$RUN/restic" restore latest --target "$RUN/restic-out"
[ "$(count r1)" = "$FINAL_COUNT" ] || die "backupd's restore holds $(count r1) values, the source $FINAL_COUNT"
[ "$(count r2)" = "$FINAL_COUNT" ] || die "influxd restore holds $(count r2) values, the source $FINAL_COUNT"
for s in full_backupd restore_backupd; do r=$(rss $s); [ "$r" -gt "$MAX_RSS" ] && MAX_RSS=$r; done

ratio() { python3 -c "print(f'{$1/$2:.3f}')"; }
PAIR_FULL=$(python3 -c "print(round($(wall full_portable)+$(wall full_restic), 2))")
PAIR_RESTORE=$(python3 -c "print(round($(wall restore_restic)+$(wall restore_portable), 2))")
R_FULL_P=$(ratio "$(wall full_backupd)" "$(wall full_portable)")
R_FULL_PAIR=$(ratio "$(wall full_backupd)" "$PAIR_FULL")
R_INCR=$(ratio "$INCR_BACKUPD" "$INCR_PAIR")
R_STORED=$(ratio "$REPO_GROWTH" "$PORTABLE_TOTAL")
R_STORED_RESTIC=$(ratio "$REPO_GROWTH" "$RESTIC_GROWTH")
pf() { python3 -c "print('PASS' if $1 else 'FAIL')"; }
printf '\nInfluxDB %s, %s points (%s values), data files %s bytes\n' "$(influxd version | awk '{print $2}')" "$POINTS" "$SOURCE_COUNT" "$(dirsize "$T/data")"
printf '%-28s %10s %10s %10s\n' step backupd portable pair
printf '%-28s %10s %10s %10s\n' "full backup s" "$(wall full_backupd)" "$(wall full_portable)" "$PAIR_FULL"
printf '%-28s %10s %10s %10s\n' "first daily incr. s" "$INCR1_BACKUPD" "$(wall day1_incr)" "$INCR1_PAIR"
printf '%-28s %10s %10s %10s\n' "daily incr. s (median 2-7)" "$INCR_BACKUPD" "$INCR_PORTABLE" "$INCR_PAIR"
printf '%-28s %10s %10s %10s\n' "7 daily backups stored B" "$REPO_GROWTH" "$PORTABLE_TOTAL" "$RESTIC_GROWTH"
printf '%-28s %10s %10s %10s\n' "restore to a new db s" "$(wall restore_backupd)" "$(wall restore_portable)" "$PAIR_RESTORE"
printf '%-28s %10s\n' "backupd peak RSS KiB" "$MAX_RSS"
printf '\ntargets:\n'
printf '  full <= 1.0x portable        %s  %s\n' "$R_FULL_P" "$(pf "$R_FULL_P <= 1.0")"
printf '  full <= 0.5x pair            %s  %s\n' "$R_FULL_PAIR" "$(pf "$R_FULL_PAIR <= 0.5")"
printf '  incremental <= 0.3x pair     %s  %s\n' "$R_INCR" "$(pf "$R_INCR <= 0.3")"
printf '  7 days stored <= 0.3x portable %s  %s  (vs restic of the portable dirs: %s)\n' "$R_STORED" "$(pf "$R_STORED <= 0.3")" "$R_STORED_RESTIC"
printf '  peak RSS <= 128 MiB          %s MiB  %s\n' "$((MAX_RSS / 1024))" "$(pf "$MAX_RSS <= 131072")"
printf '{"time":"%s","points":%s,"full_backupd":%s,"full_portable":%s,"full_pair":%s,"incr_backupd":%s,"incr_pair":%s,"stored_7d":%s,"portable_7d":%s,"restic_7d":%s,"restore_backupd":%s,"restore_portable":%s,"restore_pair":%s,"max_rss_kib":%s}\n' \
  "$(date -u +%FT%TZ)" "$POINTS" "$(wall full_backupd)" "$(wall full_portable)" "$PAIR_FULL" "$INCR_BACKUPD" "$INCR_PAIR" \
  "$REPO_GROWTH" "$PORTABLE_TOTAL" "$RESTIC_GROWTH" "$(wall restore_backupd)" "$(wall restore_portable)" "$PAIR_RESTORE" "$MAX_RSS" \
  >> "$BENCH_DIR/influx-results.jsonl"
