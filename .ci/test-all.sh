#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or this one: installs what the tests
# need (skipping what is there), then format, lint, and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
command -v mkfifo >/dev/null || need_apt+=(coreutils)
# PostgreSQL 15 for the PostgreSQL tests (throwaway clusters run as the package's
# `postgres` user; docs: ../shared/design/recipes.md section 1).
[ -x /usr/lib/postgresql/15/bin/initdb ] || need_apt+=(postgresql-15 postgresql-client-15)
command -v runuser >/dev/null || need_apt+=(util-linux)
# InfluxDB 1.x for the InfluxDB tests (throwaway influxd on free ports; recipes.md
# section 2), and curl, with which the tests check what the servers hold.
command -v influxd >/dev/null || need_apt+=(influxdb influxdb-client)
command -v curl >/dev/null || need_apt+=(curl)
# The shipped FinChat example policy's pre hook copies an SQLite database.
command -v sqlite3 >/dev/null || need_apt+=(sqlite3)
# systemd-analyze checks the shipped units (packaging/systemd).
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
# The attribute tests set and compare xattrs, ACLs, capabilities and file flags.
command -v setfattr >/dev/null || need_apt+=(attr)
command -v setfacl >/dev/null || need_apt+=(acl)
command -v setcap >/dev/null || need_apt+=(libcap2-bin)
command -v chattr >/dev/null || need_apt+=(e2fsprogs)
command -v prlimit >/dev/null || need_apt+=(util-linux)
# The clock-skew tests run backupd under libfaketime.
command -v faketime >/dev/null || need_apt+=(faketime)
# The OS-keyring tests: a Secret Service (gnome-keyring) on a private D-Bus session
# (recipes.md section 4), without gnome-keyring's desktop recommendations.
need_keyring=()
command -v gnome-keyring-daemon >/dev/null || need_keyring+=(gnome-keyring)
command -v dbus-run-session >/dev/null || need_keyring+=(dbus-daemon dbus-bin)
command -v secret-tool >/dev/null || need_keyring+=(libsecret-tools)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
if [ ${#need_keyring[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_keyring[@]}"
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# The S3 server the tests start on loopback (docs: ../shared/design/recipes.md section 3).
# 0.14.1 is the newest s3s-fs that builds with rustc 1.95.
if ! command -v s3s-fs >/dev/null && [ ! -x "$HOME/.local/bin/s3s-fs" ]; then
  cargo install s3s-fs@0.14.1 --features binary --locked --root "$HOME/.local"
fi
rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt clippy || true

cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo nextest run --locked --lib --bins --tests --no-fail-fast
