//! From a policy file's text to a [`Policy`], collecting every problem on the way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::units::{parse_duration, parse_percent, parse_rate_kib, DURATION_FORMAT, RATE_FORMAT};
use super::walk::{describe, Problem, Problems, Section, Spanned};
use super::{
    CronSchedule, Hooks, InfluxSpec, KeepRules, KeysSpec, Limits, Policy, PostgresSpec,
    RepositorySpec, RetentionSpec, S3Credentials, ScheduleSpec, SecretSource, SourceSpec, SqlCheck,
    SqlExpect, VerifySpec,
};

/// Reads and validates one policy file.
///
/// # Errors
/// Every problem found, in file order.
pub fn read_file(path: &Path) -> Result<Policy, Vec<Problem>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Problem {
            line: 0,
            key: "(file)".into(),
            expected: "a readable UTF-8 TOML file".into(),
            found: e.to_string(),
        }]
    })?;
    parse_policy(&text, path)
}

/// Validates a policy's text; `path` names it and anchors relative secret paths.
///
/// # Errors
/// Every problem found, in file order.
pub fn parse_policy(text: &str, path: &Path) -> Result<Policy, Vec<Problem>> {
    let mut p = Problems::new(text);
    let doc = match toml_edit::Document::parse(text) {
        Ok(d) => d,
        Err(e) => {
            p.add(
                e.span(),
                "(syntax)",
                "valid TOML",
                format!(
                    "a syntax error ({})",
                    e.message().lines().next().unwrap_or("unreadable")
                ),
            );
            return Err(p.list);
        }
    };
    let base = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut v = Validator {
        p,
        base,
        warnings: vec![],
        file: path.display().to_string(),
    };
    let policy = v.policy(doc.as_table(), path);
    let mut list = v.p.list;
    list.sort_by_key(|pr| pr.line);
    match policy {
        Some(pol) if list.is_empty() => Ok(pol),
        _ => Err(list),
    }
}

struct Validator<'s> {
    p: Problems<'s>,
    /// The policy file's directory: relative secret paths are relative to it.
    base: PathBuf,
    /// Accepted, but should change: `FILE:LINE: ...`.
    warnings: Vec<String>,
    /// The file, for warnings.
    file: String,
}

const NAME_RULE: &str = "a name of letters, digits, '.', '_' and '-' (at most 64)";

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !n.starts_with('.')
}

