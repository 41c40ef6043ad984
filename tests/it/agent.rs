//! The real binary as the resident agent: an every-minute policy runs, /metrics changes
//! after a run, SIGHUP reloads (an invalid reload keeps the old policies), and SIGTERM
//! in the middle of a backup leaves no snapshot.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::*;

pub(super) fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The value of one sample line `name{labels} value`, if present.
pub(super) fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn policy_text(repo: &Repo, pw: &Path, source: &str, schedule: &str) -> String {
    format!(
        "[repository]\nlocation = \"{}\"\npassword_file = \"{}\"\n[source]\n{source}\n[schedule]\n{schedule}\n",
        repo.location,
        pw.display()
    )
}

/// Writes `pol/db.toml`: a postgres policy for cluster `c` archiving into `env`'s
/// repository, yearly, with `extra` lines in its `[source]`.
pub(super) fn write_pg_policy(
    env: &super::pgserver::PgEnv,
    c: &super::pgserver::PgCluster,
    pol: &Path,
    extra: &str,
) {
    fs::create_dir_all(pol).unwrap();
    fs::write(
        pol.join("db.toml"),
        format!(
            "[repository]\nlocation = \"{}\"\npassword_file = \"{}\"\n[source]\ntype = \"postgres\"\ndata_directory = \"{}\"\nhost = \"127.0.0.1\"\nport = {}\nuser = \"postgres\"\n{extra}[schedule]\ncron = \"@yearly\"\n",
            env.location,
            env.password_file.display(),
            c.data.display(),
            c.port
        ),
    )
    .unwrap();
}

/// Starts `backupd agent` on policy directory `pol` with its state in `state`, metrics on a
/// free port; the process, the port, and a thread that returns its stderr once it exits.
pub(super) fn start_agent(
    pol: &Path,
    state: &Path,
) -> (Child, u16, std::thread::JoinHandle<String>) {
    let port = free_port();
    let mut agent = Command::new(BIN)
        .arg("--policies")
        .arg(pol)
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = agent.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    (agent, port, log)
}

