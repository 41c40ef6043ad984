//! Read-only verbs: `snapshots`, `ls`, `cat`, `stats`, `check`.

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use super::GlobalArgs;
use crate::backend::ObjectType;
use crate::error::{ExitWith, EXIT_FATAL, EXIT_OK};
use crate::pipeline::BlobId;
use crate::repo::{pack, Index, Node, NodeKind, Repository, Snapshot};

/// Arguments of `snapshots`.
#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only snapshots of this host.
    #[arg(long)]
    host: Option<String>,
    /// Only snapshots with this tag.
    #[arg(long)]
    tag: Option<String>,
}

/// Arguments of `ls`.
#[derive(Args, Debug)]
pub struct LsArgs {
    /// Snapshot id, unique prefix, or `latest`.
    snapshot: String,
    /// Directory or file inside the snapshot (default: everything).
    path: Option<String>,
    /// Mode, owner, size and time of each entry, and `+` after the mode when it has
    /// extended attributes (ACLs, capabilities, ...) or file flags, as `ls -l` marks ACLs.
    #[arg(long, short = 'l')]
    long: bool,
}

/// Object types for `cat`.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum CatKind {
    Config,
    Snapshot,
    Index,
    Pack,
    Key,
    Blob,
}

/// Arguments of `cat`.
#[derive(Args, Debug)]
pub struct CatArgs {
    /// What to print.
    #[arg(value_enum)]
    kind: CatKind,
    /// Object id (not for config; `latest` works for snapshots).
    id: Option<String>,
}

/// Arguments of `check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also read every pack and verify every blob.
    #[arg(long)]
    read_data: bool,
    /// Read back this share of the packs (e.g. 10%), a different share each month.
    #[arg(long, value_name = "PERCENT", conflicts_with = "read_data")]
    read_data_subset: Option<String>,
}

fn snapshot_json(id: &BlobId, s: &Snapshot) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.insert("id".into(), json!(id.to_hex()));
        o.insert("short_id".into(), json!(id.short()));
    }
    v
}

/// Runs `snapshots`.
///
/// # Errors
/// Repository errors.
pub fn snapshots(g: &GlobalArgs, a: SnapshotsArgs) -> Result<()> {
    let repo = g.open()?;
    let list: Vec<_> = repo
        .snapshots()?
        .into_iter()
        .filter(|(_, s)| a.host.as_ref().is_none_or(|h| &s.host == h))
        .filter(|(_, s)| a.tag.as_ref().is_none_or(|t| s.tags.contains(t)))
        .collect();
    if g.json {
        let arr: Vec<Value> = list.iter().map(|(id, s)| snapshot_json(id, s)).collect();
        println!("{}", Value::Array(arr));
        return Ok(());
    }
    println!(
        "{:<10} {:<20} {:<16} {:<8} {:>12}  paths",
        "id", "time", "host", "source", "size"
    );
    for (id, s) in &list {
        println!(
            "{:<10} {:<20} {:<16} {:<8} {:>12}  {}{}",
            id.short(),
            s.time
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S"),
            s.host,
            s.source,
            s.summary.bytes_total,
            match &s.influxdb {
                // The server, then the databases it held.
                Some(m) => format!(
                    "influxdb://{} ({})",
                    m.rpc,
                    m.databases
                        .iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                None => s.paths.join(" "),
            },
            if s.tags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", s.tags.join(","))
            }
        );
        // Sealed again by `key retire`: the id it was known by still names it.
        if let Some(o) = &s.original_id {
            println!("           was {}", o.short());
        }
        if let Some(m) = &s.postgres {
            println!(
                "           postgres {} system {} timeline {}  WAL {} .. {}  {} .. {}",
                m.server_version,
                m.system_identifier,
                m.timeline,
                m.start_lsn,
                m.stop_lsn,
                m.start_time.format("%Y-%m-%d %H:%M:%S%.3f UTC"),
                m.stop_time.format("%H:%M:%S%.3f UTC"),
            );
        }
    }
    println!("{} snapshot(s)", list.len());
    Ok(())
}

