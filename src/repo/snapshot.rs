//! Snapshots: the commit record of a backup. Written last, after every pack and index it
//! needs is durable, so a snapshot that exists always restores.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::pipeline::BlobId;
use crate::postgres::walname::Lsn;

/// What a backup reports when it ends (also stored in the snapshot).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BackupSummary {
    /// Files not in the parent snapshot.
    pub files_new: u64,
    /// Files in the parent whose metadata changed (re-read).
    pub files_changed: u64,
    /// Files reused from the parent without reading.
    pub files_unchanged: u64,
    /// Directories.
    pub dirs: u64,
    /// Content bytes read from the source.
    pub bytes_read: u64,
    /// Logical bytes of all files in the snapshot.
    pub bytes_total: u64,
    /// Plaintext bytes of blobs new to the repository.
    pub bytes_added: u64,
    /// Bytes written to packs (compressed and sealed).
    pub bytes_stored: u64,
    /// Blobs new to the repository.
    pub blobs_new: u64,
    /// Share of the snapshot's bytes already in the repository: 1 - bytes_added / bytes_total
    /// (0 = all new, 1 = nothing new).
    pub dedup_ratio: f64,
    /// Wall time.
    pub duration_secs: f64,
}

/// Snapshot features this build knows: what a snapshot's trees may use that a reader must
/// understand to restore it (format version 2).
pub const KNOWN_SNAPSHOT_FEATURES: &[&str] = &[
    FEATURE_XATTRS,
    FEATURE_SPECIAL_FILES,
    FEATURE_SPARSE,
    FEATURE_FILE_FLAGS,
];
/// Nodes carry extended attributes (ACLs, capabilities, labels).
pub const FEATURE_XATTRS: &str = "xattrs";
/// FIFOs and devices.
pub const FEATURE_SPECIAL_FILES: &str = "special-files";
/// Files with holes: data extents.
pub const FEATURE_SPARSE: &str = "sparse";
/// File flags (`chattr`).
pub const FEATURE_FILE_FLAGS: &str = "file-flags";

/// A snapshot as stored in `snapshots/<id>`. Unknown fields are ignored (format version 2:
/// what is not safe to ignore is named in `features`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// When the backup started.
    pub time: DateTime<Utc>,
    /// Host name (grouping, parent selection).
    pub host: String,
    /// User who ran it.
    #[serde(default)]
    pub username: String,
    /// Absolute source paths (or `/NAME` for stdin and commands).
    pub paths: Vec<String>,
    /// Tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Root tree.
    pub tree: BlobId,
    /// Parent snapshot, if one was used.
    #[serde(default)]
    pub parent: Option<BlobId>,
    /// "files", "stdin" or "command".
    pub source: String,
    /// The command, for command sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Policy that made it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// The backup's summary.
    #[serde(default)]
    pub summary: BackupSummary,
    /// For PostgreSQL base backups: the cluster and the WAL range that makes them
    /// consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresMeta>,
    /// For InfluxDB snapshots: the server, its databases, shards and counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub influxdb: Option<InfluxMeta>,
    /// backupd version that wrote it.
    pub program_version: String,
    /// Format features its trees use, which a reader must know to restore it (sorted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// The id it had when first written, if `key retire` sealed it again (ids are the
    /// SHA-256 of the sealed bytes): `restore ID`, `snapshots` and `forget` accept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_id: Option<BlobId>,
    /// The format its trees were written in: 2 means every entry's extended attributes,
    /// flags and holes were recorded (so an unchanged file's may be taken from it), 1 (not
    /// written) that they were not.
    #[serde(default = "format_1", skip_serializing_if = "is_format_1")]
    pub format: u32,
}

fn format_1() -> u32 {
    1
}

fn is_format_1(v: &u32) -> bool {
    *v <= 1
}

impl Snapshot {
    /// The first feature this build does not know, if any.
    pub fn unknown_feature(&self) -> Option<&str> {
        self.features
            .iter()
            .map(String::as_str)
            .find(|f| !KNOWN_SNAPSHOT_FEATURES.contains(f))
    }

