//! Connection settings as libpq users know them: flags, then the `PG*` environment
//! variables, then libpq's defaults; the password from `PGPASSWORD` or the password file
//! (`PGPASSFILE`, default `~/.pgpass`, ignored unless private, as libpq does). Copies of a
//! password made here are wiped when dropped; a child that needs one (`pg_amcheck`) gets a
//! private [`TempPassFile`], never `PGPASSWORD` in its environment.

use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

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
/// given (a policy's password source). Each lookup of `PGPASSWORD` returns a copy:
/// [`Resolved::config`] wipes it after use.
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
            .unwrap_or_else(crate::host::current_username);
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
        // tokio-postgres keeps its own copy; ours are wiped.
        if let Some(pw) = env("PGPASSWORD")
            .map(Zeroizing::new)
            .filter(|p| !p.is_empty())
        {
            c.password(pw.as_bytes());
        } else if let Some(pw) = self.password_from_file(&env) {
            c.password(pw.as_bytes());
        }
        Ok(c)
    }

    fn password_from_file(
        &self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Option<Zeroizing<String>> {
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
        let text = Zeroizing::new(std::fs::read_to_string(&path).ok()?);
        // A socket directory matches "localhost" in the file, as in libpq.
        let host = if self.host.starts_with('/') {
            "localhost"
        } else {
            self.host.as_str()
        };
        pgpass_lookup(&text, host, self.port, &self.database, &self.user).map(Zeroizing::new)
    }
}

/// A `.pgpass` field with `\` and `:` escaped.
fn pgpass_escape(field: &str) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(field.len() * 2));
    for c in field.chars() {
        if c == '\\' || c == ':' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A password file for one child (`PGPASSFILE`): one line for `host:port`, any database,
/// `user`; created new with mode 0600 (libpq ignores a file with group or world access) and
/// removed when dropped.
#[derive(Debug)]
pub struct TempPassFile {
    path: PathBuf,
}

impl TempPassFile {
    /// Creates the file in `dir` (a directory of ours: the restore test's scratch).
    ///
    /// # Errors
    /// `Io` when the file cannot be created or written.
    pub fn create(
        dir: &Path,
        host: &str,
        port: u16,
        user: &str,
        password: &str,
    ) -> Result<TempPassFile, PgError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let (host, user) = (pgpass_escape(host), pgpass_escape(user));
        let password = pgpass_escape(password);
        let port = port.to_string();
        // Sized up front: a growing String would leave copies of the password behind.
        let mut line = Zeroizing::new(String::with_capacity(
            host.len() + port.len() + user.len() + password.len() + 8,
        ));
        for part in [
            host.as_str(),
            ":",
            &port,
            ":*:",
            user.as_str(),
            ":",
            password.as_str(),
            "\n",
        ] {
            line.push_str(part);
        }
        let mut n = 0u32;
        loop {
            let path = dir.join(format!(".pgpass-{}-{n}", std::process::id()));
            let io = |source| PgError::Io {
                path: path.display().to_string(),
                source,
            };
            // create_new: never an existing file, nor through a symlink planted there.
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
            {
                Ok(mut f) => {
                    if let Err(e) = f.write_all(line.as_bytes()) {
                        let _ = std::fs::remove_file(&path);
                        return Err(io(e));
                    }
                    return Ok(TempPassFile { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                Err(e) => return Err(io(e)),
            }
        }
    }

    /// The file, for `PGPASSFILE`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempPassFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
        assert_eq!(r.user, crate::host::current_username());
    }

    #[test]
    fn temp_pass_file_is_private_found_by_lookup_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = TempPassFile::create(dir.path(), "127.0.0.1", 5433, "app", "pw:with\\odd").unwrap();
        let md = std::fs::metadata(f.path()).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(f.path()).unwrap();
        assert_eq!(
            pgpass_lookup(&text, "127.0.0.1", 5433, "anydb", "app").as_deref(),
            Some("pw:with\\odd")
        );
        let path = f.path().to_path_buf();
        let g = TempPassFile::create(dir.path(), "127.0.0.1", 5433, "app", "x").unwrap();
        assert_ne!(g.path(), path.as_path());
        drop(f);
        assert!(!path.exists());
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
