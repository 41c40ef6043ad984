//! Policies and retention through the real binary: `policy check` on the shipped examples
//! and on the invalid fixtures (exact messages), `backup --policy` with hooks, and
//! `forget` with restic's keep-* rules.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::common::*;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A copy of `policies/*.toml` in `<tmp>/policies`, with the secrets they name created in
/// `<tmp>/secrets` (mode 0600), as /etc/backupd would hold them.
pub struct PolicyDir {
    pub dir: tempfile::TempDir,
}

impl PolicyDir {
    pub fn examples() -> PolicyDir {
        let dir = tempfile::tempdir().unwrap();
        let pol = dir.path().join("policies");
        let sec = dir.path().join("secrets");
        fs::create_dir_all(&pol).unwrap();
        fs::create_dir_all(&sec).unwrap();
        for e in fs::read_dir(repo_root().join("policies")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                fs::copy(&p, pol.join(p.file_name().unwrap())).unwrap();
            }
        }
        for (name, text) in [
            ("repo.password", PASSWORD.to_string()),
            ("pg.password", "unused".to_string()),
            (
                "aws-credentials",
                "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = example\n"
                    .to_string(),
            ),
        ] {
            let f = sec.join(name);
            fs::write(&f, text).unwrap();
            fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        }
        PolicyDir { dir }
    }

    pub fn policies(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    pub fn secret(&self, name: &str) -> PathBuf {
        self.dir.path().join("secrets").join(name)
    }

    /// Points the FinNexusAI example at a test cluster and its repository (as shipped
    /// otherwise).
    pub fn point_finnexus_at(
        &self,
        env: &super::pgserver::PgEnv,
        cluster: &super::pgserver::PgCluster,
    ) {
        let pw = env.password_file.display().to_string();
        self.edit("finnexusai-postgres.toml", |doc| {
            doc["repository"]["location"] = toml_edit::value(env.location.clone());
            doc["repository"]["password_file"] = toml_edit::value(pw);
            doc["source"]["data_directory"] = toml_edit::value(cluster.data.display().to_string());
            doc["source"]["host"] = toml_edit::value("127.0.0.1");
            doc["source"]["port"] = toml_edit::value(cluster.port as i64);
            doc["source"]["database"] = toml_edit::value("postgres");
        });
    }

    /// Rewrites one policy file with `edit` (a parsed, editable document).
    pub fn edit(&self, file: &str, edit: impl FnOnce(&mut toml_edit::DocumentMut)) {
        let path = self.policies().join(file);
        let mut doc: toml_edit::DocumentMut = fs::read_to_string(&path).unwrap().parse().unwrap();
        edit(&mut doc);
        fs::write(&path, doc.to_string()).unwrap();
    }
}

#[test]
fn every_example_policy_validates_and_world_readable_secrets_are_refused() {
    let d = PolicyDir::examples();
    let n = fs::read_dir(d.policies()).unwrap().count();
    assert!(n >= 5, "one example per seed procedure at least, found {n}");
    let out = backupd()
        .args(["policy", "check"])
        .arg(d.policies())
        .run()
        .ok();
    assert!(
        out.stdout().contains(&format!("{n} policies valid")),
        "{}",
        out.describe()
    );
    // The same through --policies and --json.
    let out = backupd()
        .arg("--policies")
        .arg(d.policies())
        .args(["policy", "check", "--json"])
        .run()
        .ok();
    let v = out.json();
    assert_eq!(v["valid"], Value::Bool(true));
    assert_eq!(v["policies"].as_array().unwrap().len(), n);

    fs::set_permissions(d.secret("repo.password"), fs::Permissions::from_mode(0o644)).unwrap();
    let out = backupd()
        .args(["policy", "check"])
        .arg(d.policies())
        .run()
        .expect(1);
    assert!(
        out.stderr.contains("repository.password_file: expected a secret file that only its owner can write and other users cannot read (chmod 600 it, or chmod 640 to share it read-only with its group), found")
            && out.stderr.contains("mode 0644"),
        "{}",
        out.describe()
    );
}

