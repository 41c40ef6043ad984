#!/usr/bin/env bash
# End-to-end benchmark: backupd vs restic on the shared ~2 GiB mixed corpus.
#
# usage: benches/e2e.sh [--s3] [--corpus DIR] [--keep]
#
# --s3: both tools use a repository on one local S3 server (s3s-fs on loopback, installed with
# cargo if missing; buckets `backupd` and `restic` on the same server) instead of a local
# directory. Every request the server serves is logged, and the report counts them per tool
# and step (by HTTP method). The peak RSS target is then 192 MiB.
#
# What it measures (one run, both tools, the same working copy of the corpus):
#   init          create a fresh local repository (password "bench")
#   backup1       first backup of the working copy                -> throughput MB/s
#   backup2-same  backup again with nothing changed               -> wall time
#   -- make-change.sh WORK: ~1% deterministic change (files only, PG_TXNS=0) --
#   backup3-chg   backup after the change                         -> wall time
#   restore       full restore of the latest snapshot into an empty dir -> throughput MB/s
#   sparse-backup / sparse-restore   (after the rest) a SPARSE_GIB (64) GiB sparse file
#                 holding 100 MiB of random data in 100 extents: backup and restore times,
#                 and the bytes the restored file allocates (du of its blocks)
# Each step runs under `/usr/bin/time -f '%e %U %S %M'` (wall s, user s, sys s, peak RSS KiB);
# the repository size is `du -sb` of the repository dir after each step. The page cache is
# dropped before every measured step when we are allowed to (root, not in a locked container).
# Throughput = corpus bytes (apparent size of the working copy, 10^6 bytes = 1 MB) / wall s;
# for the restore it is the size of the changed working copy (what the snapshot holds).
# After each restore the restored tree is checked against the working copy: content
# (`diff -rq`) and metadata (type, mode, owner, size, mtime of every entry).
# "other CPU s" is the CPU the rest of the machine used during a step (from /proc/stat); a step
# where it exceeds 10% of the machine is marked NOISY (e.g. a cargo build running alongside).
# Even on a quiet 2-core machine, restic-vs-restic runs differ by up to ~30% on restore and ~15%
# on the first backup, so judge the ratios over several runs. restic's local cache lives in the
# run dir (RESTIC_CACHE_DIR) and is not counted in its repository size.
#
# Targets from the spec (printed as PASS/FAIL in the ratio section):
#   first backup throughput  >= 1.5x restic
#   no-change backup time    <= 0.5x restic (local repositories)
#   restore throughput       >= 1.5x restic
#   backupd peak RSS         <= 128 MiB (every step; 192 MiB with --s3)
#   backupd repo size        <= restic's (after the last backup)
#
# Environment:
#   BENCH_DIR    scratch + results dir            (default /var/tmp/backupd-bench)
#   SHARED       dir holding bench/make-dataset.sh (default <repo>/../shared)
#   BACKUPD_BIN  use this backupd binary instead of `cargo build --release`
#   TOOLS        tools to run, in order           (default "backupd restic")
#   VERIFY       full | none                       (default full)
#   SPARSE_GIB   size of the sparse file           (default 64; shrunk to what the disk
#                can hold if a tool restored it whole; 0 skips the sparse rows)
# Output: a table and ratios on stdout; JSON lines appended to $BENCH_DIR/e2e-results.jsonl;
# per-command logs kept in $BENCH_DIR/runs/<timestamp>/logs (the bulky data is deleted
# at the end unless --keep).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
SHARED=${SHARED:-$HERE/../../shared}
TOOLS=${TOOLS:-backupd restic}
VERIFY=${VERIFY:-full}
CORPUS=""
KEEP=0
S3=0

while [ $# -gt 0 ]; do
  case "$1" in
    --corpus) CORPUS=${2:?--corpus needs a directory}; shift 2 ;;
    --corpus=*) CORPUS=${1#--corpus=}; shift ;;
    --keep) KEEP=1; shift ;;
    --s3) S3=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (usage: $0 [--s3] [--corpus DIR] [--keep])" >&2; exit 2 ;;
  esac
done
for t in $TOOLS; do
  case "$t" in backupd|restic) ;; *) echo "unknown tool in TOOLS: $t" >&2; exit 2 ;; esac
done

