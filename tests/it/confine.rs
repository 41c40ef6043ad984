//! A restore never writes outside its target, against real PostgreSQL 15 clusters run as
//! root: a `pg_wal` that is a symlink to the source's WAL directory, links planted in the
//! data directory, a configuration in the snapshot that names commands and libraries, the
//! repository password kept out of the restored server's environment, `%` in a repository
//! path, and stale-looking scratch directories pointing at a live cluster.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::common::{free_port, Repo, Run};
use super::pgserver::{PgCluster, PgEnv};

fn backup(env: &PgEnv, c: &PgCluster) {
    super::pg::backup(env, c, &[]);
}

/// A table with `rows` rows, a base backup, `more` rows after it, and the segment holding
/// them archived.
fn rows_backup_more(env: &PgEnv, c: &PgCluster, rows: i32, more: i32) {
    c.sql(&format!(
        "create table t as select g from generate_series(1, {rows}) g"
    ));
    backup(env, c);
    c.sql(&format!(
        "insert into t select g from generate_series(1, {more}) g"
    ));
    c.switch_and_wait_archived();
}

/// Every file under `dir` (not following links): path -> (mode, size, mtime, sha256).
fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, (u32, u64, i64, String)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let sum = if m.is_file() {
                backupd::repo::sha256_hex(&fs::read(&p).unwrap())
            } else {
                String::new()
            };
            if m.is_dir() {
                stack.push(p.clone());
            }
            out.insert(
                p,
                (
                    m.mode(),
                    m.len(),
                    m.mtime_nsec() + m.mtime() * 1_000_000_000,
                    sum,
                ),
            );
        }
    }
    out
}

fn restore_start(env: &PgEnv, target: &Path, extra: &[&str]) -> (PgCluster, String) {
    restore_start_with(env.cmd(), target, extra)
}

/// `restore --at latest --start` into `target` on a free port, run as `run` says.
fn restore_start_with(run: Run, target: &Path, extra: &[&str]) -> (PgCluster, String) {
    let port = free_port();
    let out = run
        .args(["restore", "--at", "latest", "--start"])
        .arg("--target")
        .arg(target)
        .arg("--pg-port")
        .arg(port.to_string())
        .args(extra)
        .run()
        .ok();
    (PgCluster::adopt(target.to_path_buf(), port), out.all_text())
}

#[test]
fn a_symlinked_pg_wal_is_restored_as_a_directory_and_no_restore_touches_the_source_wal() {
    let env = PgEnv::new();
    let src_wal = env.path("src-wal");
    let c = env.cluster_initdb(
        "src",
        &env.archive_command(),
        "",
        &[OsStr::new("--waldir"), src_wal.as_os_str()],
    );
    assert!(fs::symlink_metadata(c.data.join("pg_wal"))
        .unwrap()
        .file_type()
        .is_symlink());
    rows_backup_more(&env, &c, 1000, 234);
    // The source stops cleanly: from here on nothing may change its WAL directory.
    c.stop();
    let before = fingerprint(&src_wal);
    assert!(before.len() > 2, "{before:?}");

    // The snapshot holds pg_wal as a directory.
    let ls = env.cmd().args(["ls", "latest"]).run().ok().stdout();
    assert!(
        ls.lines().any(|l| l == "/pg_wal/"),
        "pg_wal is a directory:\n{ls}"
    );
    assert!(!ls.contains("/pg_wal ->"), "{ls}");

    let (r, _) = restore_start(&env, &env.path("restored"), &[]);
    assert!(fs::symlink_metadata(r.data.join("pg_wal"))
        .unwrap()
        .is_dir());
    assert_eq!(r.count("select count(*) from t"), 1234);
    r.stop();
    drop(r);
    assert_eq!(
        fingerprint(&src_wal),
        before,
        "restore --start changed the source's WAL"
    );

    // --waldir: the WAL directory elsewhere on purpose.
    let wal2 = env.path("restored-wal");
    let wal2_s = wal2.display().to_string();
    let (r2, _) = restore_start(&env, &env.path("restored2"), &["--waldir", &wal2_s]);
    assert_eq!(fs::read_link(r2.data.join("pg_wal")).unwrap(), wal2);
    let m = fs::metadata(&wal2).unwrap();
    assert_eq!(m.mode() & 0o777, 0o700);
    assert_eq!(
        m.uid(),
        fs::metadata(r2.data.join("PG_VERSION")).unwrap().uid()
    );
    assert_eq!(r2.count("select count(*) from t"), 1234);
    // The promoted copy writes its new timeline's WAL there.
    let tl2 = fs::read_dir(&wal2)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("00000002"));
    assert!(tl2, "no timeline 2 WAL in {}", wal2.display());
    r2.stop();
    drop(r2);

    // The monthly restore test, as root, on the same host.
    let scratch = env.path("scratch");
    let v = env
        .cmd()
        .args(["verify", "--restore-test", "--json", "--scratch"])
        .arg(&scratch)
        .run()
        .ok()
        .json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(
        fingerprint(&src_wal),
        before,
        "verify changed the source's WAL"
    );
}