pub(super) fn signal(child: &Child, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn the_agent_runs_schedules_reloads_on_hup_and_stops_cleanly_on_term() {
    let repo = Repo::new();
    let work = repo.scratch("agent");
    let pol = work.join("policies");
    fs::create_dir_all(&pol).unwrap();
    let src = work.join("src");
    fs::create_dir_all(&src).unwrap();
    write_random(&src.join("data"), 1 << 20);
    let pw = work.join("pw");
    fs::write(&pw, PASSWORD).unwrap();
    fs::set_permissions(&pw, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(
        pol.join("quick.toml"),
        policy_text(
            &repo,
            &pw,
            &format!("type = \"files\"\npaths = [\"{}\"]", src.display()),
            "cron = \"* * * * *\"",
        ) + "[retention]\nkeep_last = 5\n[keys]\nrotate_every = \"1s\"\n",
    )
    .unwrap();
    // A backup that takes long: a command writing for 60 s.
    fs::write(
        pol.join("slow.toml"),
        policy_text(
            &repo,
            &pw,
            "type = \"command\"\ncommand = \"echo start; sleep 60; echo end\"\nfilename = \"slow.out\"",
            "cron = \"* * * * *\"",
        ),
    )
    .unwrap();
    let port = free_port();
    let mut agent = Command::new(BIN)
        .arg("--policies")
        .arg(&pol)
        .args([
            "agent",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--shutdown-timeout",
            "1s",
        ])
        .arg("--state-dir")
        .arg(work.join("state"))
        .env_remove("BACKUPD_PASSWORD")
        .env_remove("BACKUPD_REPOSITORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = agent.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let mut r = stderr;
        let _ = r.read_to_string(&mut s);
        s
    });

    wait_for("/healthz", Duration::from_secs(30), || {
        http_get(port, "/healthz").is_some_and(|(c, b)| c == 200 && b == "ok\n")
    });
    let m = http_get(port, "/metrics").unwrap().1;
    assert_eq!(
        sample(&m, "backupd_policy_info{policy=\"quick\",source=\"files\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(
            &m,
            "backupd_policy_runs_total{policy=\"quick\",result=\"success\"}"
        ),
        Some(0.0),
        "{m}"
    );
    assert!(
        sample(
            &m,
            "backupd_policy_next_run_timestamp_seconds{policy=\"quick\"}"
        )
        .is_some(),
        "{m}"
    );
    assert_eq!(http_get(port, "/nope").unwrap().0, 404);

    // Within the next minute boundary (plus the run), quick succeeds and slow is running.
    let mut metrics = String::new();
    wait_for("a scheduled run of quick", Duration::from_secs(100), || {
        metrics = http_get(port, "/metrics").map(|r| r.1).unwrap_or_default();
        sample(
            &metrics,
            "backupd_policy_runs_total{policy=\"quick\",result=\"success\"}",
        ) >= Some(1.0)
    });
    assert!(
        sample(&metrics, "backupd_policy_last_bytes_read{policy=\"quick\"}").unwrap()
            >= (1 << 20) as f64,
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "backupd_policy_last_success_timestamp_seconds{policy=\"quick\"}"
        )
        .unwrap()
            > 0.0
    );
    assert!(
        sample(
            &metrics,
            "backupd_policy_s3_requests_total{policy=\"quick\",kind=\"put\"}"
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );
    let snaps = repo.snapshots();
    assert!(snaps.iter().any(|s| s["policy"] == "quick"), "{snaps:?}");
    // After its backup, quick's [keys] rotate_every (1s; the repository was made before
    // the first run) made the agent rotate the repository's key.
    let gen_series = format!(
        "backupd_repository_key_generation{{repository=\"{}\"}}",
        repo.location
    );
    let age_series = format!(
        "backupd_repository_key_age_seconds{{repository=\"{}\"}}",
        repo.location
    );
    wait_for("the key rotation", Duration::from_secs(30), || {
        http_get(port, "/metrics").is_some_and(|(_, m)| sample(&m, &gen_series) >= Some(2.0))
    });
    let m = http_get(port, "/metrics").unwrap().1;
    assert!(sample(&m, &age_series).is_some_and(|a| a < 120.0), "{m}");
    let keys = repo.ok(&["key", "list", "--json"]).json();
    assert!(keys["generations"].as_array().unwrap().len() >= 2, "{keys}");
    wait_for("slow to be running", Duration::from_secs(30), || {
        http_get(port, "/metrics").is_some_and(|(_, m)| {
            sample(&m, "backupd_policy_running{policy=\"slow\"}") == Some(1.0)
        })
    });

    // SIGHUP with a new policy: it appears.
    fs::write(
        pol.join("yearly.toml"),
        policy_text(
            &repo,
            &pw,
            &format!("type = \"files\"\npaths = [\"{}\"]", src.display()),
            "cron = \"@yearly\"",
        ),
    )
    .unwrap();
    signal(&agent, "HUP");
    wait_for("the reloaded policy", Duration::from_secs(20), || {
        http_get(port, "/metrics").is_some_and(|(_, m)| {
            sample(
                &m,
                "backupd_policy_info{policy=\"yearly\",source=\"files\"}",
            ) == Some(1.0)
                && sample(&m, "backupd_agent_reloads_total{result=\"success\"}") == Some(1.0)
        })
    });
    // An invalid reload keeps the old policies.
    fs::write(pol.join("broken.toml"), "[repository]\nlocation = 5\n").unwrap();
    signal(&agent, "HUP");
    wait_for("the refused reload", Duration::from_secs(20), || {
        http_get(port, "/metrics").is_some_and(|(_, m)| {
            sample(&m, "backupd_agent_reloads_total{result=\"failure\"}") == Some(1.0)
        })
    });
    let m = http_get(port, "/metrics").unwrap().1;
    assert_eq!(
        sample(
            &m,
            "backupd_policy_info{policy=\"yearly\",source=\"files\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &m,
            "backupd_policy_info{policy=\"slow\",source=\"command\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "backupd_policy_running{policy=\"slow\"}"),
        Some(1.0),
        "slow still running"
    );

    // SIGTERM while slow runs: it is stopped after the 1 s shutdown timeout, no snapshot.
    let t0 = Instant::now();
    signal(&agent, "TERM");
    let status = loop {
        if let Some(s) = agent.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "the agent did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = log.join().unwrap();
    assert!(status.success(), "{status}\n{log}");
    assert!(
        t0.elapsed() < Duration::from_secs(30),
        "stopped in {:?}",
        t0.elapsed()
    );
    let snaps = repo.snapshots();
    assert!(
        !snaps.iter().any(|s| s["policy"] == "slow"),
        "no partial snapshot: {snaps:?}"
    );
    repo.ok(&["check"]);

    // Logs are JSON lines (not a terminal), name policies, and the refused reload says why.
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["fields"]["policy"] == "quick"),
        "{log}"
    );
    assert!(
        log.contains("reload refused") && log.contains("broken.toml"),
        "{log}"
    );
    assert!(log.contains("no snapshot is written"), "{log}");
    assert!(
        !log.contains(PASSWORD),
        "the password never appears in logs"
    );
    // The state file remembers what ran (catch-up after a restart).
    let state = fs::read_to_string(work.join("state/agent-state.json")).unwrap();
    assert!(
        state.contains("\"quick\"") && state.contains("last_success"),
        "{state}"
    );
}

#[test]
fn a_postgres_policy_reports_its_wal_archive_lag() {
    use super::pgserver::PgEnv;
    let env = PgEnv::new();
    // An archive_command that always fails: segments pile up unarchived.
    let c = env.cluster_with("main", "false", "");
    c.sql("create table t(i int)");
    for _ in 0..3 {
        c.sql("insert into t select generate_series(1, 1000)");
        c.sql("select pg_switch_wal()");
    }
    wait_for("the archiver to fail", Duration::from_secs(60), || {
        c.sql("select last_failed_wal is not null from pg_stat_archiver") == "t"
    });
    let work = env.path("agent");
    let pol = work.join("policies");
    write_pg_policy(&env, &c, &pol, "");
    let port = free_port();
    let mut agent = Command::new(BIN)
        .arg("--policies")
        .arg(&pol)
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(work.join("state"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut m = String::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        m = http_get(port, "/metrics").map(|r| r.1).unwrap_or_default();
        if sample(&m, "backupd_wal_archive_failing{policy=\"db\"}").is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    signal(&agent, "TERM");
    let _ = agent.wait();
    assert_eq!(
        sample(&m, "backupd_wal_archive_failing{policy=\"db\"}"),
        Some(1.0),
        "{m}"
    );
    // Every complete segment since initdb's first (number 1) is pending.
    let current = c.sql("select pg_walfile_name(pg_current_wal_lsn())");
    let number = u64::from_str_radix(&current[16..], 16).unwrap();
    assert!(number >= 3, "{current}");
    let pending = sample(&m, "backupd_wal_archive_pending_segments{policy=\"db\"}").unwrap();
    assert_eq!(pending, (number - 1) as f64, "{current}\n{m}");
    // Nothing was ever archived: no last-archived time, so no age to report.
    assert_eq!(
        sample(
            &m,
            "backupd_wal_last_archived_timestamp_seconds{policy=\"db\"}"
        ),
        None,
        "{m}"
    );
    assert_eq!(
        sample(&m, "backupd_wal_archive_lag_seconds{policy=\"db\"}"),
        None,
        "{m}"
    );
}

/// Starts the agent with no policies on a free port (under `prlimit --nofile=N:N` when
/// given) and waits for /healthz.
fn idle_agent(work: &Path, nofile: Option<u32>) -> (Child, u16) {
    let pol = work.join("policies");
    fs::create_dir_all(&pol).unwrap();
    let port = free_port();
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("prlimit");
            c.arg(format!("--nofile={n}:{n}")).arg("--").arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let agent = cmd
        .arg("--policies")
        .arg(&pol)
        .args(["agent", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(work.join("state"))
        .env_remove("BACKUPD_PASSWORD")
        .env_remove("BACKUPD_REPOSITORY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("/healthz", Duration::from_secs(30), || {
        http_get(port, "/healthz").is_some_and(|(c, _)| c == 200)
    });
    (agent, port)
}

/// `GET /healthz` answered with 200 within `within` (the agent holds an idle connection
/// 5 s; answering only after that would mean idle connections shut it out).
fn healthz_within(port: u16, within: Duration) -> Result<(), String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(within))
        .map_err(|e| e.to_string())?;
    write!(s, "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n").map_err(|e| e.to_string())?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("{e} after {within:?}"))?;
    if buf.starts_with("HTTP/1.1 200") && buf.ends_with("ok\n") {
        Ok(())
    } else {
        Err(format!("answer {buf:?}"))
    }
}

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    ticks as f64 / hz
}

