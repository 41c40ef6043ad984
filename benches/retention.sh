#!/usr/bin/env bash
# Retention benchmark: backupd vs restic on forgetting and pruning, on the shared mixed corpus,
# plus the idle footprint of `backupd agent`.
#
# usage: benches/retention.sh [--corpus DIR] [--keep]
#
# What it does (one run; each tool gets its own fresh copy of the corpus, so both see the same
# data and the same changes):
#   init          create a fresh local repository (password "bench")
#   backup1..N    N backups (BACKUPS, default 8) of the working copy; before backup2..N the
#                 working copy gets make-change.sh WORK <100+i> (files only, PG_TXNS=0: ~22 MiB
#                 of appends, rewrites, new and deleted files each). Each change has its own
#                 seed: with make-change.sh's default seed every change would write the same
#                 bytes again and later backups would add almost nothing.
#   forget        backupd `forget --keep-last 2`; restic `forget --keep-last 2` (no prune)
#   prune1/2      backupd: `prune --grace 0s` twice (the first marks and repacks, the second
#                 deletes what the first marked); "prune total" is their sum (wall, CPU; the
#                 max of peak RSS). restic: `prune` with its default settings (one step).
#   restore       restore of the latest snapshot into an empty dir, then `diff -r` against the
#                 working copy
#   check         backupd `check --read-data` / restic `check --read-data`
# Each step runs under `/usr/bin/time -f '%e %U %S %M'` (wall s, user s, sys s, peak RSS KiB);
# the repository size is `du -sb` of the repository dir after each step. The page cache is
# dropped before every measured step when we are allowed to (root, not in a locked container).
# "other CPU s" is the CPU the rest of the machine used during a step (from /proc/stat); a step
# where it exceeds 10% of the machine (and 0.1 s) is marked NOISY. restic's local cache lives in
# the run dir (RESTIC_CACHE_DIR) and is not counted in its repository size.
#
# Agent idle footprint (when backupd is in TOOLS): 5 policies (files source = the working
# copy, a local repository, cron "0 3 * * *" so nothing runs during the measurement, a 0600
# password file) in a temp dir; `backupd agent` on a free loopback port; once /healthz says ok,
# sleep 5 s, read VmRSS/VmHWM from /proc/PID/status, fetch /metrics once (its size in bytes),
# then SIGTERM and wait for the exit.
#
# Reported: a table per tool; ratios backupd/restic for prune total wall, peak RSS over
# forget+prune and final repository size. The only target: backupd peak RSS <= 128 MiB over all
# its measured steps (PASS/FAIL). A restore that differs from the working copy, a failed
# `check --read-data` or a snapshot count after forget other than KEEP_LAST (BACKUPS if fewer)
# makes the script exit 1 (after the report).
#
# Environment:
#   BENCH_DIR    scratch + results dir            (default /var/tmp/backupd-bench)
#   SHARED       dir holding bench/make-dataset.sh (default <repo>/../shared)
#   BACKUPD_BIN  use this backupd binary instead of `cargo build --release`
#   TOOLS        tools to run, in order           (default "backupd restic")
#   CORPUS_MB    approximate corpus size: builds (once) $BENCH_DIR/corpus-<N>mb with
#                make-dataset.sh and a pgbench scale chosen to reach it. The files part of the
#                dataset is fixed at ~0.8 GB, so N below ~905 gives pgbench scale 1. Without
#                CORPUS_MB and --corpus: $BENCH_DIR/corpus, the ~2 GiB corpus e2e.sh uses.
#   BACKUPS      number of backups                (default 8)
#   KEEP_LAST    forget --keep-last N             (default 2)
# Output: tables and ratios on stdout; one JSON line appended to
# $BENCH_DIR/retention-results.jsonl; per-command logs kept in $BENCH_DIR/runs/retention-<ts>/logs
# (the bulky data is deleted at the end unless --keep).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
SHARED=${SHARED:-$HERE/../../shared}
TOOLS=${TOOLS:-backupd restic}
BACKUPS=${BACKUPS:-8}
KEEP_LAST=${KEEP_LAST:-2}
CORPUS=""
KEEP=0