fn node_json(path: &str, n: &Node) -> Value {
    let mut v = json!({
        "path": path,
        "name": n.name,
        "type": n.kind,
        "mode": n.mode,
        "uid": n.uid,
        "gid": n.gid,
        "user": n.user,
        "group": n.group,
        "size": n.size,
        "mtime_ns": n.mtime_ns,
        "links": n.links,
    });
    if let Some(t) = &n.link_target {
        v["link_target"] = json!(t);
    }
    if let Some((major, minor)) = n.rdev {
        v["rdev"] = json!({"major": major, "minor": minor});
    }
    if !n.xattrs.is_empty() {
        v["xattrs"] = json!(n
            .xattrs
            .iter()
            .map(|x| match &x.raw_name {
                Some(raw) => json!({"name": x.name, "raw_name": raw, "value": x.value}),
                None => json!({"name": x.name, "value": x.value}),
            })
            .collect::<Vec<_>>());
    }
    if n.flags != 0 {
        v["flags"] = json!(n.flags);
        v["flags_letters"] = json!(flag_letters(n.flags));
    }
    if !n.extents.is_empty() {
        v["extents"] = json!(n.extents);
    }
    if n.changed {
        v["changed_while_read"] = json!(true);
    }
    if let Some(t) = n.mtime {
        v["mtime"] = json!(t);
    }
    v
}

/// File flags as `lsattr` letters.
fn flag_letters(flags: u32) -> String {
    use rustix::fs::IFlags as F;
    let f = F::from_bits_retain(flags);
    [
        (F::SECURE_REMOVAL, 's'),
        (F::UNRM, 'u'),
        (F::SYNC, 'S'),
        (F::DIRSYNC, 'D'),
        (F::IMMUTABLE, 'i'),
        (F::APPEND, 'a'),
        (F::NODUMP, 'd'),
        (F::NOATIME, 'A'),
        (F::COMPRESSED, 'c'),
        (F::JOURNALING, 'j'),
        (F::NOTAIL, 't'),
        (F::TOPDIR, 'T'),
        (F::NOCOW, 'C'),
        (F::PROJECT_INHERIT, 'P'),
    ]
    .iter()
    .filter(|(b, _)| f.contains(*b))
    .map(|(_, c)| *c)
    .collect()
}

/// `drwxr-xr-x`-style mode of a node.
fn mode_string(n: &Node) -> String {
    let t = match n.kind {
        NodeKind::Dir => 'd',
        NodeKind::Symlink => 'l',
        NodeKind::Fifo => 'p',
        NodeKind::CharDevice => 'c',
        NodeKind::BlockDevice => 'b',
        NodeKind::Unknown => '?',
        NodeKind::File => '-',
    };
    let m = n.mode;
    let bit = |b: u32, c: char| if m & b != 0 { c } else { '-' };
    let exec = |x: u32, s: u32, set: char, unset: char| match (m & x != 0, m & s != 0) {
        (true, true) => set,
        (false, true) => unset,
        (true, false) => 'x',
        (false, false) => '-',
    };
    let mut out = String::with_capacity(11);
    out.push(t);
    out.push(bit(0o400, 'r'));
    out.push(bit(0o200, 'w'));
    out.push(exec(0o100, 0o4000, 's', 'S'));
    out.push(bit(0o040, 'r'));
    out.push(bit(0o020, 'w'));
    out.push(exec(0o010, 0o2000, 's', 'S'));
    out.push(bit(0o004, 'r'));
    out.push(bit(0o002, 'w'));
    out.push(exec(0o001, 0o1000, 't', 'T'));
    if !n.xattrs.is_empty() || n.flags != 0 {
        out.push('+');
    }
    out
}