log() { printf '[e2e %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
CORPUS=${CORPUS:-$BENCH_DIR/corpus}

# ---------------------------------------------------------------- prerequisites
[ -x /usr/bin/time ] || { log "installing GNU time"; apt_install time; }
if [[ " $TOOLS " == *" restic "* ]] && ! command -v restic >/dev/null; then
  log "installing restic"; apt_install restic
fi

if [ "$S3" = 1 ]; then
  S3S_FS=$(command -v s3s-fs || echo "$HOME/.local/bin/s3s-fs")
  if [ ! -x "$S3S_FS" ]; then
    log "installing s3s-fs 0.14.1 (cargo, about 2 minutes)"
    cargo install s3s-fs@0.14.1 --features binary --locked --root "$HOME/.local" >&2
    S3S_FS=$HOME/.local/bin/s3s-fs
  fi
fi

# Every run works on a copy of the corpus.
ensure_corpus
[[ " $TOOLS " == *" backupd "* ]] && backupd_binary

# ---------------------------------------------------------------- run layout
TS=$(date -u +%Y%m%dT%H%M%SZ)
RUN=$BENCH_DIR/runs/$TS
WORK=$RUN/work
LOGS=$RUN/logs
RESULTS=$RUN/results.tsv          # tool step wall user sys rss_kib repo_bytes exit busy_cpu_s requests server_cpu_s
JSONL=$BENCH_DIR/e2e-results.jsonl
mkdir -p "$LOGS"
: > "$RESULTS"

S3_PID=""
cleanup() {
  [ -n "$S3_PID" ] && kill "$S3_PID" 2>/dev/null
  if [ "$KEEP" = 1 ]; then
    log "kept run data in $RUN"
  else
    rm -rf "$WORK" "$RUN"/repo-* "$RUN"/restore-* "$RUN"/sparse-* "$RUN"/restic-cache "$RUN"/backupd-cache "$RUN"/s3
  fi
}
trap cleanup EXIT


corpus_bytes=$(du -sb "$CORPUS" | cut -f1)
need=$(( corpus_bytes * 6 ))
avail=$(( $(df -Pk "$BENCH_DIR" | awk 'NR==2{print $4}') * 1024 ))
[ "$avail" -ge "$need" ] || log "WARNING: $((avail>>20)) MiB free under $BENCH_DIR, ~$((need>>20)) MiB needed"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)   # other load on the machine skews the figures
log "copying corpus $CORPUS -> $WORK"
cp -a "$CORPUS" "$WORK"
work_bytes0=$(du -sb "$WORK" | cut -f1)
work_files0=$(find "$WORK" -type f | wc -l)
log "working copy: $work_bytes0 bytes, $work_files0 files"

# ---------------------------------------------------------------- S3 server
S3_LOG=$LOGS/s3s-fs.log
if [ "$S3" = 1 ]; then
  S3_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mkdir -p "$RUN/s3/backupd" "$RUN/s3/restic"          # buckets are directories
  # s3s::service logs one "req: Request { method: M, uri: /BUCKET/..." line per request.
  RUST_LOG=s3s::service=debug "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" \
    --access-key AKBENCH --secret-key SKBENCHSECRET "$RUN/s3" > "$S3_LOG" 2>&1 &
  S3_PID=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && break; sleep 0.05; done
  log "s3s-fs $("$S3S_FS" --version 2>/dev/null | head -1) on 127.0.0.1:$S3_PORT, data in $RUN/s3"
fi
server_cpu_s() {  # CPU seconds the S3 server has used so far (0 without --s3)
  [ -n "$S3_PID" ] || { echo 0; return; }
  awk -v hz="$HZ" '{sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz}' "/proc/$S3_PID/stat"
}
repo_dir() {  # repo_dir TOOL: where the tool's repository bytes are on disk
  if [ "$S3" = 1 ]; then echo "$RUN/s3/$1/repo"; else echo "$RUN/repo-$1"; fi
}
# s3_requests TOOL FROM_LINE: requests for TOOL's bucket logged after line FROM_LINE, as
# "total GET=n PUT=n ..." (just "-" without --s3).
s3_requests() {
  [ "$S3" = 1 ] || { echo "-"; return; }
  tail -n +"$(( $2 + 1 ))" "$S3_LOG" | grep -o "req: Request { method: [A-Z]*, uri: /$1/" \
    | awk '{sub(/,/, "", $5); m[$5]++; n++} END {printf "%d", n; for (k in m) printf " %s=%d", k, m[k]; print ""}'
}

