//! `backupd forget`: removes snapshots by retention rules (restic's keep-* options and
//! grouping) or by id. Only snapshot objects go; the data they alone used is freed by
//! `prune`.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde_json::json;

use super::GlobalArgs;
use crate::error::EXIT_OK;
use crate::pipeline::BlobId;
use crate::policy::retention::{select, Candidate};
use crate::policy::{self, KeepRules};
use crate::repo::{Repository, Snapshot};

/// Arguments of `forget`.
#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Snapshots to forget by id (or unique prefix), besides any rules.
    snapshots: Vec<String>,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// ... days.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// ... ISO weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// ... months.
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// ... years.
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Keep every snapshot within this duration of the group's newest (e.g. 7d, 36h).
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// Keep snapshots with this tag (repeatable).
    #[arg(long = "keep-tag", value_name = "TAG")]
    keep_tag: Vec<String>,
    /// Only snapshots of this host (repeatable).
    #[arg(long)]
    host: Vec<String>,
    /// Only snapshots with this tag (repeatable).
    #[arg(long)]
    tag: Vec<String>,
    /// Only snapshots of this path (repeatable).
    #[arg(long)]
    path: Vec<String>,
    /// Group snapshots by these fields (host, paths, tags, policy; comma-separated; empty:
    /// one group). Rules apply to each group on its own.
    #[arg(long, default_value = "host,paths", value_name = "FIELDS")]
    group_by: String,
    /// Use this policy's repository and retention, on its own snapshots, grouped by host
    /// and policy.
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    /// Print what would be kept (with the rules that keep it) and removed; remove nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Prune after forgetting (also the default for a policy whose retention says so).
    #[arg(long)]
    prune: bool,
    #[command(flatten)]
    prune_args: super::prune_cmd::PruneArgs,
}

#[derive(Clone, Copy, Default)]
struct GroupBy {
    host: bool,
    paths: bool,
    tags: bool,
    policy: bool,
}

fn parse_group_by(s: &str) -> Result<GroupBy> {
    let mut g = GroupBy::default();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part {
            "host" => g.host = true,
            "paths" => g.paths = true,
            "tags" => g.tags = true,
            "policy" => g.policy = true,
            other => bail!("--group-by: unknown field {other:?} (host, paths, tags, policy)"),
        }
    }
    Ok(g)
}

fn group_key(g: GroupBy, s: &Snapshot) -> BTreeMap<&'static str, String> {
    let mut k = BTreeMap::new();
    if g.host {
        k.insert("host", s.host.clone());
    }
    if g.paths {
        let mut p = s.paths.clone();
        p.sort();
        k.insert("paths", p.join(","));
    }
    if g.tags {
        let mut t = s.tags.clone();
        t.sort();
        k.insert("tags", t.join(","));
    }
    if g.policy {
        k.insert("policy", s.policy.clone().unwrap_or_default());
    }
    k
}

/// One group's decision.
pub struct GroupPlan {
    key: BTreeMap<&'static str, String>,
    keep: Vec<(BlobId, Snapshot, Vec<String>)>,
    remove: Vec<(BlobId, Snapshot)>,
}

/// Applies `rules` to each group of `snaps`; `tz` places hour/day/week/month boundaries.
pub fn plan<Z: chrono::TimeZone>(
    snaps: Vec<(BlobId, Snapshot)>,
    rules: &KeepRules,
    group_by: &str,
    tz: &Z,
) -> Result<Vec<GroupPlan>> {
    let g = parse_group_by(group_by)?;
    let mut groups: BTreeMap<BTreeMap<&'static str, String>, Vec<(BlobId, Snapshot)>> =
        BTreeMap::new();
    for (id, s) in snaps {
        groups.entry(group_key(g, &s)).or_default().push((id, s));
    }
    let mut out = vec![];
    for (key, mut members) in groups {
        // Newest first; equal times by id, so a run is repeatable.
        members.sort_by(|a, b| b.1.time.cmp(&a.1.time).then(a.0.cmp(&b.0)));
        let cands: Vec<Candidate> = members
            .iter()
            .map(|(_, s)| Candidate {
                time: s.time,
                tags: &s.tags,
            })
            .collect();
        let reasons = select(&cands, rules, tz);
        let mut plan = GroupPlan {
            key,
            keep: vec![],
            remove: vec![],
        };
        for ((id, s), r) in members.into_iter().zip(reasons) {
            if r.is_empty() {
                plan.remove.push((id, s));
            } else {
                plan.keep.push((id, s, r));
            }
        }
        out.push(plan);
    }
    Ok(out)
}