#[test]
fn links_in_the_data_directory_are_replaced_and_what_they_point_at_is_untouched() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    // The database's OS user plants links to files it could not touch itself.
    let victims = env.path("victims");
    fs::create_dir_all(victims.join("dir")).unwrap();
    for v in ["auto", "log"] {
        fs::write(victims.join(v), format!("{v} belongs to root\n")).unwrap();
        fs::set_permissions(victims.join(v), fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::os::unix::fs::chown(&victims, Some(0), Some(0)).unwrap();
    fs::remove_file(c.data.join("postgresql.auto.conf")).unwrap();
    std::os::unix::fs::symlink(victims.join("auto"), c.data.join("postgresql.auto.conf")).unwrap();
    std::os::unix::fs::symlink(victims.join("log"), c.data.join("backupd-recovery.log")).unwrap();
    fs::remove_dir(c.data.join("pg_replslot")).unwrap();
    std::os::unix::fs::symlink(victims.join("dir"), c.data.join("pg_replslot")).unwrap();
    let before = fingerprint(&victims);
    let owners: Vec<u32> = ["auto", "log"]
        .iter()
        .map(|v| fs::metadata(victims.join(v)).unwrap().uid())
        .collect();
    rows_backup_more(&env, &c, 10, 5);

    let (r, out) = restore_start(&env, &env.path("restored"), &[]);
    assert_eq!(r.count("select count(*) from t"), 15);
    for f in ["postgresql.auto.conf", "backupd-recovery.log"] {
        assert!(
            fs::symlink_metadata(r.data.join(f)).unwrap().is_file(),
            "{f} is a regular file in the copy"
        );
    }
    assert!(fs::symlink_metadata(r.data.join("pg_replslot"))
        .unwrap()
        .is_dir());
    assert!(
        out.contains("postgresql.auto.conf"),
        "a warning names it:\n{out}"
    );
    r.stop();
    assert_eq!(fingerprint(&victims), before);
    let after: Vec<u32> = ["auto", "log"]
        .iter()
        .map(|v| fs::metadata(victims.join(v)).unwrap().uid())
        .collect();
    assert_eq!(
        after, owners,
        "no file outside was given to the cluster's owner"
    );
}

#[test]
fn a_started_copy_runs_no_command_and_loads_no_library_its_configuration_names() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    let pwned = env.path("pwned");
    fs::create_dir_all(&pwned).unwrap();
    std::os::unix::fs::chown(&pwned, Some(0), Some(0)).unwrap();
    fs::set_permissions(&pwned, fs::Permissions::from_mode(0o777)).unwrap();
    // Read at the next start only (the running source is not reloaded): the copy's
    // configuration asks for commands and a library of its choosing.
    let mut conf = fs::read_to_string(c.data.join("postgresql.conf")).unwrap();
    conf.push_str(&format!(
        "archive_command = 'touch {p}/archive-%f'\nrecovery_end_command = 'touch {p}/end'\n\
         shared_preload_libraries = 'pg_stat_statements'\n",
        p = pwned.display()
    ));
    fs::write(c.data.join("postgresql.conf"), conf).unwrap();
    rows_backup_more(&env, &c, 10, 5);

    let (r, out) = restore_start(&env, &env.path("restored"), &[]);
    // The promoted copy archives its timeline history and a switched segment: with the
    // archive_command backupd gave it, into the repository.
    let seg = r.sql("select pg_walfile_name(pg_switch_wal())");
    r.wait_archived(&seg);
    let ran: Vec<_> = fs::read_dir(&pwned).unwrap().collect();
    assert!(ran.is_empty(), "commands from the snapshot ran: {ran:?}");
    assert_eq!(r.sql("show shared_preload_libraries"), "");
    assert!(r.sql("show archive_command").contains("wal-push"));
    assert!(out.contains("shared_preload_libraries"), "{out}");
    r.stop();
    let sysid_dirs: Vec<_> = fs::read_dir(env.repo.join("wal")).unwrap().collect();
    assert_eq!(sysid_dirs.len(), 1);
    let wal = sysid_dirs.into_iter().next().unwrap().unwrap().path();
    assert!(wal.join("00000002.history").exists(), "{}", wal.display());

    let v = env
        .cmd()
        .args(["verify", "--restore-test", "--json", "--scratch"])
        .arg(env.path("scratch"))
        .run()
        .ok()
        .json();
    assert_eq!(v["ok"], true, "{v}");
    let ran: Vec<_> = fs::read_dir(&pwned).unwrap().collect();
    assert!(ran.is_empty(), "commands from the snapshot ran: {ran:?}");
}

