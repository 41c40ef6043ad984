//! `backupd key list|add|remove|passwd|rotate|keyring-set|keyring-delete`: key files (one
//! per password or recovery code) and the key generations they are granted (decision
//! 0014). Changing a password or adding a generation never rewrites data.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use zeroize::Zeroizing;

use super::password::{new_recovery_code, normalize_recovery_code, read_password, NEW_PASSWORD};
use super::{current_username, hostname, GlobalArgs};
use crate::repo::Repository;

/// Arguments of `key`.
#[derive(Args, Debug)]
pub struct KeyArgs {
    #[command(subcommand)]
    action: KeyAction,
}

#[derive(Subcommand, Debug)]
enum KeyAction {
    /// List key files (`*` marks the one that opened the repository) and key generations.
    List,
    /// Add a password (from BACKUPD_NEW_PASSWORD_FILE/_COMMAND/BACKUPD_NEW_PASSWORD or a
    /// prompt), or with --recovery a random recovery code, printed once.
    Add {
        /// A recovery code instead of a password: at least 160 random bits, printed once in
        /// groups a person can copy by hand, stored nowhere on this host.
        #[arg(long)]
        recovery: bool,
    },
    /// Remove a key file by id or unique prefix (it gets no keys written afterwards).
    Remove {
        /// Key id.
        id: String,
    },
    /// Change the password of the key in use (a version-1 key file becomes version 2).
    Passwd,
    /// Add a key generation: every object written from now on is sealed with it. Takes a
    /// few requests whatever the repository size; backups running meanwhile finish with
    /// the generation they opened with. The blob-id key and the chunker secret never
    /// change (deduplication depends on them): a rotation protects what is written after
    /// it, and `key retire` re-seals what older generations sealed; neither hides which
    /// chunks the repository holds from someone who had an old key and its password.
    Rotate,
    /// Store the repository password (read from the usual sources, never an argument) in
    /// the OS keyring (Secret Service) as entry NAME, after checking it opens the
    /// repository; then BACKUPD_PASSWORD_KEYRING=NAME or a policy's password_keyring
    /// reads it.
    KeyringSet {
        /// The entry's name.
        name: String,
    },
    /// Remove entry NAME from the OS keyring.
    KeyringDelete {
        /// The entry's name.
        name: String,
    },
}

/// Adds a recovery key file to `repo`: its id and the code, as printed.
///
/// # Errors
/// Repository errors.
pub fn add_recovery_key(repo: &Repository) -> Result<(String, Zeroizing<String>)> {
    let code = new_recovery_code();
    let password = normalize_recovery_code(&code).context("a fresh recovery code")?;
    let id = repo.add_key_file(password.as_bytes(), &hostname(), &current_username(), true)?;
    Ok((id, code))
}

/// Prints a recovery code for people, once.
pub fn print_recovery_code(id: &str, code: &str) {
    println!(
        "\nrecovery code (key {}), shown this once and stored nowhere on this host:\n\n    {code}\n\nWrite it down and keep it away from this host: with the repository's location it opens\nthe repository when every password is gone (BACKUPD_RECOVERY_CODE, or type it at the\npassword prompt).",
        id.get(..8).unwrap_or(id)
    );
}