    /// The trees it holds: the root, then each PostgreSQL tablespace's (with its name).
    pub fn trees(&self) -> impl Iterator<Item = (BlobId, Option<&str>)> + '_ {
        std::iter::once((self.tree, None)).chain(
            self.postgres
                .iter()
                .flat_map(|m| &m.tablespaces)
                .map(|t| (t.tree, Some(t.name.as_str()))),
        )
    }
}

/// Per retention policy and measurement (`rp.measurement`), the values of each field
/// (`SELECT count(*)`).
pub type InfluxCounts = std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>;

/// What an InfluxDB snapshot records about its server. The tree holds the metastore as the
/// server gave it (`metastore`), and each shard's files under `<db>/<rp>/<shard id>/`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InfluxMeta {
    /// The RPC address backed up from.
    pub rpc: String,
    /// The HTTP API counted with.
    pub http: String,
    /// The server's clock when the backup started (its `Date`): the next backup asks for
    /// files changed since then, on the server's clock.
    pub server_time: Option<DateTime<Utc>>,
    /// The server's version (`X-Influxdb-Version`).
    pub server_version: String,
    /// The databases backed up.
    pub databases: Vec<InfluxDatabase>,
    /// Users of the server: recorded, not restorable by the protocol.
    pub users: Vec<String>,
}

/// One database of an InfluxDB snapshot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InfluxDatabase {
    /// Name.
    pub name: String,
    /// Its default retention policy.
    pub default_retention_policy: String,
    /// Its retention policies.
    pub retention_policies: Vec<InfluxRetentionPolicy>,
    /// Its shards with files.
    pub shards: Vec<InfluxShard>,
    /// Continuous queries: (name, statement).
    pub continuous_queries: Vec<(String, String)>,
    /// Counts (keyed `rp.measurement`) before the shards were read: the sum of each
    /// shard's, taken before it was read (or, for a shard taken from the parent, the
    /// parent's).
    pub counts_before: InfluxCounts,
    /// The same after (equal on a server that took no writes meanwhile).
    pub counts_after: InfluxCounts,
}

/// A retention policy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InfluxRetentionPolicy {
    /// Name.
    pub name: String,
    /// Nanoseconds; 0 is forever.
    pub duration_ns: i64,
    /// Nanoseconds per shard group.
    pub shard_group_duration_ns: i64,
    /// Replication factor.
    pub replica_n: u32,
}

/// A shard.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct InfluxShard {
    /// Shard id on the server backed up.
    pub id: u64,
    /// Retention policy.
    pub retention_policy: String,
    /// Its shard group's start, Unix nanoseconds.
    pub start_ns: i64,
    /// Its shard group's end (exclusive).
    pub end_ns: i64,
    /// Files.
    pub files: u64,
    /// Bytes.
    pub bytes: u64,
    /// Tombstone files among them (deletions a restore replays).
    pub tombstones: u64,
    /// Taken from the parent snapshot unread (nothing changed on the server since).
    pub unchanged: bool,
    /// Per measurement, values per field in this shard before its files were read
    /// (empty in snapshots before per-shard counts).
    pub counts_before: InfluxCounts,
    /// The same after.
    pub counts_after: InfluxCounts,
    /// The counts are those of the files themselves, taken as they streamed (both equal,
    /// exact); otherwise the server counted, before and after (false in snapshots before
    /// 0.3.2, whose counts were all the server's).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub counted_from_files: bool,
}