# ---------------------------------------------------------------- tool drivers
# Each driver runs one step for one tool; env is set per tool, never exported globally.
tool_env() {  # tool_env TOOL: print the env assignments for TOOL (used with env(1))
  if [ "$S3" = 1 ]; then
    local ak="AWS_ACCESS_KEY_ID=AKBENCH AWS_SECRET_ACCESS_KEY=SKBENCHSECRET"
    case "$1" in
      backupd) echo "BACKUPD_REPOSITORY=s3:http://127.0.0.1:$S3_PORT/backupd/repo BACKUPD_PASSWORD=bench BACKUPD_CACHE_DIR=$RUN/backupd-cache $ak" ;;
      restic)  echo "RESTIC_REPOSITORY=s3:http://127.0.0.1:$S3_PORT/restic/repo RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$RUN/restic-cache $ak" ;;
    esac
    return
  fi
  case "$1" in
    backupd) echo "BACKUPD_REPOSITORY=$RUN/repo-backupd BACKUPD_PASSWORD=bench" ;;
    restic)  echo "RESTIC_REPOSITORY=$RUN/repo-restic RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$RUN/restic-cache" ;;
  esac
}
tool_cmd() {  # tool_cmd TOOL STEP: print the command line for STEP
  local tool=$1 step=$2
  case "$tool:$step" in
    backupd:init)    echo "$BACKUPD init" ;;
    backupd:backup*) echo "$BACKUPD backup $WORK --json" ;;
    backupd:restore) echo "$BACKUPD restore latest --target $RUN/restore-backupd" ;;
    backupd:sparse-backup)  echo "$BACKUPD backup $RUN/sparse-src --json" ;;
    backupd:sparse-restore) echo "$BACKUPD restore latest --target $RUN/sparse-restore-backupd" ;;
    restic:sparse-backup)   echo "restic backup --compression auto $RUN/sparse-src" ;;
    restic:sparse-restore)  echo "restic restore latest --target $RUN/sparse-restore-restic" ;;
    restic:init)     echo "restic init --repository-version 2" ;;
    restic:backup*)  echo "restic backup --compression auto $WORK" ;;
    restic:restore)  echo "restic restore latest --target $RUN/restore-restic" ;;
  esac
}

# run_step TOOL STEP: drop caches, run the step under GNU time, record one results row.
run_step() {
  local tool=$1 step=$2 tf=$LOGS/$1.$2.time rc=0 repo_bytes busy0 busy log0=0 reqs srv0 srv
  drop_caches
  [ "$S3" = 1 ] && log0=$(wc -l < "$S3_LOG")
  srv0=$(server_cpu_s)
  log "$tool: $step"
  busy0=$(busy_cpu_s)
  # shellcheck disable=SC2046  # word splitting of the env/cmd strings is intended (no spaces in paths)
  env $(tool_env "$tool") /usr/bin/time -f '%e %U %S %M' -o "$tf" \
    $(tool_cmd "$tool" "$step") > "$LOGS/$tool.$step.out" 2> "$LOGS/$tool.$step.err" || rc=$?
  busy=$(awk -v a="$busy0" -v b="$(busy_cpu_s)" 'BEGIN{printf "%.2f", b-a}')
  srv=$(awk -v a="$srv0" -v b="$(server_cpu_s)" 'BEGIN{printf "%.2f", b-a}')
  # exit 3 = "snapshot written, some files unreadable" for both tools: a warning, not a failure
  if [ "$rc" != 0 ] && [ "$rc" != 3 ]; then
    tail -20 "$LOGS/$tool.$step.err" >&2
    die "$tool $step failed (exit $rc); logs in $LOGS"
  fi
  [ "$rc" = 3 ] && log "WARNING: $tool $step exit 3 (some files unreadable), see $LOGS/$tool.$step.err"
  repo_bytes=$(du -sb "$(repo_dir "$tool")" | cut -f1)
  reqs=$(s3_requests "$tool" "$log0")
  # GNU time prefixes "Command exited with non-zero status N" on failure: the figures are the last line
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$step" "$(tail -1 "$tf" | tr ' ' '\t')" "$repo_bytes" "$rc" "$busy" "$reqs" "$srv" >> "$RESULTS"
}