/// Runs `key`.
///
/// # Errors
/// Repository errors, or a refused removal.
pub fn run(g: &GlobalArgs, a: KeyArgs) -> Result<()> {
    if let KeyAction::KeyringDelete { name } = &a.action {
        crate::keyring_secret::delete(name)?;
        g.say(format!(
            "removed {}/{name} from the OS keyring",
            crate::keyring_secret::SERVICE
        ));
        return Ok(());
    }
    let (repo, pw) = g.open_on_with_password(g.backend()?)?;
    match a.action {
        KeyAction::List => list(g, &repo)?,
        KeyAction::Add { recovery: true } => {
            let (id, code) = add_recovery_key(&repo)?;
            if g.json {
                println!("{}", json!({"id": id, "recovery_code": code.as_str()}));
            } else {
                print_recovery_code(&id, &code);
            }
        }
        KeyAction::Add { recovery: false } => {
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
            repo.remove_key_file(&target)?;
            g.say(format!(
                "removed key {}",
                target.get(..8).unwrap_or(&target)
            ));
        }
        KeyAction::Passwd => {
            let new_pw = read_password(&NEW_PASSWORD, true)?;
            let id = repo.add_key(new_pw.as_bytes(), &hostname(), &current_username())?;
            g.remember_key(&repo.backend().location(), &id);
            repo.remove_key_file(repo.key_id())?;
            g.say(format!(
                "password changed: key {} replaces {}",
                id.get(..8).unwrap_or(&id),
                repo.key_id().get(..8).unwrap_or(repo.key_id())
            ));
        }
        KeyAction::Rotate => {
            let before = repo.keys().current().0;
            let bundle = repo.rotate()?;
            let now = bundle.current();
            if g.json {
                println!(
                    "{}",
                    json!({"generation": now, "previous": before, "serial": bundle.serial,
                           "keys_granted": bundle.grants.len()})
                );
            } else {
                g.say(format!(
                    "key generation {now} created (was {before}): objects written from now on are sealed with it; nothing was re-encrypted ({} key files granted)",
                    bundle.grants.len()
                ));
            }
        }
        KeyAction::KeyringSet { name } => {
            crate::keyring_secret::store(&name, &pw)?;
            g.say(format!(
                "stored the password of {} in the OS keyring as {}/{name}: BACKUPD_PASSWORD_KEYRING={name} reads it",
                repo.backend().location(),
                crate::keyring_secret::SERVICE
            ));
        }
        KeyAction::KeyringDelete { .. } => unreachable!("handled before opening"),
    }
    Ok(())
}

/// `key list`: the key files, then the generations.
fn list(g: &GlobalArgs, repo: &Repository) -> Result<()> {
    let entries = repo.key_entries()?;
    let bundle = repo.generations()?;
    let granted = |id: &str| bundle.as_ref().is_some_and(|b| b.grant_for(id).is_some());
    let kind = |e: &crate::repo::generations::KeyEntry| match &e.file {
        None => "unreadable",
        Some(f) if f.version == 1 => "legacy",
        Some(_) if e.public.is_none() => "not authentic",
        Some(f) if f.recovery => "recovery",
        Some(_) => "password",
    };
    if g.json {
        let keys: Vec<_> = entries
            .iter()
            .map(|e| {
                json!({
                    "id": e.id,
                    "current": e.id == repo.key_id(),
                    "kind": kind(e),
                    "version": e.file.as_ref().map(|k| k.version),
                    "granted": granted(&e.id),
                    "host": e.file.as_ref().map(|k| k.host.clone()),
                    "username": e.file.as_ref().map(|k| k.username.clone()),
                    "created": e.file.as_ref().map(|k| k.created.clone()),
                })
            })
            .collect();
        let gens: Vec<_> = match &bundle {
            Some(b) => b
                .generations
                .iter()
                .map(|x| {
                    json!({"generation": x.generation, "created": x.created,
                                "current": x.generation == b.current()})
                })
                .collect(),
            None => repo
                .keys()
                .enc_keys
                .keys()
                .map(|gen| json!({"generation": gen, "created": null, "current": true}))
                .collect(),
        };
        println!(
            "{}",
            json!({"keys": keys, "generations": gens,
                   "serial": bundle.as_ref().map(|b| b.serial)})
        );
        return Ok(());
    }
    println!(
        " {:<10} {:<10} {:<12} {:<16} created",
        "id", "kind", "user", "host"
    );
    for e in &entries {
        let mark = if e.id == repo.key_id() { '*' } else { ' ' };
        // Listed names are key ids (64 hex digits); never slice past one anyway.
        let short = e.id.get(..8).unwrap_or(&e.id);
        let mut k = kind(e).to_string();
        if bundle.is_some() && e.public.is_some() && !granted(&e.id) {
            k.push_str(" (no grant)");
        }
        match &e.file {
            Some(f) => println!(
                "{mark}{:<10} {:<10} {:<12} {:<16} {}",
                short, k, f.username, f.host, f.created
            ),
            None => println!("{mark}{short:<10} (unreadable key file)"),
        }
    }
    match &bundle {
        Some(b) => {
            println!("\ngenerations (bundle {}, {}):", b.serial, b.note);
            for x in &b.generations {
                let cur = if x.generation == b.current() {
                    "  (current: new objects are sealed with it)"
                } else {
                    ""
                };
                println!("  {:>4}  created {}{cur}", x.generation, x.created);
            }
            for x in &b.retired {
                println!("  {:>4}  created {}  (retired)", x.generation, x.created);
            }
        }
        None => println!(
            "\ngeneration 1 only: the key files predate key generations (`backupd upgrade` converts them)"
        ),
    }
    Ok(())
}
