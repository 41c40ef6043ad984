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
    List {
        /// Also count the objects sealed with each generation (reads every object's
        /// envelope and each pack's header).
        #[arg(long)]
        usage: bool,
    },
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
    Rotate {
        /// Only when the newest generation is at least this old (`90d`); with --policy,
        /// the policy's `[keys] rotate_every` unless given.
        #[arg(long, value_name = "DURATION")]
        if_older_than: Option<String>,
        /// Use this policy's repository and password source (and rotate_every).
        #[arg(long)]
        policy: Option<String>,
    },
    /// After a key file and its password leaked: remove the named key files (their grants
    /// first), then seal again every object sealed with generation GEN or older — packs,
    /// index, snapshots (new ids; the old ones still name them), config, marks, WAL —
    /// under the newest generation (made now if GEN is the newest), and drop those
    /// generations, so the old keys open nothing the repository holds. Old packs are
    /// marked and deleted after the grace period, as prune does: until then the
    /// generations stay, and running it again finishes the job. Resumable; safe while
    /// backups run (it waits for those still sealing with a retiring generation). The
    /// blob-id key and the chunker secret cannot change without losing deduplication:
    /// whoever had an old key and its password can still tell which chunks the
    /// repository holds.
    Retire {
        /// Generations up to this one are retired.
        generation: u32,
        /// Key files (ids or unique prefixes) to remove first.
        #[arg(long = "remove-key", value_name = "ID")]
        remove_key: Vec<String>,
        /// How long old packs stay marked before they are deleted (as prune's --grace).
        #[arg(long, default_value = "24h")]
        grace: String,
        /// How long to wait for backups still sealing with a retiring generation.
        #[arg(long, default_value = "30m")]
        wait: String,
    },
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
    if let KeyAction::Rotate {
        if_older_than,
        policy,
    } = &a.action
    {
        return rotate(g, if_older_than.as_deref(), policy.as_deref());
    }
    let (repo, pw) = g.open_on_with_password(g.backend()?)?;
    match a.action {
        KeyAction::List { usage } => list(g, &repo, usage)?,
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
            let target = removable_key(&repo, &repo.list_keys()?, &id)?;
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
        KeyAction::Rotate { .. } => unreachable!("handled before opening"),
        KeyAction::Retire {
            generation,
            remove_key,
            grace,
            wait,
        } => retire(g, &repo, generation, &remove_key, &grace, &wait)?,
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

/// The key file `prefix` names among `keys`, if it is one and not the key in use.
fn removable_key(
    repo: &Repository,
    keys: &[(String, Option<crate::crypto::KeyFile>)],
    prefix: &str,
) -> Result<String> {
    let matches: Vec<&String> = keys
        .iter()
        .map(|(k, _)| k)
        .filter(|k| k.starts_with(prefix))
        .collect();
    match matches.as_slice() {
        [] => bail!("no key {prefix:?}"),
        [one] if one.as_str() == repo.key_id() => bail!(
            "refusing to remove the key in use ({prefix}); open the repository with another password to remove this one"
        ),
        [one] => Ok((*one).clone()),
        _ => bail!("key prefix {prefix:?} is ambiguous"),
    }
}

/// `key rotate [--if-older-than DUR] [--policy NAME]`.
fn rotate(g: &GlobalArgs, if_older_than: Option<&str>, policy: Option<&str>) -> Result<()> {
    let (g, min_age) = match policy {
        Some(name) => {
            let pol = crate::policy::find(&g.policies, name)?;
            let every = pol.keys.as_ref().and_then(|k| k.rotate_every);
            (g.for_policy(&pol), every)
        }
        None => (g.clone(), None),
    };
    let min_age = match if_older_than {
        Some(v) => Some(
            crate::policy::units::parse_duration(v)
                .map_err(|e| anyhow::anyhow!("--if-older-than {v:?}: {e}"))?,
        ),
        None => min_age,
    };
    let repo = g.open()?;
    let before = repo.keys().current().0;
    let (bundle, rotated) = repo.rotate_if_older(min_age)?;
    let now = bundle.current();
    let age = crate::repo::generations::generation_age(&bundle).map(|d| d.as_secs());
    if g.json {
        println!(
            "{}",
            json!({"generation": now, "previous": before, "rotated": rotated,
                   "serial": bundle.serial, "keys_granted": bundle.grants.len(),
                   "age_seconds": age, "repository": repo.backend().location()})
        );
    } else if rotated {
        g.say(format!(
            "key generation {now} created (was {before}): objects written from now on are sealed with it; nothing was re-encrypted ({} key files granted)",
            bundle.grants.len()
        ));
    } else {
        g.say(format!(
            "key generation {now} is {} old, younger than {}: not rotated",
            age.map(|s| format!("{}h", s / 3600))
                .unwrap_or_else(|| "?".into()),
            min_age
                .map(|d| format!("{}h", d.as_secs() / 3600))
                .unwrap_or_default()
        ));
    }
    Ok(())
}

/// `key retire`.
fn retire(
    g: &GlobalArgs,
    repo: &Repository,
    generation: u32,
    remove: &[String],
    grace: &str,
    wait: &str,
) -> Result<()> {
    let dur = |flag: &str, v: &str| {
        crate::policy::units::parse_duration(v).map_err(|e| anyhow::anyhow!("{flag} {v:?}: {e}"))
    };
    let keys = repo.list_keys()?;
    let remove_keys = remove
        .iter()
        .map(|prefix| removable_key(repo, &keys, prefix))
        .collect::<Result<Vec<_>>>()?;
    let opts = crate::repo::retire::RetireOptions {
        generation,
        remove_keys,
        grace: dur("--grace", grace)?,
        wait: dur("--wait", wait)?,
    };
    let bytes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let shown = bytes.clone();
    let bar = super::progress::Progress::start(
        !g.quiet && !g.json,
        "re-sealing packs",
        None,
        move || shown.load(std::sync::atomic::Ordering::Relaxed),
    );
    let report = repo.retire(&opts, &|_, _, done| {
        bytes.store(done, std::sync::atomic::Ordering::Relaxed)
    });
    drop(bar);
    let report = report.map_err(|e| match e {
        crate::repo::retire::RetireError::Waiting { .. } => {
            anyhow::Error::new(crate::error::ExitWith {
                code: crate::error::EXIT_LOCKED,
                message: e.to_string(),
            })
        }
        other => other.into(),
    })?;
    if g.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    for (kind, gens) in &report.resealed {
        for (gen, r) in gens {
            println!(
                "re-sealed {:>6} {kind} object(s) of generation {gen} ({}{})",
                r.objects,
                super::human(r.bytes),
                if r.blobs > 0 {
                    format!(", {} blobs", r.blobs)
                } else {
                    String::new()
                }
            );
        }
    }
    for k in &report.keys_removed {
        println!("removed key {}", k.get(..8).unwrap_or(k));
    }
    if report.done() {
        println!(
            "generation(s) {:?} retired: everything is sealed with generation {} now; the old keys open nothing in the repository",
            report.retired, report.generation
        );
    } else {
        println!(
            "{} old pack(s) marked, {} deleted, {} waiting for the grace period{}: run `backupd key retire {generation}` again then to drop the old generation(s)",
            report.packs_marked,
            report.packs_deleted,
            report.packs_waiting,
            report
                .waiting_until
                .map(|t| format!(" (until {})", t.to_rfc3339()))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `key list`: the key files, then the generations.
fn list(g: &GlobalArgs, repo: &Repository, usage: bool) -> Result<()> {
    let entries = repo.key_entries()?;
    let bundle = repo.generations()?;
    let usage = if usage {
        Some(repo.generation_usage()?)
    } else {
        None
    };
    let used_by = |gen: u32| -> Vec<(String, u64, u64)> {
        usage
            .iter()
            .flatten()
            .filter_map(|(kind, gens)| gens.get(&gen).map(|(n, b)| (kind.clone(), *n, *b)))
            .collect()
    };
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
                    let mut v = json!({"generation": x.generation, "created": x.created,
                                       "current": x.generation == b.current()});
                    if usage.is_some() {
                        v["usage"] = used_by(x.generation)
                            .into_iter()
                            .map(|(k, n, b)| (k, json!({"objects": n, "bytes": b})))
                            .collect::<serde_json::Map<_, _>>()
                            .into();
                    }
                    v
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
                if usage.is_some() {
                    let used = used_by(x.generation);
                    if used.is_empty() {
                        println!("        no objects");
                    }
                    for (k, n, b) in used {
                        println!("        {n:>8} {k} ({})", super::human(b));
                    }
                }
            }
            for x in &b.retired {
                println!("  {:>4}  created {}  (retired)", x.generation, x.created);
                // Nothing should be left; a count here is an object no key opens.
                for (k, n, bytes) in used_by(x.generation) {
                    println!("        {n:>8} {k} ({}) sealed with it: no key opens these", super::human(bytes));
                }
            }
        }
        None => println!(
            "\ngeneration 1 only: the key files predate key generations (`backupd upgrade` converts them)"
        ),
    }
    Ok(())
}