# verify_restore TOOL: compare the restored tree with the working copy. Prints "content meta".
verify_restore() {
  local tool=$1 dst=$RUN/restore-$1 got content=OK meta=OK
  got=$dst$WORK                           # both tools restore absolute paths under --target
  [ -d "$got" ] || { log "$tool: $got missing; comparing $dst itself"; got=$dst; }
  listing() { (cd "$1" && find . -printf '%y %m %u:%g %s %T@ %p\n' | awk '$1=="d"{$4="-"}1' | sort -k6); }
  listing "$WORK" > "$LOGS/verify.$tool.src"
  listing "$got"  > "$LOGS/verify.$tool.dst"
  if ! diff "$LOGS/verify.$tool.src" "$LOGS/verify.$tool.dst" > "$LOGS/verify.$tool.meta.diff"; then
    meta=MISMATCH
    log "$tool restore metadata differs ($(grep -c '^[<>]' "$LOGS/verify.$tool.meta.diff") lines), first ones:"
    grep '^[<>]' "$LOGS/verify.$tool.meta.diff" | head -6 >&2 || true
  fi
  if [ "$VERIFY" = full ]; then
    if ! diff -rq --no-dereference "$WORK" "$got" > "$LOGS/verify.$tool.content.diff" 2>&1; then
      content=MISMATCH
      log "$tool restore content differs, first lines:"; head -6 "$LOGS/verify.$tool.content.diff" >&2 || true
    fi
  else
    content=SKIPPED
  fi
  echo "$content $meta"
}

# ---------------------------------------------------------------- the run
for tool in $TOOLS; do
  run_step "$tool" init
  run_step "$tool" backup1
  run_step "$tool" backup2-same
done

log "make-change.sh $WORK (files only)"
bash "$SHARED/bench/make-change.sh" "$WORK" > "$LOGS/make-change.log" 2>&1
work_bytes1=$(du -sb "$WORK" | cut -f1)
work_files1=$(find "$WORK" -type f | wc -l)

for tool in $TOOLS; do run_step "$tool" backup3-chg; done

declare -A VERDICT
for tool in $TOOLS; do
  run_step "$tool" restore
  log "$tool: verifying restore"
  VERDICT[$tool]=$(verify_restore "$tool")
  [ "$KEEP" = 1 ] || rm -rf "$RUN/restore-$tool"   # free the space before the next restore
done

# ---------------------------------------------------------------- sparse file row
SPARSE_GIB=${SPARSE_GIB:-64}
declare -A SPARSE_ALLOC
if [ "$SPARSE_GIB" -gt 0 ]; then
  # A tool that fills the holes needs the whole size free.
  free_gib=$(( $(df -Pk "$BENCH_DIR" | awk 'NR==2{print $4}') / 1048576 ))
  if [ "$SPARSE_GIB" -gt $(( free_gib - 8 )) ]; then
    SPARSE_GIB=$(( free_gib - 8 ))
    log "WARNING: only ${free_gib} GiB free: the sparse file is ${SPARSE_GIB} GiB"
  fi
  mkdir -p "$RUN/sparse-src"
  SPARSE=$RUN/sparse-src/image
  truncate -s "${SPARSE_GIB}G" "$SPARSE"
  stride=$(( SPARSE_GIB * 1024 / 100 ))   # MiB between the 100 extents of 1 MiB
  for i in $(seq 0 99); do
    dd if=/dev/urandom of="$SPARSE" bs=1M count=1 seek=$(( i * stride )) conv=notrunc status=none
  done
  log "sparse file: ${SPARSE_GIB} GiB, $(( $(stat -c %b "$SPARSE") * 512 >> 20 )) MiB allocated"
  for tool in $TOOLS; do
    run_step "$tool" sparse-backup
    run_step "$tool" sparse-restore
    got=$RUN/sparse-restore-$tool$SPARSE
    SPARSE_ALLOC[$tool]=$(( $(stat -c %b "$got") * $(stat -c %B "$got") ))
    cmp -s "$SPARSE" "$got" || die "$tool: the restored sparse file differs"
    rm -rf "$RUN/sparse-restore-$tool"
  done
  rm -rf "$RUN/sparse-src"
