#!/usr/bin/env bash
# Runs fuzz targets one after another, each single-process, with the limits of
# docs/fuzzing.md, and prints one summary line per target (seconds, executions, corpus,
# crash). Build first (`cargo +nightly fuzz build -O`); then, from fuzz/:
#   ./run.sh TARGET[:SECONDS] ...        (default 600 s)
# Logs go to fuzz/logs/TARGET.log; the growing corpus to fuzz/corpus/TARGET (seeded from
# the committed fuzz/seeds/TARGET); crashes to fuzz/artifacts/TARGET/.
set -uo pipefail
cd "$(dirname "$0")"
# Each target runs from a copy taken when it starts, so a rebuild meanwhile does not
# touch a running fuzzer.
bin=target/x86_64-unknown-linux-gnu/release
mkdir -p logs bin-run
for spec in "$@"; do
    t=${spec%%:*}
    secs=${spec#*:}
    [ "$secs" = "$spec" ] && secs=600
    mkdir -p "corpus/$t" "seeds/$t" "artifacts/$t"
    max_len=4096
    case $t in walscan|wal_object|tree|index|pack) max_len=65536 ;; esac
    cp "$bin/$t" "bin-run/$t"
    start=$(date +%s)
    nice -n 10 "bin-run/$t" -artifact_prefix="artifacts/$t/" \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=256 -timeout=10 \
        -max_len="$max_len" -print_final_stats=1 "corpus/$t" "seeds/$t" > "logs/$t.log" 2>&1
    rc=$?
    end=$(date +%s)
    execs=$(grep -a 'stat::number_of_executed_units' "logs/$t.log" | tail -1 | awk '{print $2}')
    done_line=$(grep -a '^#[0-9]*.*DONE' "logs/$t.log" | tail -1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    crash=$(grep -a -m1 -E 'panicked at|==ERROR|ERROR: libFuzzer' "logs/$t.log" || true)
    echo "$t seconds=$((end - start)) rc=$rc execs=${execs:-?} corpus=$corpus done=[$done_line] crash=[${crash}]"
done
