//! Connection settings as libpq users know them: flags, then the `PG*` environment
//! variables, then libpq's defaults; the password from `PGPASSWORD` or the password file
//! (`PGPASSFILE`, default `~/.pgpass`, ignored unless private, as libpq does).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::PgError;

/// Connection settings given on the command line (each overrides its `PG*` variable).
#[derive(Clone, Debug, Default)]
pub struct ConnSettings {
    /// Host name, IP, or socket directory (`--pg-host`, `PGHOST`).
    pub host: Option<String>,
    /// Port (`--pg-port`, `PGPORT`).
    pub port: Option<u16>,
    /// User (`--pg-user`, `PGUSER`).
    pub user: Option<String>,
    /// Database to connect to (`--pg-database`, `PGDATABASE`).
    pub database: Option<String>,
}

/// This process's environment, with `PGPASSWORD` replaced by `password` when one is
/// given (a policy's password source).
pub fn env_with_password(password: Option<&str>) -> impl Fn(&str) -> Option<String> + Copy + '_ {
    move |k: &str| match (k, password) {
        ("PGPASSWORD", Some(p)) => Some(p.to_string()),
        _ => std::env::var(k).ok(),
    }
}

/// The settings after defaults, for messages (no password).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// Host or socket directory.
    pub host: String,
    /// Port.
    pub port: u16,
    /// User.
    pub user: String,
    /// Database.
    pub database: String,
}

impl std::fmt::Display for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host={} port={} user={} dbname={}",
            self.host, self.port, self.user, self.database
        )
    }
}

impl ConnSettings {
    /// Applies the environment and libpq's defaults.
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Resolved {
        let non_empty = |k: &str| env(k).filter(|v| !v.is_empty());
        let host = self
            .host
            .clone()
            .or_else(|| non_empty("PGHOST"))
            .unwrap_or_else(|| {
                ["/var/run/postgresql", "/tmp"]
                    .into_iter()
                    .find(|d| Path::new(d).is_dir())
                    .unwrap_or("localhost")
                    .to_string()
            });
        let port = self
            .port
            .or_else(|| non_empty("PGPORT").and_then(|p| p.parse().ok()))
            .unwrap_or(5432);
        let user = self
            .user
            .clone()
            .or_else(|| non_empty("PGUSER"))
            .unwrap_or_else(crate::cli::current_username);
        let database = self
            .database
            .clone()
            .or_else(|| non_empty("PGDATABASE"))
            .unwrap_or_else(|| "postgres".into());
        Resolved {
            host,
            port,
            user,
            database,
        }
    }
}

impl Resolved {
    /// A tokio-postgres config, with the password from `PGPASSWORD` or the password file.
    ///
    /// # Errors
    /// None today; reserved for settings tokio-postgres refuses.
    pub fn config(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<tokio_postgres::Config, PgError> {
        let mut c = tokio_postgres::Config::new();
        c.host(&self.host)
            .port(self.port)
            .user(&self.user)
            .dbname(&self.database)
            .application_name("backupd")
            .connect_timeout(Duration::from_secs(30));
        if let Some(pw) = env("PGPASSWORD").filter(|p| !p.is_empty()) {
            c.password(pw);
        } else if let Some(pw) = self.password_from_file(&env) {
            c.password(pw);
        }
        Ok(c)
    }

    fn password_from_file(&self, env: &impl Fn(&str) -> Option<String>) -> Option<String> {
        let path = env("PGPASSFILE")
            .map(PathBuf::from)
            .or_else(|| env("HOME").map(|h| Path::new(&h).join(".pgpass")))?;
        let md = std::fs::metadata(&path).ok()?;
        use std::os::unix::fs::PermissionsExt;
        if md.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "password file {} has group or world access; ignoring it (chmod 600 it)",
                path.display()
            );
            return None;
        }
        let text = std::fs::read_to_string(&path).ok()?;
        // A socket directory matches "localhost" in the file, as in libpq.
        let host = if self.host.starts_with('/') {
            "localhost"
        } else {
            self.host.as_str()
        };
        pgpass_lookup(&text, host, self.port, &self.database, &self.user)
    }
}

/// Splits a `.pgpass` line on unescaped `:` (`\:` and `\\` are escapes).
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().expect("one field").push(n);
                }
            }
            ':' => out.push(String::new()),
            c => out.last_mut().expect("one field").push(c),
        }
    }
    out
}

/// The password of the first matching `.pgpass` line (`*` matches anything).
pub fn pgpass_lookup(text: &str, host: &str, port: u16, db: &str, user: &str) -> Option<String> {
    let port = port.to_string();
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let f = pgpass_fields(line);
        if f.len() < 5 {
            continue;
        }
        let m = |pat: &str, v: &str| pat == "*" || pat == v;
        if m(&f[0], host) && m(&f[1], &port) && m(&f[2], db) && m(&f[3], user) {
            return Some(f[4..].join(":"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_environment_beats_defaults() {
        let env = |k: &str| match k {
            "PGHOST" => Some("db.example".to_string()),
            "PGPORT" => Some("6543".to_string()),
            "PGUSER" => Some("".to_string()),
            _ => None,
        };
        let r = ConnSettings {
            port: Some(7000),
            ..Default::default()
        }
        .resolve(env);
        assert_eq!(r.host, "db.example");
        assert_eq!(r.port, 7000);
        assert_eq!(r.database, "postgres");
        assert_eq!(r.user, crate::cli::current_username());
    }

    #[test]
    fn pgpass_matches_wildcards_and_escapes() {
        let text =
            "# comment\nother:5432:*:*:nope\nlocalhost:*:*:app:s3cr\\:et\n*:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(text, "localhost", 5433, "x", "app").as_deref(),
            Some("s3cr:et")
        );
        assert_eq!(
            pgpass_lookup(text, "h", 1, "d", "u").as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("a:1:b:c", "a", 1, "b", "c"), None);
    }
}
