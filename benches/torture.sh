#!/usr/bin/env bash
# Crash torture at scale (issue 16): the suite's torture tests (tests/it/torture.rs) with
# many rounds. Every mutating verb (backup of files, stdin and PostgreSQL, wal-push, key
# add/rotate/remove, forget, prune, restore --delta) is SIGKILLed with its children at a
# seeded random moment, ROUNDS times in a row on one local and one S3 repository; after
# each kill `check` must be clean and the verb must succeed when run again; at the end
# `check --read-data` is clean and every snapshot restores exactly. The agent is killed
# mid-job AGENT_ROUNDS times (each waits for a cron minute). Prints, per repository, the
# kills by phase (where in the verb's usual run time they fell), all survived, or the
# first that was not (with the seed that repeats it).
#
# usage: benches/torture.sh [ROUNDS [S3_ROUNDS [AGENT_ROUNDS]]]   (default 200 100 10)
# Environment: TORTURE_SEED (default: the clock), BENCH_DIR (/var/tmp/backupd-bench).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ROUNDS=${1:-200}
S3_ROUNDS=${2:-100}
AGENT_ROUNDS=${3:-10}
SEED=${TORTURE_SEED:-$(date +%s)}
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
mkdir -p "$BENCH_DIR"
LOG="$BENCH_DIR/torture-$SEED.log"
cd "$ROOT"
echo "seed $SEED, $ROUNDS rounds per verb (local), $S3_ROUNDS (S3), $AGENT_ROUNDS (agent); log $LOG"
run() {
  local rounds=$1 filter=$2
  TORTURE_SEED=$SEED TORTURE_ROUNDS=$rounds TORTURE_AGENT_ROUNDS=$AGENT_ROUNDS \
    cargo nextest run --test main --no-capture --no-fail-fast --test-threads 1 \
    -E "test(=$filter)" >>"$LOG" 2>&1 || status=1
}
status=0
start=$(date +%s)
run "$ROUNDS" it::torture::every_verb_survives_sigkill_at_random_moments_on_a_local_repository
run "$S3_ROUNDS" it::torture::every_verb_survives_sigkill_at_random_moments_on_s3
run 0 it::torture::the_agent_survives_sigkill_in_the_middle_of_a_job
# The tallies each test printed, and any failure.
awk '/^crash torture/{p=1} p&&/^$/{p=0} p' "$LOG"
grep -E "panicked at|^seed [0-9]+:" "$LOG" | head -20 || true
echo "took $(( $(date +%s) - start )) s; exit $status"
exit $status