while [ $# -gt 0 ]; do
  case "$1" in
    --corpus) CORPUS=${2:?--corpus needs a directory}; shift 2 ;;
    --corpus=*) CORPUS=${1#--corpus=}; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (usage: $0 [--corpus DIR] [--keep])" >&2; exit 2 ;;
  esac
done
for t in $TOOLS; do
  case "$t" in backupd|restic) ;; *) echo "unknown tool in TOOLS: $t" >&2; exit 2 ;; esac
done
[[ "$BACKUPS" =~ ^[0-9]+$ ]] && [ "$BACKUPS" -ge 1 ] || { echo "BACKUPS must be >= 1" >&2; exit 2; }
[[ "$KEEP_LAST" =~ ^[0-9]+$ ]] && [ "$KEEP_LAST" -ge 1 ] || { echo "KEEP_LAST must be >= 1" >&2; exit 2; }

log() { printf '[retention %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# shellcheck source=benches/lib.sh
. "$HERE/lib.sh"

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
PGSCALE=""
if [ -z "$CORPUS" ]; then
  if [ -n "${CORPUS_MB:-}" ]; then
    [[ "$CORPUS_MB" =~ ^[0-9]+$ ]] || { echo "CORPUS_MB must be a number of MB" >&2; exit 2; }
    CORPUS=$BENCH_DIR/corpus-${CORPUS_MB}mb
    # files part ~801 MB (logs/exports, blobs, 20,000 configs) + pgdata ~85 MB (WAL, catalogs)
    # + ~18.5 MB per pgbench scale unit (hex filler; scale 75 gave a 1469 MB pgdata)
    PGSCALE=$(( (CORPUS_MB - 886) * 10 / 185 )); [ "$PGSCALE" -ge 1 ] || PGSCALE=1
  else
    CORPUS=$BENCH_DIR/corpus
  fi
fi

# ---------------------------------------------------------------- prerequisites
[ -x /usr/bin/time ] || { log "installing GNU time"; apt_install time; }
if [[ " $TOOLS " == *" restic "* ]] && ! command -v restic >/dev/null; then
  log "installing restic"; apt_install restic
fi
if [[ " $TOOLS " == *" backupd "* ]] && ! command -v curl >/dev/null; then
  log "installing curl"; apt_install curl
fi

# Every tool works on a fresh copy of the corpus.
# shellcheck disable=SC2086
ensure_corpus ${PGSCALE:+42 $PGSCALE}
[[ " $TOOLS " == *" backupd "* ]] && backupd_binary

# ---------------------------------------------------------------- run layout
TS=$(date -u +%Y%m%dT%H%M%SZ)
RUN=$BENCH_DIR/runs/retention-$TS
WORK=$RUN/work
LOGS=$RUN/logs
RESULTS=$RUN/results.tsv          # tool step wall user sys rss_kib repo_bytes exit busy_cpu_s
JSONL=$BENCH_DIR/retention-results.jsonl
mkdir -p "$LOGS"
: > "$RESULTS"
T_START=$(date +%s)

AGENT_PID=""
AGENT_DIR=""
cleanup() {
  if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then kill -KILL "$AGENT_PID" 2>/dev/null || true; fi
  [ -n "$AGENT_DIR" ] && rm -rf "$AGENT_DIR"
  if [ "$KEEP" = 1 ]; then
    log "kept run data in $RUN"
  else
    rm -rf "$WORK" "$RUN"/repo-* "$RUN"/restore-* "$RUN"/restic-cache
  fi
}
trap cleanup EXIT


corpus_bytes=$(du -sb "$CORPUS" | cut -f1)
corpus_files=$(find "$CORPUS" -type f | wc -l)
need=$(( corpus_bytes * 5 ))
avail=$(( $(df -Pk "$BENCH_DIR" | awk 'NR==2{print $4}') * 1024 ))
[ "$avail" -ge "$need" ] || log "WARNING: $((avail>>20)) MiB free under $BENCH_DIR, ~$((need>>20)) MiB needed"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "corpus $CORPUS: $corpus_bytes bytes, $corpus_files files; $BACKUPS backups, forget --keep-last $KEEP_LAST"

# ---------------------------------------------------------------- tool drivers
tool_env() {  # tool_env TOOL: the env assignments for TOOL (used with env(1))
  case "$1" in
    backupd) echo "BACKUPD_REPOSITORY=$RUN/repo-backupd BACKUPD_PASSWORD=bench" ;;
    restic)  echo "RESTIC_REPOSITORY=$RUN/repo-restic RESTIC_PASSWORD=bench RESTIC_CACHE_DIR=$RUN/restic-cache" ;;
  esac
}
tool_cmd() {  # tool_cmd TOOL STEP: the command line for STEP
  case "$1:$2" in
    backupd:init)     echo "$BACKUPD init" ;;
    backupd:backup*)  echo "$BACKUPD backup $WORK --json" ;;
    backupd:forget)   echo "$BACKUPD forget --keep-last $KEEP_LAST" ;;
    backupd:prune*)   echo "$BACKUPD prune --grace 0s" ;;
    backupd:restore)  echo "$BACKUPD restore latest --target $RUN/restore-backupd" ;;
    backupd:check)    echo "$BACKUPD check --read-data" ;;
    backupd:snapshots) echo "$BACKUPD snapshots --json" ;;
    restic:init)      echo "restic init --repository-version 2" ;;
    restic:backup*)   echo "restic backup --compression auto $WORK" ;;
    restic:forget)    echo "restic forget --keep-last $KEEP_LAST" ;;
    restic:prune)     echo "restic prune" ;;
    restic:restore)   echo "restic restore latest --target $RUN/restore-restic" ;;
    restic:check)     echo "restic check --read-data" ;;
    restic:snapshots) echo "restic snapshots --json" ;;
    *) die "no command for $1 $2" ;;
  esac
}

