# Helpers shared by the end-to-end benchmark scripts (sourced; the caller defines log and
# die, and sets ROOT, SHARED and CORPUS where it uses them).

apt_install() {  # apt_install PKG...: install Debian packages (refresh the lists once if needed)
  apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null; }
}

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# CPU seconds the whole machine has been busy (all cores, from /proc/stat). A step's busy time
# minus the tool's own user+sys is "other" load (e.g. a cargo build next door) that skews it.
HZ=$(getconf CLK_TCK 2>/dev/null || echo 100)
busy_cpu_s() { awk -v hz="$HZ" '$1=="cpu"{printf "%.2f", ($2+$3+$4+$7+$8+$9)/hz; exit}' /proc/stat; }

# ensure_corpus [MAKE-DATASET ARGS...]: builds $CORPUS with the shared generator unless it
# exists, then makes CORPUS and SHARED absolute. Built once, reused by every run.
ensure_corpus() {
  [ -f "$SHARED/bench/make-change.sh" ] || die "make-change.sh not found under $SHARED/bench (set SHARED)"
  SHARED=$(cd "$SHARED" && pwd)
  if [ ! -d "$CORPUS" ] || [ -z "$(ls -A "$CORPUS" 2>/dev/null)" ]; then
    log "corpus $CORPUS missing: building it with make-dataset.sh $* (several minutes)"
    PG_FILLER=hex nice bash "$SHARED/bench/make-dataset.sh" "$CORPUS" "$@" >&2
  fi
  CORPUS=$(cd "$CORPUS" && pwd)
}

# backupd_binary: sets BACKUPD to $BACKUPD_BIN, or builds the release binary.
backupd_binary() {
  if [ -n "${BACKUPD_BIN:-}" ]; then
    BACKUPD=$BACKUPD_BIN
  else
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release) >&2
    BACKUPD=${CARGO_TARGET_DIR:-$ROOT/target}/release/backupd
  fi
  [ -x "$BACKUPD" ] || die "backupd binary not found: $BACKUPD"
  BACKUPD=$(cd "$(dirname "$BACKUPD")" && pwd)/$(basename "$BACKUPD")
}