impl Validator<'_> {
    fn policy(&mut self, root: &toml_edit::Table, path: &Path) -> Option<Policy> {
        let mut top = Section::root(root);
        let p = &mut self.p;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = match top.string(p, "name", NAME_RULE) {
            Some(n) if valid_name(&n.value) => Some(n.value),
            Some(n) => {
                p.add(n.span, "name", NAME_RULE, format!("{:?}", n.value));
                None
            }
            None if valid_name(&stem) => Some(stem),
            None => {
                p.add(
                    Some(0..0),
                    "name",
                    format!("{NAME_RULE} (the file name is not one)"),
                    "nothing",
                );
                None
            }
        };
        let description = top.string(p, "description", "a string").map(|s| s.value);
        let tags = self.tags(&mut top, "tags");
        let p = &mut self.p;
        let host = top.string(p, "host", "a host name").map(|s| s.value);
        let repository = match top.table(p, "repository") {
            Some(mut s) => self.repository(&mut s),
            None => {
                if !top.has("repository") {
                    p.add(
                        Some(0..0),
                        "repository",
                        "a [repository] table with location and a password source",
                        "nothing (the table is required)",
                    );
                }
                None
            }
        };
        let p = &mut self.p;
        let source = match top.table(p, "source") {
            Some(mut s) => self.source(&mut s),
            None => {
                if !top.has("source") {
                    p.add(
                        Some(0..0),
                        "source",
                        "a [source] table with a type (files, postgres, influxdb or command)",
                        "nothing (the table is required)",
                    );
                }
                None
            }
        };
        let p = &mut self.p;
        let schedule = top
            .table(p, "schedule")
            .and_then(|mut s| self.schedule(&mut s));
        let p = &mut self.p;
        let retention = top
            .table(p, "retention")
            .and_then(|mut s| self.retention(&mut s));
        let p = &mut self.p;
        let verify = top
            .table(p, "verify")
            .and_then(|mut s| self.verify(&mut s, source.as_ref()));
        let p = &mut self.p;
        let hooks = match top.table(p, "hooks") {
            Some(mut s) => self.hooks(&mut s),
            None => Some(Hooks {
                timeout: Duration::from_secs(600),
                ..Default::default()
            }),
        };
        let p = &mut self.p;
        let limits = match top.table(p, "limits") {
            Some(mut s) => self.limits(&mut s),
            None => Some(Limits::default()),
        };
        let p = &mut self.p;
        let keys = top.table(p, "keys").and_then(|mut s| self.keys(&mut s));
        top.finish(&mut self.p);
        Some(Policy {
            name: name?,
            file: path.to_path_buf(),
            description,
            tags: tags?,
            host,
            repository: repository?,
            source: source?,
            schedule,
            retention,
            verify,
            hooks: hooks?,
            limits: limits?,
            keys,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    fn keys(&mut self, s: &mut Section) -> Option<KeysSpec> {
        let before = self.p.list.len();
        let rotate_every = self.duration(s, "rotate_every");
        s.finish(&mut self.p);
        (!self.bad(before)).then_some(KeysSpec { rotate_every })
    }

    fn tags(&mut self, s: &mut Section, key: &str) -> Option<Vec<String>> {
        let p = &mut self.p;
        let Some(list) = s.strings(p, key, "an array of tag strings") else {
            return Some(vec![]).filter(|_| !s.has(key));
        };
        let mut ok = true;
        for t in &list {
            if t.value.is_empty() || t.value.contains(',') || t.value.contains(char::is_whitespace)
            {
                ok = false;
                p.add(
                    t.span.clone(),
                    &s.path_of(key),
                    "tags without commas or spaces",
                    format!("{:?}", t.value),
                );
            }
        }
        ok.then(|| list.into_iter().map(|t| t.value).collect())
    }

    fn duration(&mut self, s: &mut Section, key: &str) -> Option<Duration> {
        let v = s.string(&mut self.p, key, DURATION_FORMAT)?;
        match parse_duration(&v.value) {
            Ok(d) => Some(d),
            Err(why) => {
                self.p.add(
                    v.span,
                    &s.path_of(key),
                    DURATION_FORMAT,
                    format!("{:?} ({why})", v.value),
                );
                None
            }
        }
    }

    /// Whether problems were recorded since the list had `before` of them.
    fn bad(&self, before: usize) -> bool {
        self.p.list.len() > before
    }

    /// A path to a secret file: it must exist, be a regular file, and be neither readable by
    /// other users nor writable by anyone but its owner ([`crate::secret_file`]).
    fn secret_file(&mut self, v: Spanned<String>, key: &str) -> Option<PathBuf> {
        use crate::secret_file::SecretFileError;
        let path = self.base.join(&v.value);
        match crate::secret_file::check(&path, "secret file") {
            Ok(()) => Some(path),
            Err(SecretFileError::NotAFile { .. }) => {
                self.p.add(
                    v.span,
                    key,
                    "a secret file",
                    format!("{} is not a regular file", path.display()),
                );
                None
            }
            Err(SecretFileError::Mode { mode, .. }) => {
                self.p.add(
                    v.span,
                    key,
                    format!(
                        "a secret file that only its owner can write and other users cannot read ({})",
                        crate::secret_file::MODE_ADVICE
                    ),
                    format!("{} with mode {mode:04o}", path.display()),
                );
                None
            }
            Err(SecretFileError::Io { source, .. }) => {
                self.p.add(
                    v.span,
                    key,
                    "an existing secret file",
                    format!("{}: {source}", path.display()),
                );
                None
            }
        }
    }

    /// `password_file` | `password_command` | `password_env` | `password_keyring`: at most one
    /// (`required`: exactly).
    fn secret(
        &mut self,
        s: &mut Section,
        required: bool,
        what: &str,
    ) -> Option<Option<SecretSource>> {
        let p = &mut self.p;
        let file = s.string(p, "password_file", "a path to a file holding the password");
        let command = s.string(
            p,
            "password_command",
            "a shell command printing the password",
        );
        let env = s.string(p, "password_env", "the name of an environment variable");
        let keyring = s.string(
            p,
            "password_keyring",
            "the name of an OS keyring entry (backupd key keyring-set NAME)",
        );
        let given = [
            file.is_some(),
            command.is_some(),
            env.is_some(),
            keyring.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given > 1 {
            let present: Vec<(&str, usize, Option<std::ops::Range<usize>>)> = [
                ("password_file", &file),
                ("password_command", &command),
                ("password_env", &env),
                ("password_keyring", &keyring),
            ]
            .into_iter()
            .filter_map(|(k, v)| {
                v.as_ref()
                    .map(|v| (k, p.line_of(v.span.clone()), v.span.clone()))
            })
            .collect();
            let found = present
                .iter()
                .map(|(k, line, _)| format!("{k} (line {line})"))
                .collect::<Vec<_>>()
                .join(" and ");
            let (last_key, _, last_span) =
                present
                    .last()
                    .cloned()
                    .unwrap_or(("password_file", 0, None));
            p.add(
                last_span,
                &s.path_of(last_key),
                format!("only one of password_file, password_command, password_env, password_keyring for {what}"),
                found,
            );
            return None;
        }
        if given == 0 {
            if required && !s.has("password") {
                p.add(
                    s.span(),
                    &s.path_of("password_file"),
                    format!(
                        "one of password_file, password_command, password_env or password_keyring for {what} (a policy never holds the password itself)"
                    ),
                    "none of them",
                );
                return None;
            }
            if s.has("password") {
                let (_, span) = s.raw("password")?;
                p.add(
                    span,
                    &s.path_of("password"),
                    "password_file, password_command, password_env or password_keyring (a policy never holds a password itself)",
                    "a password written in the policy",
                );
                return None;
            }
            return Some(None);
        }
        if let Some(f) = file {
            let key = s.path_of("password_file");
            return self
                .secret_file(f, &key)
                .map(|p| Some(SecretSource::File(p)));
        }
        if let Some(c) = command {
            return Some(Some(SecretSource::Command(c.value)));
        }
        if let Some(k) = keyring {
            if k.value.is_empty() || k.value.chars().any(char::is_control) {
                p.add(
                    k.span,
                    &s.path_of("password_keyring"),
                    "the name of an OS keyring entry",
                    format!("{:?}", k.value),
                );
                return None;
            }
            return Some(Some(SecretSource::Keyring(k.value)));
        }
        let e = env?;
        if e.value.is_empty() || e.value.contains('=') {
            p.add(
                e.span,
                &s.path_of("password_env"),
                "the name of an environment variable",
                format!("{:?}", e.value),
            );
            return None;
        }
        crate::secret_env::register(&e.value);
        Some(Some(SecretSource::Env(e.value)))
    }

    fn repository(&mut self, s: &mut Section) -> Option<RepositorySpec> {
        let p = &mut self.p;
        let loc = s.required_string(
            p,
            "location",
            "a directory or s3:http[s]://HOST[:PORT]/BUCKET[/PREFIX] or s3:BUCKET[/PREFIX]",
        );
        if let Some(l) = &loc {
            if l.value.is_empty() {
                p.add(
                    l.span.clone(),
                    &s.path_of("location"),
                    "a directory or an s3: location",
                    "an empty string",
                );
            } else if crate::backend::S3Location::is_s3(&l.value) {
                if let Err(e) = crate::backend::S3Location::parse(&l.value) {
                    p.add(
                        l.span.clone(),
                        &s.path_of("location"),
                        "s3:http[s]://HOST[:PORT]/BUCKET[/PREFIX] or s3:BUCKET[/PREFIX]",
                        format!("{:?} ({e})", l.value),
                    );
                }
            } else if !l.value.starts_with('/') {
                p.add(
                    l.span.clone(),
                    &s.path_of("location"),
                    "an absolute directory or an s3: location",
                    format!("{:?}", l.value),
                );
            }
        }
        let password = self.secret(s, true, "the repository password");
        let p = &mut self.p;
        let cache_dir = s
            .string(p, "cache_dir", "a directory")
            .map(|v| PathBuf::from(v.value));
        let cred_file = s.string(
            p,
            "s3_credentials_file",
            "a path to an AWS shared-credentials file",
        );
        let profile = s.string(p, "s3_profile", "a profile name in s3_credentials_file");
        let cred_cmd = s.string(
            p,
            "s3_credentials_command",
            "a credential_process command printing AWS JSON credentials",
        );
        let s3_region = s.string(p, "s3_region", "an AWS region").map(|v| v.value);
        let s3_storage_class = s
            .string(p, "s3_storage_class", "an S3 storage class")
            .map(|v| v.value);
        let s3_credentials = match (cred_file, cred_cmd) {
            (Some(_), Some(c)) => {
                self.p.add(
                    c.span,
                    &s.path_of("s3_credentials_command"),
                    "either s3_credentials_file or s3_credentials_command",
                    "both",
                );
                None
            }
            (Some(f), None) => {
                let key = s.path_of("s3_credentials_file");
                self.secret_file(f, &key).map(|path| S3Credentials::File {
                    path,
                    profile: profile.map(|p| p.value).unwrap_or_else(|| "default".into()),
                })
            }
            (None, cmd) => {
                if let Some(pr) = profile {
                    self.p.add(
                        pr.span,
                        &s.path_of("s3_profile"),
                        "s3_profile only together with s3_credentials_file",
                        "s3_profile alone",
                    );
                }
                Some(match cmd {
                    Some(c) => S3Credentials::Command(c.value),
                    None => S3Credentials::Chain,
                })
            }
        };
        s.finish(&mut self.p);
        Some(RepositorySpec {
            location: loc?.value,
            password: password??,
            cache_dir,
            s3_credentials: s3_credentials?,
            s3_region,
            s3_storage_class,
        })
    }

    fn source(&mut self, s: &mut Section) -> Option<SourceSpec> {
        let p = &mut self.p;
        let kinds = "files, postgres, influxdb or command";
        let Some(kind) = s.required_string(p, "type", &format!("the source type: {kinds}")) else {
            // Without a type, its other keys cannot be checked.
            return None;
        };
        let out = match kind.value.as_str() {
            "files" => {
                let paths = s.strings(p, "paths", "an array of absolute paths");
                let exclude = s
                    .strings(p, "exclude", "an array of glob patterns")
                    .unwrap_or_default();
                let options = crate::source::files::WalkOptions {
                    format2: false,
                    parent_has_attributes: false,
                    parent_same_user: false,
                    one_file_system: s.boolean(p, "one_file_system").unwrap_or(false),
                    exclude_caches: s.boolean(p, "exclude_caches").unwrap_or(false),
                    exclude_nodump: s.boolean(p, "exclude_nodump").unwrap_or(false),
                    exclude_if_present: vec![],
                };
                let markers = s
                    .strings(p, "exclude_if_present", "an array of file names")
                    .unwrap_or_default();
                for m in &markers {
                    if let Some(want) = crate::source::files::marker_name_problem(&m.value) {
                        p.add(
                            m.span.clone(),
                            &s.path_of("exclude_if_present"),
                            want,
                            format!("{:?}", m.value),
                        );
                    }
                }
                let mut options = options;
                options.exclude_if_present = markers.into_iter().map(|v| v.value.into()).collect();
                for g in &exclude {
                    if let Err(e) = globset::Glob::new(&g.value) {
                        p.add(
                            g.span.clone(),
                            &s.path_of("exclude"),
                            "glob patterns",
                            format!("{:?} ({e})", g.value),
                        );
                    }
                }
                match paths {
                    Some(list) if !list.is_empty() => {
                        let mut ok = true;
                        for v in &list {
                            if !v.value.starts_with('/') {
                                ok = false;
                                p.add(
                                    v.span.clone(),
                                    &s.path_of("paths"),
                                    "absolute paths",
                                    format!("{:?}", v.value),
                                );
                            }
                        }
                        ok.then(|| SourceSpec::Files {
                            paths: list.into_iter().map(|v| PathBuf::from(v.value)).collect(),
                            exclude: exclude.into_iter().map(|v| v.value).collect(),
                            options,
                        })
                    }
                    Some(_) => {
                        p.add(
                            s.span(),
                            &s.path_of("paths"),
                            "at least one path",
                            "an empty array",
                        );
                        None
                    }
                    None => {
                        if !s.has("paths") {
                            p.add(
                                s.span(),
                                &s.path_of("paths"),
                                "an array of absolute paths for a files source",
                                "nothing (the key is required)",
                            );
                        }
                        None
                    }
                }
            }
            "postgres" => {
                let dd = s.required_string(
                    p,
                    "data_directory",
                    "the PostgreSQL data directory (absolute)",
                );
                if let Some(d) = &dd {
                    if !d.value.starts_with('/') {
                        p.add(
                            d.span.clone(),
                            &s.path_of("data_directory"),
                            "an absolute path",
                            format!("{:?}", d.value),
                        );
                    }
                }
                let host = s
                    .string(p, "host", "a host name, address or socket directory")
                    .map(|v| v.value);
                let port = s.integer(p, "port", 1..=65535).map(|v| v as u16);
                let user = s.string(p, "user", "a user name").map(|v| v.value);
                let database = s.string(p, "database", "a database name").map(|v| v.value);
                let fast = s.boolean(p, "fast_checkpoint").unwrap_or(true);
                let wal_stream = s.boolean(p, "wal_stream").unwrap_or(false);
                let slot = s
                    .string(
                        p,
                        "wal_stream_slot",
                        "a replication slot name (a-z, 0-9, _)",
                    )
                    .and_then(|v| {
                        if crate::postgres::replication::valid_slot_name(&v.value) {
                            Some(v.value)
                        } else {
                            p.add(
                                v.span.clone(),
                                &s.path_of("wal_stream_slot"),
                                "1 to 63 of a-z, 0-9 and _",
                                format!("{:?}", v.value),
                            );
                            None
                        }
                    });
                // `archive_timeout` was this key's name; PostgreSQL's setting of that name
                // means something else (see rpo).
                let wal_wait = self.duration(s, "wal_wait");
                let old_name = match s.raw("archive_timeout") {
                    Some((_, span)) => {
                        let line = self.p.line_of(span.clone());
                        if wal_wait.is_some() {
                            self.p.add(
                                span,
                                &s.path_of("archive_timeout"),
                                "only wal_wait (archive_timeout is its old name)",
                                "both",
                            );
                        } else {
                            self.warnings.push(format!(
                                "{}:{line}: source.archive_timeout is deprecated: it is now source.wal_wait (how long a base backup waits for its WAL; PostgreSQL's archive_timeout is another setting, see source.rpo)",
                                self.file
                            ));
                        }
                        self.duration(s, "archive_timeout")
                    }
                    None => None,
                };
                let rpo = self.duration(s, "rpo");
                let status_every = self.duration(s, "wal_stream_status_every");
                let password = self.secret(s, false, "the PostgreSQL user");
                let dd = dd.filter(|d| d.value.starts_with('/'))?;
                Some(SourceSpec::Postgres(PostgresSpec {
                    data_directory: PathBuf::from(dd.value),
                    host,
                    port,
                    user,
                    database,
                    password: password?,
                    fast_checkpoint: fast,
                    wal_wait: wal_wait.or(old_name).unwrap_or(Duration::from_secs(60)),
                    rpo: rpo.unwrap_or(crate::postgres::rpo::DEFAULT_RPO),
                    wal_stream,
                    wal_stream_slot: slot,
                    wal_stream_status_every: status_every
                        .unwrap_or(crate::postgres::walstream::DEFAULT_STATUS_EVERY),
                }))
            }
            "influxdb" => {
                let host = s
                    .string(p, "host", "the influxd backup address HOST:PORT")
                    .map(|v| v.value)
                    .unwrap_or_else(|| "127.0.0.1:8088".into());
                let database = s.string(p, "database", "a database name").map(|v| v.value);
                let list = s
                    .strings(p, "databases", "an array of database names")
                    .unwrap_or_default();
                if database.is_some() && !list.is_empty() {
                    p.add(
                        list[0].span.clone(),
                        &s.path_of("databases"),
                        "either database or databases",
                        "both",
                    );
                }
                let mut databases: Vec<String> = list.into_iter().map(|v| v.value).collect();
                databases.extend(database);
                let http = match s.string(p, "http", "the HTTP API URL, http://HOST:8086") {
                    Some(v) => {
                        if crate::source::influx::http::HttpApi::new(&v.value, None).is_err() {
                            p.add(
                                v.span.clone(),
                                &s.path_of("http"),
                                "an http:// or https:// URL with a host (and no credentials)",
                                format!("{:?}", v.value),
                            );
                        }
                        v.value
                    }
                    None => "http://127.0.0.1:8086".into(),
                };
                let username = s
                    .string(p, "username", "the HTTP API user")
                    .map(|v| v.value);
                let password = self.secret(s, false, "the InfluxDB user");
                Some(SourceSpec::Influxdb(InfluxSpec {
                    host,
                    databases,
                    http,
                    username,
                    password: password?,
                }))
            }
            "command" => {
                let argv = match s.raw("command") {
                    None => {
                        p.add(
                            s.span(),
                            &s.path_of("command"),
                            "the command: a shell string or an array of arguments",
                            "nothing (the key is required)",
                        );
                        None
                    }
                    Some((item, span)) => {
                        if let Some(sh) = item.as_str() {
                            Some(vec!["sh".to_string(), "-c".to_string(), sh.to_string()])
                        } else if let Some(arr) = item
                            .as_array()
                            .filter(|a| !a.is_empty() && a.iter().all(|v| v.as_str().is_some()))
                        {
                            Some(
                                arr.iter()
                                    .filter_map(|v| v.as_str().map(String::from))
                                    .collect(),
                            )
                        } else {
                            p.add(
                                span,
                                &s.path_of("command"),
                                "a shell string or a non-empty array of strings",
                                describe(item),
                            );
                            None
                        }
                    }
                };
                let filename =
                    s.required_string(p, "filename", "the file name to store the output as");
                if let Some(f) = &filename {
                    if f.value.is_empty()
                        || f.value.contains('/')
                        || f.value == "."
                        || f.value == ".."
                    {
                        p.add(
                            f.span.clone(),
                            &s.path_of("filename"),
                            "a plain file name",
                            format!("{:?}", f.value),
                        );
                        return None;
                    }
                }
                Some(SourceSpec::Command {
                    argv: argv?,
                    filename: filename?.value,
                })
            }
            other => {
                p.add(
                    kind.span.clone(),
                    &s.path_of("type"),
                    format!("the source type: {kinds} (stdin is not a policy source)"),
                    format!("{other:?}"),
                );
                return None;
            }
        };
        s.finish(&mut self.p);
        out
    }

    fn cron(&mut self, s: &mut Section, required: bool) -> Option<CronSchedule> {
        let p = &mut self.p;
        let expr = if required {
            s.required_string(p, "cron", super::schedule::CRON_FORMAT)
        } else {
            s.string(p, "cron", super::schedule::CRON_FORMAT)
        };
        let tz = s.string(
            p,
            "timezone",
            "an IANA time zone name such as \"UTC\" or \"Europe/Berlin\"",
        );
        let expr = expr?;
        let tz_name = tz
            .as_ref()
            .map(|t| t.value.clone())
            .unwrap_or_else(|| "UTC".into());
        match CronSchedule::parse(&expr.value, &tz_name) {
            Ok(c) => Some(c),
            Err(why) if why.contains("time zone") => {
                p.add(
                    tz.and_then(|t| t.span),
                    &s.path_of("timezone"),
                    "an IANA time zone name such as \"UTC\" or \"Europe/Berlin\"",
                    format!("{tz_name:?}"),
                );
                None
            }
            Err(why) => {
                p.add(
                    expr.span,
                    &s.path_of("cron"),
                    super::schedule::CRON_FORMAT,
                    why,
                );
                None
            }
        }
    }

    fn schedule(&mut self, s: &mut Section) -> Option<ScheduleSpec> {
        let cron = self.cron(s, true);
        let jitter = self.duration(s, "jitter").unwrap_or_default();
        let p = &mut self.p;
        let catch_up = s.boolean(p, "catch_up").unwrap_or(true);
        let retries = s.integer(p, "retries", 0..=100).unwrap_or(2) as u32;
        let retry_backoff = self
            .duration(s, "retry_backoff")
            .unwrap_or(Duration::from_secs(60));
        let timeout = self.duration(s, "timeout");
        s.finish(&mut self.p);
        Some(ScheduleSpec {
            cron: cron?,
            jitter,
            catch_up,
            retries,
            retry_backoff,
            timeout,
        })
    }

    fn retention(&mut self, s: &mut Section) -> Option<RetentionSpec> {
        let before = self.p.list.len();
        let p = &mut self.p;
        let mut n =
            |key: &str, p: &mut Problems| s.integer(p, key, 0..=1_000_000).unwrap_or(0) as u32;
        let last = n("keep_last", p);
        let hourly = n("keep_hourly", p);
        let daily = n("keep_daily", p);
        let weekly = n("keep_weekly", p);
        let monthly = n("keep_monthly", p);
        let yearly = n("keep_yearly", p);
        let within = self.duration(s, "keep_within");
        let tags = self.tags(s, "keep_tags").unwrap_or_default();
        let p = &mut self.p;
        let prune = s.boolean(p, "prune").unwrap_or(true);
        let keep = KeepRules {
            last,
            hourly,
            daily,
            weekly,
            monthly,
            yearly,
            within,
            tags,
        };
        if keep.is_empty() && !self.bad(before) {
            self.p.add(
                s.span(),
                s.path(),
                "at least one of keep_last, keep_hourly, keep_daily, keep_weekly, keep_monthly, keep_yearly, keep_within, keep_tags",
                "no rule (a retention without rules would forget all but the newest snapshot)",
            );
        }
        s.finish(&mut self.p);
        (!self.bad(before)).then_some(RetentionSpec { keep, prune })
    }

    fn verify(&mut self, s: &mut Section, source: Option<&SourceSpec>) -> Option<VerifySpec> {
        let before = self.p.list.len();
        let cron = self.cron(s, false);
        let p = &mut self.p;
        let subset = s.string(p, "read_data_subset", "a percentage such as \"10%\"");
        let read_data_subset = subset.and_then(|v| match parse_percent(&v.value) {
            Ok(f) => Some(f),
            Err(why) => {
                p.add(
                    v.span,
                    &s.path_of("read_data_subset"),
                    "a percentage such as \"10%\"",
                    format!("{:?} ({why})", v.value),
                );
                None
            }
        });
        let restore_test = s.boolean(p, "restore_test").unwrap_or(false);
        let mut sql_checks = vec![];
        let is_pg = matches!(source, Some(SourceSpec::Postgres(_)));
        let checks_span = s.raw("sql_checks").and_then(|(_, span)| span);
        if let Some(list) = s.tables(p, "sql_checks") {
            if !is_pg && source.is_some() {
                p.add(
                    checks_span,
                    &s.path_of("sql_checks"),
                    "sql_checks only for a postgres source",
                    format!("a {} source", source.map(SourceSpec::kind).unwrap_or("?")),
                );
            }
            for mut c in list {
                let query = c.required_string(p, "query", "the SQL query to run");
                let database = c.string(p, "database", "a database name").map(|v| v.value);
                let expect = check_expect(p, &mut c, true);
                c.finish(p);
                if let (Some(q), Some(expect)) = (query, expect) {
                    sql_checks.push(SqlCheck {
                        database,
                        query: q.value,
                        expect,
                    });
                }
            }
        }
        let shared_preload_libraries = s
            .string(
                p,
                "shared_preload_libraries",
                "the libraries the restored server loads, as in postgresql.conf",
            )
            .map(|v| v.value);
        let cluster_owner = s
            .string(
                p,
                "cluster_owner",
                "the OS user owning and running the restored cluster",
            )
            .map(|v| v.value);
        let mut influxql_checks = vec![];
        let is_influx = matches!(source, Some(SourceSpec::Influxdb(_)));
        let iq_span = s.raw("influxql_checks").and_then(|(_, span)| span);
        if let Some(list) = s.tables(p, "influxql_checks") {
            if !is_influx && source.is_some() {
                p.add(
                    iq_span,
                    &s.path_of("influxql_checks"),
                    "influxql_checks only for an influxdb source",
                    format!("a {} source", source.map(SourceSpec::kind).unwrap_or("?")),
                );
            }
            for mut c in list {
                let query = c.required_string(p, "query", "the InfluxQL query to run");
                let database = c.required_string(p, "database", "the database to run it in");
                let expect = check_expect(p, &mut c, false);
                c.finish(p);
                if let (Some(q), Some(d), Some(expect)) = (query, database, expect) {
                    influxql_checks.push(SqlCheck {
                        database: Some(d.value),
                        query: q.value,
                        expect,
                    });
                }
            }
        }
        let influxd = s
            .string(p, "influxd", "the influxd binary a restore test starts")
            .map(|v| PathBuf::from(v.value));
        let measurements = s
            .strings(p, "measurements", "an array of measurement names")
            .unwrap_or_default();
        if !measurements.is_empty() && !matches!(source, Some(SourceSpec::Influxdb(_)) | None) {
            p.add(
                measurements[0].span.clone(),
                &s.path_of("measurements"),
                "measurements only for an influxdb source",
                format!("a {} source", source.map(SourceSpec::kind).unwrap_or("?")),
            );
        }
        s.finish(&mut self.p);
        (!self.bad(before)).then(|| VerifySpec {
            cron,
            read_data_subset,
            restore_test,
            sql_checks,
            measurements: measurements.into_iter().map(|m| m.value).collect(),
            influxql_checks,
            influxd,
            shared_preload_libraries,
            cluster_owner,
        })
    }

    fn hooks(&mut self, s: &mut Section) -> Option<Hooks> {
        let before = self.p.list.len();
        let p = &mut self.p;
        let list = |key: &str, p: &mut Problems, s: &mut Section| {
            s.strings(p, key, "an array of shell commands")
                .unwrap_or_default()
                .into_iter()
                .map(|v| v.value)
                .collect::<Vec<_>>()
        };
        let pre = list("pre", p, s);
        let post = list("post", p, s);
        let on_failure = list("on_failure", p, s);
        let timeout = self
            .duration(s, "timeout")
            .unwrap_or(Duration::from_secs(600));
        s.finish(&mut self.p);
        (!self.bad(before)).then_some(Hooks {
            pre,
            post,
            on_failure,
            timeout,
        })
    }

    fn limits(&mut self, s: &mut Section) -> Option<Limits> {
        let before = self.p.list.len();
        let p = &mut self.p;
        let mut rate = |key: &str, p: &mut Problems| {
            let v = s.string(p, key, RATE_FORMAT)?;
            match parse_rate_kib(&v.value) {
                Ok(k) => Some(k),
                Err(why) => {
                    p.add(
                        v.span,
                        &s.path_of(key),
                        RATE_FORMAT,
                        format!("{:?} ({why})", v.value),
                    );
                    None
                }
            }
        };
        let upload_kib = rate("upload", p);
        let download_kib = rate("download", p);
        let s3_connections = s.integer(p, "s3_connections", 1..=256).map(|v| v as u64);
        s.finish(&mut self.p);
        (!self.bad(before)).then_some(Limits {
            upload_kib,
            download_kib,
            s3_connections,
        })
    }
}

/// What one check's value must be: `at_least` or `equals`, not both. With neither, a SQL
/// check is a boolean query (`true_if_neither`); an InfluxQL check has no booleans, so
/// that is a problem.
fn check_expect(p: &mut Problems, c: &mut Section, true_if_neither: bool) -> Option<SqlExpect> {
    let at_least = c.integer(p, "at_least", i64::MIN..=i64::MAX);
    let equals = c.string(p, "equals", "the text the first value must equal");
    match (at_least, equals) {
        (Some(_), Some(e)) => {
            p.add(
                e.span,
                &c.path_of("equals"),
                "either at_least or equals",
                "both",
            );
            None
        }
        (Some(n), None) => Some(SqlExpect::AtLeast(n)),
        (None, Some(e)) => Some(SqlExpect::Equals(e.value)),
        (None, None) if true_if_neither => Some(SqlExpect::True),
        (None, None) => {
            p.add(
                c.span(),
                &c.path_of("at_least"),
                "at_least or equals",
                "neither",
            );
            None
        }
    }
}