#[test]
fn invalid_policies_produce_exactly_their_expected_errors() {
    let dir = repo_root().join("policies/invalid");
    let mut seen = 0;
    let mut names: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    names.sort();
    for p in names {
        let file = p.file_name().unwrap().to_string_lossy().into_owned();
        let expected_path = p.with_extension("expected");
        let expected = fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let out = backupd()
            .current_dir(&dir)
            .args(["policy", "check", &file])
            .run()
            .expect(1);
        assert_eq!(
            out.stderr,
            expected,
            "policy check {file}:\n{}",
            out.describe()
        );
        assert!(out.stdout().is_empty(), "{}", out.describe());
        seen += 1;
    }
    assert!(seen >= 8, "only {seen} invalid fixtures");
}

#[test]
fn a_directory_with_one_bad_file_reports_all_files_problems() {
    let d = tempfile::tempdir().unwrap();
    fs::write(
        d.path().join("a.toml"),
        "[repository]\nlocation = \"relative/dir\"\npassword_env = \"PW\"\n[source]\ntype = \"files\"\npaths = [\"/etc\"]\n",
    )
    .unwrap();
    fs::write(
        d.path().join("b.toml"),
        "name = \"a\"\n[repository]\nlocation = \"/r\"\npassword_env = \"PW\"\n[source]\ntype = \"files\"\npaths = [\"/etc\"]\n[schedule]\ncron = \"0 2 * * *\"\ntimezone = \"Europe/Nowhere\"\n",
    )
    .unwrap();
    let out = backupd()
        .args(["policy", "check"])
        .arg(d.path())
        .run()
        .expect(1);
    let a = d.path().join("a.toml").display().to_string();
    let b = d.path().join("b.toml").display().to_string();
    assert!(
        out.stderr.contains(&format!(
            "{a}:2: repository.location: expected an absolute directory or an s3: location, found \"relative/dir\""
        )),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains(&format!(
            "{b}:10: schedule.timezone: expected an IANA time zone name"
        )),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("2 problems in 2 files"),
        "{}",
        out.describe()
    );
}

fn write_policy(dir: &Path, name: &str, body: &str) {
    fs::create_dir_all(dir).unwrap();
    fs::write(dir.join(format!("{name}.toml")), body).unwrap();
}