fn connect_idle(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect()
}

#[test]
fn healthz_answers_with_200_idle_connections_open() {
    let work = tempfile::tempdir().unwrap();
    // 128 descriptors: fewer than 200 connections, more than the agent holds at once.
    let (mut agent, port) = idle_agent(work.path(), Some(128));
    let idle = connect_idle(port, 200);
    std::thread::sleep(Duration::from_millis(300));
    let r = healthz_within(port, Duration::from_secs(3));
    let _ = agent.kill();
    let _ = agent.wait();
    drop(idle);
    r.unwrap();
}

#[test]
fn metrics_does_not_spin_when_file_descriptors_run_out() {
    let work = tempfile::tempdir().unwrap();
    let (mut agent, port) = idle_agent(work.path(), None);
    let pid = agent.id();
    // Leave the agent a few descriptors beyond what it has open, then take them with
    // idle connections: accept fails (EMFILE) while more connections wait.
    let open = fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let limit = open + 6;
    let st = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let idle = connect_idle(port, 100);
    std::thread::sleep(Duration::from_millis(500));
    let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(2));
    let share = (cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    // Once the idle connections close, /healthz answers again.
    drop(idle);
    let mut answered = false;
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_secs(30) && !answered {
        answered = healthz_within(port, Duration::from_secs(10)).is_ok();
    }
    let _ = agent.kill();
    let _ = agent.wait();
    // A busy loop on accept errors takes a whole core; backing off takes next to none.
    assert!(
        share < 0.3,
        "the agent used {:.0}% of a core while out of file descriptors",
        share * 100.0
    );
    assert!(
        answered,
        "/healthz did not answer after the idle connections closed"
    );
}