# run_step TOOL STEP [soft]: drop caches, run the step under GNU time, record one results row.
# A failing step (exit other than 0, or 3 for a backup) stops the script, unless "soft": then
# the exit code is only recorded. Returns the step's exit code in STEP_RC.
STEP_RC=0
run_step() {
  local tool=$1 step=$2 soft=${3:-} tf=$LOGS/$1.$2.time rc=0 repo_bytes busy0 busy
  drop_caches
  log "$tool: $step"
  busy0=$(busy_cpu_s)
  # shellcheck disable=SC2046  # word splitting of the env/cmd strings is intended (no spaces in paths)
  env $(tool_env "$tool") /usr/bin/time -f '%e %U %S %M' -o "$tf" \
    $(tool_cmd "$tool" "$step") > "$LOGS/$tool.$step.out" 2> "$LOGS/$tool.$step.err" || rc=$?
  busy=$(awk -v a="$busy0" -v b="$(busy_cpu_s)" 'BEGIN{printf "%.2f", b-a}')
  STEP_RC=$rc
  if [ "$rc" != 0 ] && ! { [ "$rc" = 3 ] && [[ "$step" == backup* ]]; }; then
    tail -20 "$LOGS/$tool.$step.err" >&2
    [ "$soft" = soft ] || die "$tool $step failed (exit $rc); logs in $LOGS"
    log "$tool $step FAILED (exit $rc)"
  fi
  [ "$rc" = 3 ] && log "WARNING: $tool $step exit 3 (some files unreadable), see $LOGS/$tool.$step.err"
  repo_bytes=$(du -sb "$RUN/repo-$tool" | cut -f1)
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$step" "$(tail -1 "$tf" | tr ' ' '\t')" "$repo_bytes" "$rc" "$busy" >> "$RESULTS"
}

snapshot_count() {  # snapshot_count TOOL: number of snapshots in TOOL's repository (unmeasured)
  # shellcheck disable=SC2046
  env $(tool_env "$1") $(tool_cmd "$1" snapshots) 2>>"$LOGS/$1.snapshots.err" \
    | python3 -c 'import json,sys; print(len(json.load(sys.stdin) or []))' 2>>"$LOGS/$1.snapshots.err" || echo "?"
}