/// One `ls --long` line.
fn long_line(p: &str, n: &Node) -> String {
    let who = |name: &str, id: u32| {
        if name.is_empty() {
            id.to_string()
        } else {
            name.to_string()
        }
    };
    let size = match n.rdev {
        Some((major, minor)) => format!("{major}, {minor}"),
        None => n.size.to_string(),
    };
    let (secs, nsecs) = n.mtime_parts();
    let t = chrono::DateTime::from_timestamp(secs, nsecs)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| n.mtime_ns.to_string());
    let target = match &n.link_target {
        Some(t) => format!(" -> {t}"),
        None => String::new(),
    };
    format!(
        "{:<11} {:>8} {:>8} {:>12} {t} {p}{target}",
        mode_string(n),
        who(&n.user, n.uid),
        who(&n.group, n.gid),
        size
    )
}

/// How `ls` prints.
#[derive(Clone, Copy)]
enum LsStyle {
    Short,
    Long,
    Json,
}

fn walk_ls(
    repo: &Repository,
    index: &Index,
    tree: &BlobId,
    prefix: &str,
    style: LsStyle,
) -> Result<()> {
    for n in repo.load_tree(index, tree)?.nodes {
        let p = format!("{prefix}/{}", n.name);
        print_node(&p, &n, style);
        if let (NodeKind::Dir, Some(sub)) = (n.kind, n.subtree) {
            walk_ls(repo, index, &sub, &p, style)?;
        }
    }
    Ok(())
}

fn print_node(p: &str, n: &Node, style: LsStyle) {
    if let LsStyle::Json = style {
        println!("{}", node_json(p, n));
    } else if let LsStyle::Long = style {
        println!("{}", long_line(p, n));
    } else {
        match n.kind {
            NodeKind::Dir => println!("{p}/"),
            NodeKind::Symlink => {
                println!("{p} -> {}", n.link_target.as_deref().unwrap_or(""))
            }
            NodeKind::File => println!("{p}"),
            k => println!("{p} ({})", k.word()),
        }
    }
}

/// Runs `ls`.
///
/// # Errors
/// Repository errors or a path not in the snapshot.
pub fn ls(g: &GlobalArgs, a: LsArgs) -> Result<()> {
    let repo = g.open()?;
    let (_, snap) = repo.resolve_snapshot(&a.snapshot)?;
    let index = repo.load_index()?;
    let style = match (g.json, a.long) {
        (true, _) => LsStyle::Json,
        (false, true) => LsStyle::Long,
        (false, false) => LsStyle::Short,
    };
    if let (Some(m), LsStyle::Short | LsStyle::Long, None) = (&snap.influxdb, style, &a.path) {
        print_influx_layout(m);
    }
    match a.path.as_deref().map(|p| p.trim_end_matches('/')) {
        None | Some("") => walk_ls(&repo, &index, &snap.tree, "", style),
        Some(p) => {
            let node = crate::restore::find_node(&repo, &index, &snap.tree, p)?;
            let full = format!("/{}", p.trim_start_matches('/'));
            print_node(&full, &node, style);
            if let (NodeKind::Dir, Some(sub)) = (node.kind, node.subtree) {
                walk_ls(&repo, &index, &sub, &full, style)?;
            }
            Ok(())
        }
    }
}