#[test]
fn backup_policy_runs_hooks_around_the_backup_and_records_the_policy() {
    let repo = Repo::new();
    let tmp = repo.scratch("work");
    let src = tmp.join("src");
    fs::create_dir_all(src.join("cache")).unwrap();
    fs::write(src.join("app.conf"), b"listen = 8080\n").unwrap();
    fs::write(src.join("cache/big.tmp"), vec![7u8; 1000]).unwrap();
    let pol = tmp.join("policies");
    let log = tmp.join("hooks.log");
    let pwfile = tmp.join("pw");
    fs::write(&pwfile, PASSWORD).unwrap();
    fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).unwrap();
    let body = |pre: &str| {
        format!(
            r#"tags = ["nightly", "app"]
[repository]
location = "{repo}"
password_file = "{pw}"
[source]
type = "files"
paths = ["{src}"]
exclude = ["*.tmp"]
[hooks]
pre = ["{pre}"]
post = ["echo post $BACKUPD_POLICY $BACKUPD_RESULT $BACKUPD_SNAPSHOT >> {log}"]
on_failure = ["echo failed $BACKUPD_RESULT >> {log}"]
"#,
            repo = repo.location,
            pw = pwfile.display(),
            src = src.display(),
            log = log.display(),
        )
    };
    write_policy(
        &pol,
        "app-files",
        &body(&format!("echo pre $BACKUPD_POLICY >> {}", log.display())),
    );
    // No repository or password in the environment: all from the policy.
    let out = backupd()
        .arg("--policies")
        .arg(&pol)
        .args(["backup", "--policy", "app-files", "--json"])
        .run()
        .ok();
    let id = out.json()["snapshot_id"].as_str().unwrap().to_string();
    let hooks = fs::read_to_string(&log).unwrap();
    assert_eq!(
        hooks,
        format!("pre app-files\npost app-files success {id}\n"),
        "{}",
        out.describe()
    );
    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["policy"], "app-files");
    assert_eq!(snaps[0]["tags"], serde_json::json!(["nightly", "app"]));
    let ls = repo.ok(&["ls", "latest"]).stdout();
    assert!(ls.contains("app.conf") && !ls.contains("big.tmp"), "{ls}");

    // A failing pre hook: no backup, on_failure runs, exit 1 naming the hook.
    fs::remove_file(&log).unwrap();
    write_policy(&pol, "app-files", &body("exit 4"));
    backupd()
        .arg("--policies")
        .arg(&pol)
        .args(["backup", "--policy", "app-files"])
        .run()
        .expect(1)
        .stderr_has("pre hook \"exit 4\" failed");
    assert_eq!(fs::read_to_string(&log).unwrap(), "failed failure\n");
    assert_eq!(repo.snapshots().len(), 1);

    // An unknown policy names the ones there are.
    backupd()
        .arg("--policies")
        .arg(&pol)
        .args(["backup", "--policy", "nope"])
        .run()
        .expect(1)
        .stderr_has("no policy named \"nope\"")
        .stderr_has("app-files");
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn forget_applies_keep_rules_per_group_and_twice_is_once() {
    let repo = Repo::new();
    let src = repo.scratch("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"data").unwrap();
    let other = repo.scratch("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("g"), b"more").unwrap();
    // src: two a day for four days (12:00 and 18:00 UTC); other: one old snapshot.
    let mut made = vec![];
    for day in 1..=4 {
        for hour in [12, 18] {
            let t = format!("2026-11-0{day} {hour}:00:00+00");
            let s = repo.backup(&[src.to_str().unwrap(), "--time", &t]);
            made.push((t, s["snapshot_id"].as_str().unwrap().to_string()));
        }
    }
    repo.backup(&[other.to_str().unwrap(), "--time", "2025-01-01 00:00:00+00"]);
    let before = repo.snapshots();
    assert_eq!(before.len(), 9);

    let dry = repo
        .cmd()
        .args([
            "forget",
            "--keep-daily",
            "2",
            "--keep-last",
            "1",
            "--dry-run",
            "--json",
        ])
        .run()
        .ok()
        .json();
    assert_eq!(repo.snapshots().len(), 9, "a dry run removes nothing");
    let groups = dry["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 2, "{dry}");
    let src_group = groups
        .iter()
        .find(|g| g["keep"].as_array().unwrap().len() > 1)
        .unwrap();
    let kept: Vec<(String, Vec<String>)> = src_group["keep"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().to_string(),
                k["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_string())
                    .collect(),
            )
        })
        .collect();
    // Newest (11-04 18:00) kept by newest, last and daily; 11-03 18:00 by daily.
    assert_eq!(
        kept,
        vec![
            (
                made[7].1.clone(),
                vec![
                    "newest snapshot".to_string(),
                    "last snapshot".into(),
                    "daily snapshot".into()
                ]
            ),
            (made[5].1.clone(), vec!["daily snapshot".to_string()]),
        ]
    );
    // The other path is a group of its own: its rules are counted separately.
    let other_group = groups
        .iter()
        .find(|g| !std::ptr::eq(*g, src_group))
        .unwrap();
    assert_eq!(
        other_group["keep"][0]["reasons"],
        serde_json::json!(["newest snapshot", "last snapshot", "daily snapshot"])
    );
    assert_eq!(other_group["remove"], serde_json::json!([]));

    let out = repo
        .cmd()
        .args(["forget", "--keep-daily", "2", "--keep-last", "1"])
        .run()
        .ok();
    assert!(
        out.stdout().contains("removed 6 snapshot(s)"),
        "{}",
        out.describe()
    );
    let mut left = ids(&serde_json::json!(repo.snapshots()));
    left.sort();
    let other_id = before
        .iter()
        .find(|s| s["paths"][0].as_str().unwrap().ends_with("/other"))
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let mut want = vec![made[7].1.clone(), made[5].1.clone(), other_id];
    want.sort();
    assert_eq!(left, want);

    // Forget twice = once.
    let again = repo
        .cmd()
        .args(["forget", "--keep-daily", "2", "--keep-last", "1", "--json"])
        .run()
        .ok()
        .json();
    assert_eq!(again["removed"], serde_json::json!([]));
    // What is left still restores.
    repo.ok(&["check", "--read-data"]);

    // No rule and no id: refused.
    repo.run(&["forget"])
        .expect(1)
        .stderr_has("no keep-* option");
    // By id.
    repo.ok(&["forget", &made[5].1[..8]]);
    assert_eq!(repo.snapshots().len(), 2);
    // With --prune and --json: one JSON object, the prune report inside.
    let v = repo
        .cmd()
        .args([
            "forget",
            "--keep-last",
            "1",
            "--prune",
            "--grace",
            "0s",
            "--json",
        ])
        .run()
        .ok()
        .json();
    assert!(v["prune"]["packs"].as_u64().unwrap() >= 1, "{v}");
    assert_eq!(v["removed"], serde_json::json!([]), "{v}");
}

/// Rewrites every occurrence of the given absolute prefixes in a policy file so that the
/// example's paths (and its hooks' paths) live under `root`.
fn reroot(d: &PolicyDir, file: &str, root: &Path, prefixes: &[&str]) {
    let path = d.policies().join(file);
    let mut text = fs::read_to_string(&path).unwrap();
    for p in prefixes {
        text = text.replace(p, &format!("{}{p}", root.display()));
    }
    fs::write(&path, text).unwrap();
}

#[test]
fn runnable_example_files_policy_really_runs_into_s3_with_its_hooks() {
    // finchat-sec-qa-files: files + an SQLite copy made by its pre hook, into S3 with a
    // credentials file, exactly as shipped except for where things are.
    let repo = Repo::new_s3();
    let d = PolicyDir::examples();
    let root = repo.scratch("root");
    for dir in [
        "app/config",
        "app/data",
        "home/finchat/.cache/finchat_sec_qa/tmp",
        "var/log/finchat",
        "var/tmp",
    ] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    fs::write(root.join("app/config/settings.yaml"), b"model: sec-qa\n").unwrap();
    fs::write(
        root.join("home/finchat/.cache/finchat_sec_qa/answers.json"),
        b"{}\n",
    )
    .unwrap();
    fs::write(
        root.join("home/finchat/.cache/finchat_sec_qa/tmp/scratch"),
        b"x",
    )
    .unwrap();
    fs::write(root.join("var/log/finchat/app.log"), b"started\n").unwrap();
    fs::write(root.join("var/log/finchat/old.log.gz"), b"gz").unwrap();
    let db = root.join("app/data/finchat.db");
    let st = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("CREATE TABLE q(id INTEGER PRIMARY KEY, text TEXT); INSERT INTO q(text) VALUES ('10-K risk factors');")
        .status()
        .expect("sqlite3");
    assert!(st.success());
    reroot(
        &d,
        "finchat-sec-qa-files.toml",
        &root,
        &["/app/", "/home/finchat/", "/var/log/finchat", "/var/tmp/"],
    );
    let creds = d.secret("aws-credentials");
    fs::write(
        &creds,
        format!("[default]\naws_access_key_id = {S3_ACCESS_KEY}\naws_secret_access_key = {S3_SECRET_KEY}\n"),
    )
    .unwrap();
    d.edit("finchat-sec-qa-files.toml", |doc| {
        doc["repository"]["location"] = toml_edit::value(repo.location.clone());
        // The test server knows no storage classes.
        doc["repository"]
            .as_table_mut()
            .unwrap()
            .remove("s3_storage_class");
    });
    backupd()
        .args(["policy", "check"])
        .arg(d.policies())
        .run()
        .ok();
    // No AWS_* variables: the credentials come from the policy's file.
    let out = backupd()
        .arg("--policies")
        .arg(d.policies())
        .env("BACKUPD_CACHE_DIR", repo.scratch("cache"))
        .args(["backup", "--policy", "finchat-sec-qa-files", "--json"])
        .run()
        .ok();
    assert!(
        !root.join("var/tmp/finchat-backup.db").exists(),
        "the post hook removes the copy:\n{}",
        out.describe()
    );
    let snaps = repo.snapshots();
    assert_eq!(snaps.len(), 1);
    assert_eq!(snaps[0]["policy"], "finchat-sec-qa-files");
    let target = repo.scratch("restored");
    repo.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    let under = |p: &str| target.join(root.strip_prefix("/").unwrap()).join(p);
    assert_eq!(
        fs::read(under("app/config/settings.yaml")).unwrap(),
        b"model: sec-qa\n"
    );
    assert!(under("var/log/finchat/app.log").exists());
    assert!(
        !under("var/log/finchat/old.log.gz").exists(),
        "*.gz is excluded"
    );
    assert!(!under("home/finchat/.cache/finchat_sec_qa/tmp").exists());
    // The SQLite copy is a consistent database with the row.
    let q = std::process::Command::new("sqlite3")
        .arg(under("var/tmp/finchat-backup.db"))
        .arg("SELECT text FROM q")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&q.stdout).trim(),
        "10-K risk factors"
    );
}