# ---------------------------------------------------------------- the run
declare -A SNAPS_BEFORE SNAPS_AFTER RESTORE_OK CHECK_OK
for tool in $TOOLS; do
  log "$tool: fresh working copy of the corpus"
  rm -rf "$WORK"
  cp -a "$CORPUS" "$WORK"
  run_step "$tool" init
  for i in $(seq 1 "$BACKUPS"); do
    if [ "$i" -gt 1 ]; then
      bash "$SHARED/bench/make-change.sh" "$WORK" $((100 + i)) 0 >> "$LOGS/$tool.make-change.log" 2>&1 \
        || die "make-change.sh failed, see $LOGS/$tool.make-change.log"
    fi
    run_step "$tool" "backup$i"
  done
  eval "work_bytes_$tool=\$(du -sb \"\$WORK\" | cut -f1)"
  eval "work_files_$tool=\$(find \"\$WORK\" -type f | wc -l)"
  SNAPS_BEFORE[$tool]=$(snapshot_count "$tool")
  run_step "$tool" forget
  SNAPS_AFTER[$tool]=$(snapshot_count "$tool")
  if [ "$tool" = backupd ]; then
    run_step "$tool" prune1
    run_step "$tool" prune2
  else
    run_step "$tool" prune
  fi
  run_step "$tool" restore soft
  got=$RUN/restore-$tool$WORK               # both tools restore absolute paths under --target
  if [ "$STEP_RC" != 0 ]; then
    RESTORE_OK[$tool]="FAIL (restore exit $STEP_RC)"
  elif [ ! -d "$got" ]; then
    RESTORE_OK[$tool]="FAIL ($got missing)"
  elif diff -r "$WORK" "$got" > "$LOGS/$tool.restore.diff" 2>&1; then
    RESTORE_OK[$tool]=OK
  else
    RESTORE_OK[$tool]="MISMATCH ($(wc -l < "$LOGS/$tool.restore.diff") diff lines)"
    log "$tool restore differs from the working copy, first lines:"; head -6 "$LOGS/$tool.restore.diff" >&2 || true
  fi
  [ "$KEEP" = 1 ] || rm -rf "$RUN/restore-$tool"
  run_step "$tool" check soft
  if [ "$STEP_RC" = 0 ]; then CHECK_OK[$tool]=OK; else CHECK_OK[$tool]="FAIL (exit $STEP_RC)"; fi
done

# ---------------------------------------------------------------- agent idle footprint
AGENT_RSS=""; AGENT_HWM=""; AGENT_METRICS=""; AGENT_EXIT=""; AGENT_OK=""
if [[ " $TOOLS " == *" backupd "* ]]; then
  [ -d "$WORK" ] || cp -a "$CORPUS" "$WORK"
  AGENT_DIR=$(mktemp -d "$RUN/agent.XXXXXX")
  mkdir -p "$AGENT_DIR/policies" "$AGENT_DIR/state"
  printf 'bench\n' > "$AGENT_DIR/repo.password"; chmod 600 "$AGENT_DIR/repo.password"
  BACKUPD_PASSWORD=bench "$BACKUPD" --repo "$RUN/repo-agent" init > "$LOGS/agent.init.out" 2>&1 \
    || die "backupd init for the agent's repository failed, see $LOGS/agent.init.out"
  for n in 1 2 3 4 5; do
    cat > "$AGENT_DIR/policies/idle-$n.toml" <<TOML
description = "retention bench: idle agent policy $n"
tags = ["bench"]

[repository]
location = "$RUN/repo-agent"
password_file = "$AGENT_DIR/repo.password"

[source]
type = "files"
paths = ["$WORK"]

