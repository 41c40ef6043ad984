#!/usr/bin/env bash
# The other base-backup method, for the record (docs/decisions/0007): `pg_basebackup -D - -Ft
# -X fetch -c fast` streamed into `backupd backup --stdin` (content-defined chunks over the
# tar stream), full and again after 10,000 pgbench transactions, on a copy of the seed
# cluster benches/pg.sh builds ($BENCH_DIR/pg-seed-s$SCALE-hex; run pg.sh once first).
# Prints wall time and peak RSS of each step and the bytes each backup stored; also the time
# of pg_basebackup alone into /dev/null (the server's side of the stream).
#
# usage: benches/pg-stream.sh        environment: SCALE (60), BENCH_DIR, BACKUPD_BIN, PGBIN
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/backupd-bench}
SCALE=${SCALE:-60}
PGBIN=${PGBIN:-/usr/lib/postgresql/15/bin}
B=${BACKUPD_BIN:-$ROOT/target/release/backupd}
SEED=$BENCH_DIR/pg-seed-s$SCALE-hex
[ -f "$SEED/READY" ] || { echo "no seed cluster at $SEED: run benches/pg.sh first" >&2; exit 1; }
W=$(mktemp -d "$BENCH_DIR/pgstream.XXXXXX"); chmod 755 "$W"
trap 'runuser -u postgres -- $PGBIN/pg_ctl -D $W/data -m immediate stop >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
cp -a "$SEED/data" "$W/data"
PORT=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$W/data" -l "$W/data/log" -w start \
  -o "-c wal_level=replica -c listen_addresses=127.0.0.1 -c port=$PORT -c unix_socket_directories=$W/data -c max_wal_size=4GB -c max_wal_senders=4" >/dev/null
echo pw > "$W/pw"; chmod 600 "$W/pw"
export BACKUPD_PASSWORD_FILE=$W/pw
"$B" -r "$W/repo" init -q >/dev/null
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
step() { # name, then the pipeline as one string
  local name=$1; shift
  drop
  /usr/bin/time -f '%e %M' -o "$W/$name.time" bash -o pipefail -c "$*" > "$W/$name.out"
  echo "$name: $(cut -d' ' -f1 "$W/$name.time") s, peak RSS $(( $(cut -d' ' -f2 "$W/$name.time") / 1024 )) MiB"
}
BB="$PGBIN/pg_basebackup -h 127.0.0.1 -p $PORT -U postgres -D - -Ft -X fetch -c fast"
step basebackup-only "$BB > /dev/null"
step full "$BB | $B -r $W/repo backup --stdin --stdin-filename base.tar --json"
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PORT" -U postgres -c 1 -t 10000 --random-seed=7 -n postgres >/dev/null 2>&1
step incremental "$BB | $B -r $W/repo backup --stdin --stdin-filename base.tar --json"
for s in full incremental; do
  python3 - "$W/$s.out" "$s" <<'P'
import json, sys
j = json.loads(open(sys.argv[1]).read())
print(f"{sys.argv[2]}: read {j['bytes_read']/2**20:.1f} MiB, added {j['bytes_added']/2**20:.1f} MiB, stored {j['bytes_stored']/2**20:.1f} MiB")
P
done