fn environ(pid: &str) -> String {
    String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/environ")).unwrap()).into_owned()
}

#[test]
fn a_password_from_the_environment_never_reaches_the_restored_servers_environment() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    rows_backup_more(&env, &c, 10, 5);
    let password = fs::read_to_string(&env.password_file).unwrap();
    let password = password.trim();
    let with_env = || {
        env.cmd()
            .env_remove("BACKUPD_PASSWORD_FILE")
            .env("BACKUPD_PASSWORD", password)
    };

    // Started by backupd: the password goes to a 0600 file for recovery, removed after.
    let target = env.path("restored");
    let (r, out) = restore_start_with(with_env(), &target, &["--archive-mode", "off"]);
    let pid = fs::read_to_string(target.join("postmaster.pid")).unwrap();
    let pid = pid.lines().next().unwrap().to_string();
    let e = environ(&pid);
    assert!(!e.contains("BACKUPD_PASSWORD="), "{e}");
    assert!(!e.contains(password));
    assert_eq!(r.count("select count(*) from t"), 15);
    assert!(out.contains("backupd-recovery.password"), "{out}");
    assert!(!target.join("backupd-recovery.password").exists());
    r.stop();
    drop(r);

    // Without --start: the file stays for the server the user starts, and recovery's
    // end removes it.
    let target = env.path("restored2");
    with_env()
        .args(["restore", "--at", "latest", "--archive-mode", "off"])
        .arg("--target")
        .arg(&target)
        .run()
        .ok();
    let pwf = target.join("backupd-recovery.password");
    let m = fs::symlink_metadata(&pwf).unwrap();
    assert_eq!(m.mode() & 0o777, 0o600);
    assert_eq!(
        m.uid(),
        fs::metadata(target.join("PG_VERSION")).unwrap().uid()
    );
    let r = PgCluster {
        data: target.clone(),
        port: free_port(),
        log: env.path("restored2.log"),
    };
    let mut conf = fs::OpenOptions::new()
        .append(true)
        .open(target.join("postgresql.conf"))
        .unwrap();
    std::io::Write::write_all(
        &mut conf,
        format!("port = {}\nunix_socket_directories = ''\n", r.port).as_bytes(),
    )
    .unwrap();
    drop(conf);
    // postgresql.auto.conf sets the port backupd chose (none here): ours is in
    // postgresql.conf, which auto.conf would override, so take it out of there.
    let auto = fs::read_to_string(target.join("postgresql.auto.conf")).unwrap();
    let auto: String = auto
        .lines()
        .filter(|l| !l.starts_with("port"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(target.join("postgresql.auto.conf"), auto).unwrap();
    r.start();
    let deadline = Instant::now() + Duration::from_secs(60);
    while r.sql("select pg_is_in_recovery()") != "f" {
        assert!(Instant::now() < deadline, "not promoted");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(r.count("select count(*) from t"), 15);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pwf.exists() {
        assert!(
            Instant::now() < deadline,
            "recovery_end_command did not remove it"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn percent_signs_in_the_repository_path_restore_and_control_characters_are_refused() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    rows_backup_more(&env, &c, 10, 5);
    c.stop();
    // The same repository under a name PostgreSQL would expand (%p) and one that cannot
    // go into a setting at all.
    let odd = env.path("re%ppo");
    fs::rename(&env.repo, &odd).unwrap();
    let run = super::common::backupd()
        .arg("--repo")
        .arg(&odd)
        .env("BACKUPD_PASSWORD_FILE", &env.password_file);
    let (r, _) = restore_start_with(run, &env.path("restored"), &["--archive-mode", "off"]);
    assert_eq!(r.count("select count(*) from t"), 15);
    r.stop();
    let bad = env.path("re\npo");
    fs::rename(&odd, &bad).unwrap();
    let target = env.path("restored-bad");
    super::common::backupd()
        .arg("--repo")
        .arg(&bad)
        .env("BACKUPD_PASSWORD_FILE", &env.password_file)
        .args(["restore", "--at", "latest"])
        .arg("--target")
        .arg(&target)
        .run()
        .expect(1)
        .stderr_has("control character");
    assert!(!target.exists(), "nothing restored");
}

#[test]
fn stale_looking_scratch_directories_are_left_alone_and_the_live_server_keeps_running() {
    let env = PgEnv::new();
    let live = env.cluster("live");
    // A local user points "left-over" scratch directories (old and new naming) at the
    // directory holding the live cluster's data, named as a restore test names it.
    let scratch = env.path("scratch");
    fs::create_dir_all(&scratch).unwrap();
    fs::set_permissions(&scratch, fs::Permissions::from_mode(0o1777)).unwrap();
    let decoy = env.path("decoy");
    fs::create_dir_all(&decoy).unwrap();
    std::os::unix::fs::symlink(&live.data, decoy.join("restore")).unwrap();
    for name in [
        "backupd-verify-4000000-1",
        "backupd-verify-00112233445566778899aabb",
    ] {
        std::os::unix::fs::symlink(&decoy, scratch.join(name)).unwrap();
    }
    // And a real directory of another user, with a marker naming a dead process.
    let other = scratch.join("backupd-verify-aabbccddeeff001122334455");
    fs::create_dir_all(&other).unwrap();
    std::os::unix::fs::symlink(&live.data, other.join("restore")).unwrap();
    fs::write(other.join("backupd-verify.owner"), "4000000 1\n").unwrap();
    fs::set_permissions(&other, fs::Permissions::from_mode(0o711)).unwrap();
    std::os::unix::fs::lchown(&other, Some(1), Some(1)).unwrap();

    let repo = Repo::new();
    let src = repo.scratch("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    repo.backup(&[src.to_str().unwrap()]);
    let v = repo
        .cmd()
        .args(["verify", "--restore-test", "--json", "--scratch"])
        .arg(&scratch)
        .run()
        .ok()
        .json();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(live.count("select 1"), 1, "the live server was stopped");
    for name in [
        "backupd-verify-4000000-1",
        "backupd-verify-00112233445566778899aabb",
    ] {
        assert!(
            fs::symlink_metadata(scratch.join(name)).is_ok(),
            "{name} removed"
        );
    }
    assert!(other.join("backupd-verify.owner").exists());
    assert!(live.data.join("PG_VERSION").exists());
    // Only the three planted entries remain: the test's own directory is gone.
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 3);
}

#[test]
fn a_tablespace_created_after_the_base_backup_is_refused_before_replay_can_remove_the_live_one() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    rows_backup_more(&env, &c, 10, 5);
    // After the base backup: a tablespace on this host, in use.
    let ts = env.path("ts-live");
    fs::create_dir_all(&ts).unwrap();
    std::process::Command::new("chown")
        .arg("postgres:postgres")
        .arg(&ts)
        .status()
        .unwrap();
    c.sql(&format!(
        "create tablespace tslive location '{}'",
        ts.display()
    ));
    c.sql("create table tl tablespace tslive as select generate_series(1, 100) g");
    c.switch_and_wait_archived();
    let before = fingerprint(&ts);
    assert!(!before.is_empty());

    let target = env.path("restored");
    env.cmd()
        .args(["restore", "--at", "latest", "--start", "--target"])
        .arg(&target)
        .arg("--pg-port")
        .arg(free_port().to_string())
        .run()
        .expect(1)
        .stderr_has("creates tablespace");
    assert!(!target.exists(), "refused before anything was written");
    let v = env
        .cmd()
        .args(["verify", "--restore-test", "--json", "--scratch"])
        .arg(env.path("scratch"))
        .run()
        .expect(1)
        .json();
    assert_eq!(v["ok"], false, "{v}");
    assert!(v.to_string().contains("creates tablespace"), "{v}");
    assert_eq!(fingerprint(&ts), before, "the live tablespace was touched");
    assert_eq!(c.count("select count(*) from tl"), 100);
}

#[test]
fn links_leading_out_of_the_data_directory_stop_a_start_and_a_restart_uses_the_configuration() {
    let env = PgEnv::new();
    let c = env.cluster("src");
    let elsewhere = env.path("elsewhere");
    fs::create_dir_all(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, c.data.join("extra-link")).unwrap();
    rows_backup_more(&env, &c, 10, 5);
    let target = env.path("restored");
    env.cmd()
        .args([
            "restore",
            "--at",
            "latest",
            "--start",
            "--archive-mode",
            "off",
            "--target",
        ])
        .arg(&target)
        .arg("--pg-port")
        .arg(free_port().to_string())
        .run()
        .expect(1)
        .stderr_has("extra-link");
    assert!(
        fs::symlink_metadata(target.join("postmaster.pid")).is_err(),
        "not started"
    );
    fs::remove_file(c.data.join("extra-link")).unwrap();
    backup(&env, &c);
    c.sql("insert into t values (1)");
    c.switch_and_wait_archived();
    let (r, _) = restore_start(&env, &env.path("restored2"), &["--archive-mode", "off"]);
    // backupd's command-line settings hold for this run only: a restart starts from the
    // configuration files.
    let opts = fs::read_to_string(r.data.join("postmaster.opts")).unwrap();
    // postmaster.opts quotes each argument; a temp dir name may itself hold "-c".
    assert!(!opts.contains("\"-c\""), "{opts}");
    assert!(opts.contains("\"-D\""), "{opts}");
    r.stop();
}