[schedule]
cron = "0 3 * * *"
timezone = "UTC"
TOML
  done
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  log "backupd agent on 127.0.0.1:$PORT (5 policies)"
  "$BACKUPD" agent --policies "$AGENT_DIR/policies" --state-dir "$AGENT_DIR/state" \
    --listen "127.0.0.1:$PORT" > "$LOGS/agent.out" 2> "$LOGS/agent.err" &
  AGENT_PID=$!
  for _ in $(seq 150); do
    [ "$(curl -s "127.0.0.1:$PORT/healthz" 2>/dev/null)" = ok ] && { AGENT_OK=1; break; }
    kill -0 "$AGENT_PID" 2>/dev/null || break
    sleep 0.2
  done
  if [ -z "$AGENT_OK" ]; then
    tail -20 "$LOGS/agent.err" >&2
    die "backupd agent did not answer /healthz with ok within 30 s; logs in $LOGS"
  fi
  sleep 5
  AGENT_RSS=$(awk '/^VmRSS:/{print $2}' "/proc/$AGENT_PID/status")
  AGENT_HWM=$(awk '/^VmHWM:/{print $2}' "/proc/$AGENT_PID/status")
  AGENT_THREADS=$(awk '/^Threads:/{print $2}' "/proc/$AGENT_PID/status")
  curl -s "127.0.0.1:$PORT/metrics" > "$LOGS/agent.metrics"
  AGENT_METRICS=$(wc -c < "$LOGS/agent.metrics")
  kill -TERM "$AGENT_PID"
  t0=$(date +%s.%N)
  for _ in $(seq 300); do kill -0 "$AGENT_PID" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$AGENT_PID" 2>/dev/null; then
    log "WARNING: agent still running 30 s after SIGTERM: killing it"; kill -KILL "$AGENT_PID"
  fi
  AGENT_EXIT=0; wait "$AGENT_PID" || AGENT_EXIT=$?
  AGENT_STOP_S=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.2f", b-a}')
  AGENT_PID=""
fi

# ---------------------------------------------------------------- report
T_END=$(date +%s)
echo
echo "backupd retention benchmark  $TS  host=$(hostname)  cpus=$(nproc)  loadavg start: $LOAD_START  end: $(cut -d' ' -f1-3 /proc/loadavg)  run: $((T_END - T_START)) s"
echo "corpus: $CORPUS  $corpus_bytes bytes, $corpus_files files; $BACKUPS backups with make-change.sh (seeds 102..$((100 + BACKUPS))) between them; forget --keep-last $KEEP_LAST"
[ -n "${BACKUPD:-}" ] && echo "backupd: $BACKUPD ($("$BACKUPD" --version 2>/dev/null || echo '?'))"
command -v restic >/dev/null && echo "restic:  $(restic version 2>/dev/null | head -1)"
for tool in $TOOLS; do
  wb=work_bytes_$tool; wf=work_files_$tool
  echo
  echo "$tool  (final working copy: ${!wb} bytes, ${!wf} files; snapshots before forget: ${SNAPS_BEFORE[$tool]}, after: ${SNAPS_AFTER[$tool]})"
  awk -F'\t' -v t="$tool" -v ncpu="$(nproc)" '
    function row(step, wall, cpu, rss, repo, other, flag) {
      printf "  %-13s %9.2f %9.2f %10.1f %11.1f %12.2f%s\n", step, wall, cpu, rss / 1024, repo / 1048576, other, flag }
    BEGIN { printf "  %-13s %9s %9s %10s %11s %12s\n", "step", "wall s", "CPU s", "RSS MiB", "repo MiB", "other CPU s"
            printf "  %-13s %9s %9s %10s %11s %12s\n", "----", "------", "-----", "-------", "--------", "-----------" }
    $1 == t {
      other = $9 - $4 - $5; if (other < 0) other = 0
      # (a floor of 0.1 s keeps sub-second steps from being flagged for a blip)
      flag = (other > 0.1 * $3 * ncpu && other > 0.1) ? "  NOISY" : ""; if (flag != "") noisy = 1
      if ($8 != 0) flag = flag "  (exit " $8 ")"
      row($2, $3, $4 + $5, $6, $7, other, flag)
      if ($2 ~ /^prune/) { n++; pw += $3; pc += $4 + $5; po += other; if ($6 > pr) pr = $6; prepo = $7 }
      if ($2 == "prune2") row("prune total", pw, pc, pr, prepo, po, "")
    }
    END { if (noisy) print "  NOISY: other processes were busy during that step; its figures are not reliable, run again on a quiet machine" }
  ' "$RESULTS"
  echo "  restore vs working copy (diff -r): ${RESTORE_OK[$tool]}   check --read-data: ${CHECK_OK[$tool]}"
done