#[test]
fn a_quiet_server_with_archive_timeout_0_is_named_and_its_rpo_bound_passes_the_objective() {
    use super::pgserver::PgEnv;
    let env = PgEnv::new();
    // Archiving into the repository with backupd wal-push, archive_timeout = 0 (the
    // PostgreSQL default, as the test clusters are made).
    let c = env.cluster("main");
    assert_eq!(c.sql("show archive_timeout"), "0");
    c.sql("select pg_switch_wal()");
    wait_for("a first archived segment", Duration::from_secs(60), || {
        c.sql("select last_archived_wal is not null from pg_stat_archiver") == "t"
    });
    // A base backup says the setting cannot meet its --rpo (and takes the old flag name,
    // with a warning).
    let out = env
        .cmd()
        .args([
            "backup",
            "--postgres",
            "--pg-host",
            "127.0.0.1",
            "--pg-user",
            "postgres",
            "--rpo",
            "2s",
            "--archive-timeout",
            "60",
        ])
        .arg("--pg-port")
        .arg(c.port.to_string())
        .run()
        .ok();
    assert!(
        out.stderr.contains("archive_timeout is 0")
            && out.stderr.contains("--archive-timeout is deprecated"),
        "{}",
        out.describe()
    );
    // One commit, then quiet: it stays in the segment being written.
    c.sql("create table t(i int); insert into t values (1)");
    let work = env.path("agent");
    let pol = work.join("policies");
    write_pg_policy(&env, &c, &pol, "rpo = \"2s\"\narchive_timeout = \"90s\"\n");
    // policy check stays offline unless asked; --online names the setting; --strict
    // makes it an error. The old key name is accepted, with a warning.
    let offline = backupd().args(["policy", "check"]).arg(&pol).run().ok();
    assert!(
        !offline.stderr.contains("archive_timeout is 0"),
        "{}",
        offline.describe()
    );
    assert!(
        offline
            .stderr
            .contains("source.archive_timeout is deprecated"),
        "{}",
        offline.describe()
    );
    let online = backupd()
        .args(["policy", "check", "--online"])
        .arg(&pol)
        .run()
        .ok();
    assert!(
        online.stderr.contains("archive_timeout is 0") && online.stderr.contains("rpo is 2s"),
        "{}",
        online.describe()
    );
    backupd()
        .args(["policy", "check", "--online", "--strict"])
        .arg(&pol)
        .run()
        .expect(1);
    // A server that cannot be reached is said to be so, not passed.
    let down = pol.join("down.toml");
    fs::write(
        &down,
        fs::read_to_string(pol.join("db.toml")).unwrap().replace(
            &format!("port = {}", c.port),
            &format!("port = {}", free_port()),
        ),
    )
    .unwrap();
    let out = backupd()
        .args(["policy", "check", "--online"])
        .arg(&down)
        .run()
        .ok();
    assert!(
        out.stderr.contains("cannot check the server (not a pass)"),
        "{}",
        out.describe()
    );
    fs::remove_file(&down).unwrap();
    // Quiet for a while: the commit's age is what the bound must cover.
    std::thread::sleep(Duration::from_secs(3));

    let (mut agent, port, log) = start_agent(&pol, &work.join("state"));
    let mut m = String::new();
    wait_for("the first WAL poll", Duration::from_secs(30), || {
        m = http_get(port, "/metrics").map(|r| r.1).unwrap_or_default();
        sample(&m, "backupd_wal_rpo_seconds{policy=\"db\"}").is_some()
    });
    signal(&agent, "TERM");
    let _ = agent.wait();
    let log = log.join().unwrap();
    // Nothing complete is pending, so the old metric says 0 ...
    assert_eq!(
        sample(&m, "backupd_wal_archive_pending_segments{policy=\"db\"}"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "backupd_wal_archive_lag_seconds{policy=\"db\"}"),
        Some(0.0),
        "{m}"
    );
    // ... while the commit in the segment being written is not in the repository: the
    // bound is above the objective, and the alert condition holds.
    let rpo = sample(&m, "backupd_wal_rpo_seconds{policy=\"db\"}").unwrap();
    let objective = sample(&m, "backupd_policy_rpo_objective_seconds{policy=\"db\"}").unwrap();
    assert_eq!(objective, 2.0, "{m}");
    assert!(rpo > objective, "rpo {rpo} <= objective {objective}\n{m}");
    assert!(log.contains("archive_timeout is 0"), "{log}");
}