#[test]
fn runnable_example_postgres_and_pg_dump_policies_really_run() {
    use super::pgserver::{PgEnv, PG_BIN};
    let env = PgEnv::new();
    let cluster = env.cluster("main");
    cluster.sql("CREATE TABLE users(id int primary key, name text); INSERT INTO users SELECT g, 'u' || g FROM generate_series(1, 500) g;");
    // The database the shipped pg_dump command names.
    cluster.sql("CREATE DATABASE stock_analysis");
    cluster.sql_in(
        "stock_analysis",
        "CREATE TABLE users(id int primary key, name text); INSERT INTO users SELECT g, 's' || g FROM generate_series(1, 300) g;",
    );
    let d = PolicyDir::examples();
    d.point_finnexus_at(&env, &cluster);
    let pw = env.password_file.display().to_string();
    d.edit("stock-analysis-pg-dump.toml", |doc| {
        doc["repository"]["location"] = toml_edit::value(env.location.clone());
        doc["repository"]["password_file"] = toml_edit::value(pw.clone());
        let r = doc["repository"].as_table_mut().unwrap();
        r.remove("s3_credentials_file");
        r.remove("s3_region");
        // The shipped command as shipped, but for where the server listens: its -h
        // (a socket directory) becomes this server's address, and -p its port.
        let shipped: Vec<String> = doc["source"]["command"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let mut argv = toml_edit::Array::new();
        let mut args = shipped.iter();
        while let Some(a) = args.next() {
            argv.push(a.as_str());
            if a == "-h" {
                args.next().expect("-h takes a value");
                argv.push("127.0.0.1");
                argv.push("-p");
                argv.push(cluster.port.to_string());
            }
        }
        assert_eq!(argv.len(), shipped.len() + 2, "{shipped:?}");
        doc["source"]["command"] = toml_edit::value(argv);
    });
    for name in ["finnexusai-postgres", "stock-analysis-pg-dump"] {
        backupd()
            .arg("--policies")
            .arg(d.policies())
            .args(["backup", "--policy", name])
            .run()
            .ok();
    }
    let snaps = env.cmd().args(["snapshots", "--json"]).run().ok().json();
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 2);
    let base = snaps
        .iter()
        .find(|s| s["policy"] == "finnexusai-postgres")
        .unwrap();
    assert_eq!(base["source"], "postgres");
    assert!(base["postgres"]["start_lsn"].is_string(), "{base}");
    let dump = snaps
        .iter()
        .find(|s| s["policy"] == "stock-analysis-pg-dump")
        .unwrap();
    assert_eq!(dump["source"], "command");
    // The dump is a custom-format archive pg_restore reads, with the users table.
    let out = env
        .cmd()
        .args(["dump", dump["id"].as_str().unwrap(), "stock_analysis.dump"])
        .run()
        .ok();
    let f = env.path("dump.bin");
    fs::write(&f, &out.stdout).unwrap();
    let list = std::process::Command::new(format!("{PG_BIN}/pg_restore"))
        .arg("--list")
        .arg(&f)
        .output()
        .unwrap();
    assert!(list.status.success());
    assert!(String::from_utf8_lossy(&list.stdout).contains("TABLE public users"));
    // And it restores: into a new database, with its rows.
    cluster.sql("CREATE DATABASE restored_dump");
    let st = std::process::Command::new(format!("{PG_BIN}/pg_restore"))
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "restored_dump",
            "-p",
        ])
        .arg(cluster.port.to_string())
        .arg(&f)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        cluster.sql_in("restored_dump", "select count(*) from users"),
        "300"
    );

    // The base backup restores too: a new server, started, with the rows.
    let (restored, _) =
        super::pg::restore_at(&env, "latest", "restored-base", &["--archive-mode", "off"]);
    assert_eq!(restored.count("select count(*) from users"), 500);
}