# Per-tool summary figures: prune total wall, peak RSS over forget+prune, repo before forget
# (after the last backup) and after prune, max RSS over every step.
SUMMARY=$RUN/summary.tsv   # tool prune_wall prune_cpu rss_fp_kib repo_before repo_after rss_max_kib rss_max_step forget_wall
awk -F'\t' -v last="backup$BACKUPS" '
  { t = $1; tools[t] = 1
    if ($2 ~ /^prune/) { pw[t] += $3; pc[t] += $4 + $5; after[t] = $7 }
    if (($2 ~ /^prune/ || $2 == "forget") && $6 > fp[t]) fp[t] = $6
    if ($2 == "forget") fw[t] = $3
    if ($2 == last) before[t] = $7
    if ($6 > mx[t]) { mx[t] = $6; mxs[t] = $2 } }
  END { for (t in tools) printf "%s\t%.2f\t%.2f\t%d\t%d\t%d\t%d\t%s\t%.2f\n", t, pw[t], pc[t], fp[t], before[t], after[t], mx[t], mxs[t], fw[t] }
' "$RESULTS" > "$SUMMARY"

echo
echo "repository size (MiB) after backup$BACKUPS -> after prune:"
for tool in $TOOLS; do
  awk -F'\t' -v t="$tool" '$1 == t {b = $5; a = $6
    printf "  %-8s %9.1f -> %9.1f  (freed %.1f MiB, %.1f%%)\n", t, b/1048576, a/1048576, (b-a)/1048576, (b > 0 ? 100*(b-a)/b : 0)}' "$SUMMARY"
done

RSS_PASS=""
if [[ " $TOOLS " == *" backupd "* ]]; then
  RSS_PASS=$(awk -F'\t' '$1=="backupd"{print ($7 <= 128*1024) ? "PASS" : "FAIL"}' "$SUMMARY")
fi
if [[ " $TOOLS " == *" backupd "* && " $TOOLS " == *" restic "* ]]; then
  echo
  echo "ratios backupd/restic:"
  awk -F'\t' '
    { pw[$1] = $2; fp[$1] = $4; after[$1] = $6; fw[$1] = $9 }
    function r(a, b) { return b > 0 ? a / b : 0 }
    END {
      printf "  prune total wall          %6.2fx   (%.2f vs %.2f s)\n", r(pw["backupd"], pw["restic"]), pw["backupd"], pw["restic"]
      printf "  forget wall               %6.2fx   (%.2f vs %.2f s)\n", r(fw["backupd"], fw["restic"]), fw["backupd"], fw["restic"]
      printf "  peak RSS forget+prune     %6.2fx   (%.1f vs %.1f MiB)\n", r(fp["backupd"], fp["restic"]), fp["backupd"]/1024, fp["restic"]/1024
      printf "  final repo size           %6.4fx   (%.1f vs %.1f MiB)\n", r(after["backupd"], after["restic"]), after["backupd"]/1048576, after["restic"]/1048576
    }' "$SUMMARY"
fi
if [ -n "$RSS_PASS" ]; then
  awk -F'\t' -v v="$RSS_PASS" '$1=="backupd"{printf "  backupd peak RSS (max over all steps: %s)  %.1f MiB [<= 128 MiB]  %s\n", $8, $7/1024, v}' "$SUMMARY"
fi
if [ -n "$AGENT_RSS" ]; then
  echo
  awk -v r="$AGENT_RSS" -v h="$AGENT_HWM" 'BEGIN{printf "agent idle RSS: %.1f MiB (peak %.1f MiB)\n", r/1024, h/1024}'
  echo "agent: 5 policies, $AGENT_THREADS threads, /metrics $AGENT_METRICS bytes, exit $AGENT_EXIT ${AGENT_STOP_S} s after SIGTERM"
fi

# ---------------------------------------------------------------- verdict + JSON line
FAILED=0
for tool in $TOOLS; do
  [ "${RESTORE_OK[$tool]}" = OK ] || FAILED=1
  [ "${CHECK_OK[$tool]}" = OK ] || FAILED=1
  if [ "${SNAPS_AFTER[$tool]}" != "$(( KEEP_LAST < BACKUPS ? KEEP_LAST : BACKUPS ))" ]; then
    echo "$tool: ${SNAPS_AFTER[$tool]} snapshot(s) after forget --keep-last $KEEP_LAST" >&2; FAILED=1
  fi