fi

# ---------------------------------------------------------------- report
# awk does the arithmetic: MiB = 2^20 bytes, MB = 10^6 bytes.
echo
echo "backupd e2e benchmark  $TS  repository: $([ "$S3" = 1 ] && echo "S3 (s3s-fs on loopback)" || echo "local directory")  host=$(hostname)  cpus=$(nproc)  loadavg start: $LOAD_START  end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "corpus: $CORPUS  working copy: $work_bytes0 bytes, $work_files0 files (after change: $work_bytes1 bytes, $work_files1 files)"
[ -n "${BACKUPD:-}" ] && echo "backupd: $BACKUPD ($("$BACKUPD" --version 2>/dev/null || echo '?'))"
command -v restic >/dev/null && echo "restic:  $(restic version 2>/dev/null | head -1)"
echo
awk -F'\t' -v b0="$work_bytes0" -v b1="$work_bytes1" -v ncpu="$(nproc)" '
  BEGIN { printf "%-13s %-8s %9s %9s %10s %10s %11s %12s %13s\n", "step", "tool", "wall s", "CPU s", "RSS MiB", "MB/s", "repo MiB", "other CPU s", "server CPU s"
          printf "%-13s %-8s %9s %9s %10s %10s %11s %12s %13s\n", "----", "----", "------", "-----", "-------", "----", "--------", "-----------", "------------" }
  { tp = "-"
    if ($2 == "backup1" && $3 > 0) tp = sprintf("%.1f", b0 / 1e6 / $3)
    if ($2 == "restore" && $3 > 0) tp = sprintf("%.1f", b1 / 1e6 / $3)
    other = $9 - $4 - $5 - $11; if (other < 0) other = 0
    # flag a step during which other processes used more than 10% of the machine
    flag = (other > 0.1 * $3 * ncpu) ? "  NOISY" : ""
    if (flag != "") noisy = 1
    printf "%-13s %-8s %9.2f %9.2f %10.1f %10s %11.1f %12.2f %13.2f%s\n", $2, $1, $3, $4 + $5, $6 / 1024, tp, $7 / 1048576, other, $11, flag }
  END { if (noisy) print "NOISY: other processes were busy during that step; its figures are not reliable, run again on a quiet machine" }
' <(# group the rows by step (stable: tools keep their TOOLS order)
     awk -F'\t' '{o = ($2=="init") ? 0 : ($2=="backup1") ? 1 : ($2=="backup2-same") ? 2 : ($2=="backup3-chg") ? 3 : ($2=="restore") ? 4 : ($2=="sparse-backup") ? 5 : 6
                  print o "\t" $0}' "$RESULTS" | sort -s -n -k1,1 | cut -f2-)
echo
for tool in $TOOLS; do
  read -r c m <<< "${VERDICT[$tool]}"
  echo "restore check $tool: content $c, metadata $m"
done
if [ "$SPARSE_GIB" -gt 0 ]; then
  echo
  echo "sparse file (${SPARSE_GIB} GiB, 100 MiB of data; contents compared with cmp after each restore):"
  for tool in $TOOLS; do
    awk -F'\t' -v t="$tool" -v a="${SPARSE_ALLOC[$tool]}" '
      $1 == t && $2 == "sparse-backup"  { b = $3 }
      $1 == t && $2 == "sparse-restore" { r = $3 }
      END { printf "  %-8s backup %8.2f s   restore %8.2f s   restored file allocates %10.1f MiB\n", t, b, r, a / 1048576 }' "$RESULTS"
  done
fi
if [ "$S3" = 1 ]; then
  echo
  echo "S3 requests served, by HTTP method (a listing is a GET):"
  awk -F'\t' '{printf "  %-13s %-8s %s\n", $2, $1, $10}' "$RESULTS"
fi

