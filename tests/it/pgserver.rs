//! Throwaway PostgreSQL 15 clusters for the tests (recipes.md section 1): a temp dir owned
//! by the `postgres` user (initdb and pg_ctl refuse root), the server on a free loopback
//! port, WAL archived by `backupd wal-push` into a repository in the same temp dir, clients
//! (psql, backupd) run as root over TCP. Everything is stopped and removed on drop.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::common::{backupd, free_port, Run, S3Server, BIN, S3_ACCESS_KEY, S3_SECRET_KEY};

/// PostgreSQL's binaries.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn as_postgres(program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"])
        .arg(Path::new(PG_BIN).join(program));
    c
}

fn chown_postgres(p: &Path) {
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(p)
        .status()
        .expect("chown");
    assert!(st.success(), "chown {}", p.display());
}

/// A repository and the clusters archiving into it.
pub struct PgEnv {
    dir: TempDir,
    /// The repository (for an S3 one: its files on the server's disk).
    pub repo: PathBuf,
    /// What `--repo` gets.
    pub location: String,
    /// Its password file (0600, owned by postgres).
    pub password_file: PathBuf,
    /// The S3 server, for a repository on S3.
    pub s3: Option<S3Server>,
}

impl PgEnv {
    /// A fresh repository, readable and writable by the `postgres` user.
    pub fn new() -> PgEnv {
        Self::with_server(None)
    }

    /// A fresh repository on an S3 server of its own.
    pub fn new_s3() -> PgEnv {
        Self::with_server(Some(S3Server::start()))
    }

    fn with_server(s3: Option<S3Server>) -> PgEnv {
        let dir = tempfile::Builder::new()
            .prefix("backupd-pg-")
            .tempdir()
            .expect("tempdir");
        let (repo, location) = match &s3 {
            Some(s) => (s.bucket_dir("bk1").join("repo"), s.location("bk1/repo")),
            None => {
                let r = dir.path().join("repo");
                let l = r.display().to_string();
                (r, l)
            }
        };
        let password_file = dir.path().join("password");
        fs::write(&password_file, "pg test password\n").unwrap();
        fs::set_permissions(&password_file, fs::Permissions::from_mode(0o600)).unwrap();
        let env = PgEnv {
            dir,
            repo,
            location,
            password_file,
            s3,
        };
        env.cmd().arg("init").run().ok();
        chown_postgres(env.dir.path());
        fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        env
    }

    /// `backupd --repo REPO` with the password file.
    pub fn cmd(&self) -> Run {
        let run = backupd()
            .arg("--repo")
            .arg(&self.location)
            .env("BACKUPD_PASSWORD_FILE", &self.password_file);
        match &self.s3 {
            Some(s) => s
                .credentials(run)
                .env("BACKUPD_CACHE_DIR", self.dir.path().join("cache")),
            None => run,
        }
    }

    /// A path in the environment's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The archive_command that pushes into this repository.
    pub fn archive_command(&self) -> String {
        let creds = if self.s3.is_some() {
            format!("AWS_ACCESS_KEY_ID={S3_ACCESS_KEY} AWS_SECRET_ACCESS_KEY={S3_SECRET_KEY} ")
        } else {
            String::new()
        };
        format!(
            "{creds}BACKUPD_PASSWORD_FILE={} {BIN} --repo {} wal-push %p",
            self.password_file.display(),
            self.location
        )
    }

    /// initdb + start a cluster archiving into this repository.
    pub fn cluster(&self, name: &str) -> PgCluster {
        self.cluster_with(name, &self.archive_command(), "")
    }

    /// initdb + start with this archive_command and extra settings.
    pub fn cluster_with(&self, name: &str, archive_command: &str, extra: &str) -> PgCluster {
        self.cluster_initdb(name, archive_command, extra, &[])
    }

