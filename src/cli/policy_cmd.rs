//! `backupd policy check [DIR] [--online] [--strict]`: validates every policy file and
//! reports every problem; `--online` also asks each PostgreSQL server whether its
//! archiving can meet the policy's rpo.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use super::GlobalArgs;
use crate::error::{EXIT_FATAL, EXIT_OK};
use crate::policy::{self, PolicyError};

/// Arguments of `policy`.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    what: PolicyVerb,
}

#[derive(Subcommand, Debug)]
enum PolicyVerb {
    /// Validate the policy files of DIR (default: --policies) or the files given; print
    /// every problem as FILE:LINE: KEY: expected ..., found ...; exit 1 when any.
    Check {
        /// A policy directory, or policy files.
        paths: Vec<PathBuf>,
        /// Also ask each PostgreSQL policy's server whether its archiving can meet the
        /// policy's rpo (archive_mode, archive_command, archive_timeout); an unreachable
        /// server is reported as such. Offline by default.
        #[arg(long)]
        online: bool,
        /// Exit 1 on warnings too (deprecated keys, settings that miss the rpo, a server
        /// that could not be asked).
        #[arg(long)]
        strict: bool,
    },
}

/// What the servers of the policies say about their RPO: per policy, the warnings.
fn online_warnings(list: &[policy::Policy]) -> Vec<(String, String)> {
    let mut out = vec![];
    for p in list {
        let policy::SourceSpec::Postgres(pg) = &p.source else {
            continue;
        };
        let password = match pg.password.as_ref().map(crate::secret_source::read_secret) {
            Some(Err(e)) => {
                out.push((
                    p.name.clone(),
                    format!("cannot check the server: its password: {e:#}"),
                ));
                continue;
            }
            Some(Ok(pw)) => Some(pw),
            None => None,
        };
        let env = crate::postgres::conn::env_with_password(password.as_deref().map(|s| s.as_str()));
        let resolved = pg.conn_settings().resolve(env);
        let session = resolved
            .config(env)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                crate::postgres::basebackup::PgSession::connect(c, &resolved)
                    .map_err(|e| e.to_string())
            });
        match session {
            // A streaming policy's RPO does not depend on archive_timeout: its slot must
            // be there.
            Ok(s) if pg.wal_stream => {
                let slot = pg.slot_name(&p.name);
                match s.slot_exists(&slot) {
                    Ok(true) => {}
                    Ok(false) => out.push((
                        p.name.clone(),
                        format!(
                            "source.wal_stream is on but {} has no replication slot {slot} (backupd wal-stream --policy {} --create-slot makes it)",
                            s.target(),
                            p.name
                        ),
                    )),
                    Err(e) => out.push((p.name.clone(), format!("cannot check the slot: {e}"))),
                }
            }
            Ok(s) => {
                for w in crate::postgres::rpo::archive_problems(
                    &s.info.archive_settings(),
                    pg.rpo,
                    s.target(),
                ) {
                    out.push((p.name.clone(), w));
                }
            }
            Err(e) => out.push((
                p.name.clone(),
                format!("cannot check the server (not a pass): {e}"),
            )),
        }
    }
    out
}

/// Runs `policy`.
///
/// # Errors
/// None of its own: problems are printed and become exit code 1.
pub fn run(g: &GlobalArgs, a: PolicyArgs) -> Result<i32> {
    let PolicyVerb::Check {
        paths,
        online,
        strict,
    } = a.what;
    let result = match paths.as_slice() {
        [] => policy::load_dir(&g.policies),
        [one] if one.is_dir() => policy::load_dir(one),
        files => policy::load_files(files),
    };
    match result {
        Ok(list) => {
            let mut warnings: Vec<(String, String)> = list
                .iter()
                .flat_map(|p| p.warnings.iter().map(|w| (p.name.clone(), w.clone())))
                .collect();
            if online {
                warnings.extend(online_warnings(&list));
            }
            let code = if strict && !warnings.is_empty() {
                EXIT_FATAL
            } else {
                EXIT_OK
            };
            if g.json {
                let v: Vec<_> = list
                    .iter()
                    .map(|p| {
                        json!({
                            "name": p.name,
                            "file": p.file,
                            "source": p.source.kind(),
                            "schedule": p.schedule.as_ref().map(|s| s.cron.expr()),
                            "timezone": p.schedule.as_ref().map(|s| s.cron.tz().name()),
                        })
                    })
                    .collect();
                let w: Vec<_> = warnings
                    .iter()
                    .map(|(p, w)| json!({"policy": p, "warning": w}))
                    .collect();
                println!(
                    "{}",
                    json!({"valid": true, "policies": v, "problems": [], "warnings": w})
                );
            } else {
                for (p, w) in &warnings {
                    eprintln!("warning: {p}: {w}");
                }
                for p in &list {
                    g.say(format!("ok  {p}"));
                }
                g.say(format!(
                    "{} polic{} valid",
                    list.len(),
                    if list.len() == 1 { "y" } else { "ies" }
                ));
            }
            Ok(code)
        }
        Err(PolicyError::Invalid(files)) => {
            if g.json {
                let v: Vec<_> = files
                    .iter()
                    .flat_map(|f| {
                        f.problems.iter().map(move |p| {
                            json!({
                                "file": f.file,
                                "line": p.line,
                                "key": p.key,
                                "expected": p.expected,
                                "found": p.found,
                            })
                        })
                    })
                    .collect();
                println!("{}", json!({"valid": false, "problems": v}));
            } else {
                eprintln!("{}", policy::render(&files));
                let n: usize = files.iter().map(|f| f.problems.len()).sum();
                eprintln!(
                    "backupd: {n} problem{} in {} file{}",
                    if n == 1 { "" } else { "s" },
                    files.len(),
                    if files.len() == 1 { "" } else { "s" }
                );
            }
            Ok(EXIT_FATAL)
        }
        Err(e) => Err(e.into()),
    }
}