done
[ -z "$AGENT_EXIT" ] || [ "$AGENT_EXIT" = 0 ] || { echo "backupd agent exited $AGENT_EXIT after SIGTERM" >&2; }

verdicts=$(for tool in $TOOLS; do printf '%s\t%s\t%s\t%s\t%s\n' "$tool" "${RESTORE_OK[$tool]}" "${CHECK_OK[$tool]}" "${SNAPS_BEFORE[$tool]}" "${SNAPS_AFTER[$tool]}"; done)
python3 - "$RESULTS" "$SUMMARY" "$JSONL" <<PY
import json, sys
results, summary, out = sys.argv[1:4]
def num(s):
    try:
        return int(s)
    except ValueError:
        try: return float(s)
        except ValueError: return None
tools = {}
for line in open(results):
    t, step, wall, usr, sys_, rss, repo, rc, busy = line.rstrip("\n").split("\t")
    other = max(0.0, float(busy) - float(usr) - float(sys_))
    tools.setdefault(t, {"steps": {}})["steps"][step] = {
        "wall_s": num(wall), "user_s": num(usr), "sys_s": num(sys_), "max_rss_kib": num(rss),
        "repo_bytes": num(repo), "exit": num(rc), "other_cpu_s": round(other, 2)}
for line in open(summary):
    t, pw, pc, fp, before, after, mx, mxs, fw = line.rstrip("\n").split("\t")
    tools[t].update({"prune_total_wall_s": num(pw), "prune_total_cpu_s": num(pc),
                     "peak_rss_forget_prune_kib": num(fp), "repo_bytes_before_forget": num(before),
                     "repo_bytes_after_prune": num(after), "peak_rss_max_kib": num(mx), "peak_rss_max_step": mxs})
for line in """$verdicts""".strip().splitlines():
    t, restore, check, sb, sa = line.split("\t")
    tools[t].update({"restore_diff": restore, "check_read_data": check,
                     "snapshots_before_forget": num(sb), "snapshots_after_forget": num(sa)})
ratios = None
if "backupd" in tools and "restic" in tools:
    b, r = tools["backupd"], tools["restic"]
    q = lambda k: (b[k] / r[k]) if r.get(k) else None
    ratios = {"prune_total_wall": q("prune_total_wall_s"), "peak_rss_forget_prune": q("peak_rss_forget_prune_kib"),
              "final_repo_size": q("repo_bytes_after_prune")}
agent = None
if "$AGENT_RSS":
    agent = {"policies": 5, "vmrss_kib": num("$AGENT_RSS"), "vmhwm_kib": num("$AGENT_HWM"),
             "threads": num("${AGENT_THREADS:-}"), "metrics_bytes": num("$AGENT_METRICS"),
             "exit_after_sigterm": num("$AGENT_EXIT"), "stop_s": num("${AGENT_STOP_S:-}")}
rec = {"ts": "$(date -u +%FT%TZ)", "run": "$TS", "host": "$(hostname)", "cpus": $(nproc),
       "loadavg_start": "$LOAD_START", "run_s": $((T_END - T_START)),
       "corpus": "$CORPUS", "corpus_bytes": $corpus_bytes, "corpus_files": $corpus_files,
       "backups": $BACKUPS, "keep_last": $KEEP_LAST,
       "backupd_version": "$([ -n "${BACKUPD:-}" ] && "$BACKUPD" --version 2>/dev/null || true)",
       "restic_version": "$(command -v restic >/dev/null && restic version 2>/dev/null | head -1 || true)",
       "tools": tools, "ratios": ratios, "backupd_peak_rss_128mib": "$RSS_PASS" or None,
       "agent_idle": agent, "ok": $([ "$FAILED" = 0 ] && echo True || echo False)}
with open(out, "a") as f:
    f.write(json.dumps(rec, separators=(",", ":")) + "\n")
PY
echo
echo "results appended to $JSONL; logs in $LOGS"
if [ "$FAILED" != 0 ]; then
  echo "FAILED: a restore differed, a check failed or forget kept the wrong number of snapshots (see above)" >&2
  exit 1
fi
