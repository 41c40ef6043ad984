//! `backupd policy check [DIR]`: validates every policy file and reports every problem.

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
    },
}

/// Runs `policy`.
///
/// # Errors
/// None of its own: problems are printed and become exit code 1.
pub fn run(g: &GlobalArgs, a: PolicyArgs) -> Result<i32> {
    let PolicyVerb::Check { paths } = a.what;
    let result = match paths.as_slice() {
        [] => policy::load_dir(&g.policies),
        [one] if one.is_dir() => policy::load_dir(one),
        files => policy::load_files(files),
    };
    match result {
        Ok(list) => {
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
                println!("{}", json!({"valid": true, "policies": v, "problems": []}));
            } else {
                for p in &list {
                    g.say(format!("ok  {p}"));
                }
                g.say(format!(
                    "{} polic{} valid",
                    list.len(),
                    if list.len() == 1 { "y" } else { "ies" }
                ));
            }
            Ok(EXIT_OK)
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