/// An InfluxDB snapshot's databases, retention policies and shards, each shard with its
/// time range and size, before its files.
fn print_influx_layout(m: &crate::repo::InfluxMeta) {
    let day = |ns: i64| {
        chrono::DateTime::from_timestamp(ns.div_euclid(1_000_000_000), 0).map_or_else(
            || ns.to_string(),
            |t| t.format("%Y-%m-%d %H:%M").to_string(),
        )
    };
    println!("# InfluxDB {} at {} ({})", m.server_version, m.rpc, m.http);
    for d in &m.databases {
        println!(
            "# database {} (default retention policy {})",
            d.name, d.default_retention_policy
        );
        for rp in &d.retention_policies {
            let shards: Vec<_> = d
                .shards
                .iter()
                .filter(|s| s.retention_policy == rp.name)
                .collect();
            let keep = if rp.duration_ns == 0 {
                "forever".to_string()
            } else {
                format!("{} h", rp.duration_ns / 3_600_000_000_000)
            };
            println!(
                "#   retention policy {}: keeps {keep}, shard groups of {} h, {} shards",
                rp.name,
                rp.shard_group_duration_ns / 3_600_000_000_000,
                shards.len()
            );
            for s in shards {
                println!(
                    "#     shard {:>6}  {} .. {}  {:>4} files  {:>10}{}{}",
                    s.id,
                    day(s.start_ns),
                    day(s.end_ns),
                    s.files,
                    super::human(s.bytes),
                    if s.tombstones > 0 {
                        format!("  {} tombstones", s.tombstones)
                    } else {
                        String::new()
                    },
                    if s.unchanged {
                        "  (unchanged since the parent)"
                    } else {
                        ""
                    },
                );
            }
        }
        for (name, _) in &d.continuous_queries {
            println!("#   continuous query {name}");
        }
    }
    if !m.users.is_empty() {
        println!("# users (recorded, not restorable): {}", m.users.join(", "));
    }
}

fn entries_json(entries: &[pack::PackEntry]) -> Vec<Value> {
    entries
        .iter()
        .map(|e| {
            json!({"type": e.kind, "id": e.id.to_hex(), "offset": e.offset,
                   "length": e.length, "raw_length": e.raw_length})
        })
        .collect()
}

