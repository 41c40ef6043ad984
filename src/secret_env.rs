//! The environment variables that hold secrets, and keeping them out of children.
//!
//! backupd reads its own secrets from the environment (`BACKUPD_PASSWORD`, a policy's
//! `password_env`, `PGPASSWORD`, AWS keys). A child that is not backupd itself — a hook, a
//! command source, a password command, `pg_ctl` and the server it starts — must not inherit
//! them: a pre hook or a restored PostgreSQL server (readable by the postgres user through
//! `/proc/PID/environ`) would otherwise hold the repository password. Every place that
//! spawns such a child calls [`scrub`] (or [`scrub_tokio`]).

use std::sync::Mutex;

/// Variables that always hold secrets.
pub const SECRET_VARS: &[&str] = &[
    "BACKUPD_PASSWORD",
    "BACKUPD_NEW_PASSWORD",
    "BACKUPD_RECOVERY_CODE",
    "BACKUPD_TO_PASSWORD",
    "PGPASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// Names registered at run time: the variables policies name in `password_env`.
static REGISTERED: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Marks `var` as holding a secret (a policy's `password_env`), so children never see it.
pub fn register(var: &str) {
    let mut g = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    if !g.iter().any(|v| v == var) && !SECRET_VARS.contains(&var) {
        g.push(var.to_string());
    }
}

/// Every variable a child must not inherit.
pub fn names() -> Vec<String> {
    let g = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    SECRET_VARS
        .iter()
        .map(|s| s.to_string())
        .chain(g.iter().cloned())
        .collect()
}

/// Removes the secret variables from a child's environment.
pub fn scrub(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for v in names() {
        cmd.env_remove(v);
    }
    cmd
}

/// [`scrub`] for a tokio command.
pub fn scrub_tokio(cmd: &mut tokio::process::Command) -> &mut tokio::process::Command {
    for v in names() {
        cmd.env_remove(v);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(cmd: &std::process::Command, var: &str) -> Option<Option<String>> {
        cmd.get_envs()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()))
    }

    #[test]
    fn scrub_removes_fixed_and_registered_names() {
        register("MY_POLICY_SECRET_FOR_TEST");
        let mut cmd = std::process::Command::new("true");
        cmd.env("BACKUPD_PASSWORD", "x")
            .env("MY_POLICY_SECRET_FOR_TEST", "y")
            .env("HARMLESS", "z");
        scrub(&mut cmd);
        assert_eq!(env_of(&cmd, "BACKUPD_PASSWORD"), Some(None));
        assert_eq!(env_of(&cmd, "MY_POLICY_SECRET_FOR_TEST"), Some(None));
        assert_eq!(env_of(&cmd, "AWS_SESSION_TOKEN"), Some(None));
        assert_eq!(env_of(&cmd, "HARMLESS"), Some(Some("z".into())));
    }
}