/// What a PostgreSQL base backup snapshot records about its cluster. The snapshot's tree
/// is the data directory's contents; each tablespace has its own tree.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresMeta {
    /// `pg_control_system().system_identifier` (a string: it does not fit a JSON double).
    #[serde(with = "u64_string")]
    pub system_identifier: u64,
    /// Timeline the backup was taken on.
    pub timeline: u32,
    /// Start LSN (redo point of the backup's checkpoint).
    pub start_lsn: Lsn,
    /// Stop LSN: the cluster is consistent once recovery replays to here.
    pub stop_lsn: Lsn,
    /// Server time at `pg_backup_start()`.
    pub start_time: DateTime<Utc>,
    /// Server time at `pg_backup_stop()`.
    pub stop_time: DateTime<Utc>,
    /// `server_version`.
    pub server_version: String,
    /// `server_version_num`.
    pub server_version_num: u32,
    /// `wal_segment_size` in bytes: a power of two from 1 MiB to 1 GiB, as `initdb
    /// --wal-segsize` allows (anything else is refused when the snapshot is decoded: prune
    /// and `restore --at` divide LSNs by it).
    #[serde(deserialize_with = "wal_segment_size::deserialize")]
    pub wal_segment_size: u64,
    /// The label given to `pg_backup_start()`.
    pub label: String,
    /// The data directory backed up.
    pub data_directory: String,
    /// `backup_label` as `pg_backup_stop()` returned it (written back at restore).
    pub backup_label: String,
    /// `tablespace_map` as `pg_backup_stop()` returned it (empty without tablespaces).
    #[serde(default)]
    pub tablespace_map: String,
    /// User tablespaces.
    #[serde(default)]
    pub tablespaces: Vec<PgTablespace>,
}

/// One user tablespace in a base backup.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgTablespace {
    /// Its oid (the name of its `pg_tblspc` link).
    pub oid: u32,
    /// Its name.
    pub name: String,
    /// Where it was.
    pub location: String,
    /// Tree of the location's contents (the `PG_<version>_<catalog>` directory).
    pub tree: BlobId,
}

mod wal_segment_size {
    use serde::{Deserialize, Deserializer};

    /// The sizes PostgreSQL allows (`initdb --wal-segsize`: 1 to 1024 MiB, powers of two).
    pub fn is_valid(v: u64) -> bool {
        v.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let v = u64::deserialize(d)?;
        if is_valid(v) {
            Ok(v)
        } else {
            Err(serde::de::Error::custom(format!(
                "wal_segment_size {v} is not a WAL segment size (a power of two from 1 MiB to 1 GiB)"
            )))
        }
    }
}

mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fuzz_pg_backup_meta_a_wal_segment_size_of_zero_is_refused() {
        // fuzz/ `pg_backup_meta`: a snapshot's PostgreSQL metadata with a segment size of
        // 0 decoded, and prune's `Segment::of(timeline, start_lsn, wal_segment_size)`
        // divided by it (a panic). The exact input:
        let crash = br#"{"backup_label":"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-01 14:00:00 UTC\nLABEL: backupd\nSTART TIMELINE: 1\n","data_directory":"/var/lib/postgresql/15/main","label":"backupd","server_version":"15.18","server_version_num":150018,"start_lsn":"0/2000028","start_time":"2026-11-01T14:00:00Z","stop_lsn":"0/2000138","stop_time":"2026-11-01T14:00:01Z","system_identifier":"7301234567890123456","tablespace_map":"16385 /srv/ts1\n","tablespaces":[{"location":"/srv/ts1","name":"ts1","oid":16385,"tree":"0000000000000000000000000000000000000000000000000000000000000000"}],"timeline":1,"wal_segment_size":0}"#;
        let e = serde_json::from_slice::<PostgresMeta>(crash).unwrap_err();
        assert!(e.to_string().contains("wal_segment_size 0"), "{e}");
        let text = std::str::from_utf8(crash).unwrap();
        for bad in ["3", "4096", "2147483648", "18446744073709551615"] {
            let t = text.replace(
                r#""wal_segment_size":0"#,
                &format!(r#""wal_segment_size":{bad}"#),
            );
            assert!(serde_json::from_str::<PostgresMeta>(&t).is_err(), "{bad}");
        }
        for good in [1u64 << 20, 16 << 20, 1 << 30] {
            let t = text.replace(
                r#""wal_segment_size":0"#,
                &format!(r#""wal_segment_size":{good}"#),
            );
            let m: PostgresMeta = serde_json::from_str(&t).unwrap();
            assert_eq!(m.wal_segment_size, good);
        }
    }
}
