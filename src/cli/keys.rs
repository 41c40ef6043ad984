//! `backupd key list|add|remove|passwd`: several key files wrap the same master keys, one
//! per password; changing a password never rewrites data.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::json;

use super::password::{read_password, NEW_PASSWORD};
use super::{current_username, hostname, GlobalArgs};
use crate::backend::ObjectType;

/// Arguments of `key`.
#[derive(Args, Debug)]
pub struct KeyArgs {
    #[command(subcommand)]
    action: KeyAction,
}

#[derive(Subcommand, Debug)]
enum KeyAction {
    /// List key files (`*` marks the one that opened the repository).
    List,
    /// Add a password (from BACKUPD_NEW_PASSWORD_FILE/_COMMAND/BACKUPD_NEW_PASSWORD or a prompt).
    Add,
    /// Remove a key file by id or unique prefix.
    Remove {
        /// Key id.
        id: String,
    },
    /// Change the password of the key in use.
    Passwd,
}

/// Runs `key`.
///
/// # Errors
/// Repository errors, or a refused removal.
pub fn run(g: &GlobalArgs, a: KeyArgs) -> Result<()> {
    let repo = g.open()?;
    match a.action {
        KeyAction::List => {
            let keys = repo.list_keys()?;
            if g.json {
                let v: Vec<_> = keys
                    .iter()
                    .map(|(id, kf)| {
                        json!({
                            "id": id,
                            "current": id == repo.key_id(),
                            "host": kf.as_ref().map(|k| k.host.clone()),
                            "username": kf.as_ref().map(|k| k.username.clone()),
                            "created": kf.as_ref().map(|k| k.created.clone()),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!(" {:<10} {:<12} {:<16} created", "id", "user", "host");
                for (id, kf) in &keys {
                    let mark = if id == repo.key_id() { '*' } else { ' ' };
                    // Listed names are key ids (64 hex digits); never slice past one anyway.
                    let short = id.get(..8).unwrap_or(id);
                    match kf {
                        Some(k) => println!(
                            "{mark}{:<10} {:<12} {:<16} {}",
                            short, k.username, k.host, k.created
                        ),
                        None => println!("{mark}{short:<10} (unreadable key file)"),
                    }
                }
            }
        }
        KeyAction::Add => {
            let pw = read_password(&NEW_PASSWORD, true)?;
            let id = repo.add_key(pw.as_bytes(), &hostname(), &current_username())?;
            g.say(format!("added key {}", id.get(..8).unwrap_or(&id)));
        }
        KeyAction::Remove { id } => {
            let keys = repo.list_keys()?;
            let matches: Vec<&String> = keys
                .iter()
                .map(|(k, _)| k)
                .filter(|k| k.starts_with(&id))
                .collect();
            let target = match matches.as_slice() {
                [] => bail!("no key {id:?}"),
                [one] => (*one).clone(),
                _ => bail!("key prefix {id:?} is ambiguous"),
            };
            if target == repo.key_id() {
                bail!("refusing to remove the key in use; open the repository with another password to remove this one");
            }
            repo.backend().delete(ObjectType::Key, &target)?;
            g.say(format!(
                "removed key {}",
                target.get(..8).unwrap_or(&target)
            ));
        }
        KeyAction::Passwd => {
            let pw = read_password(&NEW_PASSWORD, true)?;
            let id = repo.add_key(pw.as_bytes(), &hostname(), &current_username())?;
            g.remember_key(&repo.backend().location(), &id);
            repo.backend().delete(ObjectType::Key, repo.key_id())?;
            g.say(format!(
                "password changed: key {} replaces {}",
                id.get(..8).unwrap_or(&id),
                repo.key_id().get(..8).unwrap_or(repo.key_id())
            ));
        }
    }
    Ok(())
}
