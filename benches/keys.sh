#!/usr/bin/env bash
# Key generations benchmark (issue 14): `key rotate` time, and `key retire` throughput
# against prune's repack of the same bytes, with peak RSS, on a local repository and on
# one on a local S3 server (s3s-fs on loopback).
#
# usage: benches/keys.sh [--keep]
#
# For each backend: init, back up the shared corpus (untimed), then, each under
# `/usr/bin/time -f '%e %M'` with the page cache dropped before it:
#   rotate   key rotate (a new generation; nothing rewritten)
#   retire   key retire 1 --grace 0s (every pack, index, snapshot, config sealed again)
#   repack   prune --repack-unused 0 (prune's repack of every pack: the same bytes read,
#            checked and written again)
# Reported: seconds, MB/s of stored pack bytes, peak RSS; retire/repack ratio.
# Targets: peak RSS <= 128 MiB (every step).
#
# Environment:
#   BENCH_DIR    scratch + results dir   (default /var/tmp/backupd-bench)
#   CORPUS       data backed up          (default $BENCH_DIR/corpus, built by ../shared/bench)
#   SHARED       the shared design dir   (default ../shared)
#   BACKUPD_BIN  backupd binary          (default: cargo build --release)
# Output: a table; one JSON line appended to $BENCH_DIR/keys-results.jsonl.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
CORPUS=${CORPUS:-$BENCH_DIR/corpus}
SHARED=${SHARED:-$ROOT/../shared}
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1
log() { printf '[keys %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"
[ -x /usr/bin/time ] || apt_install time
ensure_corpus
backupd_binary
S3S_FS=$(command -v s3s-fs || echo "$HOME/.local/bin/s3s-fs")
if [ ! -x "$S3S_FS" ]; then
  log "installing s3s-fs 0.14.1 (cargo, about 2 minutes)"
  cargo install s3s-fs@0.14.1 --features binary --locked --root "$HOME/.local" >&2
  S3S_FS=$HOME/.local/bin/s3s-fs
fi

RUN="$BENCH_DIR/runs/keys-$(date +%Y%m%dT%H%M%S)"
mkdir -p "$RUN/s3/bkeys" "$RUN/logs"
S3_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key AKBENCH --secret-key SKBENCHSECRET \
  "$RUN/s3" > "$RUN/logs/s3s-fs.log" 2>&1 &
S3_PID=$!
cleanup() {
  kill "$S3_PID" 2>/dev/null || true
  [ "$KEEP" = 1 ] || rm -rf "$RUN"
}
trap cleanup EXIT
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && break; sleep 0.05; done
export AWS_ACCESS_KEY_ID=AKBENCH AWS_SECRET_ACCESS_KEY=SKBENCHSECRET AWS_REGION=us-east-1
export BACKUPD_PASSWORD=bench-password XDG_CACHE_HOME=$RUN/cache

timed() {  # timed NAME CMD...: "wall rss_kib" into $RUN/t.NAME
  drop_caches
  /usr/bin/time -f '%e %M' -o "$RUN/t.$1" "${@:2}" > "$RUN/logs/$1.out" 2> "$RUN/logs/$1.err" \
    || { tail -5 "$RUN/logs/$1.err" >&2; die "step $1 failed"; }
}
wall() { awk '{print $1}' "$RUN/t.$1"; }
rss() { awk '{print $2}' "$RUN/t.$1"; }
mbps() { python3 -c "print(round($1 / 1e6 / max($2, 0.001), 1))"; }

JSON="{\"time\":\"$(date -u +%FT%TZ)\""
printf '%-8s %-8s %9s %9s %10s\n' backend step seconds "MB/s" "RSS MiB"
MAX_RSS=0
for backend in local s3; do
  if [ "$backend" = local ]; then LOC=$RUN/repo; PACKS=$RUN/repo/data; else LOC=s3:http://127.0.0.1:$S3_PORT/bkeys/repo; PACKS=$RUN/s3/bkeys/repo/data; fi
  B=("$BACKUPD" --repo "$LOC")
  "${B[@]}" init >/dev/null
  log "$backend: backing up $(du -sh "$CORPUS" | cut -f1) (untimed)"
  "${B[@]}" backup "$CORPUS" -q
  BYTES=$(du -sb "$PACKS" | cut -f1)
  timed "$backend.rotate" "${B[@]}" key rotate
  timed "$backend.retire" "${B[@]}" key retire 1 --grace 0s --json
  grep -q '"retired":\[1\]' "$RUN/logs/$backend.retire.out" || die "$backend: retire did not finish: $(cat "$RUN/logs/$backend.retire.out")"
  timed "$backend.repack" "${B[@]}" prune --repack-unused 0 --grace 0s
  "${B[@]}" check >/dev/null || die "$backend: check failed after the steps"
  for s in rotate retire repack; do
    r=$(rss "$backend.$s"); [ "$r" -gt "$MAX_RSS" ] && MAX_RSS=$r
    if [ "$s" = rotate ]; then rate="-"; else rate=$(mbps "$BYTES" "$(wall "$backend.$s")"); fi
    printf '%-8s %-8s %9s %9s %10s\n' "$backend" "$s" "$(wall "$backend.$s")" "$rate" "$((r / 1024))"
    JSON="$JSON,\"${backend}_${s}_s\":$(wall "$backend.$s"),\"${backend}_${s}_rss_kib\":$r"
  done
  ratio=$(python3 -c "print(round($(wall "$backend.retire") / max($(wall "$backend.repack"), 0.001), 2))")
  printf '%-8s retire/repack time %s (pack bytes %s)\n' "$backend" "$ratio" "$BYTES"
  JSON="$JSON,\"${backend}_pack_bytes\":$BYTES,\"${backend}_retire_over_repack\":$ratio"
done
echo
if [ "$MAX_RSS" -le $((128 * 1024)) ]; then verdict=PASS; else verdict=FAIL; fi
echo "peak RSS <= 128 MiB: $((MAX_RSS / 1024)) MiB $verdict"
echo "$JSON,\"max_rss_kib\":$MAX_RSS}" >> "$BENCH_DIR/keys-results.jsonl"