fn describe_key(k: &BTreeMap<&'static str, String>) -> String {
    if k.is_empty() {
        return "all snapshots".into();
    }
    k.iter()
        .map(|(f, v)| format!("{f} {}", if v.is_empty() { "(none)" } else { v }))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Removes snapshot objects.
///
/// # Errors
/// Backend failures (the snapshots removed before the failure stay removed).
pub fn remove_snapshots(repo: &Repository, ids: &[BlobId]) -> Result<()> {
    for id in ids {
        repo.remove_snapshot(id)
            .with_context(|| format!("removing snapshot {}", id.short()))?;
    }
    Ok(())
}

/// Runs `forget`.
///
/// # Errors
/// Bad arguments, an invalid policy, or repository errors.
pub fn run(g: &GlobalArgs, a: ForgetArgs) -> Result<i32> {
    let within = a
        .keep_within
        .as_deref()
        .map(policy::units::parse_duration)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--keep-within: {e}"))?;
    let mut rules = KeepRules {
        last: a.keep_last.unwrap_or(0),
        hourly: a.keep_hourly.unwrap_or(0),
        daily: a.keep_daily.unwrap_or(0),
        weekly: a.keep_weekly.unwrap_or(0),
        monthly: a.keep_monthly.unwrap_or(0),
        yearly: a.keep_yearly.unwrap_or(0),
        within,
        tags: a.keep_tag.clone(),
    };
    let mut do_prune = a.prune;
    let (g, group_by, tz, policy_name) = match &a.policy {
        Some(name) => {
            let pol = policy::find(&g.policies, name)?;
            if rules.is_empty() {
                match &pol.retention {
                    Some(r) => rules = r.keep.clone(),
                    None => bail!(
                        "policy {name} has no [retention]; give keep-* options or add one to {}",
                        pol.file.display()
                    ),
                }
            }
            do_prune |= pol.retention.as_ref().is_some_and(|r| r.prune);
            let tz = pol
                .schedule
                .as_ref()
                .map(|s| s.cron.tz())
                .unwrap_or(chrono_tz::UTC);
            (
                g.for_policy(&pol),
                "host,policy".to_string(),
                Some(tz),
                Some(pol.name),
            )
        }
        None => (g.clone(), a.group_by.clone(), None, None),
    };
    if rules.is_empty() && a.snapshots.is_empty() {
        bail!("no keep-* option and no snapshot id: nothing would be kept, so nothing is removed (give --keep-last 1 to keep only the newest)");
    }
    let repo = g.open()?;
    let all = repo.all_snapshots()?;
    let mut by_id = vec![];
    for spec in &a.snapshots {
        let (id, _) = repo.resolve_snapshot(spec)?;
        by_id.push(id);
    }
    let selected: Vec<(BlobId, Snapshot)> = all
        .into_iter()
        .filter(|(_, s)| a.host.is_empty() || a.host.contains(&s.host))
        .filter(|(_, s)| a.tag.is_empty() || a.tag.iter().any(|t| s.tags.contains(t)))
        .filter(|(_, s)| a.path.is_empty() || a.path.iter().any(|p| s.paths.contains(p)))
        .filter(|(_, s)| policy_name.is_none() || s.policy == policy_name)
        .collect();
    let plans = if rules.is_empty() {
        vec![]
    } else {
        match tz {
            Some(tz) => plan(selected, &rules, &group_by, &tz)?,
            None => plan(selected, &rules, &group_by, &chrono::Local)?,
        }
    };
    let mut to_remove: Vec<BlobId> = by_id.clone();
    for p in &plans {
        to_remove.extend(p.remove.iter().map(|(id, _)| *id));
    }
    to_remove.sort();
    to_remove.dedup();
    // With --json: one object, printed at the end (with the prune report, if any).
    let mut json_out = None;
    if g.json {
        let groups: Vec<_> = plans
            .iter()
            .map(|p| {
                json!({
                    "group": p.key,
                    "keep": p.keep.iter().map(|(id, s, r)| json!({
                        "id": id.to_hex(), "time": s.time, "host": s.host,
                        "tags": s.tags, "reasons": r})).collect::<Vec<_>>(),
                    "remove": p.remove.iter().map(|(id, s)| json!({
                        "id": id.to_hex(), "time": s.time, "host": s.host,
                        "tags": s.tags})).collect::<Vec<_>>(),
                })
            })
            .collect();
        json_out = Some(json!({"dry_run": a.dry_run, "groups": groups,
               "removed": to_remove.iter().map(BlobId::to_hex).collect::<Vec<_>>()}));
    } else if !g.quiet {
        for p in &plans {
            println!("snapshots of {}:", describe_key(&p.key));
            println!(
                "keep {} snapshot{}:",
                p.keep.len(),
                if p.keep.len() == 1 { "" } else { "s" }
            );
            for (id, s, r) in &p.keep {
                println!(
                    "  {}  {}  {:<12} {}",
                    id.short(),
                    s.time.format("%Y-%m-%d %H:%M:%S"),
                    s.host,
                    r.join(", ")
                );
            }
            println!(
                "remove {} snapshot{}:",
                p.remove.len(),
                if p.remove.len() == 1 { "" } else { "s" }
            );
            for (id, s) in &p.remove {
                println!(
                    "  {}  {}  {}",
                    id.short(),
                    s.time.format("%Y-%m-%d %H:%M:%S"),
                    s.host
                );
            }
            println!();
        }
        for id in &by_id {
            println!("remove snapshot {} (named)", id.short());
        }
        if a.dry_run {
            println!("dry run: {} snapshot(s) would be removed", to_remove.len());
        }
    }
    if !a.dry_run {
        remove_snapshots(&repo, &to_remove)?;
        if !g.json {
            g.say(format!("removed {} snapshot(s)", to_remove.len()));
        }
    }
    if do_prune {
        let r = super::prune_cmd::prune_with(&repo, &a.prune_args, a.dry_run)?;
        match json_out.as_mut().and_then(|v| v.as_object_mut()) {
            Some(o) => {
                o.insert("prune".into(), serde_json::to_value(&r)?);
            }
            None => super::prune_cmd::print_report(&g, &r, a.dry_run),
        }
    }
    if let Some(v) = json_out {
        println!("{v}");
    }
    Ok(EXIT_OK)
}