    /// As [`PgEnv::cluster_with`], with more initdb arguments (`--waldir DIR`).
    pub fn cluster_initdb(
        &self,
        name: &str,
        archive_command: &str,
        extra: &str,
        initdb_args: &[&std::ffi::OsStr],
    ) -> PgCluster {
        let base = self.path(name);
        fs::create_dir_all(base.join("data")).unwrap();
        chown_postgres(&base);
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700)).unwrap();
        let data = base.join("data");
        let out = as_postgres("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .args(initdb_args)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = replica\narchive_mode = on\narchive_command = '{}'\n\
             archive_timeout = 0\nfsync = off\ntrack_commit_timestamp = on\nmax_wal_size = 256MB\n{extra}\n",
            base.display(),
            archive_command.replace('\'', "''"),
        );
        let mut c = fs::read_to_string(data.join("postgresql.conf")).unwrap();
        c.push_str(&conf);
        fs::write(data.join("postgresql.conf"), c).unwrap();
        let cluster = PgCluster {
            data,
            port,
            log: base.join("server.log"),
        };
        cluster.start();
        cluster
    }
}

/// A running (or stopped) cluster; stopped on drop.
pub struct PgCluster {
    /// Its data directory.
    pub data: PathBuf,
    /// Its port.
    pub port: u16,
    /// Its server log.
    pub log: PathBuf,
}

impl PgCluster {
    /// A cluster someone else started (a restored one) on `data` and `port`.
    pub fn adopt(data: PathBuf, port: u16) -> PgCluster {
        let log = data.join("backupd-recovery.log");
        PgCluster { data, port, log }
    }

    /// pg_ctl start -w.
    pub fn start(&self) {
        let out = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "start"])
            .output()
            .expect("pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// pg_ctl stop -m fast.
    pub fn stop(&self) {
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .output();
    }

    /// Runs SQL with psql; returns its unaligned output (`|` between columns).
    #[track_caller]
    pub fn sql(&self, sql: &str) -> String {
        self.sql_in("postgres", sql)
    }

    /// [`PgCluster::sql`] in database `db`.
    #[track_caller]
    pub fn sql_in(&self, db: &str, sql: &str) -> String {
        let out = Command::new(Path::new(PG_BIN).join("psql"))
            .args([
                "-X",
                "-q",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-d", db])
            .arg("-c")
            .arg(sql)
            .output()
            .expect("psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A one-value query as a number.
    #[track_caller]
    pub fn count(&self, sql: &str) -> i64 {
        let v = self.sql(sql);
        v.parse()
            .unwrap_or_else(|_| panic!("{sql}: {v:?} is not a number"))
    }

    /// Switches to a new WAL segment and waits until the finished one is archived.
    #[track_caller]
    pub fn switch_and_wait_archived(&self) -> String {
        let seg = self.sql("select pg_walfile_name(pg_switch_wal())");
        self.wait_archived(&seg);
        seg
    }

    /// Waits until `segment` (or a later one) is archived.
    #[track_caller]
    pub fn wait_archived(&self, segment: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let last = self.sql("select coalesce(last_archived_wal, '') from pg_stat_archiver");
            if last.len() == 24 && last.as_str() >= segment {
                return;
            }
            // A base backup's history file (`<segment>.<offset>.backup`) is archived after
            // the segments up to its start, at least: with nothing written since, a switch
            // names a segment archived before it.
            if last.ends_with(".backup") && last.len() > 24 && &last[..24] >= segment {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{segment} not archived in 60 s (last {last:?}); log:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// pgbench with these arguments (as postgres, over TCP).
    #[track_caller]
    pub fn pgbench(&self, args: &[&str]) -> std::process::Child {
        Command::new(Path::new(PG_BIN).join("pgbench"))
            .args(["-h", "127.0.0.1", "-U", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .args(args)
            .arg("postgres")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("pgbench")
    }

    /// Runs pgbench to completion.
    #[track_caller]
    pub fn pgbench_ok(&self, args: &[&str]) {
        let out = self.pgbench(args).wait_with_output().expect("pgbench");
        assert!(
            out.status.success(),
            "pgbench {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// pg_amcheck over every database, with heap-all-indexed checks.
    #[track_caller]
    pub fn amcheck(&self) {
        let out = Command::new(Path::new(PG_BIN).join("pg_amcheck"))
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "--all",
                "--install-missing",
                "--heapallindexed",
            ])
            .arg("-p")
            .arg(self.port.to_string())
            .output()
            .expect("pg_amcheck");
        assert!(
            out.status.success(),
            "pg_amcheck: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = as_postgres("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