if [[ " $TOOLS " == *" backupd "* && " $TOOLS " == *" restic "* ]]; then
  echo
  echo "ratios backupd/restic (target in brackets):"
  awk -F'\t' -v rss_limit_mib="$([ "$S3" = 1 ] && echo 192 || echo 128)" '
    { w[$1,$2] = $3; r[$1,$2] = $6; repo[$1,$2] = $7; if ($6 > maxr[$1]) maxr[$1] = $6 }
    function pf(ok) { return ok ? "PASS" : "FAIL" }
    END {
      x = w["restic","backup1"] / w["backupd","backup1"]
      printf "  first backup throughput  %6.2fx   [>= 1.5x]  %s\n", x, pf(x >= 1.5)
      x = w["backupd","backup2-same"] / w["restic","backup2-same"]
      if (rss_limit_mib == 128) printf "  no-change backup time    %6.2fx   [<= 0.5x]  %s\n", x, pf(x <= 0.5)
      else printf "  no-change backup time    %6.2fx   (target set for local repositories only)\n", x
      x = w["backupd","backup3-chg"] / w["restic","backup3-chg"]
      printf "  after-change backup time %6.2fx   (no target)\n", x
      x = w["restic","restore"] / w["backupd","restore"]
      printf "  restore throughput       %6.2fx   [>= 1.5x]  %s\n", x, pf(x >= 1.5)
      split("backup1 backup2-same backup3-chg restore", S, " ")
      for (i = 1; i <= 4; i++)
        printf "  peak RSS %-15s %6.2fx   (%.1f vs %.1f MiB)\n", S[i], r["backupd",S[i]] / r["restic",S[i]], r["backupd",S[i]] / 1024, r["restic",S[i]] / 1024
      printf "  backupd peak RSS (max)   %6.1f MiB [<= %d MiB]  %s\n", maxr["backupd"] / 1024, rss_limit_mib, pf(maxr["backupd"] <= rss_limit_mib * 1024)
      x = repo["backupd","backup3-chg"] / repo["restic","backup3-chg"]
      printf "  repo size after change   %6.4fx   [<= 1.0x]  %s\n", x, pf(x <= 1.0)
      x = repo["backupd","backup1"] / repo["restic","backup1"]
      printf "  repo size after first    %6.4fx\n", x
    }' "$RESULTS"
fi

# ---------------------------------------------------------------- JSON lines
now=$(date -u +%FT%TZ)
while IFS=$'\t' read -r tool step wall usr sys rss repo rc busy reqs srv; do
  bytes=$work_bytes0; [ "$step" = restore ] && bytes=$work_bytes1
  tp=null
  case "$step" in backup1|restore) tp=$(awk -v b="$bytes" -v w="$wall" 'BEGIN{printf (w>0 ? "%.3f" : "null"), (w>0 ? b/1e6/w : 0)}') ;; esac
  summary=null
  # backupd --json prints one summary object; embed it when it parses
  if [ "$tool" = backupd ] && [[ "$step" == backup* ]]; then
    s=$(tail -1 "$LOGS/$tool.$step.out" 2>/dev/null || true)
    if [ -n "$s" ] && python3 -c 'import json,sys; json.loads(sys.argv[1])' "$s" 2>/dev/null; then summary=$s; fi
  fi
  verify=null
  if [ "$step" = restore ]; then read -r c m <<< "${VERDICT[$tool]}"; verify="{\"content\":\"$c\",\"metadata\":\"$m\"}"; fi
  printf '{"ts":"%s","run":"%s","host":"%s","repository":"%s","requests":"%s","server_cpu_s":%s,"tool":"%s","step":"%s","wall_s":%s,"user_s":%s,"sys_s":%s,"cpu_s":%s,"max_rss_kib":%s,"repo_bytes":%s,"exit":%s,"corpus_bytes":%s,"corpus_files":%s,"throughput_mb_s":%s,"other_cpu_s":%s,"verify":%s,"summary":%s}\n' \
  "$now" "$TS" "$(hostname)" "$([ "$S3" = 1 ] && echo s3 || echo local)" "$reqs" "$srv" "$tool" "$step" "$wall" "$usr" "$sys" "$(awk -v a="$usr" -v b="$sys" 'BEGIN{printf "%.2f", a+b}')" \
    "$rss" "$repo" "$rc" "$bytes" "$work_files0" "$tp" \
    "$(awk -v b="$busy" -v u="$usr" -v s="$sys" -v v="$srv" 'BEGIN{o=b-u-s-v; printf "%.2f", (o<0?0:o)}')" "$verify" "$summary"
done < "$RESULTS" >> "$JSONL"
echo
echo "results appended to $JSONL; logs in $LOGS"