/// Runs `cat`.
///
/// # Errors
/// Repository errors or a missing id.
pub fn cat(g: &GlobalArgs, a: CatArgs) -> Result<()> {
    let repo = g.open()?;
    let need_id = || -> Result<String> {
        match &a.id {
            Some(i) => Ok(i.clone()),
            None => bail!("cat {:?} needs an id", a.kind),
        }
    };
    let out: Value = match a.kind {
        CatKind::Config => serde_json::to_value(repo.config())?,
        CatKind::Snapshot => {
            let (id, s) = repo.resolve_snapshot(&need_id()?)?;
            snapshot_json(&id, &s)
        }
        CatKind::Index => {
            let packs = repo.load_index_file(&need_id()?)?;
            json!({"packs": packs.iter().map(|p| json!({"id": p.pack.to_hex(), "blobs": entries_json(&p.entries)})).collect::<Vec<_>>()})
        }
        CatKind::Pack => {
            let id = need_id()?;
            let bytes = repo.backend().get(ObjectType::Pack, &id)?;
            let entries = pack::read_header(&repo.keys(), &id, &bytes)?;
            json!({"id": id, "size": bytes.len(), "blobs": entries_json(&entries)})
        }
        CatKind::Key => {
            let id = need_id()?;
            let bytes = repo.backend().get(ObjectType::Key, &id)?;
            let kf = crate::crypto::KeyFile::parse(&bytes)?;
            json!({"id": id, "version": kf.version, "created": kf.created, "host": kf.host,
                   "username": kf.username, "kdf": kf.kdf})
        }
        CatKind::Blob => {
            let id = BlobId::from_hex(&need_id()?)
                .ok_or_else(|| anyhow::anyhow!("a blob id is 64 hex digits"))?;
            let index = repo.load_index()?;
            let data = repo.read_blob(&index, &id)?;
            match serde_json::from_slice::<Value>(&data) {
                Ok(v) => v,
                Err(_) => {
                    use std::io::Write;
                    std::io::stdout().write_all(&data)?;
                    return Ok(());
                }
            }
        }
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// Runs `stats`.
///
/// # Errors
/// Repository errors.
pub fn stats(g: &GlobalArgs) -> Result<()> {
    let repo = g.open()?;
    let snaps = repo.snapshots()?;
    let index = repo.load_index()?;
    let packs = repo.backend().list(ObjectType::Pack)?;
    let stored: u64 = packs.iter().map(|(_, s)| s).sum();
    let raw: u64 = index.iter().map(|(_, l)| l.raw_length as u64).sum();
    let logical: u64 = snaps.iter().map(|(_, s)| s.summary.bytes_total).sum();
    let v = json!({
        "snapshots": snaps.len(),
        "packs": packs.len(),
        "blobs": index.len(),
        "stored_bytes": stored,
        "unique_raw_bytes": raw,
        "logical_bytes": logical,
        "compression_ratio": if stored > 0 { raw as f64 / stored as f64 } else { 0.0 },
        "index_bytes_per_blob": index.bytes_per_blob(),
    });
    if g.json {
        println!("{v}");
    } else {
        println!("snapshots:             {}", snaps.len());
        println!("packs:                 {}", packs.len());
        println!("blobs:                 {}", index.len());
        println!("stored bytes:          {stored}");
        println!("unique data (raw):     {raw}");
        println!("all snapshots (logical): {logical}");
        println!("index memory per blob: {:.1} bytes", index.bytes_per_blob());
    }
    Ok(())
}

/// Runs `check`.
///
/// # Errors
/// Repository errors, or problems found (exit 1).
pub fn check(g: &GlobalArgs, a: CheckArgs) -> Result<i32> {
    let repo = g.open()?;
    let read = match (&a.read_data_subset, a.read_data) {
        (Some(s), _) => crate::check::ReadData::monthly_subset(
            crate::policy::units::parse_percent(s)
                .map_err(|e| anyhow::anyhow!("--read-data-subset {s:?}: {e}"))?,
        ),
        (None, true) => crate::check::ReadData::All,
        (None, false) => crate::check::ReadData::None,
    };
    let r = crate::check::check_with(&repo, read);
    if g.json {
        println!(
            "{}",
            json!({"errors": r.errors, "notes": r.notes, "snapshots": r.snapshots,
                   "packs_read": r.packs_read, "affected": r.affected})
        );
    } else {
        for n in &r.notes {
            println!("note: {n}");
        }
        for e in &r.errors {
            println!("error: {e}");
        }
        for f in &r.affected {
            println!("affected: {f}");
        }
    }
    if r.errors.is_empty() {
        if !g.json {
            g.say(format!(
                "no errors found ({} snapshots{})",
                r.snapshots,
                if r.packs_read > 0 {
                    format!(", {} packs read", r.packs_read)
                } else {
                    String::new()
                }
            ));
        }
        Ok(EXIT_OK)
    } else {
        Err(ExitWith {
            code: EXIT_FATAL,
            message: format!("check found {} error(s)", r.errors.len()),
        }
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_show_modes_like_ls() {
        let mut n = Node {
            name: "x".into(),
            mode: 0o4755,
            uid: 0,
            user: "root".into(),
            gid: 54321,
            size: 12,
            mtime_ns: 1_700_000_000_123_000_000,
            ..Node::default()
        };
        assert_eq!(mode_string(&n), "-rwsr-xr-x");
        n.xattrs.push(crate::repo::tree::Xattr::new(
            b"system.posix_acl_access",
            b"x",
        ));
        assert_eq!(mode_string(&n), "-rwsr-xr-x+");
        n.kind = NodeKind::Dir;
        n.mode = 0o1777;
        n.xattrs.clear();
        assert_eq!(mode_string(&n), "drwxrwxrwt");
        let line = long_line("/tmp", &n);
        assert!(
            line.contains(" root ") && line.contains("54321") && line.ends_with(" /tmp"),
            "{line}"
        );
        n.kind = NodeKind::CharDevice;
        n.rdev = Some((1, 3));
        assert!(long_line("/null", &n).contains("1, 3"));
        assert_eq!(
            flag_letters(rustix::fs::IFlags::IMMUTABLE.bits() | rustix::fs::IFlags::NODUMP.bits()),
            "id"
        );
    }
}
